-- usage_requests is the app's table (its webhook inserts every request),
-- made by the app before any migration. usage-agg adds to it only the
-- triggers in 30_triggers/usage_requests.sql, and the setting below. What
-- it relies on: ids from the id sequence, never given by hand (the cursor
-- rests on it).
--
-- The safe horizon reads how far the id sequence has handed out ids, which
-- is only an upper bound on ids in use if no session holds cached values:
-- keep CACHE 1 (SERIAL's default). The run-time checks refuse a cache above
-- 1 and a column whose default is not that sequence.
DO $$
DECLARE
  seq text := pg_get_serial_sequence('public.usage_requests', 'id');
BEGIN
  IF seq IS NULL THEN
    RAISE EXCEPTION 'usage_requests.id has no sequence: usage-agg needs the seed schema (id SERIAL PRIMARY KEY)';
  END IF;
  EXECUTE format('ALTER SEQUENCE %s CACHE 1', seq);
END $$;

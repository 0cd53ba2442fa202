-- How far the id sequence has handed out ids, which the safe horizon and
-- the run-time checks rest on: its last value once called; before its first
-- call since a start or a RESTART, the value before the next one
-- (pg_sequence_last_value is NULL then, and was read as 0: after
-- `ALTER SEQUENCE ... RESTART WITH n`, a rebase counted to a horizon of 0
-- and the preflight saw every row as above the sequence; found by the
-- model-based test). NULL without a sequence.
CREATE OR REPLACE FUNCTION public.usage_agg_sequence_handed_out()
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  seq    regclass := pg_get_serial_sequence('public.usage_requests', 'id')::regclass;
  v      bigint;
  called boolean;
  inc    bigint;
BEGIN
  IF seq IS NULL THEN
    RETURN NULL;
  END IF;
  EXECUTE format('SELECT last_value, is_called FROM %s', seq) INTO v, called;
  SELECT seqincrement INTO inc FROM pg_sequence WHERE seqrelid = seq;
  RETURN CASE WHEN called THEN v ELSE v - inc END;
END
$$;

-- Its owner alone: usage-agg's own functions call it, never the API.
REVOKE ALL ON FUNCTION public.usage_agg_sequence_handed_out() FROM PUBLIC, anon, authenticated, service_role;

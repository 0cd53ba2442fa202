-- The safe horizon (docs/semantics.md, trap 4): the highest id H such that
-- no transaction that could still commit a row with id <= H is open.
--
-- An id is drawn when the row is inserted but becomes visible at commit, so
-- id 100 can appear after 101 was read. The technique is the one Citus'
-- incremental rollups use (and Crunchy Data's pg_incremental after it): read
-- how far the sequence has handed out ids (usage_agg_sequence_handed_out),
-- then wait for every transaction that was writing the table at that moment
-- to end. Citus waits by taking LOCK ... IN EXCLUSIVE MODE, which also
-- queues the webhook's new inserts behind it while it waits; here the same
-- set of writers is read from pg_locks (an INSERT takes ROW EXCLUSIVE on the
-- table before it draws an id, so any transaction holding an id <= H not
-- yet committed holds that lock when H is read) and polled until they are
-- gone. The webhook is never blocked. A prepared (two-phase) transaction
-- holds its locks with no backend (a NULL pid): it is a writer like any
-- other until COMMIT PREPARED or ROLLBACK PREPARED. The wait is bounded:
-- when writers outlast it, horizon is NULL and the caller counts nothing
-- new this time.
CREATE OR REPLACE FUNCTION public.usage_agg_safe_horizon(max_wait_ms integer DEFAULT 2000)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  candidate bigint;
  writers   text[];
  prepared  bigint;
  first     boolean := true;
  deadline  timestamptz := clock_timestamp() + make_interval(secs => greatest(max_wait_ms, 0) / 1000.0);
BEGIN
  candidate := coalesce(public.usage_agg_sequence_handed_out(), 0);
  LOOP
    SELECT array_agg(DISTINCT virtualtransaction), count(*) FILTER (WHERE pid IS NULL)
      INTO writers, prepared
      FROM pg_locks
     WHERE locktype = 'relation'
       AND database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
       AND relation = 'public.usage_requests'::regclass
       AND mode = 'RowExclusiveLock'
       AND (pid IS NULL OR pid <> pg_backend_pid())
       AND (first OR virtualtransaction = ANY (writers));
    first := false;
    EXIT WHEN writers IS NULL OR clock_timestamp() >= deadline;
    PERFORM pg_sleep(0.005);
  END LOOP;
  IF writers IS NOT NULL THEN
    RETURN jsonb_build_object('horizon', NULL, 'candidate', candidate,
                              'writers_in_flight', cardinality(writers), 'prepared_in_flight', prepared);
  END IF;
  RETURN jsonb_build_object('horizon', candidate, 'candidate', candidate, 'writers_in_flight', 0,
                            'prepared_in_flight', 0);
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_safe_horizon(integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_safe_horizon(integer) TO service_role;

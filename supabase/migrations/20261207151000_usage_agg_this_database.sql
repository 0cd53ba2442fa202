-- usage-agg: writers in this database only (issue 17, found by the suite).
--
-- Apply after 20261207150000_usage_agg_quota_races.sql. Idempotent. The
-- current definitions are in supabase/schemas/.
--
-- pg_locks and pg_prepared_xacts show every database of the cluster, and a
-- database cloned from another (a template, a branch) has its tables at
-- the same oids: the safe horizon waited for a transaction writing
-- usage_requests in another database, a prepared one for ever (exit 75
-- every run), and the lease named another database's prepared
-- transactions. Both look at this database only now.

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

CREATE OR REPLACE FUNCTION public.usage_agg_acquire_lease(
  p_job text, p_owner text, p_ttl_seconds integer, p_steal_from text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  s public.usage_aggregation_state;
  held jsonb;
  was text := current_setting('lock_timeout');
BEGIN
  BEGIN
    -- Runs hold the row for milliseconds. A transaction that inserted a
    -- row at or below the cursor holds it until it ends (the trigger that
    -- records the reset wrote it): a prepared one, for good. The INSERT
    -- waits on that transaction too (it checks the key's newest version).
    PERFORM set_config('lock_timeout', '3s', true);
    INSERT INTO public.usage_aggregation_state (job) VALUES (p_job) ON CONFLICT (job) DO NOTHING;
    SELECT * INTO s FROM public.usage_aggregation_state WHERE job = p_job FOR UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    SELECT coalesce(jsonb_agg(x.gid ORDER BY x.prepared), '[]') INTO held FROM pg_catalog.pg_prepared_xacts x
     WHERE x.database = current_database();
    RETURN jsonb_build_object('acquired', false, 'blocked', true, 'prepared', held, 'now', now());
  END;
  PERFORM set_config('lock_timeout', was, true);
  IF s.lease_owner IS NOT NULL AND s.lease_owner <> p_owner AND s.lease_expires_at > now()
     AND s.lease_owner IS DISTINCT FROM p_steal_from THEN
    RETURN jsonb_build_object('acquired', false, 'owner', s.lease_owner, 'since', s.lease_taken_at,
                              'expires_at', s.lease_expires_at, 'cursor', s.cursor_id, 'now', now());
  END IF;
  UPDATE public.usage_aggregation_state
     SET lease_owner = p_owner, lease_taken_at = now(),
         lease_expires_at = now() + make_interval(secs => p_ttl_seconds),
         last_run_started_at = now(), updated_at = now()
   WHERE job = p_job;
  RETURN jsonb_build_object('acquired', true, 'owner', p_owner, 'since', now(),
                            'expires_at', now() + make_interval(secs => p_ttl_seconds),
                            'cursor', s.cursor_id, 'now', now());
END
$$;

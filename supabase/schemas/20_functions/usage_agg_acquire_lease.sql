-- The lease: saves work when runs overlap (cron plus a manual run); the
-- counts never depend on it (leases expire under stalled processes). All
-- times are the database's clock, the one clock every run shares.
--
-- Takes the lease for p_owner unless another owner holds it unexpired, or
-- takes it from p_steal_from when that is who holds it (a run on the same
-- host whose process is gone). Returns the state either way; or, when a
-- transaction holds the job's state row for more than 3 s (one that
-- inserted a row at or below the cursor: the reset trigger wrote the row),
-- `blocked` with the prepared transactions, so the run says which to end
-- rather than waiting for the statement timeout.
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

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_acquire_lease(text, text, integer, text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_acquire_lease(text, text, integer, text) TO service_role;

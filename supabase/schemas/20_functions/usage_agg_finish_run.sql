-- Records how a run ended (outcome, rows, and who ran it: a CLI on some
-- host, or pg_cron), which `status` shows, and lets the lease go if the run
-- still holds it, so that the next run need not wait for it to expire.
CREATE OR REPLACE FUNCTION public.usage_agg_finish_run(
  p_job text, p_owner text, p_outcome text, p_rows bigint)
RETURNS void
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  UPDATE public.usage_aggregation_state
     SET last_run_finished_at = now(), last_run_outcome = p_outcome, last_run_rows = p_rows,
         last_run_by = p_owner,
         last_success_at = CASE WHEN p_outcome IN ('ok', 'bad_rows') THEN now() ELSE last_success_at END,
         lease_owner = CASE WHEN lease_owner = p_owner THEN NULL ELSE lease_owner END,
         lease_expires_at = CASE WHEN lease_owner = p_owner THEN NULL ELSE lease_expires_at END,
         lease_taken_at = CASE WHEN lease_owner = p_owner THEN NULL ELSE lease_taken_at END,
         updated_at = now()
   WHERE job = p_job;
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_finish_run(text, text, text, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_finish_run(text, text, text, bigint) TO service_role;

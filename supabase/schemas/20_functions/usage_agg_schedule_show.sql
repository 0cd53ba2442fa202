-- The job 'usage-agg-<p_job>' (or null) and its last p_runs runs from
-- cron.job_run_details, newest first: what `schedule` and `status` show,
-- over the REST API alone. Each run with the alerts recorded between its
-- start and its end (alerts_recorded): its own, and any another writer
-- recorded meanwhile (a quota set, a reopening, or a CLI run when this one
-- found the lease held and stood aside).
CREATE OR REPLACE FUNCTION public.usage_agg_schedule_show(p_job text, p_runs integer DEFAULT 5)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  facts jsonb := public.usage_agg_cron_facts();
  j     jsonb;
  runs  jsonb;
BEGIN
  IF NOT (facts->>'pg_cron')::boolean THEN
    RETURN facts;
  END IF;
  SELECT to_jsonb(c) INTO j FROM cron.job c WHERE c.jobname = 'usage-agg-' || p_job AND c.username = current_user;
  IF j IS NOT NULL THEN
    SELECT coalesce(jsonb_agg(to_jsonb(r) - 'command' - 'username' - 'database'
                              || jsonb_build_object('alerts_recorded', (
                                   SELECT count(*) FROM public.portal_usage_alerts al
                                    WHERE al.crossed_at >= r.start_time
                                      AND al.crossed_at <= coalesce(r.end_time, now())))
                              ORDER BY r.runid DESC), '[]')
      INTO runs
      FROM (SELECT * FROM cron.job_run_details d WHERE d.jobid = (j->>'jobid')::bigint
             ORDER BY d.runid DESC LIMIT greatest(p_runs, 0)) r;
  END IF;
  RETURN facts || jsonb_build_object('job', j, 'runs', coalesce(runs, '[]'::jsonb));
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_schedule_show(text, integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_schedule_show(text, integer) TO service_role;

-- Installs or updates the pg_cron job 'usage-agg-<p_job>' (cron.schedule
-- updates a job of the same name and role), so that `usage-agg schedule`
-- works over the REST API alone. The command is built here, never taken
-- from the caller: the job runs as this function's owner. A time limit at
-- or above the statement timeout the job will run under is refused, with
-- the figure and where it came from: the timeout covers the whole CALL,
-- and would cancel the run under way. Without pg_cron in this database it
-- returns the facts ("pg_cron": false), for the CLI to say how to enable it.
CREATE OR REPLACE FUNCTION public.usage_agg_schedule(
  p_job text, p_schedule text, p_max_seconds integer DEFAULT 50)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  facts   jsonb := public.usage_agg_cron_facts();
  v_name  text := 'usage-agg-' || p_job;
  existed boolean;
  id      bigint;
  tmo     jsonb;
BEGIN
  IF NOT (facts->>'pg_cron')::boolean THEN
    RETURN facts;
  END IF;
  IF p_job IS NULL OR p_job !~ '^[a-z0-9_]{1,40}$' THEN
    RAISE EXCEPTION 'usage_agg_schedule: % is not a job name', p_job;
  END IF;
  IF p_max_seconds IS NULL OR p_max_seconds < 1 OR p_max_seconds > 86400 THEN
    RAISE EXCEPTION 'usage_agg_schedule: p_max_seconds must be from 1 to 86400';
  END IF;
  -- The job runs as this function's owner: its statement timeout covers
  -- the whole CALL, so a time limit at or above it would be cancelled with
  -- the run under way. Refused, with the figure and where it came from.
  tmo := public.usage_agg_cron_statement_timeout(p_job);
  IF (tmo->>'ms')::bigint > 0 AND p_max_seconds::bigint * 1000 >= (tmo->>'ms')::bigint THEN
    RETURN facts || jsonb_build_object('refused', 'time_limit', 'statement_timeout', tmo);
  END IF;
  existed := EXISTS (SELECT 1 FROM cron.job c WHERE c.jobname = v_name AND c.username = current_user);
  id := cron.schedule(v_name, p_schedule, format('CALL public.usage_agg_run_scheduled(%s)', p_max_seconds));
  RETURN facts || jsonb_build_object(
    'created', NOT existed,
    'job', (SELECT to_jsonb(j) FROM cron.job j WHERE j.jobid = id),
    'runs', '[]'::jsonb, 'statement_timeout', tmo);
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_schedule(text, text, integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_schedule(text, text, integer) TO service_role;

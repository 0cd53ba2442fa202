-- Removes the pg_cron job 'usage-agg-<p_job>', for `usage-agg schedule
-- --remove` over the REST API alone; "removed": false when there was none.
CREATE OR REPLACE FUNCTION public.usage_agg_unschedule(p_job text)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  facts jsonb := public.usage_agg_cron_facts();
  j     jsonb;
BEGIN
  IF NOT (facts->>'pg_cron')::boolean THEN
    RETURN facts;
  END IF;
  SELECT to_jsonb(c) INTO j FROM cron.job c WHERE c.jobname = 'usage-agg-' || p_job AND c.username = current_user;
  IF j IS NOT NULL THEN
    PERFORM cron.unschedule((j->>'jobid')::bigint);
  END IF;
  RETURN facts || jsonb_build_object('removed', j IS NOT NULL, 'job', j, 'runs', '[]'::jsonb);
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_unschedule(text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_unschedule(text) TO service_role;

-- pg_cron, as the schedule functions see it: created in this database, its
-- version, and whether the server has it to create; so that `usage-agg
-- schedule` can say how to enable it rather than fail.
CREATE OR REPLACE FUNCTION public.usage_agg_cron_facts()
RETURNS jsonb
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  SELECT jsonb_build_object(
    'pg_cron', EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron'),
    'version', (SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'),
    'available', EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_cron'));
$$;

-- Its owner alone: usage-agg's own functions call it, never the API.
REVOKE ALL ON FUNCTION public.usage_agg_cron_facts() FROM PUBLIC, anon, authenticated, service_role;

-- The closed months, for a run to route rows by (read once per run), and a
-- generation that tells a run when a close or reopening happened since.
CREATE OR REPLACE FUNCTION public.usage_agg_periods()
RETURNS jsonb
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  SELECT jsonb_build_object(
    'closed', (SELECT coalesce(jsonb_agg(month_year ORDER BY month_year), '[]')
                 FROM public.usage_agg_closed_months WHERE closed),
    -- Every close and reopening adds an event: a run that compares this
    -- with what it read sees a reopen-then-close, which leaves the list of
    -- closed months as it was.
    'generation', (SELECT coalesce(max(id), 0) FROM public.usage_agg_period_events),
    'now', now(),
    'current_month', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM'))
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_periods() FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_periods() TO service_role;

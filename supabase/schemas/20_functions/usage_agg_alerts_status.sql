-- The undelivered alerts in numbers, for status, doctor and the metrics.
CREATE OR REPLACE FUNCTION public.usage_agg_alerts_status()
RETURNS jsonb
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  SELECT jsonb_build_object(
    'undelivered', count(*),
    'oldest_crossed_at', min(a.crossed_at),
    'oldest_age_seconds', floor(extract(epoch FROM now() - min(a.crossed_at)))::bigint,
    'attempted', count(*) FILTER (WHERE a.attempts > 0),
    'last_error', (SELECT b.last_error FROM public.portal_usage_alerts b
                    WHERE b.delivered_at IS NULL AND b.last_error IS NOT NULL
                    ORDER BY b.last_attempt_at DESC NULLS LAST LIMIT 1),
    'quotas', (SELECT count(*) FROM public.portal_usage_quotas),
    'alerts', (SELECT count(*) FROM public.portal_usage_alerts),
    'now', now())
    FROM public.portal_usage_alerts a
   WHERE a.delivered_at IS NULL
$$;

-- service_role alone: the CLI calls it over REST with the service key.
REVOKE ALL ON FUNCTION public.usage_agg_alerts_status() FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_alerts_status() TO service_role;

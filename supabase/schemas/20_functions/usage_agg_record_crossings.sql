-- The crossings of the months a rebuild wrote over REST, outside the rule
-- book, of a portal whose quota was just set, and of keys a killed run left
-- above the cursor: recorded as the rule book records them.
CREATE OR REPLACE FUNCTION public.usage_agg_record_crossings(
  p_months text[] DEFAULT NULL, p_portal_id bigint DEFAULT NULL, p_above bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  alerts jsonb;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM public.portal_usage_quotas) THEN
    RETURN '[]'::jsonb;
  END IF;
  LOCK TABLE public.usage_agg_closed_months IN SHARE MODE;
  WITH used AS (
    SELECT m.portal_id, m.month_year,
           m.request_count::bigint + coalesce(x.late_n, 0) AS n
      FROM public.portal_usage_monthly m
      LEFT JOIN LATERAL (
        SELECT sum(a.request_count) AS late_n
          FROM public.portal_usage_adjustments a
         WHERE a.portal_id = m.portal_id AND a.month_year = m.month_year AND a.source = 'late') x ON true
     WHERE (p_months IS NULL OR m.month_year = ANY (p_months))
       AND (p_portal_id IS NULL OR m.portal_id = p_portal_id)
       AND (p_above IS NULL OR m.last_request_id > p_above)
       AND public.usage_agg_valid_key(m.portal_id, m.month_year)
       AND NOT public.usage_agg_is_closed(m.month_year)
  ), reached AS (
    SELECT u.portal_id, u.month_year, t.pct, q.request_limit, u.n
      FROM used u
      CROSS JOIN LATERAL (
        SELECT coalesce(own.monthly_request_limit, dflt.monthly_request_limit) AS request_limit,
               CASE WHEN own.monthly_request_limit IS NOT NULL THEN own.thresholds_percent
                    ELSE dflt.thresholds_percent END AS thresholds
          FROM (SELECT 1) one
          LEFT JOIN public.portal_usage_quotas own ON coalesce(own.portal_id, 0) = u.portal_id
          LEFT JOIN public.portal_usage_quotas dflt ON coalesce(dflt.portal_id, 0) = 0) q
      CROSS JOIN LATERAL unnest(q.thresholds) AS t(pct)
     WHERE q.request_limit IS NOT NULL
       AND u.n::numeric * 100 >= q.request_limit::numeric * t.pct
  ), rec AS (
    INSERT INTO public.portal_usage_alerts AS al
           (portal_id, month_year, threshold_percent, request_limit, request_count, crossed_at)
    SELECT r.portal_id, r.month_year, r.pct, r.request_limit, r.n, now()
      FROM reached r
     ORDER BY r.portal_id, r.month_year, r.pct
    ON CONFLICT (portal_id, month_year, threshold_percent, request_limit) DO NOTHING
    RETURNING al.id, al.portal_id, al.month_year, al.threshold_percent, al.request_limit, al.request_count
  )
  SELECT coalesce(jsonb_agg(jsonb_build_object(
           'id', id, 'portal_id', portal_id, 'month_year', month_year, 'threshold_percent', threshold_percent,
           'request_limit', request_limit, 'request_count', request_count)
           ORDER BY portal_id, month_year, threshold_percent), '[]')
    INTO alerts FROM rec;
  RETURN alerts;
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
REVOKE ALL ON FUNCTION public.usage_agg_record_crossings(text[], bigint, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_record_crossings(text[], bigint, bigint) TO service_role;

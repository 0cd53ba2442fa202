-- What a run would record as alerts, recording nothing (`--dry-run`): the
-- crossings of the job's pending months (usage_agg_sweep_pending_crossings),
-- of keys written above p_above (the catch-up before counting), and of a
-- rebuild that would write p_keys (each {portal_id, month_year, c}: the
-- monthly row's request_count it would write) and record the crossings of
-- p_months. A month's usage is its monthly row (or what p_keys would
-- write) plus its late adjustments, as usage_agg_record_crossings reads
-- it; closed months fire nothing; an alert already recorded is not shown.
-- NULL p_months and p_above mean none (not every one).
CREATE OR REPLACE FUNCTION public.usage_agg_preview_crossings(
  p_job text DEFAULT 'default', p_keys jsonb DEFAULT '[]', p_months text[] DEFAULT NULL,
  p_above bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  months text[];
  alerts jsonb;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM public.portal_usage_quotas) THEN
    RETURN '[]'::jsonb;
  END IF;
  SELECT coalesce(s.crossings_pending, '{}') || coalesce(p_months, '{}') INTO months
    FROM public.usage_aggregation_state s WHERE s.job = p_job;
  months := coalesce(months, p_months, '{}');
  WITH planned AS (
    SELECT (k->>'portal_id')::bigint AS portal_id, k->>'month_year' AS month_year, (k->>'c')::bigint AS c
      FROM jsonb_array_elements(coalesce(p_keys, '[]'::jsonb)) k
  ), stored AS (
    SELECT m.portal_id, m.month_year, m.request_count::bigint AS c
      FROM public.portal_usage_monthly m WHERE m.month_year = ANY (months)
    UNION
    SELECT m.portal_id, m.month_year, m.request_count::bigint
      FROM public.portal_usage_monthly m WHERE p_above IS NOT NULL AND m.last_request_id > p_above
  ), keys AS (
    SELECT coalesce(p.portal_id, s.portal_id) AS portal_id, coalesce(p.month_year, s.month_year) AS month_year,
           coalesce(p.c, s.c) AS c
      FROM stored s FULL JOIN planned p ON p.portal_id = s.portal_id AND p.month_year = s.month_year
  ), used AS (
    SELECT k.portal_id, k.month_year, k.c + coalesce(x.late_n, 0) AS n
      FROM keys k
      LEFT JOIN LATERAL (
        SELECT sum(a.request_count) AS late_n
          FROM public.portal_usage_adjustments a
         WHERE a.portal_id = k.portal_id AND a.month_year = k.month_year AND a.source = 'late') x ON true
     WHERE public.usage_agg_valid_key(k.portal_id, k.month_year)
       AND NOT public.usage_agg_is_closed(k.month_year)
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
       AND NOT EXISTS (
         SELECT 1 FROM public.portal_usage_alerts al
          WHERE al.portal_id = u.portal_id AND al.month_year = u.month_year
            AND al.threshold_percent = t.pct AND al.request_limit = q.request_limit)
  )
  SELECT coalesce(jsonb_agg(jsonb_build_object(
           'portal_id', portal_id, 'month_year', month_year, 'threshold_percent', pct,
           'request_limit', request_limit, 'request_count', n)
           ORDER BY portal_id, month_year, pct), '[]')
    INTO alerts FROM reached;
  RETURN alerts;
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
REVOKE ALL ON FUNCTION public.usage_agg_preview_crossings(text, jsonb, text[], bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_preview_crossings(text, jsonb, text[], bigint) TO service_role;

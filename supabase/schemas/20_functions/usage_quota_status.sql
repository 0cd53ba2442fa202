-- A portal's month against its quota, for the app (docs/quotas.md): used
-- right now, limit, percentage, a straight-line projection.
CREATE OR REPLACE FUNCTION public.usage_quota_status(p_portal_id bigint, p_month text DEFAULT NULL)
RETURNS TABLE (portal_id bigint, month_year text, used bigint, request_limit bigint, percent numeric,
               projected bigint, projected_percent numeric, thresholds_percent integer[], quota text,
               alerted_percent integer[])
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  m       text := coalesce(nullif(p_month, ''), to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM'));
  m_start timestamptz;
  m_end   timestamptz;
  elapsed numeric;
BEGIN
  IF NOT public.usage_agg_valid_month(m) THEN
    RAISE EXCEPTION 'usage_quota_status: % is not a month (YYYY-MM)', m USING ERRCODE = '22023';
  END IF;
  IF p_portal_id IS NULL OR p_portal_id < 1 THEN
    RAISE EXCEPTION 'usage_quota_status: % is not a portal id (1 or more)', p_portal_id USING ERRCODE = '22023';
  END IF;
  portal_id := p_portal_id;
  month_year := m;
  SELECT u.request_count INTO used FROM public.usage_current(p_portal_id, m) u;
  used := coalesce(used, 0);
  SELECT q.monthly_request_limit, q.thresholds_percent,
         CASE WHEN q.portal_id IS NULL THEN 'default' ELSE 'portal' END
    INTO request_limit, thresholds_percent, quota
    FROM public.portal_usage_quotas q
   WHERE coalesce(q.portal_id, 0) IN (p_portal_id, 0)
   ORDER BY q.portal_id NULLS LAST LIMIT 1;
  quota := coalesce(quota, 'none');
  m_start := to_date(m || '-01', 'YYYY-MM-DD')::timestamp AT TIME ZONE 'UTC';
  m_end := public.usage_agg_month_end(m);
  IF now() >= m_end THEN
    projected := used;
  ELSIF now() < m_start THEN
    projected := used;
  ELSE
    elapsed := greatest(extract(epoch FROM now() - m_start), 3600);
    projected := ceil(used * extract(epoch FROM m_end - m_start) / elapsed)::bigint;
  END IF;
  IF request_limit IS NOT NULL THEN
    percent := round(used * 100.0 / request_limit, 2);
    projected_percent := round(projected * 100.0 / request_limit, 2);
    SELECT coalesce(array_agg(a.threshold_percent ORDER BY a.threshold_percent), '{}')
      INTO alerted_percent
      FROM public.portal_usage_alerts a
     WHERE a.portal_id = p_portal_id AND a.month_year = m AND a.request_limit = usage_quota_status.request_limit;
  ELSE
    alerted_percent := '{}';
  END IF;
  RETURN NEXT;
END
$$;

-- service_role alone, as usage_current: it reads any portal's usage past
-- row level security, so the app calls it server-side.
REVOKE ALL ON FUNCTION public.usage_quota_status(bigint, text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_quota_status(bigint, text) TO service_role;

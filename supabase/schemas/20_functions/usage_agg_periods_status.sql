-- What `usage-agg status` shows about periods, without scanning raw rows:
-- the closed months, and how many good raw rows of them are still there
-- (stored totals minus what prune deleted).
CREATE OR REPLACE FUNCTION public.usage_agg_periods_status(p_grace_seconds bigint DEFAULT 259200)
RETURNS jsonb
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  WITH closed AS (
    SELECT * FROM public.usage_agg_closed_months WHERE closed
  ), stored AS (
    SELECT month_year, sum(request_count)::bigint AS n FROM public.portal_usage_monthly
     WHERE month_year IN (SELECT month_year FROM closed) GROUP BY 1
  ), late AS (
    SELECT month_year, sum(request_count)::bigint AS n FROM public.portal_usage_adjustments
     WHERE source = 'late' AND month_year IN (SELECT month_year FROM closed) GROUP BY 1
  ), pruned AS (
    SELECT month_year, sum(request_count)::bigint AS n FROM public.usage_agg_pruned GROUP BY 1
  ), closable AS (
    SELECT DISTINCT m.month_year FROM public.portal_usage_monthly m
     WHERE NOT public.usage_agg_is_closed(m.month_year)
       AND public.usage_agg_valid_month(m.month_year)
       AND public.usage_agg_month_end(m.month_year) + make_interval(secs => greatest(p_grace_seconds, 0)) <= now()
  )
  SELECT jsonb_build_object(
    'closed', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                 'month', c.month_year, 'closed_at', c.closed_at, 'closed_by', c.closed_by,
                 'up_to_id', c.up_to_id, 'keys', c.keys, 'requests', c.request_count,
                 'successes', c.success_count, 'errors', c.error_count,
                 'booked_adjustments', c.booked_request_count,
                 'booked_now', (SELECT coalesce(sum(a.request_count), 0) FROM public.portal_usage_adjustments a
                                 WHERE a.booked_month = c.month_year),
                 'pruned_through', c.pruned_through,
                 'rows_left', coalesce(s.n, 0) + coalesce(l.n, 0) - coalesce(p.n, 0))
                 ORDER BY c.month_year), '[]')
                 FROM closed c
                 LEFT JOIN stored s USING (month_year) LEFT JOIN late l USING (month_year)
                 LEFT JOIN pruned p USING (month_year)),
    'newest_closed', (SELECT max(month_year) FROM closed),
    'reopened', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'month', month_year, 'reopened_at', reopened_at, 'reopened_by', reopened_by,
                   'reason', reopen_reason) ORDER BY month_year), '[]')
                   FROM public.usage_agg_closed_months WHERE NOT closed),
    'prunable_rows', (SELECT coalesce(sum(n), 0) FROM (
                        SELECT n FROM stored UNION ALL SELECT n FROM late
                        UNION ALL SELECT -p.n FROM pruned p WHERE p.month_year IN (SELECT month_year FROM closed)) x),
    'closable', (SELECT coalesce(jsonb_agg(month_year ORDER BY month_year), '[]') FROM closable),
    'now', now())
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_periods_status(bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_periods_status(bigint) TO service_role;

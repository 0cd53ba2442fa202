-- A month's usage right now, for a quota check between runs: its stored
-- totals, its late adjustments, and its good raw rows that no run has
-- counted yet (above the cursor and above what the key's rows already
-- hold). Reads the primary key's range above that point, so its cost grows
-- with the rows since the last run, not with history. p_month defaults to
-- the current month (UTC, by the database's clock).
CREATE OR REPLACE FUNCTION public.usage_current(p_portal_id bigint, p_month text DEFAULT NULL)
RETURNS TABLE (request_count bigint, success_count bigint, error_count bigint, last_request_at timestamp)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
-- A generic plan would estimate `id > $1` at a third of the table and may
-- scan it all; plan each call with its value.
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
  m     text := coalesce(nullif(p_month, ''), to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM'));
  c     bigint;
  mr    record;
  lr    record;
  rr    record;
  fl    bigint;
BEGIN
  IF NOT public.usage_agg_valid_month(m) THEN
    RAISE EXCEPTION 'usage_current: % is not a month (YYYY-MM)', m;
  END IF;
  SELECT coalesce(s.cursor_id, 0) INTO c FROM public.usage_aggregation_state s WHERE s.job = 'default';
  SELECT coalesce(t.request_count, 0)::bigint AS n, coalesce(t.success_count, 0)::bigint AS s,
         coalesce(t.error_count, 0)::bigint AS e, t.last_request_at AS at, t.last_request_id AS w
    INTO mr FROM public.portal_usage_monthly t WHERE t.portal_id = p_portal_id AND t.month_year = m;
  SELECT coalesce(sum(a.request_count), 0)::bigint AS n, coalesce(sum(a.success_count), 0)::bigint AS s,
         coalesce(sum(a.error_count), 0)::bigint AS e, max(a.last_request_at) AS at,
         max(a.last_request_id) AS w
    INTO lr FROM public.portal_usage_adjustments a
   WHERE a.portal_id = p_portal_id AND a.month_year = m AND a.source = 'late';
  fl := greatest(coalesce(c, 0), coalesce(mr.w, 0), coalesce(lr.w, 0));
  SELECT count(*) AS n, count(*) FILTER (WHERE r.success) AS s, count(*) FILTER (WHERE NOT r.success) AS e,
         max(r.request_timestamp) AS at
    INTO rr FROM public.usage_requests r
   WHERE r.id > fl AND r.portal_id = p_portal_id AND r.month_year = m
     AND r.success IS NOT NULL AND public.usage_agg_valid_time(r.request_timestamp);
  request_count := coalesce(mr.n, 0) + lr.n + rr.n;
  success_count := coalesce(mr.s, 0) + lr.s + rr.s;
  error_count := coalesce(mr.e, 0) + lr.e + rr.e;
  last_request_at := greatest(mr.at, lr.at, rr.at);
  RETURN NEXT;
END
$$;

-- service_role alone. It is SECURITY DEFINER and checks nothing of its
-- caller, so a signed-in user of the app would read any portal's usage past
-- row level security: the app calls it server-side with the service key, or
-- through a function of its own that checks the caller's portal.
REVOKE ALL ON FUNCTION public.usage_current(bigint, text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_current(bigint, text) TO service_role;

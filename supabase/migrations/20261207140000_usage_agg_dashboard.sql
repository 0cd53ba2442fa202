-- usage-agg: the dashboard's numbers in one call (issue 21).
--
-- Apply after 20261207120000_usage_agg_prune_guard.sql. Idempotent.
--
-- usage_portal_summary(p_portal_id, p_months) is what an app's usage page
-- reads, in one call and one snapshot: the current month exact right now,
-- its success and error rates and its straight-line projection; each of
-- the last p_months months as billing reads it; and the portal's quota
-- status once quotas exist. service_role's alone, like usage_current.
-- docs/dashboard.md documents it for the app.

-- One JSON value (docs/dashboard.md has an example):
--   version      1; a field is added, never renamed or removed;
--   portal_id;
--   as_of        the database's time of the snapshot (UTC, ...Z);
--   current      the current month (UTC), exact right now, as usage_current
--                reads it: its monthly row, its late adjustments and its
--                good raw rows no run has counted yet. requests, successes,
--                errors, success_rate and error_rate (percent, 2 decimals,
--                null without requests), last_request_at, month_start and
--                month_end (UTC), elapsed (the share of the month gone, 0
--                to 1) and projected_requests (requests / elapsed, rounded:
--                a straight line to the month's end; null at its first
--                instant);
--   months       the last p_months months, oldest first, the current one
--                last, every month present (zeros where nothing was used),
--                as billing reads them (docs/semantics.md, "Closed months"):
--                requests, successes, errors (the monthly row, as of the
--                last run), success_rate, error_rate, adjustments.late and
--                adjustments.manual (requests of the adjustments booked in
--                that month), billed (requests + both), closed;
--   quota        null, unless public.usage_quota_status(bigint, text)
--                exists (the quotas migration): then its answer for the
--                current month, as a JSON object.
-- Cost: the portal's monthly rows and adjustments in the window (index
-- scans), the closed months, and usage_current's read of the rows above
-- the cursor: O(months + uncounted tail), never the portal's history.
CREATE OR REPLACE FUNCTION public.usage_portal_summary(p_portal_id bigint, p_months integer DEFAULT 12)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  as_of    timestamptz := now();
  m_start  timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
  m_end    timestamp := date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month';
  m_now    text := to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM');
  m_first  text;
  span     numeric;
  elapsed  numeric;
  cur      record;
  months   jsonb;
  quota    jsonb;
  quota_fn regprocedure := to_regprocedure('public.usage_quota_status(bigint,text)');
  utc      constant text := 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"';
BEGIN
  IF p_portal_id IS NULL OR p_portal_id < 1 THEN
    RAISE EXCEPTION 'usage_portal_summary: the portal id must be a positive bigint, not %',
      coalesce(p_portal_id::text, 'NULL') USING ERRCODE = '22023';
  END IF;
  IF p_months IS NULL OR p_months NOT BETWEEN 1 AND 240 THEN
    RAISE EXCEPTION 'usage_portal_summary: p_months must be from 1 to 240, not %',
      coalesce(p_months::text, 'NULL') USING ERRCODE = '22023';
  END IF;
  m_first := to_char(m_start - make_interval(months => p_months - 1), 'YYYY-MM');

  -- The current month right now: the one definition, usage_current's (the
  -- same transaction, so the same clock and the same snapshot).
  SELECT c.request_count, c.success_count, c.error_count, c.last_request_at
    INTO cur FROM public.usage_current(p_portal_id, m_now) c;

  -- Each month of the window as billing reads it. Sums are numeric (JSON
  -- numbers are): no total wraps, whatever was booked before the bound on
  -- adjustments.
  WITH w AS (
    SELECT to_char(m_start - make_interval(months => g), 'YYYY-MM') AS month_year
      FROM generate_series(0, p_months - 1) g
  ), mo AS (
    SELECT t.month_year, t.request_count::numeric AS n, t.success_count::numeric AS s,
           t.error_count::numeric AS e
      FROM public.portal_usage_monthly t
     WHERE t.portal_id = p_portal_id AND t.month_year BETWEEN m_first AND m_now
  ), adj AS (
    SELECT a.booked_month AS month_year,
           coalesce(sum(a.request_count) FILTER (WHERE a.source = 'late'), 0) AS late,
           coalesce(sum(a.request_count) FILTER (WHERE a.source = 'manual'), 0) AS manual
      FROM public.portal_usage_adjustments a
     WHERE a.portal_id = p_portal_id AND a.booked_month BETWEEN m_first AND m_now
     GROUP BY a.booked_month
  )
  SELECT jsonb_agg(jsonb_build_object(
           'month', w.month_year,
           'requests', coalesce(mo.n, 0),
           'successes', coalesce(mo.s, 0),
           'errors', coalesce(mo.e, 0),
           'success_rate', CASE WHEN mo.n > 0 THEN round(100 * mo.s / mo.n, 2) END,
           'error_rate', CASE WHEN mo.n > 0 THEN round(100 * mo.e / mo.n, 2) END,
           'adjustments', jsonb_build_object('late', coalesce(adj.late, 0), 'manual', coalesce(adj.manual, 0)),
           'billed', coalesce(mo.n, 0) + coalesce(adj.late, 0) + coalesce(adj.manual, 0),
           'closed', coalesce(c.closed, false))
         ORDER BY w.month_year)
    INTO months
    FROM w
    LEFT JOIN mo USING (month_year)
    LEFT JOIN adj USING (month_year)
    LEFT JOIN public.usage_agg_closed_months c ON c.month_year = w.month_year;

  -- Quotas are another migration's (issue 20). Called only when it is
  -- applied, and only when its owner is this function's: it runs with this
  -- function's rights, so a function of that name made by anyone else is
  -- refused rather than run.
  IF quota_fn IS NOT NULL THEN
    IF (SELECT p.proowner FROM pg_proc p WHERE p.oid = quota_fn)
       IS DISTINCT FROM (SELECT p.proowner FROM pg_proc p
                          WHERE p.oid = 'public.usage_portal_summary(bigint,integer)'::regprocedure) THEN
      RAISE EXCEPTION 'usage_portal_summary: public.usage_quota_status is owned by %, not by %, who owns usage-agg''s functions: not called',
        (SELECT pg_get_userbyid(p.proowner) FROM pg_proc p WHERE p.oid = quota_fn),
        (SELECT pg_get_userbyid(p.proowner) FROM pg_proc p
          WHERE p.oid = 'public.usage_portal_summary(bigint,integer)'::regprocedure)
        USING ERRCODE = '42501';
    END IF;
    -- to_jsonb(q): the row as an object when it returns a row type, the
    -- value itself when it returns jsonb.
    EXECUTE 'SELECT to_jsonb(q) FROM public.usage_quota_status($1, $2) AS q LIMIT 1'
       INTO quota USING p_portal_id, m_now;
  END IF;

  span := extract(epoch FROM m_end - m_start);
  elapsed := extract(epoch FROM (as_of AT TIME ZONE 'UTC') - m_start);
  RETURN jsonb_build_object(
    'version', 1,
    'portal_id', p_portal_id,
    'as_of', to_char(as_of AT TIME ZONE 'UTC', utc),
    'current', jsonb_build_object(
      'month', m_now,
      'requests', cur.request_count,
      'successes', cur.success_count,
      'errors', cur.error_count,
      'success_rate', CASE WHEN cur.request_count > 0
                           THEN round(100 * cur.success_count::numeric / cur.request_count, 2) END,
      'error_rate', CASE WHEN cur.request_count > 0
                         THEN round(100 * cur.error_count::numeric / cur.request_count, 2) END,
      'last_request_at', cur.last_request_at,
      'month_start', to_char(m_start, utc),
      'month_end', to_char(m_end, utc),
      'elapsed', round(elapsed / span, 6),
      'projected_requests', CASE WHEN elapsed > 0 THEN round(cur.request_count * span / elapsed) END),
    'months', coalesce(months, '[]'::jsonb),
    'quota', quota);
END
$$;

-- service_role alone. It is SECURITY DEFINER and checks nothing of its
-- caller (any portal's usage, past row level security), so the app calls it
-- server-side with the service key, or through a function of its own that
-- checks the caller's portal (docs/dashboard.md).
DO $$
BEGIN
  REVOKE ALL ON FUNCTION public.usage_portal_summary(bigint, integer) FROM PUBLIC;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
    REVOKE ALL ON FUNCTION public.usage_portal_summary(bigint, integer) FROM anon;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
    REVOKE ALL ON FUNCTION public.usage_portal_summary(bigint, integer) FROM authenticated;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    REVOKE ALL ON FUNCTION public.usage_portal_summary(bigint, integer) FROM service_role;
    GRANT EXECUTE ON FUNCTION public.usage_portal_summary(bigint, integer) TO service_role;
  END IF;
END $$;

NOTIFY pgrst, 'reload schema';

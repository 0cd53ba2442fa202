-- The one rule book (docs/semantics.md, "Booking a row"): every engine books
-- counted rows here (the REST engine through usage_agg_book, the server-side
-- batch and the scheduled run through usage_agg_rpc_batch), so they cannot
-- disagree. Input: pg_temp.usage_agg_fold, one row per key with the good
-- rows of that key in (p_from, p_to] folded: c (rows), s, e, at (latest
-- request_timestamp), w (highest id). Every row of (p_from, p_to] of a key
-- must be in its fold: the caller read them all.
--
-- For each key k, under locks that fix where it books:
--   * the closed months are read in SHARE mode for the transaction, so a
--     close or a reopening waits for the booking and the booking for it;
--     the booking month cannot change under it;
--   * the target is the monthly row of k, or, when k's month is closed, its
--     late adjustment booked in usage_agg_booking_month(k's month). The
--     target is created when missing: whole, and straight into the plan,
--     for a key with nothing counted (booked for the first time: its
--     insert's own lock holds it), else empty; then every other target is
--     locked, in key order (two bookings never deadlock on each other), and
--     read by the statement that locks it (a locking read returns the
--     version it locked);
--   * E_k, the highest watermark of k over its monthly row and all its late
--     adjustments, is the locked target's and those of the other rows of k,
--     which are frozen: the triggers refuse a closed month's monthly row, a
--     late adjustment not booked in the booking month, and a late
--     adjustment of an open month;
--   * if E_k <= p_from, every folded row is new and the fold is added; if
--     E_k >= w, another run counted them all; otherwise (another run counted
--     part of the range, or died midway) the key's rows in (E_k, p_to] are
--     counted again from usage_requests, in one scan for all such keys;
--   * the target is written: counts plus the new rows, watermark = the
--     newest new row, and for a late adjustment counted_from_id = the
--     watermark its rows are counted above (so the guard of
--     usage_agg_guard_adjustment always compares the current value);
--   * each written target is read back: a row that does not hold what was
--     written (a trigger, rule or hand edit undid it) is a lost write,
--     recorded in usage_agg_refused_keys (kind 'lost').
--   * each threshold of its quota a booked key's open month reached is
--     recorded in portal_usage_alerts, once per portal, month, threshold
--     and limit (20261207130000, docs/quotas.md).
-- Each step is one set-based statement over all the keys (a key costs a
-- few microseconds a step: docs/benchmarks.md, issue 22).
-- Returns a summary; with p_dry_run, nothing is written and the summary
-- lists each change ("changes") and each alert it would record ("alerts").
CREATE OR REPLACE FUNCTION public.usage_agg_book_folded(
  p_job text, p_from bigint, p_to bigint, p_dry_run boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  n_keys     bigint;
  n_rows     bigint;
  n_late     bigint;
  late_rows  bigint;
  n_redo     bigint;
  n_super    bigint;
  n_fresh    bigint;
  n_where    bigint;
  lost       jsonb;
  changes    jsonb;
  alerts     jsonb;
BEGIN
  IF p_from IS NULL OR p_to IS NULL OR p_to < p_from THEN
    RAISE EXCEPTION 'usage_agg_book: the range (%, %] is not a range', p_from, p_to USING ERRCODE = '22023';
  END IF;
  LOCK TABLE public.usage_agg_closed_months IN SHARE MODE;

  -- The fold is one a good row can make, one line a key: usage_agg_book
  -- checks what a client sent; usage_agg_rpc_batch folds only the good rows
  -- of (p_from, p_to] by key (checking them again here was a twentieth of
  -- a batch).

  -- Where each key books: its monthly row, or (its month closed) its late
  -- adjustment in the booking month, named by its idempotency key.
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_where (
    portal_id bigint, month_year text, late boolean, booked text, ikey text,
    c bigint, s bigint, e bigint, at timestamp, w bigint) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_where;
  INSERT INTO pg_temp.usage_agg_where
  SELECT x.portal_id, x.month_year, x.booked IS NOT NULL, x.booked,
         CASE WHEN x.booked IS NOT NULL THEN 'late:' || x.portal_id || ':' || x.month_year || ':' || x.booked END,
         x.c, x.s, x.e, x.at, x.w
    FROM (SELECT f.*, CASE WHEN cm.month_year IS NOT NULL THEN public.usage_agg_booking_month(f.month_year) END AS booked
            FROM pg_temp.usage_agg_fold f
            LEFT JOIN public.usage_agg_closed_months cm ON cm.month_year = f.month_year AND cm.closed) x;
  GET DIAGNOSTICS n_where = ROW_COUNT;

  -- The plan: each key's target as read under its lock, and what is new.
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_plan (
    portal_id bigint, month_year text, late boolean, booked text, ikey text,
    c bigint, s bigint, e bigint, at timestamp, w bigint,
    tgt_c bigint, tgt_s bigint, tgt_e bigint, tgt_at timestamp, tgt_w bigint, e_k bigint,
    dc bigint, ds bigint, de bigint, dat timestamp, dw bigint, redo boolean, fresh boolean) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_plan;

  -- Targets that do not exist yet, for keys with rows above what is
  -- counted (read without locks: a key created meanwhile is found below).
  -- A key of an open month with no monthly row and no late adjustment
  -- counted past p_from (those are frozen while the month is open) has
  -- nothing counted in (p_from, p_to]: its row is written whole, once,
  -- rather than created empty and then updated, and goes straight into the
  -- plan as fresh (nothing to lock or read: the insert's own row lock
  -- holds it; E_k is at most p_from, so all of the fold is new). The
  -- others are created empty, when there are any (an anti-join over every
  -- key is a tenth of a batch's booking).
  IF NOT p_dry_run THEN
    WITH ins AS (
      INSERT INTO public.portal_usage_monthly
             (portal_id, month_year, request_count, success_count, error_count, last_request_at,
              last_request_id, updated_at)
      SELECT p.portal_id, p.month_year, p.c, p.s, p.e, p.at, p.w, now()
        FROM pg_temp.usage_agg_where p
       WHERE NOT p.late
         AND NOT EXISTS (SELECT 1 FROM public.portal_usage_monthly m
                          WHERE m.portal_id = p.portal_id AND m.month_year = p.month_year)
         AND NOT EXISTS (SELECT 1 FROM public.portal_usage_adjustments a
                          WHERE a.portal_id = p.portal_id AND a.month_year = p.month_year
                            AND a.source = 'late' AND a.last_request_id > p_from)
       ORDER BY p.portal_id, p.month_year
      ON CONFLICT (portal_id, month_year) DO NOTHING
      RETURNING portal_id, month_year
    )
    -- What the fold asked for, not what the insert returned: a row a
    -- trigger changed on its way in is then a lost write, read back below.
    INSERT INTO pg_temp.usage_agg_plan
    SELECT p.portal_id, p.month_year, false, NULL, p.ikey, p.c, p.s, p.e, p.at, p.w,
           NULL, NULL, NULL, NULL, NULL, p_from, p.c, p.s, p.e, p.at, p.w, false, true
      FROM ins JOIN pg_temp.usage_agg_where p
        ON p.portal_id = ins.portal_id AND p.month_year = ins.month_year AND NOT p.late;
    GET DIAGNOSTICS n_fresh = ROW_COUNT;
    IF n_fresh < (SELECT count(*) FROM pg_temp.usage_agg_where WHERE NOT late) THEN
      INSERT INTO public.portal_usage_monthly
             (portal_id, month_year, request_count, success_count, error_count, last_request_at,
              last_request_id, updated_at)
      SELECT p.portal_id, p.month_year, 0, 0, 0, NULL, 0, now()
        FROM pg_temp.usage_agg_where p
       WHERE NOT p.late
         AND NOT EXISTS (SELECT 1 FROM public.portal_usage_monthly m
                          WHERE m.portal_id = p.portal_id AND m.month_year = p.month_year)
       ORDER BY p.portal_id, p.month_year
      ON CONFLICT (portal_id, month_year) DO NOTHING;
    END IF;
    INSERT INTO public.portal_usage_adjustments
           (portal_id, month_year, booked_month, source, request_count, success_count, error_count,
            last_request_at, last_request_id, idempotency_key, counted_from_id)
    SELECT p.portal_id, p.month_year, p.booked, 'late', 0, 0, 0, NULL, 0, p.ikey, NULL
      FROM pg_temp.usage_agg_where p
     WHERE p.late
       AND NOT EXISTS (SELECT 1 FROM public.portal_usage_adjustments a WHERE a.idempotency_key = p.ikey)
     ORDER BY p.portal_id, p.month_year
    ON CONFLICT (idempotency_key) DO NOTHING;
  END IF;

  -- Every target locked, in key order, and read under its lock; E_k, the
  -- highest watermark of k over its monthly row and all its late
  -- adjustments, from the locked target and the rows of k that are frozen
  -- while it is (a closed month's monthly row, late adjustments not booked
  -- in the booking month, every late adjustment of an open month). One
  -- statement: the locking reads return the row versions they locked.
  -- (Nothing to do when every key was fresh: the whole of a first catch-up.)
  IF coalesce(n_fresh, 0) < n_where THEN
  WITH p AS MATERIALIZED (
    -- The keys not in the plan yet: all but the fresh ones.
    SELECT w.* FROM pg_temp.usage_agg_where w
     WHERE NOT EXISTS (SELECT 1 FROM pg_temp.usage_agg_plan n
                        WHERE n.portal_id = w.portal_id AND n.month_year = w.month_year)
  ), lm AS (
    SELECT m.portal_id, m.month_year, m.request_count, m.success_count, m.error_count,
           m.last_request_at, m.last_request_id
      FROM public.portal_usage_monthly m
      JOIN p ON m.portal_id = p.portal_id AND m.month_year = p.month_year AND NOT p.late
     ORDER BY m.portal_id, m.month_year
       FOR UPDATE OF m
  ), la AS (
    SELECT a.idempotency_key, a.request_count, a.success_count, a.error_count,
           a.last_request_at, a.last_request_id
      FROM public.portal_usage_adjustments a
      JOIN p ON a.idempotency_key = p.ikey AND p.late
     ORDER BY a.portal_id, a.month_year
       FOR UPDATE OF a
  ), frozen AS (
    SELECT a.portal_id, a.month_year, max(a.last_request_id) AS w
      FROM public.portal_usage_adjustments a
      JOIN p ON a.portal_id = p.portal_id AND a.month_year = p.month_year
     WHERE a.source = 'late' AND a.idempotency_key IS DISTINCT FROM p.ikey
     GROUP BY 1, 2
  ), frozen_m AS (
    SELECT m.portal_id, m.month_year, m.last_request_id AS w
      FROM public.portal_usage_monthly m
      JOIN p ON m.portal_id = p.portal_id AND m.month_year = p.month_year AND p.late
  ), k AS (
    SELECT p.*,
           coalesce(la.request_count, lm.request_count) AS tgt_c,
           coalesce(la.success_count, lm.success_count) AS tgt_s,
           coalesce(la.error_count, lm.error_count) AS tgt_e,
           CASE WHEN p.late THEN la.last_request_at ELSE lm.last_request_at END AS tgt_at,
           coalesce(la.last_request_id, lm.last_request_id) AS tgt_w,
           greatest(coalesce(lm.last_request_id, 0), coalesce(fm.w, 0), coalesce(la.last_request_id, 0),
                    coalesce(fz.w, 0)) AS e_k
      FROM p
      LEFT JOIN lm ON lm.portal_id = p.portal_id AND lm.month_year = p.month_year
      LEFT JOIN la ON la.idempotency_key = p.ikey
      LEFT JOIN frozen_m fm ON fm.portal_id = p.portal_id AND fm.month_year = p.month_year
      LEFT JOIN frozen fz ON fz.portal_id = p.portal_id AND fz.month_year = p.month_year
  )
  INSERT INTO pg_temp.usage_agg_plan
  SELECT k.portal_id, k.month_year, k.late, k.booked, k.ikey, k.c, k.s, k.e, k.at, k.w,
         k.tgt_c, k.tgt_s, k.tgt_e, k.tgt_at, k.tgt_w, k.e_k,
         -- What is new: all of the fold (nothing above p_from counted),
         -- nothing (another run counted it all), or (counted in part)
         -- counted again below.
         CASE WHEN k.e_k <= p_from THEN k.c WHEN k.e_k >= k.w THEN 0 END,
         CASE WHEN k.e_k <= p_from THEN k.s WHEN k.e_k >= k.w THEN 0 END,
         CASE WHEN k.e_k <= p_from THEN k.e WHEN k.e_k >= k.w THEN 0 END,
         CASE WHEN k.e_k <= p_from THEN k.at END,
         CASE WHEN k.e_k <= p_from THEN k.w END,
         k.e_k > p_from AND k.e_k < k.w,
         false
    FROM k;
  END IF;

  -- Keys another run counted in part: their rows in (E_k, p_to] counted
  -- again from usage_requests, in one scan for all such keys.
  IF EXISTS (SELECT 1 FROM pg_temp.usage_agg_plan WHERE redo) THEN
    -- One scan of the ids above the lowest such E_k, joined to the keys
    -- by hash: a scan per key (the table has no index by key) cost keys
    -- times ids, and a catch-up after a killed run timed out on it.
    UPDATE pg_temp.usage_agg_plan p
       SET dc = x.c, ds = x.s, de = x.e, dat = x.at, dw = x.w
      FROM (WITH lo AS (
              SELECT min(e_k) AS id FROM pg_temp.usage_agg_plan WHERE redo
            ), scanned AS MATERIALIZED (
              SELECT u.id, u.portal_id, u.month_year, u.success, u.request_timestamp
                FROM public.usage_requests u, lo
               WHERE u.id > lo.id AND u.id <= p_to
                 AND u.success IS NOT NULL AND public.usage_agg_valid_time(u.request_timestamp)
            )
            SELECT k.portal_id, k.month_year, count(r.id) AS c, count(r.id) FILTER (WHERE r.success) AS s,
                   count(r.id) FILTER (WHERE NOT r.success) AS e, max(r.request_timestamp) AS at,
                   max(r.id) AS w
              FROM pg_temp.usage_agg_plan k
              LEFT JOIN scanned r
                ON r.portal_id = k.portal_id AND r.month_year = k.month_year AND r.id > k.e_k
             WHERE k.redo
             GROUP BY 1, 2) x
     WHERE p.redo AND p.portal_id = x.portal_id AND p.month_year = x.month_year;
  END IF;

  SELECT count(*) FILTER (WHERE dc > 0), coalesce(sum(dc), 0),
         count(*) FILTER (WHERE dc > 0 AND late), coalesce(sum(dc) FILTER (WHERE late), 0),
         count(*) FILTER (WHERE redo), count(*) FILTER (WHERE dc = 0)
    INTO n_keys, n_rows, n_late, late_rows, n_redo, n_super
    FROM pg_temp.usage_agg_plan;


  -- Quotas (20261207130000, docs/quotas.md): every threshold of the
  -- portal's quota (its own row of portal_usage_quotas, else the default
  -- one) that the month's usage has reached, once per portal, month,
  -- threshold and limit (the UNIQUE of portal_usage_alerts). A month's
  -- usage is its monthly row plus its late adjustments, as usage_current
  -- reads it. Only keys of open months booked into their monthly row: a
  -- closed month fires nothing new. Decided here, in the transaction that
  -- books the rows, so the alert and the totals commit together or not at
  -- all; what is reached and not yet recorded fires (a level, not an edge),
  -- so usage that hovers at a threshold fires it once, and a raised limit
  -- arms the thresholds of the new one.
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_crossed (
    portal_id bigint, month_year text, threshold_percent integer, request_limit bigint,
    request_count bigint) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_crossed;
  IF EXISTS (SELECT 1 FROM public.portal_usage_quotas) THEN
    INSERT INTO pg_temp.usage_agg_crossed
    SELECT u.portal_id, u.month_year, t.pct, q.request_limit, u.n
      FROM (SELECT p.portal_id, p.month_year,
                   coalesce(p.tgt_c, 0) + p.dc + coalesce(x.late_n, 0) AS n
              FROM pg_temp.usage_agg_plan p
              LEFT JOIN LATERAL (
                SELECT sum(a.request_count) AS late_n
                  FROM public.portal_usage_adjustments a
                 WHERE a.portal_id = p.portal_id AND a.month_year = p.month_year AND a.source = 'late') x ON true
             WHERE NOT p.late AND p.dc > 0) u
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
       AND NOT EXISTS (SELECT 1 FROM public.portal_usage_alerts al
                        WHERE al.portal_id = u.portal_id AND al.month_year = u.month_year
                          AND al.threshold_percent = t.pct AND al.request_limit = q.request_limit);
  END IF;
  SELECT coalesce(jsonb_agg(jsonb_build_object(
           'portal_id', portal_id, 'month_year', month_year, 'threshold_percent', threshold_percent,
           'request_limit', request_limit, 'request_count', request_count)
           ORDER BY portal_id, month_year, threshold_percent), '[]')
    INTO alerts FROM pg_temp.usage_agg_crossed;

  IF p_dry_run THEN
    SELECT coalesce(jsonb_agg(jsonb_build_object(
             'portal_id', portal_id, 'month_year', month_year, 'booked_month', booked,
             'before', CASE WHEN tgt_w IS NULL THEN NULL ELSE jsonb_build_object(
                 'request_count', tgt_c, 'success_count', tgt_s, 'error_count', tgt_e,
                 'last_request_at', tgt_at, 'last_request_id', tgt_w) END,
             'after', jsonb_build_object(
                 'request_count', coalesce(tgt_c, 0) + dc, 'success_count', coalesce(tgt_s, 0) + ds,
                 'error_count', coalesce(tgt_e, 0) + de,
                 'last_request_at', greatest(tgt_at, dat), 'last_request_id', dw),
             'counted_from', greatest(e_k, p_from)) ORDER BY portal_id, month_year), '[]')
      INTO changes FROM pg_temp.usage_agg_plan WHERE dc > 0;
    RETURN jsonb_build_object('from', p_from, 'to', p_to, 'rows', n_rows, 'keys', n_keys,
      'late_rows', late_rows, 'late_keys', n_late, 'raced_keys', n_redo, 'superseded_keys', n_super,
      'lost', '[]'::jsonb, 'changes', changes, 'alerts', alerts);
  END IF;

  UPDATE public.portal_usage_monthly t
     SET request_count = t.request_count + p.dc,
         success_count = t.success_count + p.ds,
         error_count = t.error_count + p.de,
         last_request_at = greatest(t.last_request_at, p.dat),
         last_request_id = p.dw,
         updated_at = now()
    FROM pg_temp.usage_agg_plan p
   WHERE NOT p.late AND NOT p.fresh AND p.dc > 0 AND t.portal_id = p.portal_id AND t.month_year = p.month_year;
  UPDATE public.portal_usage_adjustments t
     SET request_count = t.request_count + p.dc,
         success_count = t.success_count + p.ds,
         error_count = t.error_count + p.de,
         last_request_at = greatest(t.last_request_at, p.dat),
         last_request_id = p.dw,
         counted_from_id = greatest(p.e_k, p_from)
    FROM pg_temp.usage_agg_plan p
   WHERE p.late AND p.dc > 0
     AND t.idempotency_key = p.ikey;

  -- Every write read back: it holds what was written, or it is lost.
  WITH now_ AS (
    SELECT p.portal_id, p.month_year, p.late,
           coalesce(p.tgt_c, 0) + p.dc AS want_c, coalesce(p.tgt_s, 0) + p.ds AS want_s,
           coalesce(p.tgt_e, 0) + p.de AS want_e, p.dw AS want_w,
           CASE WHEN p.late THEN a.request_count ELSE m.request_count END AS c,
           CASE WHEN p.late THEN a.success_count ELSE m.success_count END AS s,
           CASE WHEN p.late THEN a.error_count ELSE m.error_count END AS e,
           CASE WHEN p.late THEN a.last_request_id ELSE m.last_request_id END AS w
      FROM pg_temp.usage_agg_plan p
      LEFT JOIN public.portal_usage_monthly m
        ON NOT p.late AND m.portal_id = p.portal_id AND m.month_year = p.month_year
      LEFT JOIN public.portal_usage_adjustments a
        ON p.late AND a.idempotency_key = p.ikey
     WHERE p.dc > 0
  ), gone AS (
    SELECT * FROM now_
     WHERE (c, s, e, w) IS DISTINCT FROM (want_c, want_s, want_e, want_w)
  ), recorded AS (
    INSERT INTO public.usage_agg_refused_keys AS r
           (job, portal_id, month_year, stored_requests, raw_requests, kind)
    SELECT p_job, portal_id, month_year, coalesce(c, 0), want_c, 'lost' FROM gone
    ON CONFLICT (job, portal_id, month_year) DO UPDATE
       SET stored_requests = excluded.stored_requests, raw_requests = excluded.raw_requests,
           kind = 'lost', found_at = now()
    RETURNING r.portal_id, r.month_year
  )
  SELECT coalesce(jsonb_agg(portal_id || ':' || month_year ORDER BY portal_id, month_year), '[]')
    INTO lost FROM recorded;

  -- The crossings, recorded with the totals (a key whose write was lost
  -- records none: its usage is not what was computed). ON CONFLICT: a
  -- concurrent booking of the key recorded it first.
  WITH rec AS (
    INSERT INTO public.portal_usage_alerts AS al
           (portal_id, month_year, threshold_percent, request_limit, request_count, crossed_at)
    SELECT c.portal_id, c.month_year, c.threshold_percent, c.request_limit, c.request_count, now()
      FROM pg_temp.usage_agg_crossed c
     WHERE NOT lost @> to_jsonb(c.portal_id || ':' || c.month_year)
     ORDER BY c.portal_id, c.month_year, c.threshold_percent
    ON CONFLICT (portal_id, month_year, threshold_percent, request_limit) DO NOTHING
    RETURNING al.id, al.portal_id, al.month_year, al.threshold_percent, al.request_limit, al.request_count
  )
  SELECT coalesce(jsonb_agg(jsonb_build_object(
           'id', id, 'portal_id', portal_id, 'month_year', month_year, 'threshold_percent', threshold_percent,
           'request_limit', request_limit, 'request_count', request_count)
           ORDER BY portal_id, month_year, threshold_percent), '[]')
    INTO alerts FROM rec;

  RETURN jsonb_build_object('from', p_from, 'to', p_to, 'rows', n_rows, 'keys', n_keys,
    'late_rows', late_rows, 'late_keys', n_late, 'raced_keys', n_redo, 'superseded_keys', n_super,
    'lost', lost, 'alerts', alerts);
END
$$;

-- Its owner alone: usage-agg's own functions call it, never the API.
REVOKE ALL ON FUNCTION public.usage_agg_book_folded(text, bigint, bigint, boolean) FROM PUBLIC, anon, authenticated, service_role;

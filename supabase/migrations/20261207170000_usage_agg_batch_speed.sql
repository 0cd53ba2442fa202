-- Issue 22: server-side batches sized by what they cost, and a booking
-- that costs less per key. What this migration changes (the current
-- definition of each object is in supabase/schemas/):
--   * the closed-month guard of portal_usage_monthly checks once per
--     statement over the rows it wrote (transition tables) instead of once
--     per row: the same rule, the same error, half of a batch's time less;
--   * usage_agg_book_folded: the same rules in fewer passes over the keys
--     (each target locked and read by one statement; no self-join);
--   * usage_agg_next_batch_ids: the one sizing rule, from the rows and keys
--     of the batch just run and what each cost;
--   * usage_agg_rpc_batch takes p_aim_ms and answers next_batch_ids, and
--     the time its fold and booking took;
--   * usage_agg_run_scheduled sizes its batches with the same rule.

-- 1. The closed-month guard, per statement.
-- A closed month's portal_usage_monthly rows are what its invoice was made
-- from, so they never change: no insert, no update, no delete, by anyone,
-- until `usage-agg reopen` (which marks the month open again, with who,
-- when and why). One exception: a rebase (usage_agg.rebase, set by
-- usage_agg_rebase for its own transaction) may move a watermark and
-- nothing else.
--
-- Checked once per statement, over the rows it wrote (transition tables),
-- not once per row: a booking writes tens of thousands of keys, and a
-- per-row check (a SECURITY DEFINER call, a lookup) was half of a batch's
-- time (20261207170000, docs/benchmarks.md). An exception raised here
-- undoes the whole statement, as the per-row check did. With no month
-- closed at all (the common case) it is one lookup per statement.
-- Rows pair up by id (the seed's SERIAL primary key): under a rebase, an
-- updated row of a closed month must keep its key, counts and time.
CREATE OR REPLACE FUNCTION public.usage_agg_guard_closed_month_rows()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  m text;
  p bigint;
  rebase constant boolean := coalesce(current_setting('usage_agg.rebase', true) = 'on', false);
BEGIN
  IF NOT EXISTS (SELECT 1 FROM public.usage_agg_closed_months WHERE closed) THEN
    RETURN NULL;
  END IF;
  IF TG_OP = 'INSERT' THEN
    SELECT n.month_year, n.portal_id INTO m, p
      FROM usage_agg_new n
      JOIN public.usage_agg_closed_months c ON c.month_year = n.month_year AND c.closed
     ORDER BY n.portal_id, n.month_year LIMIT 1;
  ELSIF TG_OP = 'DELETE' THEN
    SELECT o.month_year, o.portal_id INTO m, p
      FROM usage_agg_old o
      JOIN public.usage_agg_closed_months c ON c.month_year = o.month_year AND c.closed
     ORDER BY o.portal_id, o.month_year LIMIT 1;
  ELSE
    SELECT r.month_year, r.portal_id INTO m, p
      FROM (SELECT o.id, o.portal_id, o.month_year FROM usage_agg_old o
            UNION ALL
            SELECT n.id, n.portal_id, n.month_year FROM usage_agg_new n) r
      JOIN public.usage_agg_closed_months c ON c.month_year = r.month_year AND c.closed
     WHERE NOT (rebase AND EXISTS (
             SELECT 1 FROM usage_agg_old o JOIN usage_agg_new n ON n.id = o.id
              WHERE o.id = r.id
                AND (n.portal_id, n.month_year, n.request_count, n.success_count, n.error_count,
                     n.last_request_at)
                    IS NOT DISTINCT FROM
                    (o.portal_id, o.month_year, o.request_count, o.success_count, o.error_count,
                     o.last_request_at)))
     ORDER BY r.portal_id, r.month_year LIMIT 1;
  END IF;
  IF m IS NOT NULL THEN
    RAISE EXCEPTION 'usage_agg: % is closed, so its portal_usage_monthly rows never change (portal %, %); rows that come late are booked as adjustments; `usage-agg reopen --month % --reason ...` reopens it, recorded',
      m, p, lower(TG_OP), m;
  END IF;
  RETURN NULL;
END
$$;

-- Its owner alone: it runs as a trigger, never called over REST.
REVOKE ALL ON FUNCTION public.usage_agg_guard_closed_month_rows() FROM PUBLIC, anon, authenticated, service_role;

DROP TRIGGER IF EXISTS usage_agg_closed_month ON public.portal_usage_monthly;
DROP FUNCTION IF EXISTS public.usage_agg_guard_closed_month();
DROP TRIGGER IF EXISTS usage_agg_closed_month_insert ON public.portal_usage_monthly;
DROP TRIGGER IF EXISTS usage_agg_closed_month_update ON public.portal_usage_monthly;
DROP TRIGGER IF EXISTS usage_agg_closed_month_delete ON public.portal_usage_monthly;
-- A closed month's rows never change until it is reopened: checked once per
-- statement over the rows it wrote (one trigger per event: a trigger with
-- transition tables has one event).
CREATE TRIGGER usage_agg_closed_month_insert
  AFTER INSERT ON public.portal_usage_monthly
  REFERENCING NEW TABLE AS usage_agg_new
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_guard_closed_month_rows();
CREATE TRIGGER usage_agg_closed_month_update
  AFTER UPDATE ON public.portal_usage_monthly
  REFERENCING OLD TABLE AS usage_agg_old NEW TABLE AS usage_agg_new
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_guard_closed_month_rows();
CREATE TRIGGER usage_agg_closed_month_delete
  AFTER DELETE ON public.portal_usage_monthly
  REFERENCING OLD TABLE AS usage_agg_old
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_guard_closed_month_rows();

-- 2. The rule book, in fewer passes.
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
--     target is created (empty) when missing, then every target is locked,
--     in key order (two bookings never deadlock on each other), and read
--     by the statement that locks it (a locking read returns the version
--     it locked);
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
  lost       jsonb;
  changes    jsonb;
  alerts     jsonb;
BEGIN
  IF p_from IS NULL OR p_to IS NULL OR p_to < p_from THEN
    RAISE EXCEPTION 'usage_agg_book: the range (%, %] is not a range', p_from, p_to USING ERRCODE = '22023';
  END IF;
  LOCK TABLE public.usage_agg_closed_months IN SHARE MODE;

  IF EXISTS (SELECT 1 FROM pg_temp.usage_agg_fold f
              WHERE NOT public.usage_agg_valid_key(f.portal_id, f.month_year)
                 OR f.c IS NULL OR f.s IS NULL OR f.e IS NULL
                 OR f.c < 1 OR f.s < 0 OR f.e < 0 OR f.c <> f.s + f.e
                 OR f.w IS NULL OR f.w <= p_from OR f.w > p_to
                 OR NOT public.usage_agg_valid_time(f.at)) THEN
    RAISE EXCEPTION 'usage_agg_book: a folded key is not one a good row can make (bad key, counts that do not add up, or an id outside (%, %])', p_from, p_to
      USING ERRCODE = '22023';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_temp.usage_agg_fold GROUP BY portal_id, month_year HAVING count(*) > 1) THEN
    RAISE EXCEPTION 'usage_agg_book: a key is folded twice' USING ERRCODE = '22023';
  END IF;

  -- Where each key books: its monthly row, or (its month closed) its late
  -- adjustment in the booking month, named by its idempotency key.
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_where (
    portal_id bigint, month_year text, late boolean, booked text, ikey text,
    c bigint, s bigint, e bigint, at timestamp, w bigint) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_where;
  INSERT INTO pg_temp.usage_agg_where
  SELECT x.portal_id, x.month_year, x.booked IS NOT NULL, x.booked,
         'late:' || x.portal_id || ':' || x.month_year || ':' || x.booked,
         x.c, x.s, x.e, x.at, x.w
    FROM (SELECT f.*, CASE WHEN cm.month_year IS NOT NULL THEN public.usage_agg_booking_month(f.month_year) END AS booked
            FROM pg_temp.usage_agg_fold f
            LEFT JOIN public.usage_agg_closed_months cm ON cm.month_year = f.month_year AND cm.closed) x;

  -- Targets that do not exist yet, for keys with rows above what is
  -- counted (read without locks: a key created meanwhile is found below).
  IF NOT p_dry_run THEN
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
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_plan (
    portal_id bigint, month_year text, late boolean, booked text, ikey text,
    c bigint, s bigint, e bigint, at timestamp, w bigint,
    tgt_c bigint, tgt_s bigint, tgt_e bigint, tgt_at timestamp, tgt_w bigint, e_k bigint,
    dc bigint, ds bigint, de bigint, dat timestamp, dw bigint, redo boolean) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_plan;
  WITH lm AS (
    SELECT m.portal_id, m.month_year, m.request_count, m.success_count, m.error_count,
           m.last_request_at, m.last_request_id
      FROM public.portal_usage_monthly m
      JOIN pg_temp.usage_agg_where p ON m.portal_id = p.portal_id AND m.month_year = p.month_year AND NOT p.late
     ORDER BY m.portal_id, m.month_year
       FOR UPDATE OF m
  ), la AS (
    SELECT a.idempotency_key, a.request_count, a.success_count, a.error_count,
           a.last_request_at, a.last_request_id
      FROM public.portal_usage_adjustments a
      JOIN pg_temp.usage_agg_where p ON a.idempotency_key = p.ikey AND p.late
     ORDER BY a.portal_id, a.month_year
       FOR UPDATE OF a
  ), frozen AS (
    SELECT a.portal_id, a.month_year, max(a.last_request_id) AS w
      FROM public.portal_usage_adjustments a
      JOIN pg_temp.usage_agg_where p ON a.portal_id = p.portal_id AND a.month_year = p.month_year
     WHERE a.source = 'late' AND a.idempotency_key IS DISTINCT FROM p.ikey
     GROUP BY 1, 2
  ), frozen_m AS (
    SELECT m.portal_id, m.month_year, m.last_request_id AS w
      FROM public.portal_usage_monthly m
      JOIN pg_temp.usage_agg_where p ON m.portal_id = p.portal_id AND m.month_year = p.month_year AND p.late
  ), k AS (
    SELECT p.*,
           coalesce(la.request_count, lm.request_count) AS tgt_c,
           coalesce(la.success_count, lm.success_count) AS tgt_s,
           coalesce(la.error_count, lm.error_count) AS tgt_e,
           CASE WHEN p.late THEN la.last_request_at ELSE lm.last_request_at END AS tgt_at,
           coalesce(la.last_request_id, lm.last_request_id) AS tgt_w,
           greatest(coalesce(lm.last_request_id, 0), coalesce(fm.w, 0), coalesce(la.last_request_id, 0),
                    coalesce(fz.w, 0)) AS e_k
      FROM pg_temp.usage_agg_where p
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
         k.e_k > p_from AND k.e_k < k.w
    FROM k;

  -- Keys another run counted in part: their rows in (E_k, p_to] counted
  -- again from usage_requests, in one scan for all such keys.
  IF EXISTS (SELECT 1 FROM pg_temp.usage_agg_plan WHERE redo) THEN
    UPDATE pg_temp.usage_agg_plan p
       SET dc = coalesce(x.c, 0), ds = coalesce(x.s, 0), de = coalesce(x.e, 0), dat = x.at, dw = x.w
      FROM (SELECT k.portal_id, k.month_year, r.c, r.s, r.e, r.at, r.w
              FROM pg_temp.usage_agg_plan k
              LEFT JOIN LATERAL (
                SELECT count(*) AS c, count(*) FILTER (WHERE u.success) AS s,
                       count(*) FILTER (WHERE NOT u.success) AS e, max(u.request_timestamp) AS at, max(u.id) AS w
                  FROM public.usage_requests u
                 WHERE u.id > k.e_k AND u.id <= p_to
                   AND u.portal_id = k.portal_id AND u.month_year = k.month_year
                   AND u.success IS NOT NULL AND public.usage_agg_valid_time(u.request_timestamp)) r ON true
             WHERE k.redo) x
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
   WHERE NOT p.late AND p.dc > 0 AND t.portal_id = p.portal_id AND t.month_year = p.month_year;
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

-- Its owner alone: usage-agg's own functions call it, never the API.
REVOKE ALL ON FUNCTION public.usage_agg_book_folded(text, bigint, bigint, boolean) FROM PUBLIC, anon, authenticated, service_role;

-- 3. The sizing rule.
-- The next server-side batch's ids, so that it takes about p_aim_ms: the
-- one sizing rule of `aggregate --engine rpc` and of the scheduled run
-- (usage_agg_rpc_batch answers it as next_batch_ids).
--
-- A batch's time is a part that follows the rows it reads (the fold) and a
-- part that follows the keys it books (each key written once, however many
-- rows it has), both measured on the batch just run, plus a small fixed
-- part. Sizing by time alone undershoots: twice the ids is not twice the
-- time when the rows fall on keys already in the batch, and every extra
-- batch writes those keys again (issue 22). So the keys a bigger batch
-- would touch are predicted as if its rows fell at random on K keys,
-- k = K (1 - exp(-r / K)), K solved from the batch just run (r rows on k
-- keys): where a few keys take most rows (one month active, a few big
-- portals) batches grow fast; where every row is its own key they grow in
-- proportion. The prediction is exact for rows spread at random and
-- overestimates keys (so undersizes) when rows come in runs of one key.
-- At most 16 times more and 4 times fewer ids than the batch just run,
-- within [1000, 50,000,000]. NULL when p_aim_ms is NULL (a fixed size).
CREATE OR REPLACE FUNCTION public.usage_agg_next_batch_ids(
  p_ids bigint, p_rows bigint, p_keys bigint,
  p_fold_ms double precision, p_book_ms double precision, p_fixed_ms double precision,
  p_aim_ms double precision)
RETURNS bigint
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, public
AS $$
DECLARE
  ids     constant double precision := greatest(coalesce(p_ids, 0), 1);
  r       constant double precision := greatest(coalesce(p_rows, 0), 0);
  k       constant double precision := least(greatest(coalesce(p_keys, 0), 0), r);
  per_row constant double precision := greatest(coalesce(p_fold_ms, 0), 0) / greatest(r, 1);
  per_key constant double precision := greatest(coalesce(p_book_ms, 0), 0) / greatest(k, 1);
  fixed   constant double precision := greatest(coalesce(p_fixed_ms, 0), 0);
  density constant double precision := r / ids;
  lo_n    constant double precision := greatest(1000, least(50000000, floor(ids / 4)));
  hi_n    constant double precision := least(50000000, greatest(1000, ids * 16));
  big_k   double precision;
  lo      double precision;
  hi      double precision;
  mid     double precision;
  n       double precision;
  keys_n  double precision;
  t       double precision;
BEGIN
  IF p_aim_ms IS NULL THEN
    RETURN NULL;
  END IF;
  IF r = 0 THEN
    -- No row in the range (a gap in the ids): it cost next to nothing.
    RETURN hi_n::bigint;
  END IF;
  -- K, the keys the rows fall on: none to solve when no key repeated.
  IF k > 0 AND k < r * 0.999 THEN
    lo := k;
    hi := k * 2;
    WHILE hi * (1 - exp(-least(r / hi, 700))) < k AND hi < 1e15 LOOP
      hi := hi * 2;
    END LOOP;
    FOR i IN 1..60 LOOP
      mid := (lo + hi) / 2;
      IF mid * (1 - exp(-least(r / mid, 700))) < k THEN lo := mid; ELSE hi := mid; END IF;
    END LOOP;
    big_k := hi;
  END IF;
  -- The largest n whose predicted time fits the aim: the ends first, then
  -- halving the interval between them.
  lo := lo_n;
  hi := hi_n;
  FOR i IN 0..51 LOOP
    n := CASE i WHEN 0 THEN hi_n WHEN 1 THEN lo_n ELSE (lo + hi) / 2 END;
    keys_n := CASE WHEN big_k IS NULL THEN density * n
                   ELSE big_k * (1 - exp(-least(density * n / big_k, 700))) END;
    t := fixed + per_row * density * n + per_key * keys_n;
    IF i = 0 THEN
      IF t <= p_aim_ms THEN RETURN hi_n::bigint; END IF;
    ELSIF i = 1 THEN
      IF t >= p_aim_ms THEN RETURN lo_n::bigint; END IF;
    ELSIF t <= p_aim_ms THEN
      lo := n;
    ELSE
      hi := n;
    END IF;
  END LOOP;
  RETURN round(lo)::bigint;
END
$$;

-- Its owner alone: usage_agg_rpc_batch calls it.
REVOKE ALL ON FUNCTION public.usage_agg_next_batch_ids(bigint, bigint, bigint, double precision, double precision, double precision, double precision) FROM PUBLIC, anon, authenticated, service_role;

-- 4. The batch answers the next size (a new parameter: the old signature
-- goes, or PostgREST would find two).
DROP FUNCTION IF EXISTS public.usage_agg_rpc_batch(text, bigint, integer, boolean);
-- The server-side engine (`usage-agg aggregate --engine rpc`, and the
-- scheduled run), for tables past what paging rows over HTTP serves: one
-- batch in one transaction. Rows in (cursor, min(safe horizon, cursor +
-- p_batch_ids)] are folded by key in SQL, bad rows counted (the first ids
-- named), then booked by the same rules as every engine
-- (usage_agg_book_folded), and the cursor moved. One batch at a time per
-- job. The caller calls it until it reports done. With p_aim_ms, it also
-- answers next_batch_ids, the size of the next batch to take about that
-- long (usage_agg_next_batch_ids, from this batch's rows, keys, and the
-- time its fold and its booking took, measured here, without the wait for
-- the horizon and the round trip).
CREATE OR REPLACE FUNCTION public.usage_agg_rpc_batch(
  p_job text DEFAULT 'default',
  p_batch_ids bigint DEFAULT 1000000,
  p_max_wait_ms integer DEFAULT 2000,
  p_dry_run boolean DEFAULT false,
  p_aim_ms integer DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  lo      bigint;
  hi      bigint;
  hz      jsonb;
  horizon bigint;
  n_bad   bigint;
  bad_ids bigint[];
  booked  jsonb;
  n_keys  bigint;
  n_good  bigint;
  t_start timestamptz;
  t_fold  timestamptz;
  t_book  timestamptz;
BEGIN
  IF NOT pg_try_advisory_xact_lock(hashtext('usage_agg_rpc_batch:' || p_job)) THEN
    RETURN jsonb_build_object('busy', true);
  END IF;
  SELECT cursor_id INTO lo FROM public.usage_aggregation_state WHERE job = p_job;
  IF lo IS NULL THEN
    RETURN jsonb_build_object('needs_rebuild', true);
  END IF;
  hz := public.usage_agg_safe_horizon(p_max_wait_ms);
  horizon := (hz->>'horizon')::bigint;
  IF horizon IS NULL THEN
    RETURN jsonb_build_object('cursor', lo, 'horizon', NULL, 'writers_in_flight', hz->'writers_in_flight',
                              'prepared_in_flight', hz->'prepared_in_flight');
  END IF;
  hi := greatest(lo, least(horizon, lo + p_batch_ids));
  t_start := clock_timestamp();

  CREATE TEMP TABLE IF NOT EXISTS usage_agg_fold (
    portal_id bigint, month_year text, c bigint, s bigint, e bigint, at timestamp, w bigint) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_fold;
  -- Keys are checked per key, not per row: a batch has far fewer keys
  -- than rows, and the regular expression is the costliest part.
  WITH g AS (
    SELECT r.portal_id, r.month_year,
           count(*) FILTER (WHERE r.success IS NOT NULL AND r.vt) AS c,
           count(*) FILTER (WHERE r.success AND r.vt) AS s,
           count(*) FILTER (WHERE NOT r.success AND r.vt) AS e,
           count(*) FILTER (WHERE r.success IS NULL OR NOT r.vt) AS nulls,
           max(r.request_timestamp) FILTER (WHERE r.success IS NOT NULL AND r.vt) AS at,
           max(r.id) FILTER (WHERE r.success IS NOT NULL AND r.vt) AS w
      FROM (SELECT u.id, u.portal_id, u.month_year, u.success, u.request_timestamp,
                   public.usage_agg_valid_time(u.request_timestamp) AS vt
              FROM public.usage_requests u WHERE u.id > lo AND u.id <= hi) r
     GROUP BY 1, 2
  ), v AS (
    SELECT g.*, public.usage_agg_valid_key(g.portal_id, g.month_year) AS good FROM g
  ), kept AS (
    INSERT INTO pg_temp.usage_agg_fold
    SELECT portal_id, month_year, c, s, e, at, w FROM v WHERE good AND c > 0
  )
  SELECT coalesce(sum(CASE WHEN good THEN nulls ELSE c + nulls END), 0) INTO n_bad FROM v;
  IF n_bad > 0 THEN
    SELECT array_agg(id ORDER BY id) INTO bad_ids FROM (
      SELECT id FROM public.usage_requests
       WHERE id > lo AND id <= hi
         AND (success IS NULL OR NOT public.usage_agg_valid_key(portal_id, month_year)
              OR NOT public.usage_agg_valid_time(request_timestamp))
       ORDER BY id LIMIT 5) x;
  END IF;
  SELECT count(*), coalesce(sum(c), 0) INTO n_keys, n_good FROM pg_temp.usage_agg_fold;
  t_fold := clock_timestamp();

  booked := public.usage_agg_book_folded(p_job, lo, hi, p_dry_run);
  t_book := clock_timestamp();
  IF NOT p_dry_run THEN
    UPDATE public.usage_aggregation_state
       SET cursor_id = greatest(cursor_id, hi), updated_at = now()
     WHERE job = p_job AND cursor_id >= lo;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'usage_agg_rpc_batch: the cursor of job % was reset while this batch was booked (a rebase): stop; the next run counts from there',
        p_job USING ERRCODE = '55000';
    END IF;
  END IF;
  RETURN (booked - 'changes') || jsonb_build_object('horizon', horizon, 'bad', n_bad,
    'bad_ids', to_jsonb(coalesce(bad_ids, '{}')), 'done', hi >= horizon, 'dry_run', p_dry_run,
    'fold_ms', round((extract(epoch FROM t_fold - t_start) * 1000)::numeric, 1),
    'book_ms', round((extract(epoch FROM t_book - t_fold) * 1000)::numeric, 1),
    'next_batch_ids', public.usage_agg_next_batch_ids(
      hi - lo, n_good + n_bad, n_keys,
      extract(epoch FROM t_fold - t_start) * 1000, extract(epoch FROM t_book - t_fold) * 1000,
      extract(epoch FROM clock_timestamp() - t_book) * 1000, p_aim_ms));
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_rpc_batch(text, bigint, integer, boolean, integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_rpc_batch(text, bigint, integer, boolean, integer) TO service_role;

-- 5. The scheduled run sizes its batches by the same rule.
-- The scheduled run, for projects with no cron host: what
-- `usage-agg aggregate --engine rpc` does, in the database, for pg_cron to
-- run with
--   CALL public.usage_agg_run_scheduled(50)
-- (`usage-agg schedule` installs exactly that). Each step, in order:
--   1. the lease, as CLI runs take it (owner 'pg_cron@<database>:<backend
--      pid>'; 'sql@...' when called by hand): while a live run holds it,
--      this one records nothing and returns. A lease left by a scheduled
--      run whose backend is gone (same database, no such pid) is taken
--      over at once;
--   2. the run-time checks (usage_agg_preflight, judged by
--      usage_agg_problems): a broken assumption is recorded as outcome
--      'refused', and the run ends;
--   3. a cursor: before the first CLI run (cursor NULL) it records
--      'needs_rebuild' and ends. The first run rebuilds every key from all
--      rows and reports drift key by key, which only the CLI does;
--   4. keys whose monthly row was deleted are rebuilt first
--      (usage_agg_restore_deleted_keys), as the CLI does;
--   5. usage_agg_rpc_batch until caught up, or until the time bound has
--      passed (checked between batches: a run may overrun it by one batch),
--      the lease renewed before every batch after the first;
--   6. rejected rows added to the job's tally (usage_agg_note_rejected), and
--      the run recorded with usage_agg_finish_run, with the CLI's outcomes:
--      'ok', 'bad_rows', 'decreases_refused' (refused keys stand),
--      'writes_lost' (a lost write stands), 'stopped' (time bound, lease
--      lost, inserts still in flight, another batch running, a cancel: the
--      next run goes on), 'failed' (an error in a step), and the two a
--      scheduled run alone records, 'refused' and 'needs_rebuild'.
-- It returns a jsonb summary in `summary` (`CALL` shows it). Where the CLI
-- would exit 65, 70 or 78 (refused, needs_rebuild, failed, bad_rows,
-- decreases_refused, writes_lost, and a stopped run that rejected rows,
-- which no later run will name), it then raises an error carrying the
-- reason and the summary, after the record is committed, so that
-- cron.job_run_details shows the run as failed with why; 'ok' and
-- 'stopped' end without one.
--
-- The statement timeout of the session covers the whole CALL, across its
-- COMMITs (on Supabase the global is 2 minutes): the run keeps its time
-- bound inside 80% of the timeout less 5 s, catches a cancel during a
-- batch, records the run ('stopped', with why) and lets the lease go, and
-- halves the batch for the next runs. Batches are sized as the CLI's
-- (usage_agg_next_batch_ids, answered by each batch): each aims at a fifth
-- of the time bound (1 to 10 s, never past what is left of it), starting
-- from the size the last batch left in
-- usage_aggregation_state.scheduled_batch_ids (50,000 ids the first
-- time), never above p_batch_ids. It records the
-- timeout it ran under (scheduled_statement_timeout_ms), which `schedule`
-- and `doctor` check the time limit against.
--
-- Why a PROCEDURE, with COMMIT after every batch: a function is one
-- transaction, so every batch of a run would commit together at the end,
-- holding its row locks on portal_usage_monthly (and the advisory lock) for
-- the whole run, and a run stopped at minute 5 would lose five minutes of
-- work. Committing each batch keeps the CLI's rule, one transaction per
-- batch: a crash or a cancel loses at most the batch under way, and a
-- concurrent CLI run or webhook waits on nothing longer than one batch.
--
-- Why it is SECURITY INVOKER, with no SET clause: PostgreSQL refuses
-- COMMIT in a SECURITY DEFINER procedure and in one with a SET clause
-- ("invalid transaction termination"). It runs as its caller (pg_cron runs
-- a job as the role that scheduled it: the owner of usage_agg_schedule,
-- postgres on Supabase), and the privileged work is done by the SECURITY
-- DEFINER functions it calls, each with its search_path pinned; it calls
-- them schema-qualified. Running with its caller's rights, it gives no one
-- more than they have, so its own search_path needs no pinning.
--
-- It must be the whole command (`CALL ...` alone): PostgreSQL allows COMMIT
-- in a procedure only when CALL is the top-level statement, not inside a
-- transaction block or a multi-statement string.
CREATE OR REPLACE PROCEDURE public.usage_agg_run_scheduled(
  p_max_seconds integer DEFAULT 50,
  p_batch_ids bigint DEFAULT 1000000,
  p_max_wait_ms integer DEFAULT 2000,
  INOUT summary jsonb DEFAULT NULL)
LANGUAGE plpgsql
AS $$
#variable_conflict use_variable
DECLARE
  job       constant text := 'default';
  started   constant timestamptz := clock_timestamp();
  ttl       integer;
  me        text;
  lease     jsonb;
  holder    text;
  facts     jsonb;
  problems  jsonb;
  restored  jsonb := '[]';
  b         jsonb;
  n_batches integer := 0;
  n_rows    bigint := 0;
  n_keys    bigint := 0;
  n_bad     bigint := 0;
  n_late    bigint := 0;
  bad_ids   bigint[] := '{}';
  c_before  bigint;
  c_after   bigint;
  outcome   text;
  reason    text;
  tmo_ms    bigint;
  lost      jsonb := '[]';
  budget    numeric;
  batch     bigint;
BEGIN
  IF p_max_seconds IS NULL OR p_max_seconds < 0 OR p_batch_ids IS NULL OR p_batch_ids < 1
     OR p_max_wait_ms IS NULL OR p_max_wait_ms < 0 OR p_max_wait_ms > 7000 THEN
    RAISE EXCEPTION 'usage_agg_run_scheduled: p_max_seconds must be 0 or more, p_batch_ids 1 or more, '
                    'p_max_wait_ms from 0 to 7000';
  END IF;
  -- Renewed before every batch; a run whose backend died leaves it for at
  -- most this long, unless the next scheduled run sees the backend gone.
  ttl := p_max_seconds + 60;
  me := format('%s@%s:%s',
          CASE WHEN current_setting('application_name', true) = 'pg_cron' THEN 'pg_cron' ELSE 'sql' END,
          current_database(), pg_backend_pid());

  -- 1. The lease.
  lease := public.usage_agg_acquire_lease(job, me, ttl);
  IF NOT (lease->>'acquired')::boolean THEN
    holder := lease->>'owner';
    IF holder ~ '^(pg_cron|sql)@.*:[0-9]{1,10}$'
       AND substring(holder, '^[a-z_]+@(.*):[0-9]+$') = current_database()
       AND NOT EXISTS (
         SELECT 1 FROM pg_catalog.pg_stat_activity a
          WHERE a.pid::bigint = substring(holder, ':([0-9]+)$')::bigint) THEN
      lease := public.usage_agg_acquire_lease(job, me, ttl, holder);
    END IF;
  END IF;
  IF NOT (lease->>'acquired')::boolean THEN
    summary := jsonb_build_object('outcome', NULL, 'skipped', 'another run holds the lease',
      'owner', lease->'owner', 'since', lease->'since', 'expires_at', lease->'expires_at');
    RETURN;
  END IF;
  c_before := (lease->>'cursor')::bigint;
  c_after := c_before;
  -- The statement timeout this session runs under covers the whole CALL,
  -- across its COMMITs (Supabase's global is 2 minutes): the run keeps its
  -- own time bound well inside it, so that the timeout never cuts it, and
  -- records it for `schedule` and `doctor` to check the time limit against.
  tmo_ms := (SELECT setting::bigint FROM pg_catalog.pg_settings WHERE name = 'statement_timeout');
  budget := p_max_seconds;
  IF tmo_ms > 0 THEN
    budget := least(budget, greatest(0, tmo_ms / 1000.0 * 0.8 - 5));
  END IF;
  -- A batch halved after running into the timeout stays halved for the
  -- next runs, and grows back while batches are quick.
  SELECT least(p_batch_ids, coalesce(s.scheduled_batch_ids, 50000)) INTO batch
    FROM public.usage_aggregation_state s WHERE s.job = job;
  batch := coalesce(batch, least(p_batch_ids, 50000));
  UPDATE public.usage_aggregation_state SET scheduled_statement_timeout_ms = tmo_ms WHERE usage_aggregation_state.job = job;
  COMMIT; -- the lease, for everyone to see

  -- 2. and 3. The run-time checks, and a cursor.
  BEGIN
    facts := public.usage_agg_preflight(job);
    problems := public.usage_agg_problems(facts);
    IF jsonb_array_length(problems) > 0 THEN
      outcome := 'refused';
      SELECT 'refused to count: ' || string_agg(p.value->>'message', '; refused to count: ')
        INTO reason FROM jsonb_array_elements(problems) p;
    ELSIF c_before IS NULL THEN
      outcome := 'needs_rebuild';
      reason := 'no run has set the cursor yet: the first run rebuilds every key from all rows and reports drift, '
                'which only the CLI does; run `usage-agg aggregate` once, and the scheduled runs go on from there';
    END IF;
  -- OTHERS does not catch a cancel: the statement timeout is caught
  -- apart, and the run still records itself and lets the lease go.
  EXCEPTION WHEN query_canceled THEN
    outcome := 'stopped';
    reason := format('cancelled while checking the assumptions (%s%s); the next run goes on', SQLERRM,
                     CASE WHEN tmo_ms > 0 THEN format(', statement_timeout %s ms', tmo_ms) ELSE '' END);
  WHEN OTHERS THEN
    outcome := 'failed';
    reason := format('checking the assumptions: %s (SQLSTATE %s)', SQLERRM, SQLSTATE);
  END;

  -- 4. Deleted monthly rows.
  IF outcome IS NULL AND (facts->>'deleted_keys')::bigint > 0 THEN
    BEGIN
      restored := public.usage_agg_restore_deleted_keys(job);
    EXCEPTION WHEN query_canceled THEN
      outcome := 'stopped';
      reason := format('cancelled while rebuilding keys whose monthly row was deleted (%s%s); the next run '
                       'goes on', SQLERRM,
                       CASE WHEN tmo_ms > 0 THEN format(', statement_timeout %s ms', tmo_ms) ELSE '' END);
    WHEN OTHERS THEN
      outcome := 'failed';
      reason := format('rebuilding keys whose monthly row was deleted: %s (SQLSTATE %s)', SQLERRM, SQLSTATE);
    END;
    COMMIT;
  END IF;

  -- 5. Batches, one transaction each.
  WHILE outcome IS NULL LOOP
    IF n_batches > 0 THEN
      IF clock_timestamp() >= started + make_interval(secs => budget) THEN
        outcome := 'stopped';
        reason := format('the time bound (%s s%s) passed; the next run goes on', round(budget, 1),
                         CASE WHEN budget < p_max_seconds
                              THEN format(', inside the statement_timeout of %s ms', tmo_ms) ELSE '' END);
        EXIT;
      END IF;
      IF NOT public.usage_agg_renew_lease(job, me, ttl) THEN
        outcome := 'stopped';
        reason := 'the lease was lost (it expired and another run took it)';
        EXIT;
      END IF;
    END IF;
    BEGIN
      b := public.usage_agg_rpc_batch(job, batch, p_max_wait_ms, false,
             greatest(500, least(10000, budget * 200,
                                 date_part('epoch', started + make_interval(secs => budget) - clock_timestamp()) * 1000
                                ))::integer);
    EXCEPTION WHEN query_canceled THEN
      -- The statement timeout (or a cancel) cut the batch, which rolled
      -- back whole. It fires once: the run can still record itself. The
      -- next run asks for half as many ids, as the CLI does.
      outcome := 'stopped';
      reason := format('a batch of %s ids was cancelled (%s%s); nothing of it was written; the next run '
                       'asks for %s ids', batch, SQLERRM,
                       CASE WHEN tmo_ms > 0 THEN format(', statement_timeout %s ms', tmo_ms) ELSE '' END,
                       greatest(batch / 2, 1000));
      UPDATE public.usage_aggregation_state SET scheduled_batch_ids = greatest(batch / 2, 1000)
       WHERE usage_aggregation_state.job = job;
      EXIT;
    WHEN OTHERS THEN
      outcome := 'failed';
      reason := format('running a batch (usage_agg_rpc_batch): %s (SQLSTATE %s)', SQLERRM, SQLSTATE);
      EXIT;
    END;
    IF (b->>'busy')::boolean THEN
      outcome := 'stopped';
      reason := 'another usage_agg_rpc_batch call is running for this job';
    ELSIF (b->>'needs_rebuild')::boolean THEN
      outcome := 'needs_rebuild';
      reason := 'the cursor was reset (a rebase under way?): run `usage-agg aggregate`';
    ELSIF b->>'to' IS NULL THEN
      outcome := 'stopped';
      reason := format('%s transactions writing usage_requests were still open after %s ms '
                       '(look for transactions left open if this repeats)', b->>'writers_in_flight', p_max_wait_ms);
    ELSE
      n_batches := n_batches + 1;
      n_rows := n_rows + (b->>'rows')::bigint;
      n_keys := n_keys + (b->>'keys')::bigint;
      n_bad := n_bad + (b->>'bad')::bigint;
      -- Rows of closed months, booked as adjustments (periods migration).
      n_late := n_late + coalesce((b->>'late_rows')::bigint, 0);
      -- Writes the rule book found undone: recorded there; this run says so.
      lost := lost || coalesce(b->'lost', '[]');
      bad_ids := (bad_ids || ARRAY(SELECT jsonb_array_elements_text(b->'bad_ids')::bigint))[1:5];
      c_after := (b->>'to')::bigint;
      -- The next batch as the sizing rule says, for this run and the next.
      IF (b->>'next_batch_ids') IS NOT NULL THEN
        batch := least(p_batch_ids, greatest(1000, (b->>'next_batch_ids')::bigint));
        UPDATE public.usage_aggregation_state SET scheduled_batch_ids = batch WHERE usage_aggregation_state.job = job;
      END IF;
      COMMIT;
      EXIT WHEN (b->>'done')::boolean;
    END IF;
  END LOOP;

  -- 6. The record.
  IF outcome IS NULL THEN
    IF jsonb_array_length(lost) > 0 OR coalesce((facts->>'lost_keys')::bigint, 0) > 0 THEN
      outcome := 'writes_lost';
      reason := format('keys had a write that did not hold (a trigger or a hand edit undid it; %s): remove '
                       'the cause, then `usage-agg aggregate --full` (or --month) rebuilds them',
                       CASE WHEN jsonb_array_length(lost) > 0 THEN lost ELSE facts->'refused_examples' END);
    ELSIF coalesce((facts->>'refused_keys')::bigint, 0) > 0 THEN
      outcome := 'decreases_refused';
      reason := format('%s keys hold counts above their raw rows since %s (%s); check them, then '
                       '`usage-agg aggregate --full --allow-decrease` (or --month)',
                       facts->>'refused_keys', facts->>'refused_since', facts->'refused_examples');
    ELSIF n_bad > 0 THEN
      outcome := 'bad_rows';
      reason := format('%s rows rejected as bad data (ids %s); every other row is counted',
                       n_bad, array_to_string(bad_ids, ', '));
    ELSE
      outcome := 'ok';
    END IF;
  END IF;
  IF outcome = 'stopped' AND n_bad > 0 THEN
    -- The cursor has passed them: this run is the one to name them.
    reason := format('%s; and %s rows rejected as bad data (ids %s)', reason, n_bad, array_to_string(bad_ids, ', '));
  END IF;
  IF n_bad > 0 THEN
    -- The job's tally of rejected rows, which status and verify show, kept
    -- as CLI runs keep it (the cursor has passed these rows).
    PERFORM public.usage_agg_note_rejected(job, n_bad, bad_ids);
  END IF;
  PERFORM public.usage_agg_finish_run(job, me, outcome, n_rows);
  summary := jsonb_build_object(
    'outcome', outcome, 'reason', reason, 'owner', me, 'batches', n_batches, 'rows', n_rows,
    'keys', n_keys, 'late_rows', n_late, 'bad', n_bad, 'bad_ids', to_jsonb(bad_ids),
    'cursor_before', c_before, 'cursor_after', c_after, 'restored_keys', restored,
    'seconds', round(date_part('epoch', clock_timestamp() - started)::numeric, 3));
  COMMIT;
  IF outcome IN ('refused', 'needs_rebuild', 'failed', 'bad_rows', 'decreases_refused', 'writes_lost')
     OR (outcome = 'stopped' AND n_bad > 0) THEN
    RAISE EXCEPTION 'usage_agg_run_scheduled (%): %', outcome, reason USING DETAIL = summary::text;
  END IF;
END
$$;

-- Its owner alone (postgres on Supabase): pg_cron runs the job as the role
-- that scheduled it, the owner of usage_agg_schedule. Not the API's roles.
REVOKE ALL ON PROCEDURE public.usage_agg_run_scheduled(integer, bigint, integer, jsonb) FROM PUBLIC, anon, authenticated, service_role;

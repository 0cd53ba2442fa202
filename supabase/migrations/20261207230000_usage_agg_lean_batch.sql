-- A server-side batch with fewer passes, and sized without booking every
-- key twice (issue 22). Measured on 1,000,000 uniform rows over 30,000
-- keys, from an empty table, on this project's 2 cores: one batch took
-- 1.0 s (fold 0.49, booking 0.50) against 0.51 s for a bare INSERT ...
-- SELECT ... GROUP BY ... ON CONFLICT; it takes 0.77 s (0.35 and 0.41).
--   * the fold is shaped as a bare GROUP BY: a group is folded as if every
--     row were good, and one with a bad row (rare) is folded again, each
--     row checked; checking each row in every aggregate's filter made the
--     fold twice the bare one (usage_agg_rpc_batch);
--   * a key booked for the first time goes straight into the plan, with
--     nothing to lock or read; the plan's joins run over the other keys
--     alone, and the empty targets are made only when there are some
--     (usage_agg_book_folded);
--   * what a client folded is checked at its door, usage_agg_book; the
--     server-side batch folds only good rows, one line a key, and no
--     longer checks them again. The door also refuses a key with more rows
--     than the range has ids, and the call that moves the cursor checks
--     that every key with good rows in the batch holds its newest one (an
--     adversarial pass found that a client sending fewer keys, with the
--     batch's true number of good rows, moved the cursor past rows never
--     counted);
--   * the first batch books 1,000 ids and folds the first 50,000 read only
--     to size the next (p_sample_ids): a first batch of 50,000 ids booked
--     every key of a uniform table, and the next booked them all again
--     (usage_agg_rpc_batch; the scheduled run, usage_agg_run_scheduled,
--     the first time it runs);
--   * usage_agg_run_keys counts the keys a run wrote, in one call: the
--     CLI read every one back over REST to count them, a page per 1,000
--     keys, and the scheduled run summed each batch's keys.
-- The rules are the same: docs/semantics.md, "Booking a row".

-- usage_agg_rpc_batch gains a parameter: the old one goes, or PostgREST
-- could not choose between the two.
DROP FUNCTION IF EXISTS public.usage_agg_rpc_batch(text, bigint, integer, boolean, integer);

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

-- The REST engine's door to the rules (usage_agg_book_folded): the client
-- pages through usage_requests, folds rows by key in memory, and hands the
-- folded keys here over /rpc/. p_keys is an array of folded keys,
-- {"portal_id", "month_year", "c", "s", "e", "at", "w"}, for the good rows
-- in (p_from, p_to] the client read. With p_advance, the cursor moves to
-- p_to in the same transaction (a batch is then all or nothing); that is
-- refused when the cursor is not at p_from or beyond (a rebase reset it
-- meanwhile, so the rows below p_from may not be counted), and unless
-- p_good_rows, the good rows the client folded over all the batch's calls,
-- is the number of good rows in (p_from, p_to]: a client that stopped
-- paging early (the server's silent row cap) or folded rows away can never
-- move the cursor over rows it did not count.
CREATE OR REPLACE FUNCTION public.usage_agg_book(
  p_job text, p_from bigint, p_to bigint, p_keys jsonb,
  p_advance boolean DEFAULT false, p_dry_run boolean DEFAULT false, p_good_rows bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  c       bigint;
  result  jsonb;
  n_truth bigint;
  n_short bigint;
BEGIN
  IF jsonb_typeof(coalesce(p_keys, '[]')) <> 'array' THEN
    RAISE EXCEPTION 'usage_agg_book: p_keys must be an array' USING ERRCODE = '22023';
  END IF;
  SELECT cursor_id INTO c FROM public.usage_aggregation_state WHERE job = p_job;
  IF c IS NULL OR c < p_from THEN
    RAISE EXCEPTION 'usage_agg_book: the cursor of job % is at %, below % (a rebase reset it since this run read it): stop; the next run counts from there',
      p_job, coalesce(c::text, 'none'), p_from USING ERRCODE = '55000';
  END IF;
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_fold (
    portal_id bigint, month_year text, c bigint, s bigint, e bigint, at timestamp, w bigint) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_fold;
  INSERT INTO pg_temp.usage_agg_fold
  SELECT k.portal_id, k.month_year, k.c, k.s, k.e, k.at, k.w
    FROM jsonb_to_recordset(coalesce(p_keys, '[]')) AS k(portal_id bigint, month_year text, c bigint,
                                                          s bigint, e bigint, at timestamp, w bigint);
  -- What a client sent is checked here, the door: every key one a good
  -- row can make, its counts adding up, its ids in the range, once.
  IF EXISTS (SELECT 1 FROM pg_temp.usage_agg_fold f
              WHERE NOT public.usage_agg_valid_key(f.portal_id, f.month_year)
                 OR f.c IS NULL OR f.s IS NULL OR f.e IS NULL
                 OR f.c < 1 OR f.s < 0 OR f.e < 0 OR f.c <> f.s + f.e OR f.c > p_to - p_from
                 OR f.w IS NULL OR f.w <= p_from OR f.w > p_to
                 OR NOT public.usage_agg_valid_time(f.at)) THEN
    RAISE EXCEPTION 'usage_agg_book: a folded key is not one a good row can make (bad key, counts that do not add up or exceed the range, or an id outside (%, %])', p_from, p_to
      USING ERRCODE = '22023';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_temp.usage_agg_fold GROUP BY portal_id, month_year HAVING count(*) > 1) THEN
    RAISE EXCEPTION 'usage_agg_book: a key is folded twice' USING ERRCODE = '22023';
  END IF;
  result := public.usage_agg_book_folded(p_job, p_from, p_to, p_dry_run);
  IF p_advance AND NOT p_dry_run THEN
    -- Every good row of the batch is counted before the cursor passes it:
    -- the client folded as many as there are over all the batch's calls,
    -- and every key with good rows there now holds its newest one (its
    -- monthly row or a late adjustment has a watermark at or above it),
    -- so a client that sent fewer keys is refused too, not only one that
    -- read fewer rows. One scan, the key checked per key.
    SELECT coalesce(sum(r.n), 0),
           count(*) FILTER (
             WHERE NOT EXISTS (SELECT 1 FROM public.portal_usage_monthly m
                                WHERE m.portal_id = r.portal_id AND m.month_year = r.month_year
                                  AND m.last_request_id >= r.w)
               AND NOT EXISTS (SELECT 1 FROM public.portal_usage_adjustments a
                                WHERE a.portal_id = r.portal_id AND a.month_year = r.month_year
                                  AND a.source = 'late' AND a.last_request_id >= r.w)
               -- A monthly row deleted meanwhile is logged, and the next
               -- run's restore counts it again from all its rows.
               AND NOT EXISTS (SELECT 1 FROM public.usage_agg_deleted_keys d
                                WHERE d.portal_id = r.portal_id AND d.month_year = r.month_year))
      INTO n_truth, n_short
      FROM (SELECT g.* FROM (
              SELECT u.portal_id, u.month_year, count(*) AS n, max(u.id) AS w
                FROM public.usage_requests u
               WHERE u.id > p_from AND u.id <= p_to AND u.success IS NOT NULL
                 AND public.usage_agg_valid_time(u.request_timestamp)
               GROUP BY 1, 2) g
             WHERE public.usage_agg_valid_key(g.portal_id, g.month_year)) r;
    IF p_good_rows IS DISTINCT FROM n_truth THEN
      RAISE EXCEPTION 'usage_agg_book: the batch (%, %] holds a different number of good rows than the % folded: not every row was read; nothing of this call is booked and the cursor stays',
        p_from, p_to, coalesce(p_good_rows::text, 'none') USING ERRCODE = '22023';
    END IF;
    IF n_short > 0 THEN
      RAISE EXCEPTION 'usage_agg_book: % keys with good rows in the batch (%, %] do not hold them yet: not every key was sent; nothing of this call is booked and the cursor stays',
        n_short, p_from, p_to USING ERRCODE = '22023';
    END IF;
    -- Checked again under the row's lock: a rebase that reset the cursor
    -- since the check above makes this batch roll back whole.
    UPDATE public.usage_aggregation_state
       SET cursor_id = greatest(cursor_id, p_to), updated_at = now()
     WHERE job = p_job AND cursor_id >= p_from
    RETURNING cursor_id INTO c;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'usage_agg_book: the cursor of job % was reset while this batch was booked (a rebase): stop; the next run counts from there',
        p_job USING ERRCODE = '55000';
    END IF;
    result := result || jsonb_build_object('cursor', c);
  END IF;
  RETURN result;
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_book(text, bigint, bigint, jsonb, boolean, boolean, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_book(text, bigint, bigint, jsonb, boolean, boolean, bigint) TO service_role;

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
--
-- p_sample_ids (with p_aim_ms): the ids from the cursor whose rows are
-- folded once more, read only, to size the next batch: how often rows
-- repeat a key shows only over many rows, and booking many keys only to
-- learn that costs a batch (issue 22: the first batch of 50,000 ids booked
-- every key of a uniform table, and the next booked them all again). The
-- first batch is then small (its booking gives the cost of a key), and
-- the sample gives how rows fall on keys and what folding them costs.
CREATE OR REPLACE FUNCTION public.usage_agg_rpc_batch(
  p_job text DEFAULT 'default',
  p_batch_ids bigint DEFAULT 1000000,
  p_max_wait_ms integer DEFAULT 2000,
  p_dry_run boolean DEFAULT false,
  p_aim_ms integer DEFAULT NULL,
  p_sample_ids bigint DEFAULT NULL)
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
  n_dirty bigint;
  bad_ids bigint[];
  booked  jsonb;
  n_keys  bigint;
  n_good  bigint;
  t_start timestamptz;
  t_fold  timestamptz;
  t_book  timestamptz;
  t_fixed double precision;
  t_sample timestamptz;
  s_dirty boolean;
  s_hi    bigint;
  s_rows  bigint;
  s_keys  bigint;
  s_ms    double precision;
  sized   bigint;
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
  -- The fold, in the shape of a bare GROUP BY: bad rows are rare, so a
  -- group is folded as if every row were good, with a count of the rows
  -- that are not (no success, or a time no run can book); a group with
  -- one is folded again below, exactly, from its rows alone. Checking each
  -- row in every aggregate's filter made the fold twice the bare one.
  -- Keys are checked per key, not per row: a batch has far fewer keys
  -- than rows, and the regular expression is the costliest part.
  WITH g AS (
    SELECT u.portal_id, u.month_year, count(*) AS n, count(u.success) AS n_ok,
           count(*) FILTER (WHERE u.success) AS s,
           min(u.request_timestamp) AS first_at, max(u.request_timestamp) AS at, max(u.id) AS w
      FROM public.usage_requests u WHERE u.id > lo AND u.id <= hi
     GROUP BY 1, 2
  ), v AS (
    -- A group's times are all bookable when its earliest and its latest
    -- are (they are ordered, the infinities at the ends).
    SELECT g.*, public.usage_agg_valid_key(g.portal_id, g.month_year) AS good,
           g.n_ok < g.n OR NOT public.usage_agg_valid_time(g.first_at)
             OR NOT public.usage_agg_valid_time(g.at) AS dirty
      FROM g
  ), kept AS (
    INSERT INTO pg_temp.usage_agg_fold
    SELECT portal_id, month_year, n, s, n - s, at, w FROM v WHERE good AND NOT dirty
  )
  SELECT coalesce(sum(n) FILTER (WHERE NOT good), 0), count(*) FILTER (WHERE good AND dirty)
    INTO n_bad, n_dirty FROM v;
  IF n_dirty > 0 THEN
    -- The good keys with a bad row: their rows (every row of the range
    -- whose key is not folded yet, bad keys dropped again) folded with
    -- each row checked.
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
                FROM public.usage_requests u
               WHERE u.id > lo AND u.id <= hi
                 AND NOT EXISTS (SELECT 1 FROM pg_temp.usage_agg_fold f
                                  WHERE f.portal_id = u.portal_id AND f.month_year = u.month_year)) r
       GROUP BY 1, 2
    ), v AS (
      SELECT g.* FROM g WHERE public.usage_agg_valid_key(g.portal_id, g.month_year)
    ), kept AS (
      INSERT INTO pg_temp.usage_agg_fold
      SELECT portal_id, month_year, c, s, e, at, w FROM v WHERE c > 0
    )
    SELECT n_bad + coalesce(sum(nulls), 0) INTO n_bad FROM v;
  END IF;
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
  t_fixed := extract(epoch FROM clock_timestamp() - t_book) * 1000;
  sized := public.usage_agg_next_batch_ids(
    hi - lo, n_good + n_bad, n_keys,
    extract(epoch FROM t_fold - t_start) * 1000, extract(epoch FROM t_book - t_fold) * 1000,
    t_fixed, p_aim_ms);
  s_hi := least(horizon, lo + coalesce(p_sample_ids, 0));
  IF p_aim_ms IS NOT NULL AND s_hi > hi AND n_keys > 0 THEN
    -- The sample: its rows and keys, and what folding them took; a key's
    -- booking costs what it cost in this batch. Its keys are counted with
    -- the fold's own grouping, so its time is the fold's.
    t_sample := clock_timestamp();
    -- (Every aggregate is read, or the planner would drop it.)
    SELECT count(*), coalesce(sum(g.n), 0), bool_or(g.n_ok < g.n OR g.s > g.n OR g.first_at > g.at OR g.w < 0)
      INTO s_keys, s_rows, s_dirty FROM (
      SELECT u.portal_id, u.month_year, count(*) AS n, count(u.success) AS n_ok,
             count(*) FILTER (WHERE u.success) AS s,
             min(u.request_timestamp) AS first_at, max(u.request_timestamp) AS at, max(u.id) AS w
        FROM public.usage_requests u WHERE u.id > lo AND u.id <= s_hi
       GROUP BY 1, 2) g;
    s_ms := extract(epoch FROM clock_timestamp() - t_sample) * 1000;
    IF s_rows > n_good + n_bad THEN
      sized := public.usage_agg_next_batch_ids(
        s_hi - lo, s_rows, s_keys, s_ms,
        extract(epoch FROM t_book - t_fold) * 1000 / n_keys * s_keys, t_fixed, p_aim_ms);
    END IF;
  END IF;
  RETURN (booked - 'changes') || jsonb_build_object('horizon', horizon, 'bad', n_bad,
    'bad_ids', to_jsonb(coalesce(bad_ids, '{}')), 'done', hi >= horizon, 'dry_run', p_dry_run,
    'fold_ms', round((extract(epoch FROM t_fold - t_start) * 1000)::numeric, 1),
    'book_ms', round((extract(epoch FROM t_book - t_fold) * 1000)::numeric, 1),
    'next_batch_ids', sized);
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_rpc_batch(text, bigint, integer, boolean, integer, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_rpc_batch(text, bigint, integer, boolean, integer, bigint) TO service_role;

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
--   4b. the crossings a killed rebuild left pending are recorded
--      (usage_agg_sweep_pending_crossings), as every CLI run does first;
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
-- It returns a jsonb summary in `summary` (`CALL` shows it), with the
-- alerts it recorded ('alerts'). Where the CLI
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
-- usage_aggregation_state.scheduled_batch_ids (the first time, 1,000 ids
-- and a sample of 50,000 to size the next: usage_agg_rpc_batch's
-- p_sample_ids), never above p_batch_ids. It records the
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
  swept     jsonb := '[]';
  n_alerts  bigint := 0;
  budget    numeric;
  batch     bigint;
  sample    bigint;
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
  -- The first time, as the CLI: 1,000 ids booked, and the first 50,000
  -- ids folded read only to size the next batch (p_sample_ids).
  SELECT least(p_batch_ids, s.scheduled_batch_ids) INTO batch
    FROM public.usage_aggregation_state s WHERE s.job = job;
  IF batch IS NULL THEN
    batch := least(p_batch_ids, 1000);
    sample := 50000;
  END IF;
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
  -- The crossings a rebuild killed between its writes and their record
  -- left pending (20261207175000): recorded before counting goes on, as
  -- every CLI run does.
  IF outcome IS NULL THEN
    BEGIN
      swept := public.usage_agg_sweep_pending_crossings(job);
      n_alerts := n_alerts + jsonb_array_length(swept);
    EXCEPTION WHEN query_canceled THEN
      outcome := 'stopped';
      reason := format('cancelled while recording the crossings a rebuild left pending (%s); the next run goes on',
                       SQLERRM);
    WHEN OTHERS THEN
      outcome := 'failed';
      reason := format('recording the crossings a rebuild left pending (usage_agg_sweep_pending_crossings): %s '
                       '(SQLSTATE %s)', SQLERRM, SQLSTATE);
    END;
    COMMIT;
  END IF;

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
                                ))::integer,
             CASE WHEN n_batches = 0 THEN sample END);
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
      n_alerts := n_alerts + coalesce(jsonb_array_length(b->'alerts'), 0);
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
  -- A key in several batches is one key: after more than one batch, the
  -- keys the run wrote, counted once (usage_agg_run_keys; the sum of each
  -- batch's keys counted a key once a batch).
  IF n_batches > 1 THEN
    n_keys := public.usage_agg_run_keys(c_before, c_after);
  END IF;
  summary := jsonb_build_object(
    'outcome', outcome, 'reason', reason, 'owner', me, 'batches', n_batches, 'rows', n_rows,
    'keys', n_keys, 'late_rows', n_late, 'alerts', n_alerts, 'bad', n_bad, 'bad_ids', to_jsonb(bad_ids),
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

-- The keys a run from p_from to p_to wrote: those whose monthly row or
-- late adjustment has its watermark in (p_from, p_to], each once (a key a
-- later run wrote since is not among them; one a --month rebuild left with
-- its watermark in that range is, though the run may have found nothing
-- new for it). A multi-batch run of the server-side engine reports its
-- distinct keys with it; it read every monthly row back over REST, a page
-- per 1,000 keys, to count them, and missed the late ones.
CREATE OR REPLACE FUNCTION public.usage_agg_run_keys(p_from bigint, p_to bigint)
RETURNS bigint
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  SELECT count(*) FROM (
    SELECT m.portal_id, m.month_year::text FROM public.portal_usage_monthly m
     WHERE m.last_request_id > p_from AND m.last_request_id <= p_to
    UNION
    SELECT a.portal_id, a.month_year::text FROM public.portal_usage_adjustments a
     WHERE a.source = 'late' AND a.last_request_id > p_from AND a.last_request_id <= p_to) k
$$;

-- service_role alone: the CLI calls it over REST with the service key.
REVOKE ALL ON FUNCTION public.usage_agg_run_keys(bigint, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_run_keys(bigint, bigint) TO service_role;

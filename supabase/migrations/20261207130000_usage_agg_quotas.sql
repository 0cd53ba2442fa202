-- usage-agg: quotas and usage alerts (issue 20, docs/quotas.md).
--
-- Apply after 20261207120000_usage_agg_prune_guard.sql. Idempotent.
--
-- A portal's monthly allowance (portal_usage_quotas: its own row, else the
-- default plan's, the row whose portal_id is NULL) and the thresholds of it
-- that fire an alert (80% and 100% unless told). The rule book
-- (usage_agg_book_folded, redefined here whole) records each threshold a
-- month's usage reaches in portal_usage_alerts, in the transaction that
-- books the rows, once per portal, month, threshold and limit (its
-- UNIQUE): every engine and the scheduled run book through it, so none can
-- miss a crossing or record one twice. `usage-agg alerts deliver` posts
-- each undelivered alert to a webhook, signed as Standard Webhooks specify,
-- and records the attempts (usage_agg_alert_attempt).
-- usage_quota_status(p_portal_id, p_month) is what the app reads between
-- runs: the usage right now (as usage_current), the limit, the percentage
-- and a straight-line projection of the month's end.

-- Thresholds: 1 to 20 percentages of the limit, each from 1 to 1000,
-- strictly ascending. Used by the tables' CHECKs and usage_agg_set_quota.
CREATE OR REPLACE FUNCTION public.usage_agg_valid_thresholds(p_thresholds integer[])
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
  SELECT coalesce(cardinality(p_thresholds) BETWEEN 1 AND 20
                  AND array_ndims(p_thresholds) = 1
                  AND array_position(p_thresholds, NULL) IS NULL
                  AND 1 <= ALL (p_thresholds) AND 1000 >= ALL (p_thresholds)
                  AND p_thresholds = ARRAY(SELECT DISTINCT v FROM unnest(p_thresholds) AS v ORDER BY v), false)
$$;

-- A portal's monthly allowance. portal_id NULL is the default plan: every
-- portal without a row of its own. One row per portal, one default.
CREATE TABLE IF NOT EXISTS public.portal_usage_quotas (
  portal_id             bigint CHECK (portal_id > 0),
  monthly_request_limit bigint NOT NULL CHECK (monthly_request_limit > 0),
  thresholds_percent    integer[] NOT NULL DEFAULT '{80,100}'
                        CHECK (public.usage_agg_valid_thresholds(thresholds_percent)),
  updated_at            timestamptz NOT NULL DEFAULT now(),
  updated_by            text
);
CREATE UNIQUE INDEX IF NOT EXISTS portal_usage_quotas_portal_key
  ON public.portal_usage_quotas ((coalesce(portal_id, 0)));
ALTER TABLE public.portal_usage_quotas ENABLE ROW LEVEL SECURITY;

-- Each threshold a month's usage reached, once per portal, month,
-- threshold and limit: request_count is the month's usage when the booking
-- that reached it committed (a batch books many rows at once, so it may be
-- above the threshold). delivered_at, attempts, last_error and
-- last_attempt_at are the webhook's (usage-agg alerts deliver).
CREATE TABLE IF NOT EXISTS public.portal_usage_alerts (
  id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  portal_id         bigint NOT NULL CHECK (portal_id > 0),
  month_year        text NOT NULL CHECK (public.usage_agg_valid_month(month_year)),
  threshold_percent integer NOT NULL CHECK (threshold_percent BETWEEN 1 AND 1000),
  request_limit     bigint NOT NULL CHECK (request_limit > 0),
  request_count     bigint NOT NULL,
  crossed_at        timestamptz NOT NULL DEFAULT now(),
  delivered_at      timestamptz,
  attempts          integer NOT NULL DEFAULT 0,
  last_error        text,
  last_attempt_at   timestamptz,
  -- The webhook-id every delivery of it carries (Standard Webhooks): the
  -- same across attempts, unique across databases, so a receiver of
  -- several projects dedups by it alone.
  webhook_id        uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
  CONSTRAINT portal_usage_alerts_once UNIQUE (portal_id, month_year, threshold_percent, request_limit)
);
-- What delivery and `status` read: the undelivered, oldest first.
CREATE INDEX IF NOT EXISTS portal_usage_alerts_undelivered_idx
  ON public.portal_usage_alerts (id) WHERE delivered_at IS NULL;
ALTER TABLE public.portal_usage_alerts ENABLE ROW LEVEL SECURITY;

-- The rule book, as in 20261207100000_usage_agg_rule_book.sql, with the
-- quotas' crossings: after the writes are read back, each threshold a
-- booked key's month reached is recorded in portal_usage_alerts (see the
-- block "Quotas" below), in the same transaction; a dry run answers them
-- ("alerts") and records none. The rest is unchanged.
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

  -- Where each key books, and what is wrong with the input.
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_plan (
    portal_id bigint, month_year text, late boolean, booked text,
    c bigint, s bigint, e bigint, at timestamp, w bigint,
    tgt_c bigint, tgt_s bigint, tgt_e bigint, tgt_at timestamp, tgt_w bigint, e_k bigint,
    dc bigint, ds bigint, de bigint, dat timestamp, dw bigint, redo boolean) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_plan;
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
  INSERT INTO pg_temp.usage_agg_plan (portal_id, month_year, late, booked, c, s, e, at, w)
  SELECT f.portal_id, f.month_year, cm.month_year IS NOT NULL,
         CASE WHEN cm.month_year IS NOT NULL THEN public.usage_agg_booking_month(f.month_year) END,
         f.c, f.s, f.e, f.at, f.w
    FROM pg_temp.usage_agg_fold f
    LEFT JOIN public.usage_agg_closed_months cm ON cm.month_year = f.month_year AND cm.closed;

  -- Targets that do not exist yet, for keys with rows above what is
  -- counted (read without locks: a key created meanwhile is found below).
  IF NOT p_dry_run THEN
    INSERT INTO public.portal_usage_monthly
           (portal_id, month_year, request_count, success_count, error_count, last_request_at,
            last_request_id, updated_at)
    SELECT p.portal_id, p.month_year, 0, 0, 0, NULL, 0, now()
      FROM pg_temp.usage_agg_plan p
     WHERE NOT p.late
       AND NOT EXISTS (SELECT 1 FROM public.portal_usage_monthly m
                        WHERE m.portal_id = p.portal_id AND m.month_year = p.month_year)
     ORDER BY p.portal_id, p.month_year
    ON CONFLICT (portal_id, month_year) DO NOTHING;
    INSERT INTO public.portal_usage_adjustments
           (portal_id, month_year, booked_month, source, request_count, success_count, error_count,
            last_request_at, last_request_id, idempotency_key, counted_from_id)
    SELECT p.portal_id, p.month_year, p.booked, 'late', 0, 0, 0, NULL, 0,
           'late:' || p.portal_id || ':' || p.month_year || ':' || p.booked, NULL
      FROM pg_temp.usage_agg_plan p
     WHERE p.late
       AND NOT EXISTS (SELECT 1 FROM public.portal_usage_adjustments a
                        WHERE a.idempotency_key = 'late:' || p.portal_id || ':' || p.month_year || ':' || p.booked)
     ORDER BY p.portal_id, p.month_year
    ON CONFLICT (idempotency_key) DO NOTHING;

    -- Every target locked, in key order.
    PERFORM 1 FROM public.portal_usage_monthly m JOIN pg_temp.usage_agg_plan p
        ON m.portal_id = p.portal_id AND m.month_year = p.month_year AND NOT p.late
     ORDER BY m.portal_id, m.month_year FOR UPDATE OF m;
    PERFORM 1 FROM public.portal_usage_adjustments a JOIN pg_temp.usage_agg_plan p
        ON a.idempotency_key = 'late:' || p.portal_id || ':' || p.month_year || ':' || p.booked AND p.late
     ORDER BY a.portal_id, a.month_year FOR UPDATE OF a;
  END IF;

  -- The target's state and E_k, under those locks.
  UPDATE pg_temp.usage_agg_plan p
     SET tgt_c = CASE WHEN p.late THEN t.a_c ELSE m.request_count END,
         tgt_s = CASE WHEN p.late THEN t.a_s ELSE m.success_count END,
         tgt_e = CASE WHEN p.late THEN t.a_e ELSE m.error_count END,
         tgt_at = CASE WHEN p.late THEN t.a_at ELSE m.last_request_at END,
         tgt_w = CASE WHEN p.late THEN t.a_w ELSE m.last_request_id END,
         e_k = greatest(coalesce(m.last_request_id, 0), coalesce(x.all_w, 0))
    FROM pg_temp.usage_agg_plan k
    LEFT JOIN public.portal_usage_monthly m ON m.portal_id = k.portal_id AND m.month_year = k.month_year
    LEFT JOIN LATERAL (
      SELECT max(a.last_request_id) AS all_w
        FROM public.portal_usage_adjustments a
       WHERE a.portal_id = k.portal_id AND a.month_year = k.month_year AND a.source = 'late') x ON true
    LEFT JOIN LATERAL (
      SELECT a.request_count AS a_c, a.success_count AS a_s, a.error_count AS a_e,
             a.last_request_at AS a_at, a.last_request_id AS a_w
        FROM public.portal_usage_adjustments a
       WHERE k.late AND a.idempotency_key = 'late:' || k.portal_id || ':' || k.month_year || ':' || k.booked) t ON true
   WHERE p.portal_id = k.portal_id AND p.month_year = k.month_year;

  -- What is new for each key.
  UPDATE pg_temp.usage_agg_plan
     SET dc = c, ds = s, de = e, dat = at, dw = w, redo = false
   WHERE e_k <= p_from;
  UPDATE pg_temp.usage_agg_plan
     SET dc = 0, ds = 0, de = 0, dat = NULL, dw = NULL, redo = false
   WHERE e_k >= w;
  UPDATE pg_temp.usage_agg_plan
     SET redo = true
   WHERE e_k > p_from AND e_k < w;
  IF EXISTS (SELECT 1 FROM pg_temp.usage_agg_plan WHERE redo) THEN
    UPDATE pg_temp.usage_agg_plan p
       SET dc = coalesce(x.c, 0), ds = coalesce(x.s, 0), de = coalesce(x.e, 0), dat = x.at, dw = x.w
      FROM pg_temp.usage_agg_plan k
      LEFT JOIN LATERAL (
        SELECT count(*) AS c, count(*) FILTER (WHERE r.success) AS s,
               count(*) FILTER (WHERE NOT r.success) AS e, max(r.request_timestamp) AS at, max(r.id) AS w
          FROM public.usage_requests r
         WHERE r.id > k.e_k AND r.id <= p_to
           AND r.portal_id = k.portal_id AND r.month_year = k.month_year
           AND r.success IS NOT NULL AND public.usage_agg_valid_time(r.request_timestamp)) x ON true
     WHERE k.redo AND p.portal_id = k.portal_id AND p.month_year = k.month_year;
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
     AND t.idempotency_key = 'late:' || p.portal_id || ':' || p.month_year || ':' || p.booked;

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
        ON p.late AND a.idempotency_key = 'late:' || p.portal_id || ':' || p.month_year || ':' || p.booked
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

-- Sets a portal's quota (p_portal_id), or the default plan's (left out): the
-- limit of requests a month and the thresholds that fire an alert. Refuses,
-- writing nothing: a limit below 1 ('bad_limit'), thresholds outside 1 to
-- 1000 or not strictly ascending ('bad_thresholds'), a portal id below 1
-- ('bad_portal'), and a portal usage-agg has never seen ('unknown_portal':
-- no monthly row, adjustment or pruned rows, and no row no run has counted
-- yet), unless p_new_portal (a portal whose first request is still to
-- come). Answers what was set, what it replaced, and the alerts of the
-- thresholds the portal's open months (every portal's, for the default
-- plan) have already reached by their stored totals, recorded now, in
-- the same transaction (usage_agg_record_crossings): a lowered limit
-- fires at once, not at the next request.
CREATE OR REPLACE FUNCTION public.usage_agg_set_quota(
  p_limit bigint, p_thresholds integer[] DEFAULT '{80,100}', p_portal_id bigint DEFAULT NULL,
  p_by text DEFAULT NULL, p_new_portal boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  c      bigint;
  before jsonb;
  after  jsonb;
BEGIN
  IF p_portal_id IS NOT NULL AND p_portal_id < 1 THEN
    RETURN jsonb_build_object('refused', 'bad_portal');
  END IF;
  IF p_limit IS NULL OR p_limit < 1 THEN
    RETURN jsonb_build_object('refused', 'bad_limit');
  END IF;
  IF NOT public.usage_agg_valid_thresholds(p_thresholds) THEN
    RETURN jsonb_build_object('refused', 'bad_thresholds');
  END IF;
  IF p_portal_id IS NOT NULL AND NOT coalesce(p_new_portal, false)
     AND NOT EXISTS (SELECT 1 FROM public.portal_usage_monthly m WHERE m.portal_id = p_portal_id)
     AND NOT EXISTS (SELECT 1 FROM public.portal_usage_adjustments a WHERE a.portal_id = p_portal_id)
     AND NOT EXISTS (SELECT 1 FROM public.usage_agg_pruned p WHERE p.portal_id = p_portal_id)
     AND NOT EXISTS (SELECT 1 FROM public.portal_usage_quotas q WHERE q.portal_id = p_portal_id) THEN
    SELECT coalesce(s.cursor_id, 0) INTO c FROM public.usage_aggregation_state s WHERE s.job = 'default';
    IF NOT EXISTS (SELECT 1 FROM public.usage_requests r
                    WHERE r.id > coalesce(c, 0) AND r.portal_id = p_portal_id) THEN
      RETURN jsonb_build_object('refused', 'unknown_portal');
    END IF;
  END IF;
  SELECT jsonb_build_object('monthly_request_limit', q.monthly_request_limit,
                            'thresholds_percent', to_jsonb(q.thresholds_percent),
                            'updated_at', q.updated_at, 'updated_by', q.updated_by)
    INTO before
    FROM public.portal_usage_quotas q WHERE coalesce(q.portal_id, 0) = coalesce(p_portal_id, 0)
   FOR UPDATE;
  INSERT INTO public.portal_usage_quotas AS q
         (portal_id, monthly_request_limit, thresholds_percent, updated_at, updated_by)
  VALUES (p_portal_id, p_limit, p_thresholds, now(), p_by)
  ON CONFLICT ((coalesce(portal_id, 0))) DO UPDATE
     SET monthly_request_limit = excluded.monthly_request_limit,
         thresholds_percent = excluded.thresholds_percent,
         updated_at = excluded.updated_at, updated_by = excluded.updated_by
  RETURNING jsonb_build_object('portal_id', q.portal_id, 'monthly_request_limit', q.monthly_request_limit,
                               'thresholds_percent', to_jsonb(q.thresholds_percent),
                               'updated_at', q.updated_at, 'updated_by', q.updated_by)
    INTO after;
  RETURN jsonb_build_object('quota', after, 'previous', before,
                            'alerts', public.usage_agg_record_crossings(NULL, p_portal_id));
END
$$;

-- The crossings of the months a rebuild wrote (first run, --full, --month,
-- --rebase): a rebuild writes absolute states over REST, outside the rule
-- book, so the run calls this after its writes; and of a portal whose
-- quota was just set (usage_agg_set_quota). Every open month of p_months
-- (NULL: every open month), of p_portal_id (NULL: every portal), is read as
-- stored, and each threshold its usage reached and no alert records is
-- recorded, as the rule book records it. With p_above, only the keys
-- written past that watermark: a CLI run calls it with the cursor before
-- it counts when a key stands above the cursor, which a rebuild killed
-- between its writes and this call leaves, so that such a crossing is
-- recorded by the next run. Answers the alerts recorded.
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

-- One delivery attempt of an alert, recorded by `usage-agg alerts
-- deliver`: attempts counted, the time of the attempt, delivered_at on a
-- 2xx answer (kept as first set when delivered twice), the error otherwise
-- (last_error keeps the last failure's after a delivery).
CREATE OR REPLACE FUNCTION public.usage_agg_alert_attempt(p_id bigint, p_delivered boolean, p_error text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  result jsonb;
BEGIN
  UPDATE public.portal_usage_alerts a
     SET attempts = a.attempts + 1,
         last_attempt_at = now(),
         delivered_at = CASE WHEN p_delivered THEN coalesce(a.delivered_at, now()) ELSE a.delivered_at END,
         last_error = CASE WHEN p_delivered THEN a.last_error ELSE left(p_error, 1000) END
   WHERE a.id = p_id
  RETURNING jsonb_build_object('id', a.id, 'attempts', a.attempts, 'delivered_at', a.delivered_at,
                               'last_error', a.last_error)
    INTO result;
  RETURN coalesce(result, jsonb_build_object('id', p_id, 'missing', true));
END
$$;

-- The alerts not yet delivered, for `status`, `doctor` and the metrics:
-- how many, the oldest's crossing time and age by the database's clock,
-- and the last error among them.
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

-- A portal's month against its quota, for the app between runs: used
-- (exact right now, as usage_current: stored totals, late adjustments and
-- the rows no run has counted yet), the limit, the percentage, and a
-- straight-line projection of the month's end (used over the time elapsed,
-- at least an hour, times the month's length; the month's usage once it
-- has ended). p_month defaults to the current month (UTC, by the
-- database's clock). quota is 'portal' (its own row), 'default' or 'none'
-- (then the limit and percentages are NULL); alerted_percent lists the
-- thresholds of the current limit already recorded for the month.
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


-- Grants, as 20261207110000 gives them: every default grant on the new
-- tables, their sequence and the new functions revoked (Supabase gives
-- anon, authenticated and service_role ALL on what postgres makes in
-- public), then service_role given what the CLI and the app call. The
-- tables are read by service_role and written only through the functions:
-- a quota by usage_agg_set_quota (its checks: a known portal), an alert by
-- the rule book and usage_agg_alert_attempt. usage_quota_status is
-- service_role's alone, as usage_current is: it reads any portal's usage
-- past row level security.
DO $$
DECLARE
  api_roles text := 'PUBLIC';
  obj text;
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
    api_roles := api_roles || ', anon, authenticated';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    api_roles := api_roles || ', service_role';
  END IF;
  FOREACH obj IN ARRAY ARRAY[
    'public.usage_agg_valid_thresholds(integer[])',
    'public.usage_agg_set_quota(bigint, integer[], bigint, text, boolean)',
    'public.usage_agg_record_crossings(text[], bigint, bigint)',
    'public.usage_agg_alert_attempt(bigint, boolean, text)',
    'public.usage_agg_alerts_status()',
    'public.usage_quota_status(bigint, text)'
  ] LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %s', obj, api_roles);
  END LOOP;
  EXECUTE format('REVOKE ALL ON TABLE public.portal_usage_quotas, public.portal_usage_alerts FROM %s', api_roles);
  EXECUTE format('REVOKE ALL ON SEQUENCE public.portal_usage_alerts_id_seq FROM %s', api_roles);
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    FOREACH obj IN ARRAY ARRAY[
      'public.usage_agg_set_quota(bigint, integer[], bigint, text, boolean)',
      'public.usage_agg_record_crossings(text[], bigint, bigint)',
      'public.usage_agg_alert_attempt(bigint, boolean, text)',
      'public.usage_agg_alerts_status()',
      'public.usage_quota_status(bigint, text)'
    ] LOOP
      EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', obj);
    END LOOP;
    GRANT SELECT ON public.portal_usage_quotas, public.portal_usage_alerts TO service_role;
  END IF;
END $$;

NOTIFY pgrst, 'reload schema';

-- usage-agg: billing periods. A month closes after a grace window and its
-- totals never move again without a trace; rows that arrive for it later
-- are booked, exactly once, as adjustments in the next open month; manual
-- corrections are signed, reasoned entries; usage right now; retention.
--
-- Apply after 20261130120000_usage_agg_trust.sql (applying it again changes
-- nothing):
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f supabase/migrations/20261201090000_usage_agg_periods.sql
-- or `supabase db push`, or paste `usage-agg sql` (every migration, in order)
-- into Supabase's SQL editor.
--
-- What it adds (docs/semantics.md, "Closed months", says why each exists):
--   * usage_agg_closed_months: each closed month, when, by whom, up to which
--     raw id, a snapshot of its totals, its last reopening; and
--     usage_agg_period_events, the append-only history of closes and reopenings;
--   * portal_usage_adjustments: late rows of closed months ('late', one row
--     per portal, month and booked month, with a watermark) and manual
--     corrections ('manual', one row per idempotency key);
--   * triggers: a closed month's portal_usage_monthly rows never change, an
--     adjustment is booked only in the open month after the newest closed
--     one and never edited once that month closes, and a late adjustment's
--     watermark never moves back;
--   * usage_agg_pruned: per key, the good raw rows that prune deleted, so the
--     totals can still be checked once rows are gone;
--   * functions: close, reopen, adjust, prune, usage_current, and new
--     versions of the server-side batch, the deleted-key restore, the rebase
--     and the preflight that know about closed months and adjustments.
-- Nothing on the webhook's insert path.

-- Month helpers. 'YYYY-MM' sorts as time, so text comparison is month order.
CREATE OR REPLACE FUNCTION public.usage_agg_valid_month(p_month text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
  SELECT coalesce(p_month ~ '^[0-9]{4}-(0[1-9]|1[0-2])$', false)
$$;

-- The first instant after the month (UTC), i.e. its end.
CREATE OR REPLACE FUNCTION public.usage_agg_month_end(p_month text)
RETURNS timestamptz
LANGUAGE sql
STABLE
AS $$
  SELECT (to_date(p_month || '-01', 'YYYY-MM-DD') + interval '1 month')::timestamp AT TIME ZONE 'UTC'
$$;

CREATE OR REPLACE FUNCTION public.usage_agg_next_month(p_month text)
RETURNS text
LANGUAGE sql
STABLE
AS $$
  SELECT to_char(to_date(p_month || '-01', 'YYYY-MM-DD') + interval '1 month', 'YYYY-MM')
$$;

-- Each month that was ever closed, as it stands now. `closed` false: it was
-- reopened (the reopening is kept here, and every event in
-- usage_agg_period_events).
CREATE TABLE IF NOT EXISTS public.usage_agg_closed_months (
  month_year      text PRIMARY KEY CHECK (public.usage_agg_valid_month(month_year)),
  closed          boolean NOT NULL DEFAULT true,
  closed_at       timestamptz NOT NULL DEFAULT now(),
  closed_by       text NOT NULL,
  -- The cursor when it closed: every good row of the month with an id at or
  -- below it is in portal_usage_monthly; later ones become adjustments.
  up_to_id        bigint NOT NULL,
  -- The month's portal_usage_monthly rows at the close.
  keys            bigint NOT NULL,
  request_count   bigint NOT NULL,
  success_count   bigint NOT NULL,
  error_count     bigint NOT NULL,
  -- The requests of the adjustments booked in the month at its close (late
  -- rows of earlier months, manual corrections): with the monthly rows,
  -- what its invoice counts. Neither changes while it is closed.
  booked_request_count bigint NOT NULL DEFAULT 0,
  reopened_at     timestamptz,
  reopened_by     text,
  reopen_reason   text,
  -- Every raw row of the month with an id at or below this is deleted
  -- (usage-agg prune), and counted in usage_agg_pruned.
  pruned_through  bigint NOT NULL DEFAULT 0,
  updated_at      timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE public.usage_agg_closed_months ENABLE ROW LEVEL SECURITY;

CREATE TABLE IF NOT EXISTS public.usage_agg_period_events (
  id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  month_year    text NOT NULL,
  event         text NOT NULL CHECK (event IN ('close', 'reopen')),
  at            timestamptz NOT NULL DEFAULT now(),
  by            text NOT NULL,
  reason        text,
  up_to_id      bigint,
  keys          bigint,
  request_count bigint,
  success_count bigint,
  error_count   bigint
);
ALTER TABLE public.usage_agg_period_events ENABLE ROW LEVEL SECURITY;

-- Adjustments, on top of portal_usage_monthly. What billing invoices for a
-- month B is B's monthly rows plus the adjustments booked in B.
--   'late':   rows of a closed month counted after its close. One row per
--             (portal_id, month_year, booked_month), written as a full state
--             with a watermark, exactly as portal_usage_monthly is; its
--             idempotency_key is 'late:<portal>:<month>:<booked>', so the
--             one unique key serves both sources.
--   'manual': a signed correction, with its reason and the caller's
--             idempotency key; never edited.
CREATE TABLE IF NOT EXISTS public.portal_usage_adjustments (
  id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  portal_id       bigint NOT NULL CHECK (portal_id > 0),
  month_year      text NOT NULL CHECK (public.usage_agg_valid_month(month_year)),
  booked_month    text NOT NULL CHECK (public.usage_agg_valid_month(booked_month)),
  source          text NOT NULL CHECK (source IN ('late', 'manual')),
  request_count   bigint NOT NULL DEFAULT 0,
  success_count   bigint NOT NULL DEFAULT 0,
  error_count     bigint NOT NULL DEFAULT 0,
  last_request_at timestamp,
  last_request_id bigint NOT NULL DEFAULT 0,
  reason          text,
  idempotency_key text NOT NULL UNIQUE,
  -- 'late', written over REST: the watermark the write's new rows start
  -- above (the key's highest when the run read it). The guard refuses it
  -- when the key's monthly row already counts past it: the month was
  -- reopened and closed again meanwhile, and those rows are in the monthly
  -- row now. NULL: not checked (the server-side engine locks the closed
  -- months for its whole transaction instead).
  counted_from_id bigint,
  created_by      text,
  created_at      timestamptz NOT NULL DEFAULT now(),
  updated_at      timestamptz NOT NULL DEFAULT now(),
  CHECK (booked_month >= month_year),
  CHECK (request_count = success_count + error_count),
  CHECK (source <> 'late'
         OR idempotency_key = 'late:' || portal_id || ':' || month_year || ':' || booked_month),
  CHECK (source <> 'manual'
         OR (reason IS NOT NULL AND btrim(reason) <> '' AND idempotency_key NOT LIKE 'late:%'
             AND last_request_id = 0))
);
ALTER TABLE public.portal_usage_adjustments ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.portal_usage_adjustments ADD COLUMN IF NOT EXISTS counted_from_id bigint;
CREATE INDEX IF NOT EXISTS portal_usage_adjustments_key_idx
  ON public.portal_usage_adjustments (portal_id, month_year);
CREATE INDEX IF NOT EXISTS portal_usage_adjustments_last_request_id_idx
  ON public.portal_usage_adjustments (last_request_id);
CREATE INDEX IF NOT EXISTS portal_usage_adjustments_booked_month_idx
  ON public.portal_usage_adjustments (booked_month);

-- Per key, the good raw rows `usage-agg prune` deleted: with them the
-- invariant can still be checked once the rows are gone.
CREATE TABLE IF NOT EXISTS public.usage_agg_pruned (
  id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  portal_id       bigint NOT NULL,
  month_year      text NOT NULL,
  request_count   bigint NOT NULL,
  success_count   bigint NOT NULL,
  error_count     bigint NOT NULL,
  last_request_at timestamp,
  rows_deleted    bigint NOT NULL,
  UNIQUE (portal_id, month_year)
);
ALTER TABLE public.usage_agg_pruned ENABLE ROW LEVEL SECURITY;

CREATE OR REPLACE FUNCTION public.usage_agg_is_closed(p_month text)
RETURNS boolean
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  SELECT EXISTS (SELECT 1 FROM public.usage_agg_closed_months WHERE month_year = p_month AND closed)
$$;

-- Where an adjustment for p_month is booked: the open month after the
-- newest closed one, or p_month itself when it is later (an open month).
-- A function of the closed months alone, never of the clock, so two runs
-- that see the same closed months book the same rows in the same place.
CREATE OR REPLACE FUNCTION public.usage_agg_booking_month(p_month text)
RETURNS text
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  SELECT greatest(p_month, (SELECT public.usage_agg_next_month(max(month_year))
                              FROM public.usage_agg_closed_months WHERE closed))
$$;

-- A closed month's portal_usage_monthly rows never change: no insert, no
-- update, no delete, by anyone, until `usage-agg reopen` (which marks the
-- month open again, with who, when and why). One exception: a rebase
-- (usage_agg.rebase, set by usage_agg_rebase for its own transaction) may
-- move a watermark and nothing else.
CREATE OR REPLACE FUNCTION public.usage_agg_guard_closed_month()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  m text;
  p bigint;
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') AND public.usage_agg_is_closed(OLD.month_year) THEN
    m := OLD.month_year;
    p := OLD.portal_id;
  ELSIF TG_OP IN ('INSERT', 'UPDATE') AND public.usage_agg_is_closed(NEW.month_year) THEN
    m := NEW.month_year;
    p := NEW.portal_id;
  END IF;
  IF m IS NOT NULL THEN
    IF TG_OP = 'UPDATE' AND current_setting('usage_agg.rebase', true) = 'on'
       AND (NEW.portal_id, NEW.month_year, NEW.request_count, NEW.success_count, NEW.error_count,
            NEW.last_request_at)
           IS NOT DISTINCT FROM (OLD.portal_id, OLD.month_year, OLD.request_count, OLD.success_count,
                                 OLD.error_count, OLD.last_request_at) THEN
      RETURN NEW;
    END IF;
    RAISE EXCEPTION 'usage_agg: % is closed, so its portal_usage_monthly rows never change (portal %, %); rows that come late are booked as adjustments; `usage-agg reopen --month % --reason ...` reopens it, recorded',
      m, p, lower(TG_OP), m;
  END IF;
  IF TG_OP = 'DELETE' THEN
    RETURN OLD;
  END IF;
  RETURN NEW;
END
$$;

-- Fires before usage_agg_guard_watermark (triggers fire in name order).
DROP TRIGGER IF EXISTS usage_agg_closed_month ON public.portal_usage_monthly;
CREATE TRIGGER usage_agg_closed_month
  BEFORE INSERT OR UPDATE OR DELETE ON public.portal_usage_monthly
  FOR EACH ROW EXECUTE FUNCTION public.usage_agg_guard_closed_month();

-- Adjustments are never deleted, and edited only as a late row's state
-- moving forward while the month it is booked in is open:
--   * an adjustment is booked in usage_agg_booking_month(month_year), and a
--     late one only for a closed month_year. Checked at each write, so a
--     run that read the closed months before a close or a reopening cannot
--     book rows where the run after it would not (docs/semantics.md,
--     "Closed months");
--   * once its booked month closes, it never changes;
--   * a manual one never changes;
--   * a late one's watermark never moves back (the guard of
--     portal_usage_monthly: the newer state wins).
CREATE OR REPLACE FUNCTION public.usage_agg_guard_adjustment()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  booking text;
BEGIN
  IF TG_OP = 'DELETE' THEN
    RAISE EXCEPTION 'usage_agg: portal_usage_adjustments is never edited: book a correcting adjustment (`usage-agg adjust`) instead of deleting one';
  END IF;
  IF TG_OP = 'UPDATE' THEN
    IF (NEW.id, NEW.portal_id, NEW.month_year, NEW.booked_month, NEW.source, NEW.idempotency_key)
       IS DISTINCT FROM (OLD.id, OLD.portal_id, OLD.month_year, OLD.booked_month, OLD.source, OLD.idempotency_key) THEN
      RAISE EXCEPTION 'usage_agg: an adjustment''s portal, months, source and key never change';
    END IF;
    IF current_setting('usage_agg.rebase', true) = 'on'
       AND (NEW.request_count, NEW.success_count, NEW.error_count, NEW.last_request_at)
           IS NOT DISTINCT FROM (OLD.request_count, OLD.success_count, OLD.error_count, OLD.last_request_at) THEN
      RETURN NEW;
    END IF;
    IF OLD.source = 'manual' THEN
      RAISE EXCEPTION 'usage_agg: manual adjustment % is never edited: book a correcting one (`usage-agg adjust`)',
        OLD.idempotency_key;
    END IF;
  END IF;
  IF NEW.source = 'late' AND NOT public.usage_agg_is_closed(NEW.month_year) THEN
    RAISE EXCEPTION 'usage_agg: % is not closed, so its rows are counted in portal_usage_monthly, not as late adjustments (a month was reopened meanwhile: the next run counts them)',
      NEW.month_year;
  END IF;
  booking := public.usage_agg_booking_month(NEW.month_year);
  IF NEW.booked_month IS DISTINCT FROM booking THEN
    RAISE EXCEPTION 'usage_agg: an adjustment for % is booked in %, the open month after the newest closed one, not in % (a month was closed or reopened meanwhile: the next run books it)',
      NEW.month_year, booking, NEW.booked_month;
  END IF;
  IF NEW.source = 'late' AND NEW.counted_from_id IS NOT NULL
     AND NEW.counted_from_id < coalesce((SELECT m.last_request_id FROM public.portal_usage_monthly m
                                          WHERE m.portal_id = NEW.portal_id AND m.month_year = NEW.month_year), 0) THEN
    RAISE EXCEPTION 'usage_agg: rows of %:% above id % are already counted in its monthly row (the month was reopened and closed again meanwhile: the next run counts from there)',
      NEW.portal_id, NEW.month_year, NEW.counted_from_id;
  END IF;
  IF TG_OP = 'UPDATE' THEN
    IF NEW.last_request_id < OLD.last_request_id THEN
      RETURN OLD;
    END IF;
    NEW.created_at := OLD.created_at;
    NEW.updated_at := now();
  END IF;
  RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS usage_agg_guard_adjustment ON public.portal_usage_adjustments;
CREATE TRIGGER usage_agg_guard_adjustment
  BEFORE INSERT OR UPDATE OR DELETE ON public.portal_usage_adjustments
  FOR EACH ROW EXECUTE FUNCTION public.usage_agg_guard_adjustment();

-- TRUNCATE fires no row trigger: refuse it where rows must not go.
CREATE OR REPLACE FUNCTION public.usage_agg_refuse_truncate()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
BEGIN
  IF TG_TABLE_NAME = 'portal_usage_adjustments'
     OR EXISTS (SELECT 1 FROM public.usage_agg_closed_months WHERE closed) THEN
    RAISE EXCEPTION 'usage_agg: % holds closed months or adjustments, which are never removed', TG_TABLE_NAME;
  END IF;
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS usage_agg_refuse_truncate ON public.portal_usage_monthly;
CREATE TRIGGER usage_agg_refuse_truncate
  BEFORE TRUNCATE ON public.portal_usage_monthly
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_refuse_truncate();
DROP TRIGGER IF EXISTS usage_agg_refuse_truncate ON public.portal_usage_adjustments;
CREATE TRIGGER usage_agg_refuse_truncate
  BEFORE TRUNCATE ON public.portal_usage_adjustments
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_refuse_truncate();

CREATE OR REPLACE FUNCTION public.usage_agg_append_only()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  RAISE EXCEPTION 'usage_agg: % is a history: it is never edited', TG_TABLE_NAME;
END
$$;

DROP TRIGGER IF EXISTS usage_agg_append_only ON public.usage_agg_period_events;
CREATE TRIGGER usage_agg_append_only
  BEFORE UPDATE OR DELETE ON public.usage_agg_period_events
  FOR EACH ROW EXECUTE FUNCTION public.usage_agg_append_only();

-- The closed months, for a run to route rows by (read once per run).
CREATE OR REPLACE FUNCTION public.usage_agg_periods()
RETURNS jsonb
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  SELECT jsonb_build_object(
    'closed', (SELECT coalesce(jsonb_agg(month_year ORDER BY month_year), '[]')
                 FROM public.usage_agg_closed_months WHERE closed),
    -- Every close and reopening adds an event: a run that compares this
    -- with what it read sees a reopen-then-close, which leaves the list of
    -- closed months as it was.
    'generation', (SELECT coalesce(max(id), 0) FROM public.usage_agg_period_events),
    'now', now(),
    'current_month', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM'))
$$;

-- One month's place in its life, on the database's clock: whether it is
-- closed (by whom, when), and the earliest time it may close after a grace
-- of p_grace_seconds past its end.
CREATE OR REPLACE FUNCTION public.usage_agg_period_info(p_month text, p_grace_seconds bigint DEFAULT 259200)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  c public.usage_agg_closed_months;
  earliest timestamptz;
BEGIN
  IF NOT public.usage_agg_valid_month(p_month) THEN
    RETURN jsonb_build_object('valid', false);
  END IF;
  SELECT * INTO c FROM public.usage_agg_closed_months WHERE month_year = p_month;
  earliest := public.usage_agg_month_end(p_month) + make_interval(secs => greatest(p_grace_seconds, 0));
  RETURN jsonb_build_object(
    'valid', true,
    'month', p_month,
    'closed', coalesce(c.closed, false),
    'closed_at', c.closed_at,
    'closed_by', c.closed_by,
    'up_to_id', c.up_to_id,
    'reopened_at', c.reopened_at,
    'reopened_by', c.reopened_by,
    'reopen_reason', c.reopen_reason,
    'now', now(),
    'current_month', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM'),
    'earliest_close_at', earliest,
    'can_close', now() >= earliest,
    'future', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM') < p_month);
END
$$;

-- Closes p_month in one transaction: refuses inside the grace window (by
-- the database's clock), while keys of the month stand refused or deleted,
-- and before the first rebuild; records the close and a snapshot of the
-- month's portal_usage_monthly rows. Closing a closed month changes nothing.
-- The caller has caught up and checked the month's keys against their raw
-- rows first (`usage-agg close`).
--
-- The locks: closes, reopenings and server-side batches take the closed
-- months in order (a batch reads them in SHARE mode for its whole
-- transaction), and a close waits for every write in flight to either
-- table to commit, so that every write is either before the close (and in
-- the snapshot, and seen by every later run) or after it (and checked
-- against it by the triggers).
CREATE OR REPLACE FUNCTION public.usage_agg_close_month(
  p_job text, p_month text, p_grace_seconds bigint, p_by text)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  c        public.usage_agg_closed_months;
  cur      bigint;
  earliest timestamptz;
  n_keys   bigint;
  n_req    bigint;
  n_ok     bigint;
  n_err    bigint;
  n_booked bigint;
  blocked  jsonb;
BEGIN
  LOCK TABLE public.usage_agg_closed_months IN SHARE ROW EXCLUSIVE MODE;
  LOCK TABLE public.portal_usage_monthly, public.portal_usage_adjustments IN SHARE MODE;
  IF NOT public.usage_agg_valid_month(p_month) THEN
    RETURN jsonb_build_object('refused', 'bad_month');
  END IF;
  SELECT * INTO c FROM public.usage_agg_closed_months WHERE month_year = p_month;
  IF FOUND AND c.closed THEN
    RETURN jsonb_build_object('already_closed', true, 'month', p_month, 'closed_at', c.closed_at,
                              'closed_by', c.closed_by, 'up_to_id', c.up_to_id, 'keys', c.keys,
                              'requests', c.request_count, 'successes', c.success_count,
                              'errors', c.error_count);
  END IF;
  earliest := public.usage_agg_month_end(p_month) + make_interval(secs => greatest(p_grace_seconds, 0));
  IF now() < earliest THEN
    RETURN jsonb_build_object('refused', 'grace', 'earliest_close_at', earliest, 'now', now());
  END IF;
  SELECT cursor_id INTO cur FROM public.usage_aggregation_state WHERE job = p_job;
  IF cur IS NULL THEN
    RETURN jsonb_build_object('refused', 'no_cursor');
  END IF;
  SELECT coalesce(jsonb_agg(k ORDER BY k), '[]') INTO blocked FROM (
    SELECT portal_id || ':' || month_year AS k FROM public.usage_agg_refused_keys
     WHERE job = p_job AND month_year = p_month
    UNION
    SELECT portal_id || ':' || month_year FROM public.usage_agg_deleted_keys WHERE month_year = p_month) x;
  IF jsonb_array_length(blocked) > 0 THEN
    RETURN jsonb_build_object('refused', 'keys', 'keys', blocked);
  END IF;
  SELECT count(*), coalesce(sum(request_count), 0), coalesce(sum(success_count), 0),
         coalesce(sum(error_count), 0)
    INTO n_keys, n_req, n_ok, n_err
    FROM public.portal_usage_monthly WHERE month_year = p_month;
  SELECT coalesce(sum(request_count), 0) INTO n_booked
    FROM public.portal_usage_adjustments WHERE booked_month = p_month;
  INSERT INTO public.usage_agg_closed_months AS t
         (month_year, closed, closed_at, closed_by, up_to_id, keys, request_count, success_count,
          error_count, booked_request_count, updated_at)
  VALUES (p_month, true, now(), p_by, cur, n_keys, n_req, n_ok, n_err, n_booked, now())
  ON CONFLICT (month_year) DO UPDATE
     SET closed = true, closed_at = now(), closed_by = excluded.closed_by, up_to_id = excluded.up_to_id,
         keys = excluded.keys, request_count = excluded.request_count,
         success_count = excluded.success_count, error_count = excluded.error_count,
         booked_request_count = excluded.booked_request_count, updated_at = now();
  INSERT INTO public.usage_agg_period_events
         (month_year, event, by, up_to_id, keys, request_count, success_count, error_count)
  VALUES (p_month, 'close', p_by, cur, n_keys, n_req, n_ok, n_err);
  RETURN jsonb_build_object('closed', true, 'month', p_month, 'closed_at', now(), 'closed_by', p_by,
                            'up_to_id', cur, 'keys', n_keys, 'requests', n_req, 'successes', n_ok,
                            'errors', n_err, 'booked_adjustments', n_booked);
END
$$;

-- Marks p_month open again, recording who, when and why. Its monthly rows
-- may then change again (late rows of it are counted there from now on),
-- and adjustments are booked after the newest month still closed.
CREATE OR REPLACE FUNCTION public.usage_agg_reopen_month(p_month text, p_reason text, p_by text)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  c public.usage_agg_closed_months;
BEGIN
  LOCK TABLE public.usage_agg_closed_months IN SHARE ROW EXCLUSIVE MODE;
  LOCK TABLE public.portal_usage_monthly, public.portal_usage_adjustments IN SHARE MODE;
  IF NOT public.usage_agg_valid_month(p_month) THEN
    RETURN jsonb_build_object('refused', 'bad_month');
  END IF;
  IF p_reason IS NULL OR btrim(p_reason) = '' THEN
    RETURN jsonb_build_object('refused', 'no_reason');
  END IF;
  SELECT * INTO c FROM public.usage_agg_closed_months WHERE month_year = p_month;
  IF NOT FOUND OR NOT c.closed THEN
    RETURN jsonb_build_object('not_closed', true, 'month', p_month);
  END IF;
  UPDATE public.usage_agg_closed_months
     SET closed = false, reopened_at = now(), reopened_by = p_by, reopen_reason = p_reason, updated_at = now()
   WHERE month_year = p_month;
  INSERT INTO public.usage_agg_period_events (month_year, event, by, reason)
  VALUES (p_month, 'reopen', p_by, p_reason);
  RETURN jsonb_build_object('reopened', true, 'month', p_month, 'reopened_at', now(), 'reopened_by', p_by,
                            'closed_at', c.closed_at, 'closed_by', c.closed_by);
END
$$;

-- A signed manual adjustment, booked in the open month (see
-- usage_agg_booking_month), once per idempotency key: the same key again
-- books nothing and answers what was booked; the same key with other values
-- is refused. Refusals are answered, not raised, so the caller can say why.
CREATE OR REPLACE FUNCTION public.usage_agg_adjust(
  p_portal_id bigint, p_month text, p_requests bigint, p_successes bigint, p_errors bigint,
  p_reason text, p_key text, p_by text)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  a       public.portal_usage_adjustments;
  booked  text;
BEGIN
  -- The booking month cannot change under this insert.
  LOCK TABLE public.usage_agg_closed_months IN SHARE MODE;
  IF NOT public.usage_agg_valid_month(p_month) THEN
    RETURN jsonb_build_object('refused', 'bad_month');
  END IF;
  IF p_month > to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM') THEN
    RETURN jsonb_build_object('refused', 'future', 'current_month', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM'));
  END IF;
  IF p_reason IS NULL OR btrim(p_reason) = '' THEN
    RETURN jsonb_build_object('refused', 'no_reason');
  END IF;
  IF p_key IS NULL OR btrim(p_key) = '' OR p_key LIKE 'late:%' THEN
    RETURN jsonb_build_object('refused', 'bad_key');
  END IF;
  IF p_successes + p_errors <> p_requests THEN
    RETURN jsonb_build_object('refused', 'counts');
  END IF;
  SELECT * INTO a FROM public.portal_usage_adjustments WHERE idempotency_key = p_key;
  IF NOT FOUND THEN
    IF NOT EXISTS (SELECT 1 FROM public.portal_usage_monthly WHERE portal_id = p_portal_id)
       AND NOT EXISTS (SELECT 1 FROM public.portal_usage_adjustments WHERE portal_id = p_portal_id) THEN
      RETURN jsonb_build_object('refused', 'unknown_portal');
    END IF;
    booked := public.usage_agg_booking_month(p_month);
    INSERT INTO public.portal_usage_adjustments
           (portal_id, month_year, booked_month, source, request_count, success_count, error_count,
            reason, idempotency_key, created_by)
    VALUES (p_portal_id, p_month, booked, 'manual', p_requests, p_successes, p_errors, p_reason, p_key, p_by)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING * INTO a;
    IF FOUND THEN
      RETURN jsonb_build_object('booked', true, 'adjustment', to_jsonb(a));
    END IF;
    SELECT * INTO a FROM public.portal_usage_adjustments WHERE idempotency_key = p_key;
  END IF;
  IF a.source = 'manual' AND a.portal_id = p_portal_id AND a.month_year = p_month
     AND a.request_count = p_requests AND a.success_count = p_successes AND a.error_count = p_errors THEN
    RETURN jsonb_build_object('booked', false, 'already', true, 'adjustment', to_jsonb(a));
  END IF;
  RETURN jsonb_build_object('refused', 'key_reused', 'adjustment', to_jsonb(a));
END
$$;

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

-- Deletes one id range of the raw rows of closed months before p_before, up
-- to the cursor (every row there is counted), adding the good ones to
-- usage_agg_pruned per key in the same transaction: a batch is all or
-- nothing, and a killed prune resumes where the last batch ended
-- (pruned_through). Refuses while a month before p_before with usage is
-- open. Call until done.
CREATE OR REPLACE FUNCTION public.usage_agg_prune_batch(
  p_job text, p_before text, p_batch_ids bigint DEFAULT 100000, p_dry_run boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  cur     bigint;
  months  text[];
  open_m  jsonb;
  lo      bigint;
  hi      bigint;
  n_del   bigint;
  n_good  bigint;
  left_rows bigint;
BEGIN
  -- No month can be reopened under a batch, and prunes take turns.
  LOCK TABLE public.usage_agg_closed_months IN SHARE ROW EXCLUSIVE MODE;
  IF NOT public.usage_agg_valid_month(p_before) THEN
    RETURN jsonb_build_object('refused', 'bad_month');
  END IF;
  SELECT cursor_id INTO cur FROM public.usage_aggregation_state WHERE job = p_job;
  IF cur IS NULL THEN
    RETURN jsonb_build_object('refused', 'no_cursor');
  END IF;
  SELECT coalesce(jsonb_agg(DISTINCT m.month_year ORDER BY m.month_year), '[]') INTO open_m
    FROM public.portal_usage_monthly m
   WHERE m.month_year < p_before AND NOT public.usage_agg_is_closed(m.month_year);
  IF jsonb_array_length(open_m) > 0 THEN
    RETURN jsonb_build_object('refused', 'open_months', 'months', open_m);
  END IF;
  SELECT array_agg(month_year ORDER BY month_year), min(pruned_through) INTO months, lo
    FROM public.usage_agg_closed_months WHERE closed AND month_year < p_before;
  IF months IS NULL THEN
    RETURN jsonb_build_object('done', true, 'months', '[]'::jsonb, 'deleted', 0, 'cursor', cur);
  END IF;
  -- Good rows still there, by the stored totals (no scan).
  SELECT coalesce(sum(x.n), 0) INTO left_rows FROM (
    SELECT request_count::bigint AS n FROM public.portal_usage_monthly WHERE month_year = ANY (months)
    UNION ALL
    SELECT request_count FROM public.portal_usage_adjustments WHERE source = 'late' AND month_year = ANY (months)
    UNION ALL
    SELECT -request_count FROM public.usage_agg_pruned WHERE month_year = ANY (months)) x;
  hi := least(cur, lo + greatest(p_batch_ids, 1));
  IF p_dry_run OR hi <= lo THEN
    RETURN jsonb_build_object('done', hi <= lo, 'dry_run', p_dry_run, 'months', to_jsonb(months),
                              'from', lo, 'to', hi, 'deleted', 0, 'rows_left', left_rows, 'cursor', cur);
  END IF;
  WITH del AS (
    DELETE FROM public.usage_requests r
     WHERE r.id > lo AND r.id <= hi AND r.month_year = ANY (months)
    RETURNING r.portal_id, r.month_year, r.success, r.request_timestamp
  ), g AS (
    SELECT d.portal_id, d.month_year,
           count(*) FILTER (WHERE d.success IS NOT NULL AND public.usage_agg_valid_time(d.request_timestamp)) AS c,
           count(*) FILTER (WHERE d.success AND public.usage_agg_valid_time(d.request_timestamp)) AS s,
           count(*) FILTER (WHERE NOT d.success AND public.usage_agg_valid_time(d.request_timestamp)) AS e,
           max(d.request_timestamp) FILTER (WHERE d.success IS NOT NULL AND public.usage_agg_valid_time(d.request_timestamp)) AS at,
           count(*) AS n
      FROM del d GROUP BY 1, 2
  ), led AS (
    INSERT INTO public.usage_agg_pruned AS p
           (portal_id, month_year, request_count, success_count, error_count, last_request_at, rows_deleted)
    SELECT portal_id, month_year, c, s, e, at, n FROM g WHERE public.usage_agg_valid_key(portal_id, month_year)
    ON CONFLICT (portal_id, month_year) DO UPDATE
       SET request_count = p.request_count + excluded.request_count,
           success_count = p.success_count + excluded.success_count,
           error_count = p.error_count + excluded.error_count,
           last_request_at = greatest(p.last_request_at, excluded.last_request_at),
           rows_deleted = p.rows_deleted + excluded.rows_deleted
    RETURNING 1
  )
  SELECT coalesce(sum(n), 0), coalesce(sum(c), 0) INTO n_del, n_good FROM g;
  UPDATE public.usage_agg_closed_months SET pruned_through = greatest(pruned_through, hi), updated_at = now()
   WHERE month_year = ANY (months);
  RETURN jsonb_build_object('done', hi >= cur, 'months', to_jsonb(months), 'from', lo, 'to', hi,
                            'deleted', n_del, 'good_deleted', n_good, 'rows_left', left_rows - n_good,
                            'cursor', cur);
END
$$;

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

-- The preflight, as in 20261130120000, with one change: the highest
-- watermark includes late adjustments', which the id sequence must not fall
-- below either.
CREATE OR REPLACE FUNCTION public.usage_agg_preflight(p_job text DEFAULT 'default')
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  seq      text := pg_get_serial_sequence('public.usage_requests', 'id');
  seq_last bigint;
  seq_cache bigint;
  id_default text;
  identity char;
  st       public.usage_aggregation_state;
  newest   bigint;
BEGIN
  SELECT max(id) INTO newest FROM public.usage_requests;
  IF seq IS NOT NULL THEN
    seq_last := pg_sequence_last_value(seq::regclass);
    SELECT seqcache INTO seq_cache FROM pg_sequence WHERE seqrelid = seq::regclass;
  END IF;
  SELECT pg_get_expr(d.adbin, d.adrelid), a.attidentity INTO id_default, identity
    FROM pg_attribute a
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE a.attrelid = 'public.usage_requests'::regclass AND a.attname = 'id';
  SELECT * INTO st FROM public.usage_aggregation_state WHERE job = p_job;
  RETURN jsonb_build_object(
    'sequence', seq,
    'sequence_last_value', seq_last,
    'sequence_cache', seq_cache,
    'id_default', id_default,
    -- From the watched sequence itself: an identity column, or a default
    -- that depends on that sequence (a nextval() of another sequence would
    -- leave the watched one still while ids move on).
    'id_from_sequence', coalesce(identity IN ('a', 'd')
                                 OR (seq IS NOT NULL AND id_default LIKE 'nextval(%' AND EXISTS (
                                       SELECT 1 FROM pg_attrdef d
                                         JOIN pg_depend dep ON dep.classid = 'pg_attrdef'::regclass
                                                           AND dep.objid = d.oid
                                        WHERE d.adrelid = 'public.usage_requests'::regclass
                                          AND d.adnum = (SELECT attnum FROM pg_attribute
                                                          WHERE attrelid = 'public.usage_requests'::regclass
                                                            AND attname = 'id')
                                          AND dep.refclassid = 'pg_class'::regclass
                                          AND dep.refobjid = seq::regclass)), false),
    'newest_id', newest,
    'cursor', st.cursor_id,
    'highest_watermark', greatest(
        (SELECT max(last_request_id) FROM public.portal_usage_monthly),
        (SELECT max(last_request_id) FROM public.portal_usage_adjustments WHERE source = 'late')),
    'reset_reason', st.reset_reason,
    'reset_at', st.reset_at,
    'refused_keys', (SELECT count(*) FROM public.usage_agg_refused_keys WHERE job = p_job),
    'refused_since', (SELECT min(found_at) FROM public.usage_agg_refused_keys WHERE job = p_job),
    'refused_examples', (SELECT coalesce(jsonb_agg(x.k ORDER BY x.k), '[]') FROM (
        SELECT portal_id || ':' || month_year AS k FROM public.usage_agg_refused_keys
         WHERE job = p_job ORDER BY portal_id, month_year LIMIT 5) x),
    'deleted_keys', (SELECT count(*) FROM public.usage_agg_deleted_keys),
    -- A unique index on exactly (portal_id, month_year): what the bulk upsert's
    -- on_conflict needs (without it every key is written one by one).
    'unique_key', EXISTS (
      SELECT 1 FROM pg_index i
       WHERE i.indrelid = 'public.portal_usage_monthly'::regclass AND i.indisunique
         AND i.indnkeyatts = 2
         AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
                FROM pg_attribute a
               WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey))
             = ARRAY['month_year', 'portal_id']));
END
$$;

-- The rebase, as in 20261130120000, with one change: closed months keep
-- their totals (the rebuild that follows leaves them alone); only their
-- watermarks, and late adjustments', go to 0 with the others, past the
-- triggers (usage_agg.rebase lets a watermark move and nothing else).
CREATE OR REPLACE FUNCTION public.usage_agg_rebase(p_job text, p_owner text)
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  n bigint;
BEGIN
  PERFORM 1 FROM public.usage_aggregation_state
   WHERE job = p_job AND lease_owner = p_owner AND lease_expires_at > now()
     FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'usage_agg_rebase: % does not hold the lease of job %', p_owner, p_job;
  END IF;
  PERFORM set_config('usage_agg.rebase', 'on', true);
  UPDATE public.portal_usage_monthly SET last_request_id = 0 WHERE last_request_id <> 0;
  GET DIAGNOSTICS n = ROW_COUNT;
  UPDATE public.portal_usage_adjustments SET last_request_id = 0
   WHERE source = 'late' AND last_request_id <> 0;
  PERFORM set_config('usage_agg.rebase', 'off', true);
  UPDATE public.usage_aggregation_state
     SET cursor_id = NULL,
         reset_reason = coalesce(reset_reason, 'a rebase was started and has not finished'),
         reset_at = coalesce(reset_at, now()),
         updated_at = now()
   WHERE job = p_job;
  DELETE FROM public.usage_agg_refused_keys WHERE job = p_job;
  DELETE FROM public.usage_agg_deleted_keys;
  RETURN n;
END
$$;

-- The restore of deleted monthly rows, as in 20261130120000, with two
-- changes: a key's late adjustments and pruned rows are part of its rows
-- (the monthly row holds the rest), and a closed month is left alone (its
-- rows cannot be deleted; a key logged before its close is dropped).
CREATE OR REPLACE FUNCTION public.usage_agg_restore_deleted_keys(p_job text DEFAULT 'default')
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  c        bigint;
  restored jsonb;
BEGIN
  SELECT cursor_id INTO c FROM public.usage_aggregation_state WHERE job = p_job;
  IF c IS NULL THEN
    RETURN '[]'::jsonb;
  END IF;
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_restore (portal_id bigint, month_year text) ON COMMIT DROP;
  TRUNCATE usage_agg_restore;
  WITH taken AS (
    DELETE FROM public.usage_agg_deleted_keys RETURNING portal_id, month_year
  )
  INSERT INTO usage_agg_restore SELECT portal_id, month_year FROM taken
   WHERE NOT public.usage_agg_is_closed(month_year);
  WITH raw AS (
    SELECT k.portal_id, k.month_year,
           count(r.id) AS n,
           count(r.id) FILTER (WHERE r.success) AS s,
           count(r.id) FILTER (WHERE NOT r.success) AS e,
           max(r.request_timestamp) AS at
      FROM usage_agg_restore k
      LEFT JOIN public.usage_requests r
        ON r.portal_id = k.portal_id AND r.month_year = k.month_year AND r.id <= c
       AND r.success IS NOT NULL AND public.usage_agg_valid_time(r.request_timestamp)
     WHERE public.usage_agg_valid_key(k.portal_id, k.month_year)
     GROUP BY 1, 2
  ), truth AS (
    SELECT raw.portal_id, raw.month_year,
           raw.n + coalesce(p.request_count, 0) - coalesce(l.n, 0) AS n,
           raw.s + coalesce(p.success_count, 0) - coalesce(l.s, 0) AS s,
           raw.e + coalesce(p.error_count, 0) - coalesce(l.e, 0) AS e,
           greatest(raw.at, p.last_request_at) AS at
      FROM raw
      LEFT JOIN public.usage_agg_pruned p USING (portal_id, month_year)
      LEFT JOIN (SELECT portal_id, month_year, sum(request_count) AS n, sum(success_count) AS s,
                        sum(error_count) AS e
                   FROM public.portal_usage_adjustments WHERE source = 'late' GROUP BY 1, 2) l
        USING (portal_id, month_year)
  ), written AS (
    INSERT INTO public.portal_usage_monthly AS t
           (portal_id, month_year, request_count, success_count, error_count, last_request_at,
            last_request_id, updated_at)
    SELECT portal_id, month_year, n, s, e, at, c, now() FROM truth WHERE n > 0
    ON CONFLICT (portal_id, month_year) DO UPDATE
       SET request_count = excluded.request_count, success_count = excluded.success_count,
           error_count = excluded.error_count, last_request_at = excluded.last_request_at,
           last_request_id = excluded.last_request_id, updated_at = now()
     WHERE t.last_request_id <= c
    RETURNING t.portal_id, t.month_year
  )
  SELECT coalesce(jsonb_agg(portal_id || ':' || month_year ORDER BY portal_id, month_year), '[]')
    INTO restored FROM written;
  RETURN restored;
END
$$;

-- The server-side batch, as in 20261130120000, with closed months: a row of
-- a closed month is counted into the late adjustment of its key booked in
-- the open month (usage_agg_booking_month), never into its frozen monthly
-- row, with the same rules: each target row (a monthly row, or a late
-- adjustment) carries a watermark; rows are counted above every watermark
-- of their key (its monthly row's and all its late adjustments'), so no
-- row is counted twice whichever engine or booked month counted it first.
--
-- The closed months are read under a SHARE lock held to the end of the
-- transaction: no close or reopening happens during a batch, so the
-- booking month is fixed, a key's watermarks other than its target's
-- cannot move (the triggers refuse those writes), and only the target row
-- can race (with a REST run), exactly as before: it is updated only if its
-- watermark is the one read, and otherwise locked and counted again.
CREATE OR REPLACE FUNCTION public.usage_agg_rpc_batch(
  p_job text DEFAULT 'default',
  p_batch_ids bigint DEFAULT 1000000,
  p_max_wait_ms integer DEFAULT 2000,
  p_dry_run boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  lo        bigint;
  hi        bigint;
  hz        jsonb;
  horizon   bigint;
  n_rows    bigint;
  n_keys    bigint;
  n_bad     bigint;
  bad_ids   bigint[];
  n_redo    bigint := 0;
  redo_rows bigint := 0;
  n_late    bigint := 0;
  late_rows bigint := 0;
BEGIN
  IF NOT pg_try_advisory_xact_lock(hashtext('usage_agg_rpc_batch:' || p_job)) THEN
    RETURN jsonb_build_object('busy', true);
  END IF;
  LOCK TABLE public.usage_agg_closed_months IN SHARE MODE;
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

  -- One pass over the batch's rows, grouped by key, then joined to what is
  -- stored. For each key, its target (late: the adjustment booked in the
  -- open month; else the monthly row): base, the target's watermark (-1:
  -- no target row yet); other, the highest watermark among the key's other
  -- rows (fixed during the batch; 0: none).
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_batch3 (
    portal_id bigint, month_year varchar, good boolean, late boolean, booked text,
    base bigint, other bigint,
    c bigint, s bigint, e bigint, nulls bigint, at timestamp, w bigint) ON COMMIT DROP;
  TRUNCATE usage_agg_batch3;
  INSERT INTO usage_agg_batch3
  SELECT g.portal_id, g.month_year, public.usage_agg_valid_key(g.portal_id, g.month_year),
         cm.month_year IS NOT NULL,
         CASE WHEN cm.month_year IS NOT NULL THEN public.usage_agg_booking_month(g.month_year) END,
         -1, 0, g.c, g.s, g.e, g.nulls, g.at, g.w
    FROM (SELECT r.portal_id, r.month_year,
                 count(*) FILTER (WHERE r.success IS NOT NULL AND r.vt) AS c,
                 count(*) FILTER (WHERE r.success AND r.vt) AS s,
                 count(*) FILTER (WHERE NOT r.success AND r.vt) AS e,
                 count(*) FILTER (WHERE r.success IS NULL OR NOT r.vt) AS nulls,
                 max(r.request_timestamp) FILTER (WHERE r.success IS NOT NULL AND r.vt) AS at,
                 max(r.id) FILTER (WHERE r.success IS NOT NULL AND r.vt) AS w
            FROM (SELECT u.*, public.usage_agg_valid_time(u.request_timestamp) AS vt
                    FROM public.usage_requests u) r
           WHERE r.id > lo AND r.id <= hi
           GROUP BY 1, 2) g
    LEFT JOIN public.usage_agg_closed_months cm ON cm.month_year = g.month_year AND cm.closed;
  UPDATE usage_agg_batch3 b
     SET base = CASE WHEN b.late THEN coalesce(x.target_w, -1) ELSE coalesce(m.last_request_id, -1) END,
         other = CASE WHEN b.late THEN greatest(coalesce(m.last_request_id, 0), coalesce(x.other_w, 0))
                      ELSE coalesce(x.all_w, 0) END
    FROM usage_agg_batch3 k
    LEFT JOIN public.portal_usage_monthly m ON m.portal_id = k.portal_id AND m.month_year = k.month_year
    LEFT JOIN LATERAL (
      SELECT max(a.last_request_id) FILTER (WHERE a.booked_month = k.booked) AS target_w,
             max(a.last_request_id) FILTER (WHERE a.booked_month IS DISTINCT FROM k.booked) AS other_w,
             max(a.last_request_id) AS all_w
        FROM public.portal_usage_adjustments a
       WHERE a.portal_id = k.portal_id AND a.month_year = k.month_year AND a.source = 'late') x ON true
   WHERE b.portal_id = k.portal_id AND b.month_year = k.month_year AND k.good;

  SELECT coalesce(sum(b.c + b.nulls) FILTER (WHERE NOT b.good), 0) + coalesce(sum(b.nulls) FILTER (WHERE b.good), 0)
    INTO n_bad FROM usage_agg_batch3 b;
  IF n_bad > 0 THEN
    SELECT array_agg(id ORDER BY id) INTO bad_ids FROM (
      SELECT id FROM public.usage_requests
       WHERE id > lo AND id <= hi
         AND (success IS NULL OR NOT public.usage_agg_valid_key(portal_id, month_year)
              OR NOT public.usage_agg_valid_time(request_timestamp))
       ORDER BY id LIMIT 5) x;
  END IF;

  IF p_dry_run THEN
    SELECT count(*), coalesce(sum(c), 0), count(*) FILTER (WHERE late) INTO n_keys, n_rows, n_late
      FROM usage_agg_batch3 WHERE good AND c > 0;
    RETURN jsonb_build_object('dry_run', true, 'from', lo, 'to', hi, 'horizon', horizon,
      'rows', n_rows, 'keys', n_keys, 'late_keys', n_late, 'bad', n_bad,
      'bad_ids', to_jsonb(coalesce(bad_ids, '{}')), 'done', hi >= horizon);
  END IF;

  -- The common case: the target's watermark and every other watermark of
  -- the key at or below the cursor, so every row of the key in the batch
  -- is new. The update applies only if the target's watermark is still the
  -- one read; a new target is inserted only if nobody else did.
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_written (portal_id bigint, month_year varchar) ON COMMIT DROP;
  TRUNCATE usage_agg_written;
  WITH upd AS (
    UPDATE public.portal_usage_monthly t
       SET request_count = coalesce(t.request_count, 0) + b.c,
           success_count = coalesce(t.success_count, 0) + b.s,
           error_count = coalesce(t.error_count, 0) + b.e,
           last_request_at = greatest(t.last_request_at, b.at),
           last_request_id = b.w,
           updated_at = now()
      FROM usage_agg_batch3 b
     WHERE b.good AND NOT b.late AND b.c > 0 AND b.base >= 0 AND b.base <= lo AND b.other <= lo
       AND t.portal_id = b.portal_id AND t.month_year = b.month_year AND t.last_request_id = b.base
    RETURNING t.portal_id, t.month_year
  ), ins AS (
    INSERT INTO public.portal_usage_monthly
           (portal_id, month_year, request_count, success_count, error_count, last_request_at, last_request_id, updated_at)
    SELECT b.portal_id, b.month_year, b.c, b.s, b.e, b.at, b.w, now()
      FROM usage_agg_batch3 b WHERE b.good AND NOT b.late AND b.c > 0 AND b.base < 0 AND b.other <= lo
    ON CONFLICT (portal_id, month_year) DO NOTHING
    RETURNING portal_id, month_year
  ), lupd AS (
    UPDATE public.portal_usage_adjustments t
       SET request_count = t.request_count + b.c,
           success_count = t.success_count + b.s,
           error_count = t.error_count + b.e,
           last_request_at = greatest(t.last_request_at, b.at),
           last_request_id = b.w
      FROM usage_agg_batch3 b
     WHERE b.good AND b.late AND b.c > 0 AND b.base >= 0 AND b.base <= lo AND b.other <= lo
       AND t.idempotency_key = 'late:' || b.portal_id || ':' || b.month_year || ':' || b.booked
       AND t.last_request_id = b.base
    RETURNING t.portal_id, t.month_year
  ), lins AS (
    INSERT INTO public.portal_usage_adjustments
           (portal_id, month_year, booked_month, source, request_count, success_count, error_count,
            last_request_at, last_request_id, idempotency_key)
    SELECT b.portal_id, b.month_year, b.booked, 'late', b.c, b.s, b.e, b.at, b.w,
           'late:' || b.portal_id || ':' || b.month_year || ':' || b.booked
      FROM usage_agg_batch3 b WHERE b.good AND b.late AND b.c > 0 AND b.base < 0 AND b.other <= lo
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING portal_id, month_year
  )
  INSERT INTO usage_agg_written
  SELECT portal_id, month_year FROM upd UNION ALL SELECT portal_id, month_year FROM ins
  UNION ALL SELECT portal_id, month_year FROM lupd UNION ALL SELECT portal_id, month_year FROM lins;

  SELECT count(*), coalesce(sum(b.c), 0), count(*) FILTER (WHERE b.late), coalesce(sum(b.c) FILTER (WHERE b.late), 0)
    INTO n_keys, n_rows, n_late, late_rows
    FROM usage_agg_batch3 b JOIN usage_agg_written d ON d.portal_id = b.portal_id AND d.month_year = b.month_year
   WHERE b.good AND b.c > 0;

  -- The rest (rare): keys another run wrote meanwhile or left counted past
  -- the cursor. Their targets are created empty where missing and rows
  -- remain to count, then locked, then counted above every watermark of
  -- the key, in one pass.
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_redo3 (
    portal_id bigint, month_year varchar, late boolean, booked text, other bigint, w bigint) ON COMMIT DROP;
  TRUNCATE usage_agg_redo3;
  INSERT INTO usage_agg_redo3
  SELECT b.portal_id, b.month_year, b.late, b.booked, b.other, NULL
    FROM usage_agg_batch3 b
   WHERE b.good AND b.c > 0
     AND NOT EXISTS (SELECT 1 FROM usage_agg_written d WHERE d.portal_id = b.portal_id AND d.month_year = b.month_year);
  IF EXISTS (SELECT 1 FROM usage_agg_redo3) THEN
    INSERT INTO public.portal_usage_monthly
           (portal_id, month_year, request_count, success_count, error_count, last_request_at, last_request_id, updated_at)
    SELECT k.portal_id, k.month_year, 0, 0, 0, NULL, 0, now()
      FROM usage_agg_redo3 k JOIN usage_agg_batch3 b USING (portal_id, month_year)
     WHERE NOT k.late AND b.w > greatest(lo, k.other)
    ON CONFLICT (portal_id, month_year) DO NOTHING;
    INSERT INTO public.portal_usage_adjustments
           (portal_id, month_year, booked_month, source, request_count, success_count, error_count,
            last_request_at, last_request_id, idempotency_key)
    SELECT k.portal_id, k.month_year, k.booked, 'late', 0, 0, 0, NULL, 0,
           'late:' || k.portal_id || ':' || k.month_year || ':' || k.booked
      FROM usage_agg_redo3 k JOIN usage_agg_batch3 b USING (portal_id, month_year)
     WHERE k.late AND b.w > greatest(lo, k.other)
    ON CONFLICT (idempotency_key) DO NOTHING;
    UPDATE usage_agg_redo3 k SET w = t.last_request_id
      FROM (SELECT t.portal_id, t.month_year, t.last_request_id
              FROM public.portal_usage_monthly t JOIN usage_agg_redo3 r
                ON r.portal_id = t.portal_id AND r.month_year = t.month_year AND NOT r.late
               FOR UPDATE OF t) t
     WHERE k.portal_id = t.portal_id AND k.month_year = t.month_year AND NOT k.late;
    UPDATE usage_agg_redo3 k SET w = t.last_request_id
      FROM (SELECT t.portal_id, t.month_year, t.last_request_id
              FROM public.portal_usage_adjustments t JOIN usage_agg_redo3 r
                ON t.idempotency_key = 'late:' || r.portal_id || ':' || r.month_year || ':' || r.booked AND r.late
               FOR UPDATE OF t) t
     WHERE k.portal_id = t.portal_id AND k.month_year = t.month_year AND k.late;
    WITH x AS (
      SELECT r.portal_id, r.month_year, count(*) AS c, count(*) FILTER (WHERE r.success) AS s,
             count(*) FILTER (WHERE NOT r.success) AS e, max(r.request_timestamp) AS at, max(r.id) AS w
        FROM public.usage_requests r
        JOIN usage_agg_redo3 k ON k.portal_id = r.portal_id AND k.month_year = r.month_year
       WHERE r.id > lo AND r.id <= hi AND k.w IS NOT NULL AND r.id > k.w AND r.id > k.other
         AND r.success IS NOT NULL AND public.usage_agg_valid_time(r.request_timestamp)
       GROUP BY 1, 2
    ), upd AS (
      UPDATE public.portal_usage_monthly t
         SET request_count = coalesce(t.request_count, 0) + x.c,
             success_count = coalesce(t.success_count, 0) + x.s,
             error_count = coalesce(t.error_count, 0) + x.e,
             last_request_at = greatest(t.last_request_at, x.at),
             last_request_id = x.w,
             updated_at = now()
        FROM x JOIN usage_agg_redo3 k USING (portal_id, month_year)
       WHERE NOT k.late AND t.portal_id = x.portal_id AND t.month_year = x.month_year
      RETURNING x.c, false AS late
    ), lupd AS (
      UPDATE public.portal_usage_adjustments t
         SET request_count = t.request_count + x.c,
             success_count = t.success_count + x.s,
             error_count = t.error_count + x.e,
             last_request_at = greatest(t.last_request_at, x.at),
             last_request_id = x.w
        FROM x JOIN usage_agg_redo3 k USING (portal_id, month_year)
       WHERE k.late AND t.idempotency_key = 'late:' || k.portal_id || ':' || k.month_year || ':' || k.booked
      RETURNING x.c, true AS late
    ), both_ AS (
      SELECT * FROM upd UNION ALL SELECT * FROM lupd
    )
    SELECT count(*), coalesce(sum(c), 0), n_late + count(*) FILTER (WHERE late),
           late_rows + coalesce(sum(c) FILTER (WHERE late), 0)
      INTO n_redo, redo_rows, n_late, late_rows FROM both_;
  END IF;

  INSERT INTO public.usage_aggregation_state AS st (job, cursor_id) VALUES (p_job, hi)
  ON CONFLICT (job) DO UPDATE SET cursor_id = greatest(coalesce(st.cursor_id, 0), excluded.cursor_id), updated_at = now();

  RETURN jsonb_build_object('from', lo, 'to', hi, 'horizon', horizon,
    'rows', n_rows + redo_rows, 'keys', n_keys + n_redo,
    'late_rows', late_rows, 'late_keys', n_late,
    'bad', n_bad, 'bad_ids', to_jsonb(coalesce(bad_ids, '{}')), 'raced_keys', n_redo, 'done', hi >= horizon);
END
$$;

-- service_role only, except usage_current (also authenticated: a quota
-- check from the app): nothing for anon, nor PUBLIC.
DO $$
DECLARE
  fn text;
BEGIN
  FOREACH fn IN ARRAY ARRAY[
    'public.usage_agg_valid_month(text)',
    'public.usage_agg_month_end(text)',
    'public.usage_agg_next_month(text)',
    'public.usage_agg_is_closed(text)',
    'public.usage_agg_booking_month(text)',
    'public.usage_agg_periods()',
    'public.usage_agg_period_info(text, bigint)',
    'public.usage_agg_close_month(text, text, bigint, text)',
    'public.usage_agg_reopen_month(text, text, text)',
    'public.usage_agg_adjust(bigint, text, bigint, bigint, bigint, text, text, text)',
    'public.usage_agg_prune_batch(text, text, bigint, boolean)',
    'public.usage_agg_periods_status(bigint)',
    'public.usage_agg_preflight(text)',
    'public.usage_agg_rebase(text, text)',
    'public.usage_agg_restore_deleted_keys(text)',
    'public.usage_agg_rpc_batch(text, bigint, integer, boolean)',
    'public.usage_current(bigint, text)'
  ] LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
      EXECUTE format('REVOKE ALL ON FUNCTION %s FROM anon, authenticated', fn);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
      EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', fn);
    END IF;
  END LOOP;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
    GRANT EXECUTE ON FUNCTION public.usage_current(bigint, text) TO authenticated;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
    REVOKE ALL ON public.usage_agg_closed_months, public.usage_agg_period_events,
                  public.portal_usage_adjustments, public.usage_agg_pruned FROM anon, authenticated;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    REVOKE ALL ON public.usage_agg_closed_months, public.usage_agg_period_events,
                  public.usage_agg_pruned FROM service_role;
    GRANT SELECT ON public.usage_agg_closed_months, public.usage_agg_period_events,
                    public.usage_agg_pruned TO service_role;
    REVOKE ALL ON public.portal_usage_adjustments FROM service_role;
    GRANT SELECT, INSERT, UPDATE ON public.portal_usage_adjustments TO service_role;
  END IF;
END $$;

NOTIFY pgrst, 'reload schema';

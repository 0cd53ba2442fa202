-- usage-agg: the rules a manual adjustment must meet (issue 17, cases 4
-- and 6; docs/semantics.md, "Manual adjustments").
--
-- Apply after 20261202090000_usage_agg_rejected_tally.sql (applying it
-- again changes nothing):
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f supabase/migrations/20261207090000_usage_agg_adjust_rules.sql
-- or `supabase db push`, or paste `usage-agg sql` (every migration, in order)
-- into Supabase's SQL editor.
--
-- What it changes:
--   * usage_agg_adjust_bound(): the bound on a manual adjustment's counts,
--     10^12 either way;
--   * usage_agg_adjust, as in 20261201090000, refuses (answers, as its other
--     refusals) what it used to book:
--       - an amount beyond the bound: requests, successes and errors are
--         each within -10^12 to 10^12. Before, any bigint was booked, and
--         the sums billing reads (`report`'s billed total, `verify`, the
--         snapshot `close` takes) overflowed: close failed for good with
--         22003. The counts are checked before any arithmetic, and their
--         sum is compared in numeric, which cannot overflow;
--       - a booking month no invoice can still show: one after the
--         database's current month, or, while no month is closed, one
--         before the earliest month with usage (a monthly row, or an
--         adjustment booked in it: what an invoice of the month shows):
--         `--month 0001-01` was booked in 0001-01. With a
--         month closed, the booking month is after the newest closed one
--         by construction (usage_agg_booking_month);
--   * portal_usage_adjustments_manual_bound: the same bound as a CHECK on
--     the table, so a manual adjustment written to the table directly
--     (service_role may insert there: the REST engine writes its late
--     adjustments) is bounded too. NOT VALID: an adjustment booked before
--     this migration stays as it was booked (history is never edited), and
--     `report` and `verify` say so if such amounts no longer add up.

-- The most a manual adjustment adds or takes away, in each of requests,
-- successes and errors (src/periods.rs, ADJUST_BOUND, says why 10^12).
-- `usage-agg doctor` reads it to tell whether this migration is applied.
CREATE OR REPLACE FUNCTION public.usage_agg_adjust_bound()
RETURNS bigint
LANGUAGE sql
IMMUTABLE
AS $$
  SELECT 1000000000000::bigint
$$;

-- The bound, as a CHECK on new manual adjustments.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_constraint
                  WHERE conrelid = 'public.portal_usage_adjustments'::regclass
                    AND conname = 'portal_usage_adjustments_manual_bound') THEN
    ALTER TABLE public.portal_usage_adjustments
      ADD CONSTRAINT portal_usage_adjustments_manual_bound
      CHECK (source <> 'manual'
             OR (request_count BETWEEN -1000000000000 AND 1000000000000
                 AND success_count BETWEEN -1000000000000 AND 1000000000000
                 AND error_count BETWEEN -1000000000000 AND 1000000000000))
      NOT VALID;
  END IF;
END $$;

-- A signed manual adjustment, booked in the open month (see
-- usage_agg_booking_month), once per idempotency key: the same key again
-- books nothing and answers what was booked; the same key with other values
-- is refused. Refusals are answered, not raised, so the caller can say why.
-- As in 20261201090000, with the bound on amounts and the rule on the
-- booking month (above).
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
  a        public.portal_usage_adjustments;
  booked   text;
  current  text := to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM');
  earliest text;
  bound    constant bigint := public.usage_agg_adjust_bound();
BEGIN
  -- The booking month cannot change under this insert.
  LOCK TABLE public.usage_agg_closed_months IN SHARE MODE;
  IF NOT public.usage_agg_valid_month(p_month) THEN
    RETURN jsonb_build_object('refused', 'bad_month');
  END IF;
  IF p_month > current THEN
    RETURN jsonb_build_object('refused', 'future', 'current_month', current);
  END IF;
  IF p_reason IS NULL OR btrim(p_reason) = '' THEN
    RETURN jsonb_build_object('refused', 'no_reason');
  END IF;
  IF p_key IS NULL OR btrim(p_key) = '' OR p_key LIKE 'late:%' THEN
    RETURN jsonb_build_object('refused', 'bad_key');
  END IF;
  IF p_requests IS NULL OR p_successes IS NULL OR p_errors IS NULL THEN
    RETURN jsonb_build_object('refused', 'counts');
  END IF;
  -- Before any arithmetic on them: bigint arithmetic near its ends raises.
  IF p_requests NOT BETWEEN -bound AND bound OR p_successes NOT BETWEEN -bound AND bound
     OR p_errors NOT BETWEEN -bound AND bound THEN
    RETURN jsonb_build_object('refused', 'amount_bound', 'bound', bound);
  END IF;
  IF p_successes::numeric + p_errors <> p_requests THEN
    RETURN jsonb_build_object('refused', 'counts');
  END IF;
  SELECT * INTO a FROM public.portal_usage_adjustments WHERE idempotency_key = p_key;
  IF NOT FOUND THEN
    IF NOT EXISTS (SELECT 1 FROM public.portal_usage_monthly WHERE portal_id = p_portal_id)
       AND NOT EXISTS (SELECT 1 FROM public.portal_usage_adjustments WHERE portal_id = p_portal_id) THEN
      RETURN jsonb_build_object('refused', 'unknown_portal');
    END IF;
    booked := public.usage_agg_booking_month(p_month);
    -- A month an invoice can still show: not one after the database's
    -- month, and, while no month is closed (the booking month is then the
    -- usage's own month), not one before the first with usage. With a
    -- month closed, it is after the newest closed one by construction.
    IF booked > current THEN
      RETURN jsonb_build_object('refused', 'future', 'current_month', current, 'booking_month', booked);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM public.usage_agg_closed_months WHERE closed) THEN
      SELECT least((SELECT min(month_year) FROM public.portal_usage_monthly
                     WHERE public.usage_agg_valid_month(month_year)),
                   (SELECT min(booked_month) FROM public.portal_usage_adjustments))
        INTO earliest;
      IF booked < earliest THEN
        RETURN jsonb_build_object('refused', 'before_usage', 'booking_month', booked,
                                  'earliest_month', earliest);
      END IF;
    END IF;
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

-- service_role only: nothing for anon or authenticated, nor PUBLIC (as the
-- periods migration granted usage_agg_adjust).
DO $$
DECLARE
  fn text;
BEGIN
  FOREACH fn IN ARRAY ARRAY[
    'public.usage_agg_adjust_bound()',
    'public.usage_agg_adjust(bigint, text, bigint, bigint, bigint, text, text, text)'
  ] LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
      EXECUTE format('REVOKE ALL ON FUNCTION %s FROM anon, authenticated', fn);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
      EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', fn);
    END IF;
  END LOOP;
END $$;

NOTIFY pgrst, 'reload schema';

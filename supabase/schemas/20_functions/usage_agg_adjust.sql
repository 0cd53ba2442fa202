-- A signed manual correction (`usage-agg adjust`), with its reason: billing
-- corrections are entries, never edits. Booked in the open month (see
-- usage_agg_booking_month), once per idempotency key: the same key again
-- books nothing and answers what was booked; the same key with other values
-- is refused. Refusals are answered, not raised, so the caller can say why.
-- Refused too (issue 17, cases 4 and 6; docs/semantics.md, "Manual
-- adjustments"): an amount beyond usage_agg_adjust_bound() either way
-- (checked before any arithmetic, the sum compared in numeric, so nothing
-- overflows), and a booking month no invoice can still show: one after the
-- database's current month, or, while no month is closed, one before the
-- earliest month with usage (a monthly row, or an adjustment booked in
-- it). With a month closed, the booking month is after the newest closed
-- one by construction.
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

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_adjust(bigint, text, bigint, bigint, bigint, text, text, text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_adjust(bigint, text, bigint, bigint, bigint, text, text, text) TO service_role;

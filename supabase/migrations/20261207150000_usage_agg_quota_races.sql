-- usage-agg: a quota set beside a booking (issue 20, an adversarial pass).
--
-- Apply after 20261207140000_usage_agg_dashboard.sql. Idempotent. The
-- current definition is in supabase/schemas/20_functions/usage_agg_set_quota.sql.
--
-- usage_agg_set_quota and a booking ran side by side under READ COMMITTED,
-- neither waiting for the other: the booking judged its rows against the
-- old limit, and the quota's own record of what is reached read the totals
-- from before the booking. Lowering a portal's limit to 50 while a run
-- booked its 46th to 55th rows recorded 80% and never 100%, with exit 0
-- everywhere, and a portal blocked at its limit sends no row that would
-- fire it later. The quota now takes turns with bookings.

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
  -- Bookings hold the closed months in SHARE mode for their transaction:
  -- this waits for those in flight to commit, and those that start after
  -- wait for this one. A booking then sees the limit in force, and the
  -- crossings recorded here see every booking committed before (a quota
  -- set beside a booking recorded neither side's crossing; found by an
  -- adversarial pass).
  LOCK TABLE public.usage_agg_closed_months IN SHARE ROW EXCLUSIVE MODE;
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

-- Marks p_month open again, recording who, when and why (a closed month's
-- rows change only through this, and never without a trace). Its monthly
-- rows may then change again (late rows of it are counted there from now
-- on), and adjustments are booked after the newest month still closed.
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

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_reopen_month(text, text, text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_reopen_month(text, text, text) TO service_role;

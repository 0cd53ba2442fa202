-- The month after p_month: adjustments are booked there once p_month is the
-- newest closed month (usage_agg_booking_month).
CREATE OR REPLACE FUNCTION public.usage_agg_next_month(p_month text)
RETURNS text
LANGUAGE sql
STABLE
AS $$
  SELECT to_char(to_date(p_month || '-01', 'YYYY-MM-DD') + interval '1 month', 'YYYY-MM')
$$;

-- Its owner alone: usage-agg's own functions call it, never the API.
REVOKE ALL ON FUNCTION public.usage_agg_next_month(text) FROM PUBLIC, anon, authenticated, service_role;

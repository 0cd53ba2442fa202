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

-- Its owner alone: usage-agg's own functions call it, never the API.
REVOKE ALL ON FUNCTION public.usage_agg_booking_month(text) FROM PUBLIC, anon, authenticated, service_role;

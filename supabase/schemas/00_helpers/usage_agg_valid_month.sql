-- Months are 'YYYY-MM' text throughout, as the seed's month_year is: that
-- form sorts as time, so text comparison is month order. This is the one
-- test of the form, used by the tables' CHECKs (hence its place before
-- them) and by every function that takes a month.
CREATE OR REPLACE FUNCTION public.usage_agg_valid_month(p_month text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
  SELECT coalesce(p_month ~ '^[0-9]{4}-(0[1-9]|1[0-2])$', false)
$$;

-- Its owner alone: usage-agg's own functions call it, never the API.
REVOKE ALL ON FUNCTION public.usage_agg_valid_month(text) FROM PUBLIC, anon, authenticated, service_role;

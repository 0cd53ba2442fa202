-- Whether p_month is closed now: the one question every guard and booking
-- rule asks. SECURITY DEFINER, its search_path pinned, so that it answers
-- the same whoever writes (usage_agg_closed_months is readable by its owner
-- and service_role alone).
CREATE OR REPLACE FUNCTION public.usage_agg_is_closed(p_month text)
RETURNS boolean
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  SELECT EXISTS (SELECT 1 FROM public.usage_agg_closed_months WHERE month_year = p_month AND closed)
$$;

-- Its owner alone: usage-agg's own functions call it, never the API.
REVOKE ALL ON FUNCTION public.usage_agg_is_closed(text) FROM PUBLIC, anon, authenticated, service_role;

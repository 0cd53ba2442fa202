-- The first instant after the month (UTC), i.e. its end: the grace window
-- before a month may close starts here, on the database's clock, so that
-- every caller's idea of "the month is over" is the same.
CREATE OR REPLACE FUNCTION public.usage_agg_month_end(p_month text)
RETURNS timestamptz
LANGUAGE sql
STABLE
AS $$
  SELECT (to_date(p_month || '-01', 'YYYY-MM-DD') + interval '1 month')::timestamp AT TIME ZONE 'UTC'
$$;

-- Its owner alone: usage-agg's own functions call it, never the API.
REVOKE ALL ON FUNCTION public.usage_agg_month_end(text) FROM PUBLIC, anon, authenticated, service_role;

-- TRUNCATE fires no row trigger: refuse it where rows must not go (the
-- adjustments, and the monthly rows while any month is closed), since
-- those are what invoices were made from.
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

-- Its owner alone: it runs as a trigger, never called over REST.
REVOKE ALL ON FUNCTION public.usage_agg_refuse_truncate() FROM PUBLIC, anon, authenticated, service_role;

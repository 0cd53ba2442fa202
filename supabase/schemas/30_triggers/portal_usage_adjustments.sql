-- Adjustments are what invoices add to a month: never deleted, booked only
-- where the rules say, and never emptied by a TRUNCATE.

-- Every insert, update and delete checked against the booking rules.
CREATE TRIGGER usage_agg_guard_adjustment
  BEFORE INSERT OR UPDATE OR DELETE ON public.portal_usage_adjustments
  FOR EACH ROW EXECUTE FUNCTION public.usage_agg_guard_adjustment();

-- TRUNCATE fires no row trigger: refused here.
CREATE TRIGGER usage_agg_refuse_truncate
  BEFORE TRUNCATE ON public.portal_usage_adjustments
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_refuse_truncate();

-- What keeps the app's monthly totals true whoever writes them: a closed
-- month's rows frozen, a watermark never lowered, a deleted key rebuilt, a
-- reset noticed. Triggers of one kind fire in name order:
-- usage_agg_closed_month runs before usage_agg_guard_watermark, so the
-- closed-month check sees each write as it was asked for, before the
-- watermark guard may turn it into a no-op.

-- A closed month's rows never change until it is reopened.
CREATE TRIGGER usage_agg_closed_month
  BEFORE INSERT OR UPDATE OR DELETE ON public.portal_usage_monthly
  FOR EACH ROW EXECUTE FUNCTION public.usage_agg_guard_closed_month();

-- A write that would lower a key's watermark is a no-op. The WHEN clause is
-- checked without calling the function, so ordinary writes (the watermark
-- going up) pay nothing for the guard.
CREATE TRIGGER usage_agg_guard_watermark
  BEFORE UPDATE ON public.portal_usage_monthly
  FOR EACH ROW
  WHEN (NEW.last_request_id < OLD.last_request_id)
  EXECUTE FUNCTION public.usage_agg_guard_watermark();

-- A deleted key is logged, and the next run rebuilds it from all its rows.
CREATE TRIGGER usage_agg_note_deleted_key
  AFTER DELETE ON public.portal_usage_monthly
  FOR EACH ROW EXECUTE FUNCTION public.usage_agg_note_deleted_key();

-- A TRUNCATE after the first run is recorded as a reset...
CREATE TRIGGER usage_agg_note_truncate
  AFTER TRUNCATE ON public.portal_usage_monthly
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_note_truncate();

-- ...and refused outright while any month is closed (TRUNCATE fires no row
-- trigger).
CREATE TRIGGER usage_agg_refuse_truncate
  BEFORE TRUNCATE ON public.portal_usage_monthly
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_refuse_truncate();

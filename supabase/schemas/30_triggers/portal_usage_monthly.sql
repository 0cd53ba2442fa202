-- What keeps the app's monthly totals true whoever writes them: a closed
-- month's rows frozen, a watermark never lowered, a deleted key rebuilt, a
-- reset noticed. The closed-month check runs after each statement, over the
-- rows as written: a write the watermark guard turned into a no-op is still
-- a write to a closed month's row, and refused.

-- A closed month's rows never change until it is reopened: checked once per
-- statement over the rows it wrote (one trigger per event: a trigger with
-- transition tables has one event).
CREATE TRIGGER usage_agg_closed_month_insert
  AFTER INSERT ON public.portal_usage_monthly
  REFERENCING NEW TABLE AS usage_agg_new
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_guard_closed_month_rows();
CREATE TRIGGER usage_agg_closed_month_update
  AFTER UPDATE ON public.portal_usage_monthly
  REFERENCING OLD TABLE AS usage_agg_old NEW TABLE AS usage_agg_new
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_guard_closed_month_rows();
CREATE TRIGGER usage_agg_closed_month_delete
  AFTER DELETE ON public.portal_usage_monthly
  REFERENCING OLD TABLE AS usage_agg_old
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_guard_closed_month_rows();

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

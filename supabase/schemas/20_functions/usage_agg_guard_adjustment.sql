-- Adjustments are what invoices add to a month's rows, so they are never
-- deleted, and edited only as a late row's state moving forward while the
-- month it is booked in is open:
--   * an adjustment is booked in usage_agg_booking_month(month_year), and a
--     late one only for a closed month_year. Checked at each write, so a
--     run that read the closed months before a close or a reopening cannot
--     book rows where the run after it would not (docs/semantics.md,
--     "Closed months");
--   * once its booked month closes, it never changes;
--   * a manual one never changes;
--   * a late one's watermark never moves back (the guard of
--     portal_usage_monthly: the newer state wins), and a late one is
--     refused when the key's monthly row already counts past the watermark
--     its rows were counted from (counted_from_id: the month was reopened
--     and closed again meanwhile).
CREATE OR REPLACE FUNCTION public.usage_agg_guard_adjustment()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  booking text;
BEGIN
  IF TG_OP = 'DELETE' THEN
    RAISE EXCEPTION 'usage_agg: portal_usage_adjustments is never edited: book a correcting adjustment (`usage-agg adjust`) instead of deleting one';
  END IF;
  IF TG_OP = 'UPDATE' THEN
    IF (NEW.id, NEW.portal_id, NEW.month_year, NEW.booked_month, NEW.source, NEW.idempotency_key)
       IS DISTINCT FROM (OLD.id, OLD.portal_id, OLD.month_year, OLD.booked_month, OLD.source, OLD.idempotency_key) THEN
      RAISE EXCEPTION 'usage_agg: an adjustment''s portal, months, source and key never change';
    END IF;
    IF current_setting('usage_agg.rebase', true) = 'on'
       AND (NEW.request_count, NEW.success_count, NEW.error_count, NEW.last_request_at)
           IS NOT DISTINCT FROM (OLD.request_count, OLD.success_count, OLD.error_count, OLD.last_request_at) THEN
      RETURN NEW;
    END IF;
    IF OLD.source = 'manual' THEN
      RAISE EXCEPTION 'usage_agg: manual adjustment % is never edited: book a correcting one (`usage-agg adjust`)',
        OLD.idempotency_key;
    END IF;
  END IF;
  IF NEW.source = 'late' AND NOT public.usage_agg_is_closed(NEW.month_year) THEN
    RAISE EXCEPTION 'usage_agg: % is not closed, so its rows are counted in portal_usage_monthly, not as late adjustments (a month was reopened meanwhile: the next run counts them)',
      NEW.month_year;
  END IF;
  booking := public.usage_agg_booking_month(NEW.month_year);
  IF NEW.booked_month IS DISTINCT FROM booking THEN
    RAISE EXCEPTION 'usage_agg: an adjustment for % is booked in %, the open month after the newest closed one, not in % (a month was closed or reopened meanwhile: the next run books it)',
      NEW.month_year, booking, NEW.booked_month;
  END IF;
  IF NEW.source = 'late' AND NEW.counted_from_id IS NOT NULL
     AND NEW.counted_from_id < coalesce((SELECT m.last_request_id FROM public.portal_usage_monthly m
                                          WHERE m.portal_id = NEW.portal_id AND m.month_year = NEW.month_year), 0) THEN
    RAISE EXCEPTION 'usage_agg: rows of %:% above id % are already counted in its monthly row (the month was reopened and closed again meanwhile: the next run counts from there)',
      NEW.portal_id, NEW.month_year, NEW.counted_from_id;
  END IF;
  IF TG_OP = 'UPDATE' THEN
    IF NEW.last_request_id < OLD.last_request_id THEN
      RETURN OLD;
    END IF;
    NEW.created_at := OLD.created_at;
    NEW.updated_at := now();
  END IF;
  RETURN NEW;
END
$$;

-- Its owner alone: it runs as a trigger, never called over REST.
REVOKE ALL ON FUNCTION public.usage_agg_guard_adjustment() FROM PUBLIC, anon, authenticated, service_role;

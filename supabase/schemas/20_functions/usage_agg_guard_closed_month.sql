-- A closed month's portal_usage_monthly rows are what its invoice was made
-- from, so they never change: no insert, no update, no delete, by anyone,
-- until `usage-agg reopen` (which marks the month open again, with who,
-- when and why). One exception: a rebase (usage_agg.rebase, set by
-- usage_agg_rebase for its own transaction) may move a watermark and
-- nothing else.
CREATE OR REPLACE FUNCTION public.usage_agg_guard_closed_month()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  m text;
  p bigint;
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') AND public.usage_agg_is_closed(OLD.month_year) THEN
    m := OLD.month_year;
    p := OLD.portal_id;
  ELSIF TG_OP IN ('INSERT', 'UPDATE') AND public.usage_agg_is_closed(NEW.month_year) THEN
    m := NEW.month_year;
    p := NEW.portal_id;
  END IF;
  IF m IS NOT NULL THEN
    IF TG_OP = 'UPDATE' AND current_setting('usage_agg.rebase', true) = 'on'
       AND (NEW.portal_id, NEW.month_year, NEW.request_count, NEW.success_count, NEW.error_count,
            NEW.last_request_at)
           IS NOT DISTINCT FROM (OLD.portal_id, OLD.month_year, OLD.request_count, OLD.success_count,
                                 OLD.error_count, OLD.last_request_at) THEN
      RETURN NEW;
    END IF;
    RAISE EXCEPTION 'usage_agg: % is closed, so its portal_usage_monthly rows never change (portal %, %); rows that come late are booked as adjustments; `usage-agg reopen --month % --reason ...` reopens it, recorded',
      m, p, lower(TG_OP), m;
  END IF;
  IF TG_OP = 'DELETE' THEN
    RETURN OLD;
  END IF;
  RETURN NEW;
END
$$;

-- Its owner alone: it runs as a trigger, never called over REST.
REVOKE ALL ON FUNCTION public.usage_agg_guard_closed_month() FROM PUBLIC, anon, authenticated, service_role;

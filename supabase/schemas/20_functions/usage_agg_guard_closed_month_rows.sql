-- A closed month's portal_usage_monthly rows are what its invoice was made
-- from, so they never change: no insert, no update, no delete, by anyone,
-- until `usage-agg reopen` (which marks the month open again, with who,
-- when and why). One exception: a rebase (usage_agg.rebase, set by
-- usage_agg_rebase for its own transaction) may move a watermark and
-- nothing else.
--
-- Checked once per statement, over the rows it wrote (transition tables),
-- not once per row: a booking writes tens of thousands of keys, and a
-- per-row check (a SECURITY DEFINER call, a lookup) was half of a batch's
-- time (20261207170000, docs/benchmarks.md). An exception raised here
-- undoes the whole statement, as the per-row check did. With no month
-- closed at all (the common case) it is one lookup per statement.
-- Rows pair up by id (the seed's SERIAL primary key): under a rebase, an
-- updated row of a closed month must keep its key, counts and time.
CREATE OR REPLACE FUNCTION public.usage_agg_guard_closed_month_rows()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  m text;
  p bigint;
  rebase constant boolean := coalesce(current_setting('usage_agg.rebase', true) = 'on', false);
BEGIN
  IF NOT EXISTS (SELECT 1 FROM public.usage_agg_closed_months WHERE closed) THEN
    RETURN NULL;
  END IF;
  IF TG_OP = 'INSERT' THEN
    SELECT n.month_year, n.portal_id INTO m, p
      FROM usage_agg_new n
      JOIN public.usage_agg_closed_months c ON c.month_year = n.month_year AND c.closed
     ORDER BY n.portal_id, n.month_year LIMIT 1;
  ELSIF TG_OP = 'DELETE' THEN
    SELECT o.month_year, o.portal_id INTO m, p
      FROM usage_agg_old o
      JOIN public.usage_agg_closed_months c ON c.month_year = o.month_year AND c.closed
     ORDER BY o.portal_id, o.month_year LIMIT 1;
  ELSE
    SELECT r.month_year, r.portal_id INTO m, p
      FROM (SELECT o.id, o.portal_id, o.month_year FROM usage_agg_old o
            UNION ALL
            SELECT n.id, n.portal_id, n.month_year FROM usage_agg_new n) r
      JOIN public.usage_agg_closed_months c ON c.month_year = r.month_year AND c.closed
     WHERE NOT (rebase AND EXISTS (
             SELECT 1 FROM usage_agg_old o JOIN usage_agg_new n ON n.id = o.id
              WHERE o.id = r.id
                AND (n.portal_id, n.month_year, n.request_count, n.success_count, n.error_count,
                     n.last_request_at)
                    IS NOT DISTINCT FROM
                    (o.portal_id, o.month_year, o.request_count, o.success_count, o.error_count,
                     o.last_request_at)))
     ORDER BY r.portal_id, r.month_year LIMIT 1;
  END IF;
  IF m IS NOT NULL THEN
    RAISE EXCEPTION 'usage_agg: % is closed, so its portal_usage_monthly rows never change (portal %, %); rows that come late are booked as adjustments; `usage-agg reopen --month % --reason ...` reopens it, recorded',
      m, p, lower(TG_OP), m;
  END IF;
  RETURN NULL;
END
$$;

-- Its owner alone: it runs as a trigger, never called over REST.
REVOKE ALL ON FUNCTION public.usage_agg_guard_closed_month_rows() FROM PUBLIC, anon, authenticated, service_role;

-- portal_usage_monthly is the app's table (billing reads it), made by the
-- app before any migration; usage-agg writes it. What usage-agg adds to it:
-- each key's watermark and its index here, the triggers in
-- 30_triggers/portal_usage_monthly.sql. UNIQUE (portal_id, month_year),
-- the seed's, is what the bulk upsert needs.

-- Each key's watermark: the newest raw id its counts include. Existing rows
-- start at 0: the first run after the migration rebuilds every key from its
-- rows and sets it.
ALTER TABLE public.portal_usage_monthly
  ADD COLUMN last_request_id bigint NOT NULL DEFAULT 0;

-- Finds keys a run that died wrote past the cursor (docs/semantics.md,
-- trap 2).
CREATE INDEX portal_usage_monthly_last_request_id_idx
  ON public.portal_usage_monthly (last_request_id);

-- A month's keys: the crossings of a rebuild's months
-- (usage_agg_sweep_pending_crossings) read those keys alone.
CREATE INDEX portal_usage_monthly_month_year_idx
  ON public.portal_usage_monthly (month_year);

-- The REST engine writes here with the service key. (On Supabase the
-- default privileges already give the app's tables to every API role; the
-- app's row level security keeps anon and authenticated out.)
GRANT SELECT, INSERT, UPDATE ON public.portal_usage_monthly TO service_role;

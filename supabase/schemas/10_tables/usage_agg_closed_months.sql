-- Billing periods (docs/semantics.md, "Closed months"): a month closes after
-- a grace window and its totals never move again without a trace. One row
-- per month that was ever closed, as it stands now; `closed` false: it was
-- reopened (the reopening is kept here, and every event in
-- usage_agg_period_events).
CREATE TABLE public.usage_agg_closed_months (
  month_year      text PRIMARY KEY CHECK (public.usage_agg_valid_month(month_year)),
  closed          boolean NOT NULL DEFAULT true,
  closed_at       timestamptz NOT NULL DEFAULT now(),
  closed_by       text NOT NULL,
  -- The cursor when it closed: every good row of the month with an id at or
  -- below it is in portal_usage_monthly; later ones become adjustments.
  up_to_id        bigint NOT NULL,
  -- The month's portal_usage_monthly rows at the close.
  keys            bigint NOT NULL,
  request_count   bigint NOT NULL,
  success_count   bigint NOT NULL,
  error_count     bigint NOT NULL,
  -- The requests of the adjustments booked in the month at its close (late
  -- rows of earlier months, manual corrections): with the monthly rows,
  -- what its invoice counts. Neither changes while it is closed.
  booked_request_count bigint NOT NULL DEFAULT 0,
  reopened_at     timestamptz,
  reopened_by     text,
  reopen_reason   text,
  -- Every raw row of the month with an id at or below this is deleted
  -- (usage-agg prune), and counted in usage_agg_pruned.
  pruned_through  bigint NOT NULL DEFAULT 0,
  updated_at      timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE public.usage_agg_closed_months ENABLE ROW LEVEL SECURITY;

-- Read by service_role; closes and reopenings go through the functions.
REVOKE ALL ON TABLE public.usage_agg_closed_months FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE public.usage_agg_closed_months TO service_role;

-- Each threshold of its quota a portal's month reached (docs/quotas.md),
-- recorded by the rule book in the transaction that booked the rows, once
-- per portal, month, threshold and limit; request_count is the month's
-- usage at that booking. delivered_at, attempts, last_error and
-- last_attempt_at are the webhook's (`usage-agg alerts deliver`).
CREATE TABLE public.portal_usage_alerts (
  id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  portal_id         bigint NOT NULL CHECK (portal_id > 0),
  month_year        text NOT NULL CHECK (public.usage_agg_valid_month(month_year)),
  threshold_percent integer NOT NULL CHECK (threshold_percent BETWEEN 1 AND 1000),
  request_limit     bigint NOT NULL CHECK (request_limit > 0),
  request_count     bigint NOT NULL,
  crossed_at        timestamptz NOT NULL DEFAULT now(),
  delivered_at      timestamptz,
  attempts          integer NOT NULL DEFAULT 0,
  last_error        text,
  last_attempt_at   timestamptz,
  -- The webhook-id every delivery of it carries (Standard Webhooks): the
  -- same across attempts, unique across databases, so a receiver of
  -- several projects dedups by it alone.
  webhook_id        uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
  CONSTRAINT portal_usage_alerts_once UNIQUE (portal_id, month_year, threshold_percent, request_limit)
);
-- What delivery and `status` read: the undelivered, oldest first.
CREATE INDEX portal_usage_alerts_undelivered_idx
  ON public.portal_usage_alerts (id) WHERE delivered_at IS NULL;
-- The alerts a scheduled run recorded, by its time
-- (usage_agg_schedule_show).
CREATE INDEX portal_usage_alerts_crossed_at_idx
  ON public.portal_usage_alerts (crossed_at);
ALTER TABLE public.portal_usage_alerts ENABLE ROW LEVEL SECURITY;

-- Read by service_role, written only by the rule book and
-- usage_agg_alert_attempt.
REVOKE ALL ON TABLE public.portal_usage_alerts FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE public.portal_usage_alerts TO service_role;
REVOKE ALL ON SEQUENCE public.portal_usage_alerts_id_seq FROM PUBLIC, anon, authenticated, service_role;

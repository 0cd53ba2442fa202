-- The history of every close and reopening, never edited (the trigger
-- usage_agg_append_only): what tells why a month's totals changed after its
-- invoice was sent.
CREATE TABLE public.usage_agg_period_events (
  id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  month_year    text NOT NULL,
  event         text NOT NULL CHECK (event IN ('close', 'reopen')),
  at            timestamptz NOT NULL DEFAULT now(),
  by            text NOT NULL,
  reason        text,
  up_to_id      bigint,
  keys          bigint,
  request_count bigint,
  success_count bigint,
  error_count   bigint
);
ALTER TABLE public.usage_agg_period_events ENABLE ROW LEVEL SECURITY;

-- Read by service_role, written only by close and reopen.
REVOKE ALL ON TABLE public.usage_agg_period_events FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE public.usage_agg_period_events TO service_role;
REVOKE ALL ON SEQUENCE public.usage_agg_period_events_id_seq FROM PUBLIC, anon, authenticated, service_role;

-- Adjustments, on top of portal_usage_monthly: what billing invoices for a
-- month B is B's monthly rows plus the adjustments booked in B. They exist
-- so that a closed month's totals never move, and a correction is an entry,
-- never an edit.
--   'late':   rows of a closed month counted after its close. One row per
--             (portal_id, month_year, booked_month), written as a full state
--             with a watermark, exactly as portal_usage_monthly is; its
--             idempotency_key is 'late:<portal>:<month>:<booked>', so the
--             one unique key serves both sources.
--   'manual': a signed correction, with its reason and the caller's
--             idempotency key; never edited.
-- The trigger usage_agg_guard_adjustment keeps them where they are booked.
CREATE TABLE public.portal_usage_adjustments (
  id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  portal_id       bigint NOT NULL CHECK (portal_id > 0),
  month_year      text NOT NULL CHECK (public.usage_agg_valid_month(month_year)),
  booked_month    text NOT NULL CHECK (public.usage_agg_valid_month(booked_month)),
  source          text NOT NULL CHECK (source IN ('late', 'manual')),
  request_count   bigint NOT NULL DEFAULT 0,
  success_count   bigint NOT NULL DEFAULT 0,
  error_count     bigint NOT NULL DEFAULT 0,
  last_request_at timestamp,
  last_request_id bigint NOT NULL DEFAULT 0,
  reason          text,
  idempotency_key text NOT NULL UNIQUE,
  -- 'late', written over REST: the watermark the write's new rows start
  -- above (the key's highest when the run read it). The guard refuses it
  -- when the key's monthly row already counts past it: the month was
  -- reopened and closed again meanwhile, and those rows are in the monthly
  -- row now. NULL: not checked (the server-side engine locks the closed
  -- months for its whole transaction instead).
  counted_from_id bigint,
  created_by      text,
  created_at      timestamptz NOT NULL DEFAULT now(),
  updated_at      timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT portal_usage_adjustments_check CHECK (booked_month >= month_year),
  CONSTRAINT portal_usage_adjustments_check1 CHECK (request_count = success_count + error_count),
  CONSTRAINT portal_usage_adjustments_check2 CHECK (source <> 'late'
         OR idempotency_key = 'late:' || portal_id || ':' || month_year || ':' || booked_month),
  CONSTRAINT portal_usage_adjustments_check3 CHECK (source <> 'manual'
         OR (reason IS NOT NULL AND btrim(reason) <> '' AND idempotency_key NOT LIKE 'late:%'
             AND last_request_id = 0))
);
ALTER TABLE public.portal_usage_adjustments ENABLE ROW LEVEL SECURITY;

-- The bound of usage_agg_adjust_bound() on manual amounts, as a CHECK, so
-- that a manual adjustment written to the table directly, not through
-- usage_agg_adjust, is bounded too. NOT VALID: an adjustment booked before
-- the bound (20261207090000) stays as it was booked, since history is never
-- edited; `report` and `verify` say so if such amounts no longer add up.
ALTER TABLE public.portal_usage_adjustments
  ADD CONSTRAINT portal_usage_adjustments_manual_bound
  CHECK (source <> 'manual'
         OR (request_count BETWEEN -1000000000000 AND 1000000000000
             AND success_count BETWEEN -1000000000000 AND 1000000000000
             AND error_count BETWEEN -1000000000000 AND 1000000000000))
  NOT VALID;

-- A key's adjustments (usage_current, the rules), the watermarks a run
-- checks, and what a month's invoice adds.
CREATE INDEX portal_usage_adjustments_key_idx
  ON public.portal_usage_adjustments (portal_id, month_year);
CREATE INDEX portal_usage_adjustments_last_request_id_idx
  ON public.portal_usage_adjustments (last_request_id);
CREATE INDEX portal_usage_adjustments_booked_month_idx
  ON public.portal_usage_adjustments (booked_month);

-- Read by service_role, written only through the functions (the REST
-- engine books through usage_agg_book).
REVOKE ALL ON TABLE public.portal_usage_adjustments FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE public.portal_usage_adjustments TO service_role;
REVOKE ALL ON SEQUENCE public.portal_usage_adjustments_id_seq FROM PUBLIC, anon, authenticated, service_role;

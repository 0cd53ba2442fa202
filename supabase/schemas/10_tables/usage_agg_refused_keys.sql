-- Keys the rules refused to change, standing until a later run resolves
-- them; while one stands, every run and `status` exit 65. Kinds:
-- 'decrease' (a rebuild found the key above its raw rows and, without
-- --allow-decrease, did not lower it), 'lost' (a write that should have
-- taken effect did not: a trigger or a hand edit undid it), 'closed' (a
-- rebase found a closed month's key with fewer raw rows than billed: only a
-- reopening and a rebuild of the month resolve it).
CREATE TABLE public.usage_agg_refused_keys (
  job             text NOT NULL,
  portal_id       bigint NOT NULL,
  month_year      text NOT NULL,
  stored_requests bigint NOT NULL,
  raw_requests    bigint NOT NULL,
  found_at        timestamptz NOT NULL DEFAULT now(),
  kind            text NOT NULL DEFAULT 'decrease'
                  CONSTRAINT usage_agg_refused_keys_kind_check CHECK (kind IN ('decrease', 'lost', 'closed')),
  PRIMARY KEY (job, portal_id, month_year)
);
ALTER TABLE public.usage_agg_refused_keys ENABLE ROW LEVEL SECURITY;

-- Read by service_role, written only through the functions.
REVOKE ALL ON TABLE public.usage_agg_refused_keys FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE public.usage_agg_refused_keys TO service_role;

-- Per key, the good raw rows `usage-agg prune` deleted: with them the
-- invariant (every total equals its rows) can still be checked once the
-- rows are gone.
CREATE TABLE public.usage_agg_pruned (
  id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  portal_id       bigint NOT NULL,
  month_year      text NOT NULL,
  request_count   bigint NOT NULL,
  success_count   bigint NOT NULL,
  error_count     bigint NOT NULL,
  last_request_at timestamp,
  rows_deleted    bigint NOT NULL,
  UNIQUE (portal_id, month_year)
);
ALTER TABLE public.usage_agg_pruned ENABLE ROW LEVEL SECURITY;

-- Read by service_role, written only by usage_agg_prune_batch.
REVOKE ALL ON TABLE public.usage_agg_pruned FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE public.usage_agg_pruned TO service_role;
REVOKE ALL ON SEQUENCE public.usage_agg_pruned_id_seq FROM PUBLIC, anon, authenticated, service_role;

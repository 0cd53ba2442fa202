-- A portal's monthly allowance (docs/quotas.md): its own row, else the
-- default plan's (portal_id NULL), one of each; the thresholds of it that
-- fire an alert. Written through usage_agg_set_quota (`usage-agg quota set`).
CREATE TABLE public.portal_usage_quotas (
  portal_id             bigint CHECK (portal_id > 0),
  monthly_request_limit bigint NOT NULL CHECK (monthly_request_limit > 0),
  thresholds_percent    integer[] NOT NULL DEFAULT '{80,100}'
                        CHECK (public.usage_agg_valid_thresholds(thresholds_percent)),
  updated_at            timestamptz NOT NULL DEFAULT now(),
  updated_by            text
);
CREATE UNIQUE INDEX portal_usage_quotas_portal_key
  ON public.portal_usage_quotas ((coalesce(portal_id, 0)));
ALTER TABLE public.portal_usage_quotas ENABLE ROW LEVEL SECURITY;

-- Read by service_role, written only through usage_agg_set_quota.
REVOKE ALL ON TABLE public.portal_usage_quotas FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE public.portal_usage_quotas TO service_role;

-- The most a manual adjustment adds or takes away, in each of requests,
-- successes and errors (src/periods.rs, ADJUST_BOUND, says why 10^12): any
-- bigint overflowed the sums billing reads. usage_agg_adjust refuses beyond
-- it, and `usage-agg doctor` reads it to tell whether the adjust-rules
-- migration (20261207090000) is applied.
CREATE OR REPLACE FUNCTION public.usage_agg_adjust_bound()
RETURNS bigint
LANGUAGE sql
IMMUTABLE
AS $$
  SELECT 1000000000000::bigint
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_adjust_bound() FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_adjust_bound() TO service_role;

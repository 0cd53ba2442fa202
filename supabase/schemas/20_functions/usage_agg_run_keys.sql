-- The keys a run from p_from to p_to wrote: the monthly rows whose
-- watermark is in (p_from, p_to] (a key a later run wrote since is not
-- among them). A multi-batch run of the server-side engine reports its
-- distinct keys with it; it read every such row back over REST, a page per
-- 1,000 keys, to count them.
CREATE OR REPLACE FUNCTION public.usage_agg_run_keys(p_from bigint, p_to bigint)
RETURNS bigint
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  SELECT count(*) FROM public.portal_usage_monthly m
   WHERE m.last_request_id > p_from AND m.last_request_id <= p_to
$$;

-- service_role alone: the CLI calls it over REST with the service key.
REVOKE ALL ON FUNCTION public.usage_agg_run_keys(bigint, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_run_keys(bigint, bigint) TO service_role;

-- The keys a run from p_from to p_to wrote: those whose monthly row or
-- late adjustment has its watermark in (p_from, p_to], each once (a key a
-- later run wrote since is not among them; one a --month rebuild left with
-- its watermark in that range is, though the run may have found nothing
-- new for it). A multi-batch run of the server-side engine reports its
-- distinct keys with it; it read every monthly row back over REST, a page
-- per 1,000 keys, to count them, and missed the late ones.
CREATE OR REPLACE FUNCTION public.usage_agg_run_keys(p_from bigint, p_to bigint)
RETURNS bigint
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  SELECT count(*) FROM (
    SELECT m.portal_id, m.month_year::text FROM public.portal_usage_monthly m
     WHERE m.last_request_id > p_from AND m.last_request_id <= p_to
    UNION
    SELECT a.portal_id, a.month_year::text FROM public.portal_usage_adjustments a
     WHERE a.source = 'late' AND a.last_request_id > p_from AND a.last_request_id <= p_to) k
$$;

-- service_role alone: the CLI calls it over REST with the service key.
REVOKE ALL ON FUNCTION public.usage_agg_run_keys(bigint, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_run_keys(bigint, bigint) TO service_role;

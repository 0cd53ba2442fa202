-- A quota's thresholds (docs/quotas.md): 1 to 20 percentages of the
-- limit, each from 1 to 1000, strictly ascending. The one test of them,
-- used by portal_usage_quotas' CHECK (hence its place before the tables)
-- and by usage_agg_set_quota.
CREATE OR REPLACE FUNCTION public.usage_agg_valid_thresholds(p_thresholds integer[])
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
  SELECT coalesce(cardinality(p_thresholds) BETWEEN 1 AND 20
                  AND array_ndims(p_thresholds) = 1
                  AND array_position(p_thresholds, NULL) IS NULL
                  AND 1 <= ALL (p_thresholds) AND 1000 >= ALL (p_thresholds)
                  AND p_thresholds = ARRAY(SELECT DISTINCT v FROM unnest(p_thresholds) AS v ORDER BY v), false)
$$;

-- Its owner alone: usage-agg's own functions and the tables' CHECKs call it, never the API.
REVOKE ALL ON FUNCTION public.usage_agg_valid_thresholds(integer[]) FROM PUBLIC, anon, authenticated, service_role;

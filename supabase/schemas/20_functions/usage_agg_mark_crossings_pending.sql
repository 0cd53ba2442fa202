-- A rebuild's months whose quotas' crossings are still to be recorded
-- (docs/quotas.md, "Where crossings are recorded"): a rebuild writes
-- monthly rows over REST, outside the rule book, so it notes their months
-- here before its first write, and usage_agg_sweep_pending_crossings
-- records their crossings and clears them once it is done. A rebuild
-- killed in between leaves them here, where the next CLI run finds them,
-- whatever the cursor did.
CREATE OR REPLACE FUNCTION public.usage_agg_mark_crossings_pending(p_job text, p_months text[])
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  pending text[];
BEGIN
  IF p_months IS NULL OR EXISTS (SELECT 1 FROM unnest(p_months) m WHERE NOT public.usage_agg_valid_month(m)) THEN
    RAISE EXCEPTION 'usage_agg_mark_crossings_pending: months are YYYY-MM, got %', p_months USING ERRCODE = '22023';
  END IF;
  -- The closed months first, then the job's row: the rule book's order.
  LOCK TABLE public.usage_agg_closed_months IN SHARE MODE;
  UPDATE public.usage_aggregation_state s
     SET crossings_pending = ARRAY(SELECT DISTINCT m FROM unnest(s.crossings_pending || p_months) m ORDER BY m),
         updated_at = now()
   WHERE s.job = p_job
  RETURNING s.crossings_pending INTO pending;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'usage_agg_mark_crossings_pending: no job %', p_job USING ERRCODE = '22023';
  END IF;
  RETURN to_jsonb(pending);
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
REVOKE ALL ON FUNCTION public.usage_agg_mark_crossings_pending(text, text[]) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_mark_crossings_pending(text, text[]) TO service_role;

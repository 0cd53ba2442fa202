-- Adds a run's rejected rows to the job's tally, keeping the first 20 ids:
-- once the cursor has passed a bad row no run reads it again, so the tally
-- is where `status`, `doctor` and `verify` still name it. Each row is added
-- once (rebuilds do not add the rows they read again). The scheduled run
-- calls it too.
CREATE OR REPLACE FUNCTION public.usage_agg_note_rejected(p_job text, p_count bigint, p_ids bigint[])
RETURNS bigint
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  UPDATE public.usage_aggregation_state
     SET rejected_rows = rejected_rows + greatest(p_count, 0),
         rejected_ids = (SELECT coalesce(array_agg(i ORDER BY i), '{}') FROM (
                           SELECT DISTINCT i FROM unnest(rejected_ids || p_ids) i ORDER BY i LIMIT 20) x),
         updated_at = now()
   WHERE job = p_job
  RETURNING rejected_rows;
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_note_rejected(text, bigint, bigint[]) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_note_rejected(text, bigint, bigint[]) TO service_role;

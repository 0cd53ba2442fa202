-- Records the quotas' crossings of the months a rebuild noted as pending
-- (usage_agg_mark_crossings_pending) and clears them, in one transaction:
-- a rebuild calls it after its writes, and every run (CLI or scheduled)
-- calls it before it counts, so the
-- crossings of a rebuild killed between its writes and their record are
-- recorded by the next run, once (the alerts' UNIQUE).
-- It costs the keys of the pending months (the month_year index), nothing
-- when none is pending. Returns the alerts recorded, as
-- usage_agg_record_crossings does.
CREATE OR REPLACE FUNCTION public.usage_agg_sweep_pending_crossings(p_job text DEFAULT 'default')
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  pending text[];
  alerts  jsonb;
BEGIN
  -- The closed months first, then the job's row: the rule book's order.
  LOCK TABLE public.usage_agg_closed_months IN SHARE MODE;
  SELECT s.crossings_pending INTO pending
    FROM public.usage_aggregation_state s WHERE s.job = p_job FOR UPDATE;
  IF coalesce(cardinality(pending), 0) = 0 THEN
    RETURN '[]'::jsonb;
  END IF;
  alerts := public.usage_agg_record_crossings(pending);
  UPDATE public.usage_aggregation_state s
     SET crossings_pending = '{}', updated_at = now()
   WHERE s.job = p_job;
  RETURN alerts;
END
$$;

-- service_role: the CLI calls it over REST with the service key; the
-- scheduled run calls it as its owner.
REVOKE ALL ON FUNCTION public.usage_agg_sweep_pending_crossings(text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_sweep_pending_crossings(text) TO service_role;

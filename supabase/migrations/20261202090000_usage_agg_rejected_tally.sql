-- usage-agg: the tally of rejected rows, in a migration of its own.
--
-- Apply after 20261201100000_usage_agg_schedule.sql. Idempotent: a database
-- where an earlier copy of 20261130120000_usage_agg_trust.sql already added
-- these (they were first written into that file after it had been
-- committed) runs it again harmlessly.
--
-- Rows rejected as bad data are added to a tally in the job's state by each
-- run (each row once: rebuilds do not add the rows they read again), with
-- the first ids, for `status`, `doctor` and `verify`. The scheduled job
-- (usage_agg_run_scheduled) calls the same function.

ALTER TABLE public.usage_aggregation_state
  ADD COLUMN IF NOT EXISTS rejected_rows bigint NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS rejected_ids bigint[] NOT NULL DEFAULT '{}';

-- Adds a run's rejected rows to the job's tally; keeps the first 20 ids.
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

-- service_role only: nothing for anon or authenticated, nor PUBLIC.
REVOKE ALL ON FUNCTION public.usage_agg_note_rejected(text, bigint, bigint[]) FROM PUBLIC;
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
    REVOKE ALL ON FUNCTION public.usage_agg_note_rejected(text, bigint, bigint[]) FROM anon, authenticated;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    GRANT EXECUTE ON FUNCTION public.usage_agg_note_rejected(text, bigint, bigint[]) TO service_role;
  END IF;
END $$;

NOTIFY pgrst, 'reload schema';

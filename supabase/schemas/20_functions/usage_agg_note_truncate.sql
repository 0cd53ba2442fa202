-- A TRUNCATE of either table after the first run invalidates what the cursor
-- and the watermarks claim (with RESTART IDENTITY, new ids start again below
-- the cursor). Recorded as a reset, so runs refuse to count until
-- `usage-agg aggregate --rebase`.
CREATE OR REPLACE FUNCTION public.usage_agg_note_truncate()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
BEGIN
  UPDATE public.usage_aggregation_state
     SET reset_reason = format('%s was truncated', TG_TABLE_NAME), reset_at = now(), updated_at = now()
   WHERE cursor_id IS NOT NULL;
  RETURN NULL;
END
$$;

-- Its owner alone: it runs as a trigger, never called over REST.
REVOKE ALL ON FUNCTION public.usage_agg_note_truncate() FROM PUBLIC, anon, authenticated, service_role;

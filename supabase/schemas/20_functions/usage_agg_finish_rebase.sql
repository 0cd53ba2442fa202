-- The end of a rebase's rebuild: the cursor to the horizon it counted to,
-- and the reset cleared, together, so that a rebase that dies before this
-- is redone rather than taken for a finished one.
CREATE OR REPLACE FUNCTION public.usage_agg_finish_rebase(p_job text, p_cursor bigint)
RETURNS bigint
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  UPDATE public.usage_aggregation_state
     SET cursor_id = greatest(coalesce(cursor_id, 0), p_cursor), reset_reason = NULL, reset_at = NULL,
         updated_at = now()
   WHERE job = p_job
  RETURNING cursor_id;
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_finish_rebase(text, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_finish_rebase(text, bigint) TO service_role;

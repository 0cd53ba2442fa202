-- Moves the cursor forward, never back: every id <= p_cursor is counted.
-- Needs no lease: an overlapping run that counted up to p_cursor makes the
-- claim true whoever holds the lease.
CREATE OR REPLACE FUNCTION public.usage_agg_advance_cursor(p_job text, p_cursor bigint)
RETURNS bigint
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  INSERT INTO public.usage_aggregation_state AS s (job, cursor_id) VALUES (p_job, p_cursor)
  ON CONFLICT (job) DO UPDATE
     SET cursor_id = greatest(coalesce(s.cursor_id, 0), excluded.cursor_id), updated_at = now()
  RETURNING cursor_id;
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_advance_cursor(text, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_advance_cursor(text, bigint) TO service_role;

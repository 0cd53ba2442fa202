-- Keeps a long run's lease (usage_agg_acquire_lease) while it works: extends
-- it if p_owner still holds it; false when it was lost (it expired and
-- another run took it), so that the run stops instead of working beside the
-- new holder.
CREATE OR REPLACE FUNCTION public.usage_agg_renew_lease(p_job text, p_owner text, p_ttl_seconds integer)
RETURNS boolean
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  WITH renewed AS (
    UPDATE public.usage_aggregation_state
       SET lease_expires_at = now() + make_interval(secs => p_ttl_seconds), updated_at = now()
     WHERE job = p_job AND lease_owner = p_owner
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM renewed);
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_renew_lease(text, text, integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_renew_lease(text, text, integer) TO service_role;

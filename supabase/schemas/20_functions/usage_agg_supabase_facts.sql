-- What `doctor` checks on a Supabase project, in one read: who owns the
-- seed's tables (the migrations alter them as the role that owns
-- usage-agg's functions: a table Studio made as supabase_admin stops
-- them), row level security on both and any policy that opens them to
-- the API's roles, grants wider than the migrations leave, and the
-- statement timeouts a run lives under.
CREATE OR REPLACE FUNCTION public.usage_agg_supabase_facts(p_job text DEFAULT 'default')
RETURNS jsonb
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  WITH seed(t) AS (VALUES ('usage_requests'), ('portal_usage_monthly')),
  api(r) AS (SELECT rolname FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role'))
  SELECT jsonb_build_object(
    'migrations_owner', (SELECT pg_get_userbyid(proowner) FROM pg_proc
                          WHERE oid = 'public.usage_agg_book_folded(text,bigint,bigint,boolean)'::regprocedure),
    'table_owners', (SELECT jsonb_object_agg(c.relname, pg_get_userbyid(c.relowner))
                       FROM pg_class c JOIN seed ON c.oid = to_regclass('public.' || seed.t)),
    'rls', (SELECT jsonb_object_agg(c.relname, c.relrowsecurity)
              FROM pg_class c JOIN seed ON c.oid = to_regclass('public.' || seed.t)),
    'open_policies', (SELECT coalesce(jsonb_agg(p.tablename || '.' || p.policyname ORDER BY 1), '[]')
                        FROM pg_policies p
                       WHERE p.schemaname = 'public' AND p.tablename IN (SELECT t FROM seed)
                         AND p.roles && ARRAY['public', 'anon', 'authenticated']::name[]),
    'grant_leaks', (SELECT coalesce(jsonb_agg(x ORDER BY x), '[]') FROM (
        SELECT api.r || ' may write ' || t AS x
          FROM api, unnest(ARRAY['usage_aggregation_state', 'usage_agg_deleted_keys', 'usage_agg_refused_keys',
                                 'usage_agg_closed_months', 'usage_agg_period_events',
                                 'portal_usage_adjustments', 'usage_agg_pruned']) t
         WHERE to_regclass('public.' || t) IS NOT NULL
           AND has_table_privilege(api.r, 'public.' || t, 'INSERT, UPDATE, DELETE, TRUNCATE')
        UNION ALL
        SELECT api.r || ' may execute ' || p.oid::regprocedure::text
          FROM api, pg_proc p
         WHERE p.pronamespace = 'public'::regnamespace
           AND (p.proname LIKE 'usage\_agg\_%' OR p.proname = 'usage_current')
           AND api.r IN ('anon', 'authenticated') AND has_function_privilege(api.r, p.oid, 'EXECUTE')) l),
    'api_statement_timeout', (SELECT substring(c FROM '^statement_timeout=(.*)$')
                                FROM pg_db_role_setting s, unnest(s.setconfig) c
                               WHERE s.setrole = (SELECT oid FROM pg_roles WHERE rolname = 'authenticator')
                                 AND c LIKE 'statement_timeout=%' LIMIT 1),
    'cron_statement_timeout', public.usage_agg_cron_statement_timeout(p_job))
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_supabase_facts(text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_supabase_facts(text) TO service_role;

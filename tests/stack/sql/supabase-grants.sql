-- A Supabase project's public schema, per database, run by supabase_admin
-- before any table exists: the default privileges of Supabase's initial
-- schema give every table, sequence and function postgres creates in
-- public to postgres, anon, authenticated and service_role (ALL). Row level
-- security, not grants, keeps anon out: the seed's tables get it enabled
-- (supabase-rls.sql), as the dashboard does.
GRANT ALL ON SCHEMA public TO postgres;
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
  GRANT ALL ON TABLES TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
  GRANT ALL ON SEQUENCES TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
  GRANT ALL ON FUNCTIONS TO postgres, anon, authenticated, service_role;

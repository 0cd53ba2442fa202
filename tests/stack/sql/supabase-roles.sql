-- The roles of a Supabase project, as its public setup makes them
-- (supabase/postgres: migrations/db/init-scripts/ and migrations/db/migrations/;
-- shared/reference/supabase-roles-notes.md). Cluster-wide, run once per
-- cluster by the bootstrap superuser, supabase_admin.
--
-- postgres is not a superuser: migrations, the SQL editor and pg_cron jobs
-- run as it (demote-postgres). It is a member of the API roles and of the
-- monitoring roles Supabase grants it.
CREATE ROLE postgres NOSUPERUSER CREATEDB CREATEROLE LOGIN REPLICATION BYPASSRLS;
CREATE ROLE anon NOLOGIN INHERIT;
CREATE ROLE authenticated NOLOGIN INHERIT;
CREATE ROLE service_role NOLOGIN INHERIT BYPASSRLS;
CREATE ROLE authenticator LOGIN NOINHERIT;
GRANT anon, authenticated, service_role TO authenticator;
GRANT anon, authenticated, service_role TO postgres;
GRANT pg_monitor, pg_read_all_data, pg_signal_backend TO postgres;
-- The limits: anon 3 s, authenticated 8 s, and PostgREST's own login role
-- 8 s for statements and locks (service_role has none of its own, so its
-- requests run under authenticator's).
ALTER ROLE anon SET statement_timeout = '3s';
ALTER ROLE authenticated SET statement_timeout = '8s';
ALTER ROLE authenticator SET statement_timeout = '8s';
ALTER ROLE authenticator SET lock_timeout = '8s';
-- pg-safeupdate in every PostgREST session (enable-safeupdate-postgrest):
-- our stand-in, tests/stack/safeupdate/safeupdate.c, built by scripts/setup.
ALTER ROLE authenticator SET session_preload_libraries = 'safeupdate';

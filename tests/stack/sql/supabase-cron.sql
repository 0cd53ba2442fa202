-- pg_cron as Supabase sets it up (pg_cron/after-create.sql and
-- 20231020085357): created by supabase_admin; postgres may use the schema
-- and its tables, but only read cron.job (jobs are made with cron.schedule).
CREATE EXTENSION pg_cron;
GRANT USAGE ON SCHEMA cron TO postgres WITH GRANT OPTION;
GRANT ALL ON ALL TABLES IN SCHEMA cron TO postgres WITH GRANT OPTION;
GRANT ALL ON ALL SEQUENCES IN SCHEMA cron TO postgres WITH GRANT OPTION;
GRANT ALL ON ALL FUNCTIONS IN SCHEMA cron TO postgres WITH GRANT OPTION;
REVOKE ALL ON TABLE cron.job FROM postgres;
GRANT SELECT ON TABLE cron.job TO postgres;

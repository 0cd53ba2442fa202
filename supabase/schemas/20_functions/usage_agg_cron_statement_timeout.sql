-- A scheduled run lives under the statement timeout of the role pg_cron
-- runs it as, which covers the whole CALL: `schedule` and `doctor` check the
-- time limit against it. This is that timeout, as far as it can be told
-- from an API session (which runs under authenticator's own): the cron
-- role's setting (this function's owner: pg_cron runs the job as the role
-- that scheduled it) in this database or in all, the database's, then what
-- the last scheduled run found itself under; else Supabase's global
-- default, 2 minutes, assumed and said so. {"ms", "source"}; 0 ms: none.
CREATE OR REPLACE FUNCTION public.usage_agg_cron_statement_timeout(p_job text DEFAULT 'default')
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  v   text;
  src text;
  ms  bigint;
BEGIN
  SELECT x.v, x.src INTO v, src FROM (
    SELECT substring(c FROM '^statement_timeout=(.*)$') AS v, s.src, s.pri
      FROM (SELECT unnest(setconfig) AS c,
                   CASE WHEN setrole <> 0 AND setdatabase <> 0 THEN 'the cron role''s setting in this database'
                        WHEN setrole <> 0 THEN 'the cron role''s setting'
                        ELSE 'this database''s setting' END AS src,
                   CASE WHEN setrole <> 0 AND setdatabase <> 0 THEN 1 WHEN setrole <> 0 THEN 2 ELSE 3 END AS pri
              FROM pg_db_role_setting
             WHERE (setrole = (SELECT oid FROM pg_roles WHERE rolname = current_user) OR setrole = 0)
               AND (setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database()) OR setdatabase = 0)
               AND NOT (setrole = 0 AND setdatabase = 0)) s
     WHERE c LIKE 'statement_timeout=%') x
   ORDER BY x.pri LIMIT 1;
  IF v IS NOT NULL THEN
    -- Read as PostgreSQL reads it ('30 s', '1.5min', '45000us' alike): set
    -- for this subtransaction, read back in milliseconds, rolled back.
    BEGIN
      PERFORM set_config('statement_timeout', v, true);
      ms := (SELECT setting::bigint FROM pg_catalog.pg_settings WHERE name = 'statement_timeout');
      RAISE EXCEPTION USING ERRCODE = 'P0002';
    EXCEPTION WHEN no_data_found THEN
      NULL;
    WHEN OTHERS THEN
      ms := NULL;
    END;
    IF ms IS NOT NULL THEN
      RETURN jsonb_build_object('ms', ms, 'source', src);
    END IF;
    RETURN jsonb_build_object('ms', 0, 'source', format('%s, %L, which PostgreSQL does not read as a time', src, v));
  END IF;
  SELECT scheduled_statement_timeout_ms INTO ms FROM public.usage_aggregation_state WHERE job = p_job;
  IF ms IS NOT NULL THEN
    RETURN jsonb_build_object('ms', ms, 'source', 'what the last scheduled run ran under');
  END IF;
  RETURN jsonb_build_object('ms', 120000, 'source', 'assumed: Supabase''s global default (no scheduled run has told yet)');
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_cron_statement_timeout(text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_cron_statement_timeout(text) TO service_role;

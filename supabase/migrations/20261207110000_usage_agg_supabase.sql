-- usage-agg on a real Supabase project (issue 18): what a superuser's test
-- cluster hid.
--
-- Apply after 20261207100000_usage_agg_rule_book.sql (and
-- 20261207090000_usage_agg_adjust_rules.sql, whose function it grants). Idempotent.
--
-- 1. pg-safeupdate, loaded into every PostgREST session on Supabase, refuses
--    an UPDATE or DELETE without a WHERE clause, inside functions and CTEs
--    too (PostgREST answers 400 21000). Every such statement a function the
--    CLI calls over REST runs gets one: `WHERE true` where the whole table is
--    meant (the deleted-keys log is taken whole).
-- 4. Supabase's default privileges give anon, authenticated and
--    service_role ALL on every table, sequence and function postgres makes
--    in public, so a service key could PATCH the cursor or the lease, and
--    anon kept USAGE on the new sequences and EXECUTE on the trigger
--    functions. Every grant on usage-agg's own objects is revoked, then
--    exactly what each role needs is granted (the seed's two tables are the
--    app's, and keep theirs).

-- The restore of deleted monthly rows, as in 20261201090000, with a WHERE
-- clause on the DELETE that takes the log.
CREATE OR REPLACE FUNCTION public.usage_agg_restore_deleted_keys(p_job text DEFAULT 'default')
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  c        bigint;
  restored jsonb;
BEGIN
  SELECT cursor_id INTO c FROM public.usage_aggregation_state WHERE job = p_job;
  IF c IS NULL THEN
    RETURN '[]'::jsonb;
  END IF;
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_restore (portal_id bigint, month_year text) ON COMMIT DROP;
  TRUNCATE usage_agg_restore;
  WITH taken AS (
    DELETE FROM public.usage_agg_deleted_keys WHERE true RETURNING portal_id, month_year
  )
  INSERT INTO usage_agg_restore SELECT portal_id, month_year FROM taken
   WHERE NOT public.usage_agg_is_closed(month_year);
  WITH raw AS (
    SELECT k.portal_id, k.month_year,
           count(r.id) AS n,
           count(r.id) FILTER (WHERE r.success) AS s,
           count(r.id) FILTER (WHERE NOT r.success) AS e,
           max(r.request_timestamp) AS at
      FROM usage_agg_restore k
      LEFT JOIN public.usage_requests r
        ON r.portal_id = k.portal_id AND r.month_year = k.month_year AND r.id <= c
       AND r.success IS NOT NULL AND public.usage_agg_valid_time(r.request_timestamp)
     WHERE public.usage_agg_valid_key(k.portal_id, k.month_year)
     GROUP BY 1, 2
  ), truth AS (
    SELECT raw.portal_id, raw.month_year,
           raw.n + coalesce(p.request_count, 0) - coalesce(l.n, 0) AS n,
           raw.s + coalesce(p.success_count, 0) - coalesce(l.s, 0) AS s,
           raw.e + coalesce(p.error_count, 0) - coalesce(l.e, 0) AS e,
           greatest(raw.at, p.last_request_at) AS at
      FROM raw
      LEFT JOIN public.usage_agg_pruned p USING (portal_id, month_year)
      LEFT JOIN (SELECT portal_id, month_year, sum(request_count) AS n, sum(success_count) AS s,
                        sum(error_count) AS e
                   FROM public.portal_usage_adjustments WHERE source = 'late' GROUP BY 1, 2) l
        USING (portal_id, month_year)
  ), written AS (
    INSERT INTO public.portal_usage_monthly AS t
           (portal_id, month_year, request_count, success_count, error_count, last_request_at,
            last_request_id, updated_at)
    SELECT portal_id, month_year, n, s, e, at, c, now() FROM truth WHERE n > 0
    ON CONFLICT (portal_id, month_year) DO UPDATE
       SET request_count = excluded.request_count, success_count = excluded.success_count,
           error_count = excluded.error_count, last_request_at = excluded.last_request_at,
           last_request_id = excluded.last_request_id, updated_at = now()
     WHERE t.last_request_id <= c
    RETURNING t.portal_id, t.month_year
  )
  SELECT coalesce(jsonb_agg(portal_id || ':' || month_year ORDER BY portal_id, month_year), '[]')
    INTO restored FROM written;
  RETURN restored;
END
$$;

-- 2. The scheduled run, as in 20261201100000, inside the statement timeout.
--    On Supabase the global statement_timeout (2 minutes) covers the whole
--    CALL across its COMMITs: a run longer than that was cancelled with no
--    record, its lease held until the TTL. Now the run keeps its time bound
--    inside 80% of the timeout less 5 s, catches a cancel during a batch,
--    records the run ('stopped', with why), and halves the batch for the
--    next runs (growing it back while batches are quick). It records the
--    timeout it ran under, which `schedule` and `doctor` check the time
--    limit against. A lost write standing is recorded as 'writes_lost'.
ALTER TABLE public.usage_aggregation_state
  ADD COLUMN IF NOT EXISTS scheduled_batch_ids bigint,
  ADD COLUMN IF NOT EXISTS scheduled_statement_timeout_ms bigint;

CREATE OR REPLACE PROCEDURE public.usage_agg_run_scheduled(
  p_max_seconds integer DEFAULT 50,
  p_batch_ids bigint DEFAULT 1000000,
  p_max_wait_ms integer DEFAULT 2000,
  INOUT summary jsonb DEFAULT NULL)
LANGUAGE plpgsql
AS $$
#variable_conflict use_variable
DECLARE
  job       constant text := 'default';
  started   constant timestamptz := clock_timestamp();
  ttl       integer;
  me        text;
  lease     jsonb;
  holder    text;
  facts     jsonb;
  problems  jsonb;
  restored  jsonb := '[]';
  b         jsonb;
  n_batches integer := 0;
  n_rows    bigint := 0;
  n_keys    bigint := 0;
  n_bad     bigint := 0;
  n_late    bigint := 0;
  bad_ids   bigint[] := '{}';
  c_before  bigint;
  c_after   bigint;
  outcome   text;
  reason    text;
  tmo_ms    bigint;
  lost      jsonb := '[]';
  budget    numeric;
  batch     bigint;
  b_start   timestamptz;
BEGIN
  IF p_max_seconds IS NULL OR p_max_seconds < 0 OR p_batch_ids IS NULL OR p_batch_ids < 1
     OR p_max_wait_ms IS NULL OR p_max_wait_ms < 0 OR p_max_wait_ms > 7000 THEN
    RAISE EXCEPTION 'usage_agg_run_scheduled: p_max_seconds must be 0 or more, p_batch_ids 1 or more, '
                    'p_max_wait_ms from 0 to 7000';
  END IF;
  -- Renewed before every batch; a run whose backend died leaves it for at
  -- most this long, unless the next scheduled run sees the backend gone.
  ttl := p_max_seconds + 60;
  me := format('%s@%s:%s',
          CASE WHEN current_setting('application_name', true) = 'pg_cron' THEN 'pg_cron' ELSE 'sql' END,
          current_database(), pg_backend_pid());

  -- 1. The lease.
  lease := public.usage_agg_acquire_lease(job, me, ttl);
  IF NOT (lease->>'acquired')::boolean THEN
    holder := lease->>'owner';
    IF holder ~ '^(pg_cron|sql)@.*:[0-9]{1,10}$'
       AND substring(holder, '^[a-z_]+@(.*):[0-9]+$') = current_database()
       AND NOT EXISTS (
         SELECT 1 FROM pg_catalog.pg_stat_activity a
          WHERE a.pid::bigint = substring(holder, ':([0-9]+)$')::bigint) THEN
      lease := public.usage_agg_acquire_lease(job, me, ttl, holder);
    END IF;
  END IF;
  IF NOT (lease->>'acquired')::boolean THEN
    summary := jsonb_build_object('outcome', NULL, 'skipped', 'another run holds the lease',
      'owner', lease->'owner', 'since', lease->'since', 'expires_at', lease->'expires_at');
    RETURN;
  END IF;
  c_before := (lease->>'cursor')::bigint;
  c_after := c_before;
  -- The statement timeout this session runs under covers the whole CALL,
  -- across its COMMITs (Supabase's global is 2 minutes): the run keeps its
  -- own time bound well inside it, so that the timeout never cuts it, and
  -- records it for `schedule` and `doctor` to check the time limit against.
  tmo_ms := (SELECT setting::bigint FROM pg_catalog.pg_settings WHERE name = 'statement_timeout');
  budget := p_max_seconds;
  IF tmo_ms > 0 THEN
    budget := least(budget, greatest(0, tmo_ms / 1000.0 * 0.8 - 5));
  END IF;
  -- A batch halved after running into the timeout stays halved for the
  -- next runs, and grows back while batches are quick.
  SELECT least(p_batch_ids, coalesce(s.scheduled_batch_ids, p_batch_ids)) INTO batch
    FROM public.usage_aggregation_state s WHERE s.job = job;
  batch := coalesce(batch, p_batch_ids);
  UPDATE public.usage_aggregation_state SET scheduled_statement_timeout_ms = tmo_ms WHERE usage_aggregation_state.job = job;
  COMMIT; -- the lease, for everyone to see

  -- 2. and 3. The run-time checks, and a cursor.
  BEGIN
    facts := public.usage_agg_preflight(job);
    problems := public.usage_agg_problems(facts);
    IF jsonb_array_length(problems) > 0 THEN
      outcome := 'refused';
      SELECT 'refused to count: ' || string_agg(p.value->>'message', '; refused to count: ')
        INTO reason FROM jsonb_array_elements(problems) p;
    ELSIF c_before IS NULL THEN
      outcome := 'needs_rebuild';
      reason := 'no run has set the cursor yet: the first run rebuilds every key from all rows and reports drift, '
                'which only the CLI does; run `usage-agg aggregate` once, and the scheduled runs go on from there';
    END IF;
  EXCEPTION WHEN OTHERS THEN
    outcome := 'failed';
    reason := format('checking the assumptions: %s (SQLSTATE %s)', SQLERRM, SQLSTATE);
  END;

  -- 4. Deleted monthly rows.
  IF outcome IS NULL AND (facts->>'deleted_keys')::bigint > 0 THEN
    BEGIN
      restored := public.usage_agg_restore_deleted_keys(job);
    EXCEPTION WHEN OTHERS THEN
      outcome := 'failed';
      reason := format('rebuilding keys whose monthly row was deleted: %s (SQLSTATE %s)', SQLERRM, SQLSTATE);
    END;
    COMMIT;
  END IF;

  -- 5. Batches, one transaction each.
  WHILE outcome IS NULL LOOP
    IF n_batches > 0 THEN
      IF clock_timestamp() >= started + make_interval(secs => budget) THEN
        outcome := 'stopped';
        reason := format('the time bound (%s s%s) passed; the next run goes on', round(budget, 1),
                         CASE WHEN budget < p_max_seconds
                              THEN format(', inside the statement_timeout of %s ms', tmo_ms) ELSE '' END);
        EXIT;
      END IF;
      IF NOT public.usage_agg_renew_lease(job, me, ttl) THEN
        outcome := 'stopped';
        reason := 'the lease was lost (it expired and another run took it)';
        EXIT;
      END IF;
    END IF;
    b_start := clock_timestamp();
    BEGIN
      b := public.usage_agg_rpc_batch(job, batch, p_max_wait_ms, false);
    EXCEPTION WHEN query_canceled THEN
      -- The statement timeout (or a cancel) cut the batch, which rolled
      -- back whole. It fires once: the run can still record itself. The
      -- next run asks for half as many ids, as the CLI does.
      outcome := 'stopped';
      reason := format('a batch of %s ids was cancelled (%s%s); nothing of it was written; the next run '
                       'asks for %s ids', batch, SQLERRM,
                       CASE WHEN tmo_ms > 0 THEN format(', statement_timeout %s ms', tmo_ms) ELSE '' END,
                       greatest(batch / 2, 1000));
      UPDATE public.usage_aggregation_state SET scheduled_batch_ids = greatest(batch / 2, 1000)
       WHERE usage_aggregation_state.job = job;
      EXIT;
    WHEN OTHERS THEN
      outcome := 'failed';
      reason := format('running a batch (usage_agg_rpc_batch): %s (SQLSTATE %s)', SQLERRM, SQLSTATE);
      EXIT;
    END;
    IF (b->>'busy')::boolean THEN
      outcome := 'stopped';
      reason := 'another usage_agg_rpc_batch call is running for this job';
    ELSIF (b->>'needs_rebuild')::boolean THEN
      outcome := 'needs_rebuild';
      reason := 'the cursor was reset (a rebase under way?): run `usage-agg aggregate`';
    ELSIF b->>'to' IS NULL THEN
      outcome := 'stopped';
      reason := format('%s transactions writing usage_requests were still open after %s ms '
                       '(look for transactions left open if this repeats)', b->>'writers_in_flight', p_max_wait_ms);
    ELSE
      n_batches := n_batches + 1;
      n_rows := n_rows + (b->>'rows')::bigint;
      n_keys := n_keys + (b->>'keys')::bigint;
      n_bad := n_bad + (b->>'bad')::bigint;
      -- Rows of closed months, booked as adjustments (periods migration).
      n_late := n_late + coalesce((b->>'late_rows')::bigint, 0);
      -- Writes the rule book found undone: recorded there; this run says so.
      lost := lost || coalesce(b->'lost', '[]');
      bad_ids := (bad_ids || ARRAY(SELECT jsonb_array_elements_text(b->'bad_ids')::bigint))[1:5];
      c_after := (b->>'to')::bigint;
      -- A quick batch lets a halved size grow back, up to p_batch_ids.
      IF batch < p_batch_ids AND clock_timestamp() - b_start < interval '2 seconds' THEN
        batch := least(p_batch_ids, batch * 2);
        UPDATE public.usage_aggregation_state SET scheduled_batch_ids = batch WHERE usage_aggregation_state.job = job;
      END IF;
      COMMIT;
      EXIT WHEN (b->>'done')::boolean;
    END IF;
  END LOOP;

  -- 6. The record.
  IF outcome IS NULL THEN
    IF jsonb_array_length(lost) > 0 OR coalesce((facts->>'lost_keys')::bigint, 0) > 0 THEN
      outcome := 'writes_lost';
      reason := format('keys had a write that did not hold (a trigger or a hand edit undid it; %s): remove '
                       'the cause, then `usage-agg aggregate --full` (or --month) rebuilds them',
                       CASE WHEN jsonb_array_length(lost) > 0 THEN lost ELSE facts->'refused_examples' END);
    ELSIF coalesce((facts->>'refused_keys')::bigint, 0) > 0 THEN
      outcome := 'decreases_refused';
      reason := format('%s keys hold counts above their raw rows since %s (%s); check them, then '
                       '`usage-agg aggregate --full --allow-decrease` (or --month)',
                       facts->>'refused_keys', facts->>'refused_since', facts->'refused_examples');
    ELSIF n_bad > 0 THEN
      outcome := 'bad_rows';
      reason := format('%s rows rejected as bad data (ids %s); every other row is counted',
                       n_bad, array_to_string(bad_ids, ', '));
    ELSE
      outcome := 'ok';
    END IF;
  END IF;
  IF outcome = 'stopped' AND n_bad > 0 THEN
    -- The cursor has passed them: this run is the one to name them.
    reason := format('%s; and %s rows rejected as bad data (ids %s)', reason, n_bad, array_to_string(bad_ids, ', '));
  END IF;
  IF n_bad > 0 THEN
    -- The job's tally of rejected rows, which status and verify show, kept
    -- as CLI runs keep it (the cursor has passed these rows).
    PERFORM public.usage_agg_note_rejected(job, n_bad, bad_ids);
  END IF;
  PERFORM public.usage_agg_finish_run(job, me, outcome, n_rows);
  summary := jsonb_build_object(
    'outcome', outcome, 'reason', reason, 'owner', me, 'batches', n_batches, 'rows', n_rows,
    'keys', n_keys, 'late_rows', n_late, 'bad', n_bad, 'bad_ids', to_jsonb(bad_ids),
    'cursor_before', c_before, 'cursor_after', c_after, 'restored_keys', restored,
    'seconds', round(date_part('epoch', clock_timestamp() - started)::numeric, 3));
  COMMIT;
  IF outcome IN ('refused', 'needs_rebuild', 'failed', 'bad_rows', 'decreases_refused', 'writes_lost')
     OR (outcome = 'stopped' AND n_bad > 0) THEN
    RAISE EXCEPTION 'usage_agg_run_scheduled (%): %', outcome, reason USING DETAIL = summary::text;
  END IF;
END
$$;


-- The statement timeout a scheduled run runs under, as far as it can be
-- told from an API session (which runs under authenticator's own): the
-- cron role's setting (this function's owner: pg_cron runs the job as the
-- role that scheduled it) in this database or in all, the database's, then
-- what the last scheduled run found itself under; else Supabase's global
-- default, 2 minutes, assumed and said so. {"ms", "source"}; 0 ms: none.
CREATE OR REPLACE FUNCTION public.usage_agg_cron_statement_timeout(p_job text DEFAULT 'default')
RETURNS jsonb
LANGUAGE plpgsql
STABLE
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
    -- The units PostgreSQL takes: a bare number is milliseconds.
    ms := CASE WHEN v ~ '^[0-9]+$' THEN v::bigint
               WHEN v ~ '^[0-9]+ms$' THEN substring(v FROM '^[0-9]+')::bigint
               WHEN v ~ '^[0-9]+s$' THEN substring(v FROM '^[0-9]+')::bigint * 1000
               WHEN v ~ '^[0-9]+min$' THEN substring(v FROM '^[0-9]+')::bigint * 60000
               WHEN v ~ '^[0-9]+h$' THEN substring(v FROM '^[0-9]+')::bigint * 3600000
               WHEN v ~ '^[0-9]+d$' THEN substring(v FROM '^[0-9]+')::bigint * 86400000 END;
    IF ms IS NOT NULL THEN
      RETURN jsonb_build_object('ms', ms, 'source', src);
    END IF;
  END IF;
  SELECT scheduled_statement_timeout_ms INTO ms FROM public.usage_aggregation_state WHERE job = p_job;
  IF ms IS NOT NULL THEN
    RETURN jsonb_build_object('ms', ms, 'source', 'what the last scheduled run ran under');
  END IF;
  RETURN jsonb_build_object('ms', 120000, 'source', 'assumed: Supabase''s global default (no scheduled run has told yet)');
END
$$;

-- Installs or updates the job, as in 20261201100000, refusing a time limit
-- at or above the statement timeout the job will run under.
CREATE OR REPLACE FUNCTION public.usage_agg_schedule(
  p_job text, p_schedule text, p_max_seconds integer DEFAULT 50)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  facts   jsonb := public.usage_agg_cron_facts();
  v_name  text := 'usage-agg-' || p_job;
  existed boolean;
  id      bigint;
  tmo     jsonb;
BEGIN
  IF NOT (facts->>'pg_cron')::boolean THEN
    RETURN facts;
  END IF;
  IF p_job IS NULL OR p_job !~ '^[a-z0-9_]{1,40}$' THEN
    RAISE EXCEPTION 'usage_agg_schedule: % is not a job name', p_job;
  END IF;
  IF p_max_seconds IS NULL OR p_max_seconds < 1 OR p_max_seconds > 86400 THEN
    RAISE EXCEPTION 'usage_agg_schedule: p_max_seconds must be from 1 to 86400';
  END IF;
  -- The job runs as this function's owner: its statement timeout covers
  -- the whole CALL, so a time limit at or above it would be cancelled with
  -- the run under way. Refused, with the figure and where it came from.
  tmo := public.usage_agg_cron_statement_timeout(p_job);
  IF (tmo->>'ms')::bigint > 0 AND p_max_seconds::bigint * 1000 >= (tmo->>'ms')::bigint THEN
    RETURN facts || jsonb_build_object('refused', 'time_limit', 'statement_timeout', tmo);
  END IF;
  existed := EXISTS (SELECT 1 FROM cron.job c WHERE c.jobname = v_name AND c.username = current_user);
  id := cron.schedule(v_name, p_schedule, format('CALL public.usage_agg_run_scheduled(%s)', p_max_seconds));
  RETURN facts || jsonb_build_object(
    'created', NOT existed,
    'job', (SELECT to_jsonb(j) FROM cron.job j WHERE j.jobid = id),
    'runs', '[]'::jsonb, 'statement_timeout', tmo);
END
$$;


-- 4. Grants: REVOKE ALL first, then exactly what each role needs.
DO $$
DECLARE
  api_roles text := 'PUBLIC';
  obj text;
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
    api_roles := api_roles || ', anon, authenticated';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    api_roles := api_roles || ', service_role';
  END IF;
  -- Every function and procedure of usage-agg's, trigger functions included.
  FOR obj IN
    SELECT p.oid::regprocedure::text
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = 'public' AND (p.proname LIKE 'usage\_agg\_%' OR p.proname = 'usage_current')
  LOOP
    EXECUTE format('REVOKE ALL ON ROUTINE %s FROM %s', obj, api_roles);
  END LOOP;
  -- Its own tables, and their sequences.
  FOREACH obj IN ARRAY ARRAY['public.usage_aggregation_state', 'public.usage_agg_deleted_keys',
                              'public.usage_agg_refused_keys', 'public.usage_agg_closed_months',
                              'public.usage_agg_period_events', 'public.portal_usage_adjustments',
                              'public.usage_agg_pruned'] LOOP
    EXECUTE format('REVOKE ALL ON TABLE %s FROM %s', obj, api_roles);
  END LOOP;
  FOR obj IN
    SELECT c.oid::regclass::text
      FROM pg_class c JOIN pg_depend d ON d.objid = c.oid AND d.classid = 'pg_class'::regclass
     WHERE c.relkind = 'S' AND d.refclassid = 'pg_class'::regclass
       AND d.refobjid IN ('public.usage_aggregation_state'::regclass, 'public.usage_agg_refused_keys'::regclass,
                          'public.usage_agg_deleted_keys'::regclass, 'public.usage_agg_closed_months'::regclass,
                          'public.usage_agg_period_events'::regclass, 'public.portal_usage_adjustments'::regclass,
                          'public.usage_agg_pruned'::regclass)
  LOOP
    EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM %s', obj, api_roles);
  END LOOP;

  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    -- What the CLI calls over REST with the service key.
    FOREACH obj IN ARRAY ARRAY[
      'public.usage_agg_acquire_lease(text, text, integer, text)',
      'public.usage_agg_renew_lease(text, text, integer)',
      'public.usage_agg_advance_cursor(text, bigint)',
      'public.usage_agg_finish_run(text, text, text, bigint)',
      'public.usage_agg_safe_horizon(integer)',
      'public.usage_agg_preflight(text)',
      'public.usage_agg_book(text, bigint, bigint, jsonb, boolean, boolean, bigint)',
      'public.usage_agg_rpc_batch(text, bigint, integer, boolean)',
      'public.usage_agg_rebase(text, text, bigint)',
      'public.usage_agg_finish_rebase(text, bigint)',
      'public.usage_agg_record_refusals(text, text, jsonb)',
      'public.usage_agg_restore_deleted_keys(text)',
      'public.usage_agg_note_rejected(text, bigint, bigint[])',
      'public.usage_agg_periods()',
      'public.usage_agg_period_info(text, bigint)',
      'public.usage_agg_periods_status(bigint)',
      'public.usage_agg_close_month(text, text, bigint, text)',
      'public.usage_agg_reopen_month(text, text, text)',
      'public.usage_agg_adjust(bigint, text, bigint, bigint, bigint, text, text, text)',
      'public.usage_agg_adjust_bound()',
      'public.usage_agg_prune_batch(text, text, bigint, boolean)',
      'public.usage_agg_schedule(text, text, integer)',
      'public.usage_agg_unschedule(text)',
      'public.usage_agg_schedule_show(text, integer)',
      'public.usage_agg_cron_statement_timeout(text)',
      'public.usage_current(bigint, text)'
    ] LOOP
      -- A function of a migration not applied yet is granted by that one.
      IF to_regprocedure(obj) IS NOT NULL THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', obj);
      END IF;
    END LOOP;
    -- Read, never written directly: the cursor, the lease, the refusals and
    -- the periods change only through the functions above.
    GRANT SELECT ON public.usage_aggregation_state, public.usage_agg_refused_keys,
                    public.usage_agg_closed_months, public.usage_agg_period_events,
                    public.portal_usage_adjustments, public.usage_agg_pruned TO service_role;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
    -- A quota check from the app, as a signed-in user.
    GRANT EXECUTE ON FUNCTION public.usage_current(bigint, text) TO authenticated;
  END IF;
END $$;

NOTIFY pgrst, 'reload schema';

-- usage-agg: the job scheduled in the database (Supabase Cron, the pg_cron
-- extension), for projects with no cron host.
--
-- Apply after 20261201090000_usage_agg_periods.sql (applying it again
-- changes nothing):
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f supabase/migrations/20261201100000_usage_agg_schedule.sql
-- or `supabase db push`, or paste `usage-agg sql` (every migration, in order)
-- into Supabase's SQL editor. It needs no pg_cron to apply: only
-- `usage-agg schedule` does, and says how to enable it.
--
-- What it adds (README, "Run it without a cron host"):
--   * usage_agg_run_scheduled(): a PROCEDURE that does what
--     `usage-agg aggregate --engine rpc` does, in the database: the run-time
--     checks, the lease, server-side batches until caught up or out of time,
--     the run record. pg_cron runs it with `CALL`;
--   * usage_agg_problems(): the run-time checks' decision in SQL, the same
--     as src/preflight.rs (the CLI keeps deciding in Rust);
--   * usage_agg_schedule(), usage_agg_unschedule(), usage_agg_schedule_show():
--     cron.schedule, cron.unschedule and reading cron.job and
--     cron.job_run_details for service_role, so that `usage-agg schedule`
--     and `status` work over the REST API alone;
--   * usage_aggregation_state.last_run_by: who ran the last run (a CLI on
--     some host, or pg_cron), set by usage_agg_finish_run.

ALTER TABLE public.usage_aggregation_state
  ADD COLUMN IF NOT EXISTS last_run_by text;

-- As in 20261127120000, and it also records who ran the run.
CREATE OR REPLACE FUNCTION public.usage_agg_finish_run(
  p_job text, p_owner text, p_outcome text, p_rows bigint)
RETURNS void
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  UPDATE public.usage_aggregation_state
     SET last_run_finished_at = now(), last_run_outcome = p_outcome, last_run_rows = p_rows,
         last_run_by = p_owner,
         last_success_at = CASE WHEN p_outcome IN ('ok', 'bad_rows') THEN now() ELSE last_success_at END,
         lease_owner = CASE WHEN lease_owner = p_owner THEN NULL ELSE lease_owner END,
         lease_expires_at = CASE WHEN lease_owner = p_owner THEN NULL ELSE lease_expires_at END,
         lease_taken_at = CASE WHEN lease_owner = p_owner THEN NULL ELSE lease_taken_at END,
         updated_at = now()
   WHERE job = p_job;
$$;

-- The run-time checks' decision (docs/semantics.md, "Assumptions"), from the
-- facts usage_agg_preflight reports: the same rules, codes and exit statuses
-- as `problems` in src/preflight.rs, which the CLI uses (a test feeds both
-- the same facts). Returns [{code, exit, message}], empty when all hold.
CREATE OR REPLACE FUNCTION public.usage_agg_problems(p_facts jsonb)
RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, public
AS $$
DECLARE
  seq      text := p_facts->>'sequence';
  last     bigint := coalesce((p_facts->>'sequence_last_value')::bigint, 0);
  counted  bigint := greatest(coalesce((p_facts->>'cursor')::bigint, 0),
                              coalesce((p_facts->>'highest_watermark')::bigint, 0));
  newest   bigint := (p_facts->>'newest_id')::bigint;
  out      jsonb := '[]';
BEGIN
  IF seq IS NULL THEN
    RETURN jsonb_build_array(jsonb_build_object('code', 'no_sequence', 'exit', 78, 'message',
      'usage_requests.id has no sequence, so no safe horizon can be read; repair: give it one (identity, or a '
      'SERIAL default), then `usage-agg verify`'));
  END IF;
  IF (p_facts->>'id_from_sequence')::boolean IS FALSE THEN
    out := out || jsonb_build_object('code', 'id_default_not_sequence', 'exit', 78, 'message',
      format('usage_requests.id takes its value from %s, not from %s, so rows can take ids the cursor has '
             'already passed; repair: ALTER TABLE public.usage_requests ALTER COLUMN id SET DEFAULT nextval(%L), '
             'then `usage-agg verify`', coalesce(p_facts->>'id_default', 'no default'), seq, seq));
  END IF;
  IF (p_facts->>'sequence_cache')::bigint > 1 THEN
    out := out || jsonb_build_object('code', 'sequence_cache', 'exit', 78, 'message',
      format('the sequence %s hands out %s ids at a time per session, so cached ids can commit below a cursor '
             'already past them; repair: ALTER SEQUENCE %s CACHE 1, then `usage-agg verify`',
             seq, p_facts->>'sequence_cache', seq));
  END IF;
  IF last < counted THEN
    out := out || jsonb_build_object('code', 'sequence_behind_cursor', 'exit', 65, 'message',
      format('the sequence %s is at %s, below id %s which is already counted, so new rows would take ids the '
             'cursor has passed; repair: `usage-agg aggregate --rebase`', seq, last, counted));
  END IF;
  IF newest > last THEN
    out := out || jsonb_build_object('code', 'ids_above_sequence', 'exit', 65, 'message',
      format('usage_requests holds id %s, above %s, the last value of %s: rows were inserted with ids of their '
             'own; repair: SELECT setval(%L, (SELECT max(id) FROM public.usage_requests)), then `usage-agg verify`',
             newest, last, seq, seq));
  END IF;
  IF p_facts->>'reset_reason' IS NOT NULL THEN
    out := out || jsonb_build_object('code', 'table_reset', 'exit', 65, 'message',
      format('%s (recorded %s) after the cursor was set, so the cursor and the watermarks no longer describe the '
             'table; repair: `usage-agg aggregate --rebase`', p_facts->>'reset_reason', p_facts->>'reset_at'));
  END IF;
  RETURN out;
END
$$;

-- The scheduled run: what `usage-agg aggregate --engine rpc` does, in the
-- database, for pg_cron to run with
--   CALL public.usage_agg_run_scheduled(50)
-- (`usage-agg schedule` installs exactly that). Each step, in order:
--   1. the lease, as CLI runs take it (owner 'pg_cron@<database>:<backend
--      pid>'; 'sql@...' when called by hand): while a live run holds it,
--      this one records nothing and returns. A lease left by a scheduled
--      run whose backend is gone (same database, no such pid) is taken
--      over at once;
--   2. the run-time checks (usage_agg_preflight, judged by
--      usage_agg_problems): a broken assumption is recorded as outcome
--      'refused', and the run ends;
--   3. a cursor: before the first CLI run (cursor NULL) it records
--      'needs_rebuild' and ends. The first run rebuilds every key from all
--      rows and reports drift key by key, which only the CLI does;
--   4. keys whose monthly row was deleted are rebuilt first
--      (usage_agg_restore_deleted_keys), as the CLI does;
--   5. usage_agg_rpc_batch until caught up, or until p_max_seconds have
--      passed (checked between batches: a run may overrun it by one batch),
--      the lease renewed before every batch after the first;
--   6. rejected rows added to the job's tally (usage_agg_note_rejected), and
--      the run recorded with usage_agg_finish_run, with the CLI's outcomes:
--      'ok', 'bad_rows', 'decreases_refused' (refused keys stand), 'stopped'
--      (time bound, lease lost, inserts still in flight, another batch
--      running: the next run goes on), 'failed' (an error in a step), and
--      the two a scheduled run alone records, 'refused' and 'needs_rebuild'.
-- It returns a jsonb summary in `summary` (`CALL` shows it). Where the CLI
-- would exit 65, 70 or 78 (refused, needs_rebuild, failed, bad_rows,
-- decreases_refused, and a stopped run that rejected rows, which no later
-- run will name), it then raises an error carrying the reason and the
-- summary, after the record is committed, so that cron.job_run_details
-- shows the run as failed with why; 'ok' and 'stopped' end without one.
--
-- Why a PROCEDURE, with COMMIT after every batch: a function is one
-- transaction, so every batch of a run would commit together at the end,
-- holding its row locks on portal_usage_monthly (and the advisory lock) for
-- the whole run, and a run stopped at minute 5 would lose five minutes of
-- work. Committing each batch keeps the CLI's rule, one transaction per
-- batch: a crash or a cancel loses at most the batch under way, and a
-- concurrent CLI run or webhook waits on nothing longer than one batch.
--
-- Why it is SECURITY INVOKER, with no SET clause: PostgreSQL refuses
-- COMMIT in a SECURITY DEFINER procedure and in one with a SET clause
-- ("invalid transaction termination"). It runs as its caller (pg_cron runs
-- a job as the role that scheduled it: the owner of usage_agg_schedule,
-- postgres on Supabase), and the privileged work is done by the SECURITY
-- DEFINER functions it calls, each with its search_path pinned; it calls
-- them schema-qualified. Running with its caller's rights, it gives no one
-- more than they have, so its own search_path needs no pinning.
--
-- It must be the whole command (`CALL ...` alone): PostgreSQL allows COMMIT
-- in a procedure only when CALL is the top-level statement, not inside a
-- transaction block or a multi-statement string. A statement_timeout on the
-- role that runs it applies to the whole CALL: keep p_max_seconds below it.
CREATE OR REPLACE PROCEDURE public.usage_agg_run_scheduled(
  p_max_seconds integer DEFAULT 50,
  p_batch_ids bigint DEFAULT 1000000,
  p_max_wait_ms integer DEFAULT 2000,
  INOUT summary jsonb DEFAULT NULL)
LANGUAGE plpgsql
AS $$
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
      IF clock_timestamp() >= started + make_interval(secs => p_max_seconds) THEN
        outcome := 'stopped';
        reason := format('the time bound (%s s) passed; the next run goes on', p_max_seconds);
        EXIT;
      END IF;
      IF NOT public.usage_agg_renew_lease(job, me, ttl) THEN
        outcome := 'stopped';
        reason := 'the lease was lost (it expired and another run took it)';
        EXIT;
      END IF;
    END IF;
    BEGIN
      b := public.usage_agg_rpc_batch(job, p_batch_ids, p_max_wait_ms, false);
    EXCEPTION WHEN OTHERS THEN
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
      bad_ids := (bad_ids || ARRAY(SELECT jsonb_array_elements_text(b->'bad_ids')::bigint))[1:5];
      c_after := (b->>'to')::bigint;
      COMMIT;
      EXIT WHEN (b->>'done')::boolean;
    END IF;
  END LOOP;

  -- 6. The record.
  IF outcome IS NULL THEN
    IF coalesce((facts->>'refused_keys')::bigint, 0) > 0 THEN
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
  IF outcome IN ('refused', 'needs_rebuild', 'failed', 'bad_rows', 'decreases_refused')
     OR (outcome = 'stopped' AND n_bad > 0) THEN
    RAISE EXCEPTION 'usage_agg_run_scheduled (%): %', outcome, reason USING DETAIL = summary::text;
  END IF;
END
$$;

-- pg_cron, as the schedule functions see it: created in this database, its
-- version, and whether the server has it to create.
CREATE OR REPLACE FUNCTION public.usage_agg_cron_facts()
RETURNS jsonb
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  SELECT jsonb_build_object(
    'pg_cron', EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron'),
    'version', (SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'),
    'available', EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_cron'));
$$;

-- Installs or updates the job 'usage-agg-<p_job>' (cron.schedule updates a
-- job of the same name and role). The command is built here, never taken
-- from the caller: the job runs as this function's owner. Without pg_cron
-- in this database it returns the facts ("pg_cron": false), for the CLI to
-- say how to enable it.
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
  existed := EXISTS (SELECT 1 FROM cron.job c WHERE c.jobname = v_name AND c.username = current_user);
  id := cron.schedule(v_name, p_schedule, format('CALL public.usage_agg_run_scheduled(%s)', p_max_seconds));
  RETURN facts || jsonb_build_object(
    'created', NOT existed,
    'job', (SELECT to_jsonb(j) FROM cron.job j WHERE j.jobid = id),
    'runs', '[]'::jsonb);
END
$$;

-- Removes the job 'usage-agg-<p_job>'; "removed": false when there was none.
CREATE OR REPLACE FUNCTION public.usage_agg_unschedule(p_job text)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  facts jsonb := public.usage_agg_cron_facts();
  j     jsonb;
BEGIN
  IF NOT (facts->>'pg_cron')::boolean THEN
    RETURN facts;
  END IF;
  SELECT to_jsonb(c) INTO j FROM cron.job c WHERE c.jobname = 'usage-agg-' || p_job AND c.username = current_user;
  IF j IS NOT NULL THEN
    PERFORM cron.unschedule((j->>'jobid')::bigint);
  END IF;
  RETURN facts || jsonb_build_object('removed', j IS NOT NULL, 'job', j, 'runs', '[]'::jsonb);
END
$$;

-- The job 'usage-agg-<p_job>' (or null) and its last p_runs runs from
-- cron.job_run_details, newest first.
CREATE OR REPLACE FUNCTION public.usage_agg_schedule_show(p_job text, p_runs integer DEFAULT 5)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  facts jsonb := public.usage_agg_cron_facts();
  j     jsonb;
  runs  jsonb;
BEGIN
  IF NOT (facts->>'pg_cron')::boolean THEN
    RETURN facts;
  END IF;
  SELECT to_jsonb(c) INTO j FROM cron.job c WHERE c.jobname = 'usage-agg-' || p_job AND c.username = current_user;
  IF j IS NOT NULL THEN
    SELECT coalesce(jsonb_agg(to_jsonb(r) - 'command' - 'username' - 'database' ORDER BY r.runid DESC), '[]')
      INTO runs
      FROM (SELECT * FROM cron.job_run_details d WHERE d.jobid = (j->>'jobid')::bigint
             ORDER BY d.runid DESC LIMIT greatest(p_runs, 0)) r;
  END IF;
  RETURN facts || jsonb_build_object('job', j, 'runs', coalesce(runs, '[]'::jsonb));
END
$$;

-- service_role only: nothing for anon or authenticated, nor PUBLIC. The
-- procedure also for postgres, the role Supabase's pg_cron jobs run as
-- (the owner of usage_agg_schedule, which installs the job).
DO $$
DECLARE
  fn text;
BEGIN
  FOREACH fn IN ARRAY ARRAY[
    'FUNCTION public.usage_agg_finish_run(text, text, text, bigint)',
    'FUNCTION public.usage_agg_problems(jsonb)',
    'FUNCTION public.usage_agg_cron_facts()',
    'FUNCTION public.usage_agg_schedule(text, text, integer)',
    'FUNCTION public.usage_agg_unschedule(text)',
    'FUNCTION public.usage_agg_schedule_show(text, integer)',
    'PROCEDURE public.usage_agg_run_scheduled(integer, bigint, integer, jsonb)'
  ] LOOP
    EXECUTE format('REVOKE ALL ON %s FROM PUBLIC', fn);
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
      EXECUTE format('REVOKE ALL ON %s FROM anon, authenticated', fn);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
      EXECUTE format('GRANT EXECUTE ON %s TO service_role', fn);
    END IF;
  END LOOP;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'postgres') THEN
    GRANT EXECUTE ON PROCEDURE public.usage_agg_run_scheduled(integer, bigint, integer, jsonb) TO postgres;
  END IF;
END $$;

NOTIFY pgrst, 'reload schema';

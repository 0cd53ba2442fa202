-- The scheduled run, for projects with no cron host: what
-- `usage-agg aggregate --engine rpc` does, in the database, for pg_cron to
-- run with
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
--   4b. the crossings a killed rebuild left pending are recorded
--      (usage_agg_sweep_pending_crossings), as every CLI run does first;
--   5. usage_agg_rpc_batch until caught up, or until the time bound has
--      passed (checked between batches: a run may overrun it by one batch),
--      the lease renewed before every batch after the first;
--   6. rejected rows added to the job's tally (usage_agg_note_rejected), and
--      the run recorded with usage_agg_finish_run, with the CLI's outcomes:
--      'ok', 'bad_rows', 'decreases_refused' (refused keys stand),
--      'writes_lost' (a lost write stands), 'stopped' (time bound, lease
--      lost, inserts still in flight, another batch running, a cancel: the
--      next run goes on), 'failed' (an error in a step), and the two a
--      scheduled run alone records, 'refused' and 'needs_rebuild'.
-- It returns a jsonb summary in `summary` (`CALL` shows it), with the
-- alerts it recorded ('alerts'). Where the CLI
-- would exit 65, 70 or 78 (refused, needs_rebuild, failed, bad_rows,
-- decreases_refused, writes_lost, and a stopped run that rejected rows,
-- which no later run will name), it then raises an error carrying the
-- reason and the summary, after the record is committed, so that
-- cron.job_run_details shows the run as failed with why; 'ok' and
-- 'stopped' end without one.
--
-- The statement timeout of the session covers the whole CALL, across its
-- COMMITs (on Supabase the global is 2 minutes): the run keeps its time
-- bound inside 80% of the timeout less 5 s, catches a cancel during a
-- batch, records the run ('stopped', with why) and lets the lease go, and
-- halves the batch for the next runs. Batches are sized as the CLI's
-- (usage_agg_next_batch_ids, answered by each batch): each aims at a fifth
-- of the time bound (1 to 10 s, never past what is left of it), starting
-- from the size the last batch left in
-- usage_aggregation_state.scheduled_batch_ids (the first time, 1,000 ids
-- and a sample of 50,000 to size the next: usage_agg_rpc_batch's
-- p_sample_ids), never above p_batch_ids. It records the
-- timeout it ran under (scheduled_statement_timeout_ms), which `schedule`
-- and `doctor` check the time limit against.
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
-- transaction block or a multi-statement string.
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
  swept     jsonb := '[]';
  n_alerts  bigint := 0;
  budget    numeric;
  batch     bigint;
  sample    bigint;
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
  -- The first time, as the CLI: 1,000 ids booked, and the first 50,000
  -- ids folded read only to size the next batch (p_sample_ids).
  SELECT least(p_batch_ids, s.scheduled_batch_ids) INTO batch
    FROM public.usage_aggregation_state s WHERE s.job = job;
  IF batch IS NULL THEN
    batch := least(p_batch_ids, 1000);
    sample := 50000;
  END IF;
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
  -- OTHERS does not catch a cancel: the statement timeout is caught
  -- apart, and the run still records itself and lets the lease go.
  EXCEPTION WHEN query_canceled THEN
    outcome := 'stopped';
    reason := format('cancelled while checking the assumptions (%s%s); the next run goes on', SQLERRM,
                     CASE WHEN tmo_ms > 0 THEN format(', statement_timeout %s ms', tmo_ms) ELSE '' END);
  WHEN OTHERS THEN
    outcome := 'failed';
    reason := format('checking the assumptions: %s (SQLSTATE %s)', SQLERRM, SQLSTATE);
  END;

  -- 4. Deleted monthly rows.
  IF outcome IS NULL AND (facts->>'deleted_keys')::bigint > 0 THEN
    BEGIN
      restored := public.usage_agg_restore_deleted_keys(job);
    EXCEPTION WHEN query_canceled THEN
      outcome := 'stopped';
      reason := format('cancelled while rebuilding keys whose monthly row was deleted (%s%s); the next run '
                       'goes on', SQLERRM,
                       CASE WHEN tmo_ms > 0 THEN format(', statement_timeout %s ms', tmo_ms) ELSE '' END);
    WHEN OTHERS THEN
      outcome := 'failed';
      reason := format('rebuilding keys whose monthly row was deleted: %s (SQLSTATE %s)', SQLERRM, SQLSTATE);
    END;
    COMMIT;
  END IF;

  -- 5. Batches, one transaction each.
  -- The crossings a rebuild killed between its writes and their record
  -- left pending (20261207175000): recorded before counting goes on, as
  -- every CLI run does.
  IF outcome IS NULL THEN
    BEGIN
      swept := public.usage_agg_sweep_pending_crossings(job);
      n_alerts := n_alerts + jsonb_array_length(swept);
    EXCEPTION WHEN query_canceled THEN
      outcome := 'stopped';
      reason := format('cancelled while recording the crossings a rebuild left pending (%s); the next run goes on',
                       SQLERRM);
    WHEN OTHERS THEN
      outcome := 'failed';
      reason := format('recording the crossings a rebuild left pending (usage_agg_sweep_pending_crossings): %s '
                       '(SQLSTATE %s)', SQLERRM, SQLSTATE);
    END;
    COMMIT;
  END IF;

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
    BEGIN
      b := public.usage_agg_rpc_batch(job, batch, p_max_wait_ms, false,
             greatest(500, least(10000, budget * 200,
                                 date_part('epoch', started + make_interval(secs => budget) - clock_timestamp()) * 1000
                                ))::integer,
             CASE WHEN n_batches = 0 THEN sample END);
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
      n_alerts := n_alerts + coalesce(jsonb_array_length(b->'alerts'), 0);
      -- Writes the rule book found undone: recorded there; this run says so.
      lost := lost || coalesce(b->'lost', '[]');
      bad_ids := (bad_ids || ARRAY(SELECT jsonb_array_elements_text(b->'bad_ids')::bigint))[1:5];
      c_after := (b->>'to')::bigint;
      -- The next batch as the sizing rule says, for this run and the next.
      IF (b->>'next_batch_ids') IS NOT NULL THEN
        batch := least(p_batch_ids, greatest(1000, (b->>'next_batch_ids')::bigint));
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
  -- A key in several batches is one key: after more than one batch, the
  -- keys the run wrote, counted once (usage_agg_run_keys; the sum of each
  -- batch's keys counted a key once a batch).
  IF n_batches > 1 THEN
    n_keys := public.usage_agg_run_keys(c_before, c_after);
  END IF;
  summary := jsonb_build_object(
    'outcome', outcome, 'reason', reason, 'owner', me, 'batches', n_batches, 'rows', n_rows,
    'keys', n_keys, 'late_rows', n_late, 'alerts', n_alerts, 'bad', n_bad, 'bad_ids', to_jsonb(bad_ids),
    'cursor_before', c_before, 'cursor_after', c_after, 'restored_keys', restored,
    'seconds', round(date_part('epoch', clock_timestamp() - started)::numeric, 3));
  COMMIT;
  IF outcome IN ('refused', 'needs_rebuild', 'failed', 'bad_rows', 'decreases_refused', 'writes_lost')
     OR (outcome = 'stopped' AND n_bad > 0) THEN
    RAISE EXCEPTION 'usage_agg_run_scheduled (%): %', outcome, reason USING DETAIL = summary::text;
  END IF;
END
$$;

-- Its owner alone (postgres on Supabase): pg_cron runs the job as the role
-- that scheduled it, the owner of usage_agg_schedule. Not the API's roles.
REVOKE ALL ON PROCEDURE public.usage_agg_run_scheduled(integer, bigint, integer, jsonb) FROM PUBLIC, anon, authenticated, service_role;

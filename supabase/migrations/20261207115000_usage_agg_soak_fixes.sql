-- usage-agg: fixes found by the model-based soak and an adversarial pass
-- (issues 17 and 18), made after 20261207100000 and 20261207110000 were
-- committed, and so moved here from them (a migration on main is never
-- edited).
--
-- Apply after 20261207110000_usage_agg_supabase.sql. Idempotent. The
-- current definition of each object is in supabase/schemas/.
--
-- 1. usage_agg_record_refusals takes the rebuild's horizon: a lost write
--    stands for a key whose highest watermark is above it (another run
--    wrote the key after the rebuild read it, and the rebuild's write was
--    superseded: the key is no more right than before). A --full beside an
--    incremental run cleared the record of a key that stayed short, and
--    later runs exited 0.
-- 2. usage_agg_preflight reports lease_holder_gone: the lease's holder is a
--    run in this database (a scheduled run, or a CALL by hand) whose backend
--    is gone, so the lease is stale at once, whatever its expiry says.
-- 3. The restore of deleted monthly rows clears the refusals of the keys it
--    restores: they hold their rows now.
-- 4. The scheduled run catches a cancel (the statement timeout) in its
--    preflight and its restore too, records 'stopped' and lets the lease go.
-- 5. The cron role's statement timeout is read as PostgreSQL reads it
--    ('30 s', '1.5min', '45000us').
-- 6. usage_agg_supabase_facts: what `doctor` checks on a Supabase project,
--    in one read (owners, row level security, open policies, grants wider
--    than the migrations leave, statement timeouts).
-- 7. usage_current is no longer granted to authenticated: it is SECURITY
--    DEFINER and checks nothing of its caller, so any signed-in user of the
--    app read any portal's usage, past row level security. The app calls it
--    server-side with the service key, or through a function of its own
--    that checks the caller's portal.

-- The old signature goes: the new one takes the horizon.
DROP FUNCTION IF EXISTS public.usage_agg_record_refusals(text, text, jsonb);

CREATE OR REPLACE FUNCTION public.usage_agg_record_refusals(
  p_job text, p_scope text, p_keys jsonb, p_horizon bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  n bigint;
BEGIN
  DELETE FROM public.usage_agg_refused_keys r
   WHERE r.job = p_job AND (p_scope = 'all' OR r.month_year = p_scope)
     AND NOT public.usage_agg_is_closed(r.month_year)
     AND NOT (r.kind = 'lost' AND p_horizon IS NOT NULL
              AND greatest(
                    (SELECT max(m.last_request_id) FROM public.portal_usage_monthly m
                      WHERE m.portal_id = r.portal_id AND m.month_year = r.month_year),
                    (SELECT max(a.last_request_id) FROM public.portal_usage_adjustments a
                      WHERE a.portal_id = r.portal_id AND a.month_year = r.month_year AND a.source = 'late'))
                  > p_horizon);
  INSERT INTO public.usage_agg_refused_keys (job, portal_id, month_year, stored_requests, raw_requests, kind)
  SELECT p_job, k.portal_id, k.month_year, k.stored_requests, k.raw_requests, coalesce(k.kind, 'decrease')
    FROM jsonb_to_recordset(coalesce(p_keys, '[]')) AS k(portal_id bigint, month_year text,
                                                          stored_requests bigint, raw_requests bigint,
                                                          kind text)
  ON CONFLICT (job, portal_id, month_year) DO UPDATE
     SET stored_requests = excluded.stored_requests, raw_requests = excluded.raw_requests,
         kind = excluded.kind;
  SELECT count(*) INTO n FROM public.usage_agg_refused_keys WHERE job = p_job;
  RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION public.usage_agg_preflight(p_job text DEFAULT 'default')
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  seq      text := pg_get_serial_sequence('public.usage_requests', 'id');
  seq_last bigint;
  seq_cache bigint;
  id_default text;
  identity char;
  st       public.usage_aggregation_state;
  newest   bigint;
  facts    jsonb;
BEGIN
  SELECT max(id) INTO newest FROM public.usage_requests;
  IF seq IS NOT NULL THEN
    seq_last := public.usage_agg_sequence_handed_out();
    SELECT seqcache INTO seq_cache FROM pg_sequence WHERE seqrelid = seq::regclass;
  END IF;
  SELECT pg_get_expr(d.adbin, d.adrelid), a.attidentity INTO id_default, identity
    FROM pg_attribute a
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE a.attrelid = 'public.usage_requests'::regclass AND a.attname = 'id';
  SELECT * INTO st FROM public.usage_aggregation_state WHERE job = p_job;
  facts := jsonb_build_object(
    'sequence', seq,
    'sequence_last_value', seq_last,
    'sequence_cache', seq_cache,
    'id_default', id_default,
    -- From the watched sequence itself: an identity column, or a default
    -- that depends on that sequence (a nextval() of another sequence would
    -- leave the watched one still while ids move on).
    'id_from_sequence', coalesce(identity IN ('a', 'd')
                                 OR (seq IS NOT NULL AND id_default LIKE 'nextval(%' AND EXISTS (
                                       SELECT 1 FROM pg_attrdef d
                                         JOIN pg_depend dep ON dep.classid = 'pg_attrdef'::regclass
                                                           AND dep.objid = d.oid
                                        WHERE d.adrelid = 'public.usage_requests'::regclass
                                          AND d.adnum = (SELECT attnum FROM pg_attribute
                                                          WHERE attrelid = 'public.usage_requests'::regclass
                                                            AND attname = 'id')
                                          AND dep.refclassid = 'pg_class'::regclass
                                          AND dep.refobjid = seq::regclass)), false),
    'newest_id', newest,
    'cursor', st.cursor_id,
    'highest_watermark', greatest(
        (SELECT max(last_request_id) FROM public.portal_usage_monthly),
        (SELECT max(last_request_id) FROM public.portal_usage_adjustments WHERE source = 'late')),
    'reset_reason', st.reset_reason,
    'reset_at', st.reset_at,
    'refused_keys', (SELECT count(*) FROM public.usage_agg_refused_keys WHERE job = p_job),
    'refused_since', (SELECT min(found_at) FROM public.usage_agg_refused_keys WHERE job = p_job),
    'refused_examples', (SELECT coalesce(jsonb_agg(x.k ORDER BY x.k), '[]') FROM (
        SELECT portal_id || ':' || month_year AS k FROM public.usage_agg_refused_keys
         WHERE job = p_job ORDER BY portal_id, month_year LIMIT 5) x),
    -- Of the refused keys, writes that were lost (a trigger or a hand edit
    -- undid them) and a rebase's closed-month keys: each a kind of its own.
    'lost_keys', (SELECT count(*) FROM public.usage_agg_refused_keys WHERE job = p_job AND kind = 'lost'),
    'closed_refused_keys', (SELECT count(*) FROM public.usage_agg_refused_keys
                             WHERE job = p_job AND kind = 'closed'),
    'deleted_keys', (SELECT count(*) FROM public.usage_agg_deleted_keys),
    -- The lease's holder is a run in this database (a scheduled run, or a
    -- CALL by hand) whose backend is gone: stale at once, whatever its
    -- expiry says (a run the statement timeout or a crash cut).
    'lease_holder_gone', (st.lease_owner ~ '^(pg_cron|sql)@.*:[0-9]{1,10}$'
                          AND substring(st.lease_owner, '^[a-z_]+@(.*):[0-9]+$') = current_database()
                          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                                           WHERE a.pid::bigint = substring(st.lease_owner, ':([0-9]+)$')::bigint)),
    -- A unique index on exactly (portal_id, month_year): what the bulk upsert's
    -- on_conflict needs (without it every key is written one by one).
    'unique_key', EXISTS (
      SELECT 1 FROM pg_index i
       WHERE i.indrelid = 'public.portal_usage_monthly'::regclass AND i.indisunique
         AND i.indnkeyatts = 2
         AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
                FROM pg_attribute a
               WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey))
             = ARRAY['month_year', 'portal_id']));
  -- Judged here, once, for the CLI and the scheduled run alike.
  RETURN facts || jsonb_build_object('problems', public.usage_agg_problems(facts));
END
$$;

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
  -- A restored key holds its rows now: a refusal of it (a lost write, a
  -- refused decrease) no longer stands (found by the model-based soak: a
  -- lost write stood after the key was rebuilt whole).
  DELETE FROM public.usage_agg_refused_keys r
   WHERE r.job = p_job AND r.kind <> 'closed'
     AND (r.portal_id || ':' || r.month_year) IN (SELECT jsonb_array_elements_text(restored));
  RETURN restored;
END
$$;

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

-- Grants: Supabase's default privileges give every new function to anon,
-- authenticated and service_role; what this file creates is revoked from
-- them and granted to service_role alone, as 20261207110000 does for the
-- rest. CREATE OR REPLACE keeps the grants of what it replaces.
DO $$
DECLARE
  api_roles text := 'PUBLIC';
  obj text;
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon')
     AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
    api_roles := api_roles || ', anon, authenticated';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    api_roles := api_roles || ', service_role';
  END IF;
  FOREACH obj IN ARRAY ARRAY['public.usage_agg_record_refusals(text, text, jsonb, bigint)',
                             'public.usage_agg_supabase_facts(text)'] LOOP
    EXECUTE format('REVOKE ALL ON ROUTINE %s FROM %s', obj, api_roles);
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
      EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', obj);
    END IF;
  END LOOP;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
    REVOKE EXECUTE ON FUNCTION public.usage_current(bigint, text) FROM authenticated;
  END IF;
END $$;

-- usage-agg: one rule book. Every engine books counted rows through one
-- database function (docs/semantics.md, "Booking a row"), so the REST
-- engine, the server-side batch and the scheduled run cannot disagree.
--
-- Apply after 20261202090000_usage_agg_rejected_tally.sql. Idempotent.
--
-- Before this file the rules were written three times: in Rust for the REST
-- engine, in usage_agg_rpc_batch, and (through it) in the scheduled run; the
-- REST engine and the batch kept counted_from_id of a late adjustment
-- differently, and after a month was closed twice every server-side batch
-- failed for good (issue 17, case 1). Now:
--   * usage_agg_book_folded: the rules, once. It takes per-key partial
--     totals of the rows in (p_from, p_to] from the temporary table
--     usage_agg_fold and books them: monthly row or late adjustment, each
--     key counted above its highest watermark, raced keys counted again
--     from the raw rows, every write checked, lost writes recorded.
--   * usage_agg_book: the REST engine's door to it. The client pages
--     through usage_requests, folds rows by key in memory, and hands the
--     folded keys here over /rpc/.
--   * usage_agg_rpc_batch: folds in SQL and calls the same rules.
--   * usage_agg_rebase(job, owner, horizon): books a closed month's rows
--     that were committed but not counted as late adjustments before the
--     watermarks go (issue 17, case 2), or refuses them, recorded.
--   * lost writes stand as a kind of refused key until a rebuild fixes
--     them (issue 17, case 3).

-- A standing refusal is now one of two kinds: 'decrease' (a rebuild would
-- have lowered the key) or 'lost' (a write that should have taken effect
-- did not: a trigger or a hand edit undid it). Both make every run and
-- `status` exit 65 until a rebuild of the key's month finds it right.
ALTER TABLE public.usage_agg_refused_keys
  ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'decrease';
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'usage_agg_refused_keys_kind_check') THEN
    ALTER TABLE public.usage_agg_refused_keys
      ADD CONSTRAINT usage_agg_refused_keys_kind_check CHECK (kind IN ('decrease', 'lost', 'closed'));
  END IF;
END $$;

-- Replaces the refusals a rebuild's scope can resolve (p_scope: 'all', or
-- one month as YYYY-MM) with the ones it found (each with an optional
-- "kind", 'decrease' by default); returns how many stand in all. A rebuild
-- never writes a closed month, so it leaves that month's refusals standing
-- (kind 'closed': only a reopening and a rebuild of the month resolve it).
-- With p_horizon, the rebuild's horizon: a lost write stands for a key
-- whose highest watermark is above it, since another run wrote the key
-- after this rebuild read it, over the short state, and this rebuild's
-- write was superseded: the key is no more right than before (found by
-- the model-based soak: a --full beside an incremental run cleared the
-- record of a key that stayed short, and later runs exited 0).
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

-- The run-time checks' decision (docs/semantics.md, "Assumptions"), the one
-- place it is made: [{code, exit, message}], empty when all hold. Each
-- message says what was found, the likely cause and the repair.
CREATE OR REPLACE FUNCTION public.usage_agg_problems(p_facts jsonb)
RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, public
AS $$
DECLARE
  seq      text := p_facts->>'sequence';
  -- Not called yet (or restarted): the next id is the start, 1.
  last     bigint := coalesce((p_facts->>'sequence_last_value')::bigint, 0);
  counted  bigint := greatest(coalesce((p_facts->>'cursor')::bigint, 0),
                              coalesce((p_facts->>'highest_watermark')::bigint, 0));
  newest   bigint := (p_facts->>'newest_id')::bigint;
  out      jsonb := '[]';
BEGIN
  IF seq IS NULL THEN
    RETURN jsonb_build_array(jsonb_build_object('code', 'no_sequence', 'exit', 78, 'message',
      'usage_requests.id has no sequence, so no safe horizon can be read; likely cause: the column was changed '
      'from SERIAL; repair: give it one (ALTER TABLE public.usage_requests ALTER COLUMN id ADD GENERATED BY '
      'DEFAULT AS IDENTITY, or a SERIAL default), then `usage-agg verify`'));
  END IF;
  IF (p_facts->>'id_from_sequence')::boolean IS FALSE THEN
    out := out || jsonb_build_object('code', 'id_default_not_sequence', 'exit', 78, 'message',
      format('usage_requests.id takes its value from %s, not from %s, so rows can take ids the cursor has '
             'already passed; likely cause: the column default was dropped or changed; repair: ALTER TABLE '
             'public.usage_requests ALTER COLUMN id SET DEFAULT nextval(%L), then `usage-agg verify`',
             coalesce(to_jsonb(p_facts->>'id_default')::text, '"no default"'), seq, seq));
  END IF;
  IF (p_facts->>'sequence_cache')::bigint > 1 THEN
    out := out || jsonb_build_object('code', 'sequence_cache', 'exit', 78, 'message',
      format('the sequence %s hands out %s ids at a time per session, so a session''s cached ids can commit '
             'below a cursor already past them; likely cause: ALTER SEQUENCE ... CACHE after the migration; '
             'repair: ALTER SEQUENCE %s CACHE 1, then `usage-agg verify`',
             seq, p_facts->>'sequence_cache', seq));
  END IF;
  IF last < counted THEN
    out := out || jsonb_build_object('code', 'sequence_behind_cursor', 'exit', 65, 'message',
      format('the sequence %s is at %s, below id %s which is already counted, so new rows take ids the cursor '
             'has passed and would never be counted; likely cause: TRUNCATE ... RESTART IDENTITY or ALTER '
             'SEQUENCE ... RESTART (a dev reset?); repair: `usage-agg aggregate --rebase` (resets the cursor and '
             'the watermarks, then rebuilds every key from its rows)', seq, last, counted));
  END IF;
  IF newest > last THEN
    out := out || jsonb_build_object('code', 'ids_above_sequence', 'exit', 65, 'message',
      format('usage_requests holds id %s, above %s, the last value of %s: rows were inserted with ids of their '
             'own, which the cursor may pass before they commit; likely cause: an import that set ids; repair: '
             'SELECT setval(%L, (SELECT max(id) FROM public.usage_requests)), then `usage-agg verify` (and '
             '`aggregate --full` if it differs)', newest, last, seq, seq));
  END IF;
  IF p_facts->>'reset_reason' IS NOT NULL THEN
    out := out || jsonb_build_object('code', 'table_reset', 'exit', 65, 'message',
      format('%s (recorded %s) after the cursor was set, so the cursor and the watermarks no longer describe '
             'the table (ids may have restarted; stored totals may count rows that are gone); repair: '
             '`usage-agg aggregate --rebase` (resets the cursor and the watermarks, then rebuilds every key '
             'from its rows)', p_facts->>'reset_reason', coalesce(p_facts->>'reset_at', '')));
  END IF;
  RETURN out;
END
$$;

-- How far the id sequence has handed out ids: its last value once called;
-- before its first call since a start or a RESTART, the value before the
-- next one (pg_sequence_last_value is NULL then, and was read as 0: after
-- `ALTER SEQUENCE ... RESTART WITH n`, a rebase counted to a horizon of 0
-- and the preflight saw every row as above the sequence; found by the
-- model-based test). NULL without a sequence.
CREATE OR REPLACE FUNCTION public.usage_agg_sequence_handed_out()
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  seq    regclass := pg_get_serial_sequence('public.usage_requests', 'id')::regclass;
  v      bigint;
  called boolean;
  inc    bigint;
BEGIN
  IF seq IS NULL THEN
    RETURN NULL;
  END IF;
  EXECUTE format('SELECT last_value, is_called FROM %s', seq) INTO v, called;
  SELECT seqincrement INTO inc FROM pg_sequence WHERE seqrelid = seq;
  RETURN CASE WHEN called THEN v ELSE v - inc END;
END
$$;

-- The safe horizon, as in 20261130120000, from how far the sequence has
-- handed out ids (above).
CREATE OR REPLACE FUNCTION public.usage_agg_safe_horizon(max_wait_ms integer DEFAULT 2000)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  candidate bigint;
  writers   text[];
  prepared  bigint;
  first     boolean := true;
  deadline  timestamptz := clock_timestamp() + make_interval(secs => greatest(max_wait_ms, 0) / 1000.0);
BEGIN
  candidate := coalesce(public.usage_agg_sequence_handed_out(), 0);
  LOOP
    SELECT array_agg(DISTINCT virtualtransaction), count(*) FILTER (WHERE pid IS NULL)
      INTO writers, prepared
      FROM pg_locks
     WHERE locktype = 'relation'
       AND relation = 'public.usage_requests'::regclass
       AND mode = 'RowExclusiveLock'
       AND (pid IS NULL OR pid <> pg_backend_pid())
       AND (first OR virtualtransaction = ANY (writers));
    first := false;
    EXIT WHEN writers IS NULL OR clock_timestamp() >= deadline;
    PERFORM pg_sleep(0.005);
  END LOOP;
  IF writers IS NOT NULL THEN
    RETURN jsonb_build_object('horizon', NULL, 'candidate', candidate,
                              'writers_in_flight', cardinality(writers), 'prepared_in_flight', prepared);
  END IF;
  RETURN jsonb_build_object('horizon', candidate, 'candidate', candidate, 'writers_in_flight', 0,
                            'prepared_in_flight', 0);
END
$$;


-- The preflight, as in 20261201090000, with the kinds of refused keys, and
-- the facts judged: 'problems', from usage_agg_problems below. The CLI and
-- the scheduled run read the same judgement; Rust only maps each code to
-- its exit status (src/preflight.rs).
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

-- The rules. Input: pg_temp.usage_agg_fold, one row per key with the good
-- rows of that key in (p_from, p_to] folded: c (rows), s, e, at (latest
-- request_timestamp), w (highest id). Every row of (p_from, p_to] of a key
-- must be in its fold: the caller read them all.
--
-- For each key k, under locks that fix where it books:
--   * the closed months are read in SHARE mode for the transaction, so a
--     close or a reopening waits for the booking and the booking for it;
--     the booking month cannot change under it;
--   * the target is the monthly row of k, or, when k's month is closed, its
--     late adjustment booked in usage_agg_booking_month(k's month). The
--     target is created (empty) when missing, then every target is locked,
--     in key order (two bookings never deadlock on each other);
--   * E_k, the highest watermark of k over its monthly row and all its late
--     adjustments, is read under those locks. Every other row of k is
--     frozen: the triggers refuse a closed month's monthly row and a late
--     adjustment not booked in the booking month;
--   * if E_k <= p_from, every folded row is new and the fold is added; if
--     E_k >= w, another run counted them all; otherwise (another run counted
--     part of the range, or died midway) the key's rows in (E_k, p_to] are
--     counted again from usage_requests, in one scan for all such keys;
--   * the target is written: counts plus the new rows, watermark = the
--     newest new row, and for a late adjustment counted_from_id = the
--     watermark its rows are counted above (so the guard of
--     usage_agg_guard_adjustment always compares the current value);
--   * each written target is read back: a row that does not hold what was
--     written (a trigger, rule or hand edit undid it) is a lost write,
--     recorded in usage_agg_refused_keys (kind 'lost').
-- Returns a summary; with p_dry_run, nothing is written and the summary
-- lists each change ("changes").
CREATE OR REPLACE FUNCTION public.usage_agg_book_folded(
  p_job text, p_from bigint, p_to bigint, p_dry_run boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  n_keys     bigint;
  n_rows     bigint;
  n_late     bigint;
  late_rows  bigint;
  n_redo     bigint;
  n_super    bigint;
  lost       jsonb;
  changes    jsonb;
BEGIN
  IF p_from IS NULL OR p_to IS NULL OR p_to < p_from THEN
    RAISE EXCEPTION 'usage_agg_book: the range (%, %] is not a range', p_from, p_to USING ERRCODE = '22023';
  END IF;
  LOCK TABLE public.usage_agg_closed_months IN SHARE MODE;

  -- Where each key books, and what is wrong with the input.
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_plan (
    portal_id bigint, month_year text, late boolean, booked text,
    c bigint, s bigint, e bigint, at timestamp, w bigint,
    tgt_c bigint, tgt_s bigint, tgt_e bigint, tgt_at timestamp, tgt_w bigint, e_k bigint,
    dc bigint, ds bigint, de bigint, dat timestamp, dw bigint, redo boolean) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_plan;
  IF EXISTS (SELECT 1 FROM pg_temp.usage_agg_fold f
              WHERE NOT public.usage_agg_valid_key(f.portal_id, f.month_year)
                 OR f.c IS NULL OR f.s IS NULL OR f.e IS NULL
                 OR f.c < 1 OR f.s < 0 OR f.e < 0 OR f.c <> f.s + f.e
                 OR f.w IS NULL OR f.w <= p_from OR f.w > p_to
                 OR NOT public.usage_agg_valid_time(f.at)) THEN
    RAISE EXCEPTION 'usage_agg_book: a folded key is not one a good row can make (bad key, counts that do not add up, or an id outside (%, %])', p_from, p_to
      USING ERRCODE = '22023';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_temp.usage_agg_fold GROUP BY portal_id, month_year HAVING count(*) > 1) THEN
    RAISE EXCEPTION 'usage_agg_book: a key is folded twice' USING ERRCODE = '22023';
  END IF;
  INSERT INTO pg_temp.usage_agg_plan (portal_id, month_year, late, booked, c, s, e, at, w)
  SELECT f.portal_id, f.month_year, cm.month_year IS NOT NULL,
         CASE WHEN cm.month_year IS NOT NULL THEN public.usage_agg_booking_month(f.month_year) END,
         f.c, f.s, f.e, f.at, f.w
    FROM pg_temp.usage_agg_fold f
    LEFT JOIN public.usage_agg_closed_months cm ON cm.month_year = f.month_year AND cm.closed;

  -- Targets that do not exist yet, for keys with rows above what is
  -- counted (read without locks: a key created meanwhile is found below).
  IF NOT p_dry_run THEN
    INSERT INTO public.portal_usage_monthly
           (portal_id, month_year, request_count, success_count, error_count, last_request_at,
            last_request_id, updated_at)
    SELECT p.portal_id, p.month_year, 0, 0, 0, NULL, 0, now()
      FROM pg_temp.usage_agg_plan p
     WHERE NOT p.late
       AND NOT EXISTS (SELECT 1 FROM public.portal_usage_monthly m
                        WHERE m.portal_id = p.portal_id AND m.month_year = p.month_year)
     ORDER BY p.portal_id, p.month_year
    ON CONFLICT (portal_id, month_year) DO NOTHING;
    INSERT INTO public.portal_usage_adjustments
           (portal_id, month_year, booked_month, source, request_count, success_count, error_count,
            last_request_at, last_request_id, idempotency_key, counted_from_id)
    SELECT p.portal_id, p.month_year, p.booked, 'late', 0, 0, 0, NULL, 0,
           'late:' || p.portal_id || ':' || p.month_year || ':' || p.booked, NULL
      FROM pg_temp.usage_agg_plan p
     WHERE p.late
       AND NOT EXISTS (SELECT 1 FROM public.portal_usage_adjustments a
                        WHERE a.idempotency_key = 'late:' || p.portal_id || ':' || p.month_year || ':' || p.booked)
     ORDER BY p.portal_id, p.month_year
    ON CONFLICT (idempotency_key) DO NOTHING;

    -- Every target locked, in key order.
    PERFORM 1 FROM public.portal_usage_monthly m JOIN pg_temp.usage_agg_plan p
        ON m.portal_id = p.portal_id AND m.month_year = p.month_year AND NOT p.late
     ORDER BY m.portal_id, m.month_year FOR UPDATE OF m;
    PERFORM 1 FROM public.portal_usage_adjustments a JOIN pg_temp.usage_agg_plan p
        ON a.idempotency_key = 'late:' || p.portal_id || ':' || p.month_year || ':' || p.booked AND p.late
     ORDER BY a.portal_id, a.month_year FOR UPDATE OF a;
  END IF;

  -- The target's state and E_k, under those locks.
  UPDATE pg_temp.usage_agg_plan p
     SET tgt_c = CASE WHEN p.late THEN t.a_c ELSE m.request_count END,
         tgt_s = CASE WHEN p.late THEN t.a_s ELSE m.success_count END,
         tgt_e = CASE WHEN p.late THEN t.a_e ELSE m.error_count END,
         tgt_at = CASE WHEN p.late THEN t.a_at ELSE m.last_request_at END,
         tgt_w = CASE WHEN p.late THEN t.a_w ELSE m.last_request_id END,
         e_k = greatest(coalesce(m.last_request_id, 0), coalesce(x.all_w, 0))
    FROM pg_temp.usage_agg_plan k
    LEFT JOIN public.portal_usage_monthly m ON m.portal_id = k.portal_id AND m.month_year = k.month_year
    LEFT JOIN LATERAL (
      SELECT max(a.last_request_id) AS all_w
        FROM public.portal_usage_adjustments a
       WHERE a.portal_id = k.portal_id AND a.month_year = k.month_year AND a.source = 'late') x ON true
    LEFT JOIN LATERAL (
      SELECT a.request_count AS a_c, a.success_count AS a_s, a.error_count AS a_e,
             a.last_request_at AS a_at, a.last_request_id AS a_w
        FROM public.portal_usage_adjustments a
       WHERE k.late AND a.idempotency_key = 'late:' || k.portal_id || ':' || k.month_year || ':' || k.booked) t ON true
   WHERE p.portal_id = k.portal_id AND p.month_year = k.month_year;

  -- What is new for each key.
  UPDATE pg_temp.usage_agg_plan
     SET dc = c, ds = s, de = e, dat = at, dw = w, redo = false
   WHERE e_k <= p_from;
  UPDATE pg_temp.usage_agg_plan
     SET dc = 0, ds = 0, de = 0, dat = NULL, dw = NULL, redo = false
   WHERE e_k >= w;
  UPDATE pg_temp.usage_agg_plan
     SET redo = true
   WHERE e_k > p_from AND e_k < w;
  IF EXISTS (SELECT 1 FROM pg_temp.usage_agg_plan WHERE redo) THEN
    UPDATE pg_temp.usage_agg_plan p
       SET dc = coalesce(x.c, 0), ds = coalesce(x.s, 0), de = coalesce(x.e, 0), dat = x.at, dw = x.w
      FROM pg_temp.usage_agg_plan k
      LEFT JOIN LATERAL (
        SELECT count(*) AS c, count(*) FILTER (WHERE r.success) AS s,
               count(*) FILTER (WHERE NOT r.success) AS e, max(r.request_timestamp) AS at, max(r.id) AS w
          FROM public.usage_requests r
         WHERE r.id > k.e_k AND r.id <= p_to
           AND r.portal_id = k.portal_id AND r.month_year = k.month_year
           AND r.success IS NOT NULL AND public.usage_agg_valid_time(r.request_timestamp)) x ON true
     WHERE k.redo AND p.portal_id = k.portal_id AND p.month_year = k.month_year;
  END IF;

  SELECT count(*) FILTER (WHERE dc > 0), coalesce(sum(dc), 0),
         count(*) FILTER (WHERE dc > 0 AND late), coalesce(sum(dc) FILTER (WHERE late), 0),
         count(*) FILTER (WHERE redo), count(*) FILTER (WHERE dc = 0)
    INTO n_keys, n_rows, n_late, late_rows, n_redo, n_super
    FROM pg_temp.usage_agg_plan;

  IF p_dry_run THEN
    SELECT coalesce(jsonb_agg(jsonb_build_object(
             'portal_id', portal_id, 'month_year', month_year, 'booked_month', booked,
             'before', CASE WHEN tgt_w IS NULL THEN NULL ELSE jsonb_build_object(
                 'request_count', tgt_c, 'success_count', tgt_s, 'error_count', tgt_e,
                 'last_request_at', tgt_at, 'last_request_id', tgt_w) END,
             'after', jsonb_build_object(
                 'request_count', coalesce(tgt_c, 0) + dc, 'success_count', coalesce(tgt_s, 0) + ds,
                 'error_count', coalesce(tgt_e, 0) + de,
                 'last_request_at', greatest(tgt_at, dat), 'last_request_id', dw),
             'counted_from', greatest(e_k, p_from)) ORDER BY portal_id, month_year), '[]')
      INTO changes FROM pg_temp.usage_agg_plan WHERE dc > 0;
    RETURN jsonb_build_object('from', p_from, 'to', p_to, 'rows', n_rows, 'keys', n_keys,
      'late_rows', late_rows, 'late_keys', n_late, 'raced_keys', n_redo, 'superseded_keys', n_super,
      'lost', '[]'::jsonb, 'changes', changes);
  END IF;

  UPDATE public.portal_usage_monthly t
     SET request_count = t.request_count + p.dc,
         success_count = t.success_count + p.ds,
         error_count = t.error_count + p.de,
         last_request_at = greatest(t.last_request_at, p.dat),
         last_request_id = p.dw,
         updated_at = now()
    FROM pg_temp.usage_agg_plan p
   WHERE NOT p.late AND p.dc > 0 AND t.portal_id = p.portal_id AND t.month_year = p.month_year;
  UPDATE public.portal_usage_adjustments t
     SET request_count = t.request_count + p.dc,
         success_count = t.success_count + p.ds,
         error_count = t.error_count + p.de,
         last_request_at = greatest(t.last_request_at, p.dat),
         last_request_id = p.dw,
         counted_from_id = greatest(p.e_k, p_from)
    FROM pg_temp.usage_agg_plan p
   WHERE p.late AND p.dc > 0
     AND t.idempotency_key = 'late:' || p.portal_id || ':' || p.month_year || ':' || p.booked;

  -- Every write read back: it holds what was written, or it is lost.
  WITH now_ AS (
    SELECT p.portal_id, p.month_year, p.late,
           coalesce(p.tgt_c, 0) + p.dc AS want_c, coalesce(p.tgt_s, 0) + p.ds AS want_s,
           coalesce(p.tgt_e, 0) + p.de AS want_e, p.dw AS want_w,
           CASE WHEN p.late THEN a.request_count ELSE m.request_count END AS c,
           CASE WHEN p.late THEN a.success_count ELSE m.success_count END AS s,
           CASE WHEN p.late THEN a.error_count ELSE m.error_count END AS e,
           CASE WHEN p.late THEN a.last_request_id ELSE m.last_request_id END AS w
      FROM pg_temp.usage_agg_plan p
      LEFT JOIN public.portal_usage_monthly m
        ON NOT p.late AND m.portal_id = p.portal_id AND m.month_year = p.month_year
      LEFT JOIN public.portal_usage_adjustments a
        ON p.late AND a.idempotency_key = 'late:' || p.portal_id || ':' || p.month_year || ':' || p.booked
     WHERE p.dc > 0
  ), gone AS (
    SELECT * FROM now_
     WHERE (c, s, e, w) IS DISTINCT FROM (want_c, want_s, want_e, want_w)
  ), recorded AS (
    INSERT INTO public.usage_agg_refused_keys AS r
           (job, portal_id, month_year, stored_requests, raw_requests, kind)
    SELECT p_job, portal_id, month_year, coalesce(c, 0), want_c, 'lost' FROM gone
    ON CONFLICT (job, portal_id, month_year) DO UPDATE
       SET stored_requests = excluded.stored_requests, raw_requests = excluded.raw_requests,
           kind = 'lost', found_at = now()
    RETURNING r.portal_id, r.month_year
  )
  SELECT coalesce(jsonb_agg(portal_id || ':' || month_year ORDER BY portal_id, month_year), '[]')
    INTO lost FROM recorded;

  RETURN jsonb_build_object('from', p_from, 'to', p_to, 'rows', n_rows, 'keys', n_keys,
    'late_rows', late_rows, 'late_keys', n_late, 'raced_keys', n_redo, 'superseded_keys', n_super,
    'lost', lost);
END
$$;

-- The REST engine's door to the rules: p_keys is an array of folded keys,
-- {"portal_id", "month_year", "c", "s", "e", "at", "w"}, for the good rows
-- in (p_from, p_to] the client read. With p_advance, the cursor moves to
-- p_to in the same transaction (a batch is then all or nothing); that is
-- refused when the cursor is not at p_from or beyond (a rebase reset it
-- meanwhile, so the rows below p_from may not be counted), and unless
-- p_good_rows, the good rows the client folded over all the batch's calls,
-- is the number of good rows in (p_from, p_to]: a client that stopped
-- paging early (the server's silent row cap) or folded rows away can never
-- move the cursor over rows it did not count.
CREATE OR REPLACE FUNCTION public.usage_agg_book(
  p_job text, p_from bigint, p_to bigint, p_keys jsonb,
  p_advance boolean DEFAULT false, p_dry_run boolean DEFAULT false, p_good_rows bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  c      bigint;
  result jsonb;
BEGIN
  IF jsonb_typeof(coalesce(p_keys, '[]')) <> 'array' THEN
    RAISE EXCEPTION 'usage_agg_book: p_keys must be an array' USING ERRCODE = '22023';
  END IF;
  SELECT cursor_id INTO c FROM public.usage_aggregation_state WHERE job = p_job;
  IF c IS NULL OR c < p_from THEN
    RAISE EXCEPTION 'usage_agg_book: the cursor of job % is at %, below % (a rebase reset it since this run read it): stop; the next run counts from there',
      p_job, coalesce(c::text, 'none'), p_from USING ERRCODE = '55000';
  END IF;
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_fold (
    portal_id bigint, month_year text, c bigint, s bigint, e bigint, at timestamp, w bigint) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_fold;
  INSERT INTO pg_temp.usage_agg_fold
  SELECT k.portal_id, k.month_year, k.c, k.s, k.e, k.at, k.w
    FROM jsonb_to_recordset(coalesce(p_keys, '[]')) AS k(portal_id bigint, month_year text, c bigint,
                                                          s bigint, e bigint, at timestamp, w bigint);
  result := public.usage_agg_book_folded(p_job, p_from, p_to, p_dry_run);
  IF p_advance AND NOT p_dry_run THEN
    IF p_good_rows IS DISTINCT FROM (
         SELECT count(*) FROM public.usage_requests r
          WHERE r.id > p_from AND r.id <= p_to AND r.success IS NOT NULL
            AND public.usage_agg_valid_time(r.request_timestamp)
            AND public.usage_agg_valid_key(r.portal_id, r.month_year)) THEN
      RAISE EXCEPTION 'usage_agg_book: the batch (%, %] holds a different number of good rows than the % folded: not every row was read; nothing of this call is booked and the cursor stays',
        p_from, p_to, coalesce(p_good_rows::text, 'none') USING ERRCODE = '22023';
    END IF;
    -- Checked again under the row's lock: a rebase that reset the cursor
    -- since the check above makes this batch roll back whole.
    UPDATE public.usage_aggregation_state
       SET cursor_id = greatest(cursor_id, p_to), updated_at = now()
     WHERE job = p_job AND cursor_id >= p_from
    RETURNING cursor_id INTO c;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'usage_agg_book: the cursor of job % was reset while this batch was booked (a rebase): stop; the next run counts from there',
        p_job USING ERRCODE = '55000';
    END IF;
    result := result || jsonb_build_object('cursor', c);
  END IF;
  RETURN result;
END
$$;

-- The server-side batch: the safe horizon, the batch's rows folded in SQL,
-- bad rows counted, then the same rules as every engine, and the cursor.
CREATE OR REPLACE FUNCTION public.usage_agg_rpc_batch(
  p_job text DEFAULT 'default',
  p_batch_ids bigint DEFAULT 1000000,
  p_max_wait_ms integer DEFAULT 2000,
  p_dry_run boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  lo      bigint;
  hi      bigint;
  hz      jsonb;
  horizon bigint;
  n_bad   bigint;
  bad_ids bigint[];
  booked  jsonb;
BEGIN
  IF NOT pg_try_advisory_xact_lock(hashtext('usage_agg_rpc_batch:' || p_job)) THEN
    RETURN jsonb_build_object('busy', true);
  END IF;
  SELECT cursor_id INTO lo FROM public.usage_aggregation_state WHERE job = p_job;
  IF lo IS NULL THEN
    RETURN jsonb_build_object('needs_rebuild', true);
  END IF;
  hz := public.usage_agg_safe_horizon(p_max_wait_ms);
  horizon := (hz->>'horizon')::bigint;
  IF horizon IS NULL THEN
    RETURN jsonb_build_object('cursor', lo, 'horizon', NULL, 'writers_in_flight', hz->'writers_in_flight',
                              'prepared_in_flight', hz->'prepared_in_flight');
  END IF;
  hi := greatest(lo, least(horizon, lo + p_batch_ids));

  CREATE TEMP TABLE IF NOT EXISTS usage_agg_fold (
    portal_id bigint, month_year text, c bigint, s bigint, e bigint, at timestamp, w bigint) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_fold;
  -- Keys are checked per key, not per row: a batch has far fewer keys
  -- than rows, and the regular expression is the costliest part.
  WITH g AS (
    SELECT r.portal_id, r.month_year,
           count(*) FILTER (WHERE r.success IS NOT NULL AND r.vt) AS c,
           count(*) FILTER (WHERE r.success AND r.vt) AS s,
           count(*) FILTER (WHERE NOT r.success AND r.vt) AS e,
           count(*) FILTER (WHERE r.success IS NULL OR NOT r.vt) AS nulls,
           max(r.request_timestamp) FILTER (WHERE r.success IS NOT NULL AND r.vt) AS at,
           max(r.id) FILTER (WHERE r.success IS NOT NULL AND r.vt) AS w
      FROM (SELECT u.id, u.portal_id, u.month_year, u.success, u.request_timestamp,
                   public.usage_agg_valid_time(u.request_timestamp) AS vt
              FROM public.usage_requests u WHERE u.id > lo AND u.id <= hi) r
     GROUP BY 1, 2
  ), v AS (
    SELECT g.*, public.usage_agg_valid_key(g.portal_id, g.month_year) AS good FROM g
  ), kept AS (
    INSERT INTO pg_temp.usage_agg_fold
    SELECT portal_id, month_year, c, s, e, at, w FROM v WHERE good AND c > 0
  )
  SELECT coalesce(sum(CASE WHEN good THEN nulls ELSE c + nulls END), 0) INTO n_bad FROM v;
  IF n_bad > 0 THEN
    SELECT array_agg(id ORDER BY id) INTO bad_ids FROM (
      SELECT id FROM public.usage_requests
       WHERE id > lo AND id <= hi
         AND (success IS NULL OR NOT public.usage_agg_valid_key(portal_id, month_year)
              OR NOT public.usage_agg_valid_time(request_timestamp))
       ORDER BY id LIMIT 5) x;
  END IF;

  booked := public.usage_agg_book_folded(p_job, lo, hi, p_dry_run);
  IF NOT p_dry_run THEN
    UPDATE public.usage_aggregation_state
       SET cursor_id = greatest(cursor_id, hi), updated_at = now()
     WHERE job = p_job AND cursor_id >= lo;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'usage_agg_rpc_batch: the cursor of job % was reset while this batch was booked (a rebase): stop; the next run counts from there',
        p_job USING ERRCODE = '55000';
    END IF;
  END IF;
  RETURN (booked - 'changes') || jsonb_build_object('horizon', horizon, 'bad', n_bad,
    'bad_ids', to_jsonb(coalesce(bad_ids, '{}')), 'done', hi >= horizon, 'dry_run', p_dry_run);
END
$$;

-- The rebase, with closed months (issue 17, case 2). Before the watermarks
-- go, each closed month's key is compared with its rows up to the horizon
-- the rebuild will count to: what billing has for it (its monthly row and
-- every late adjustment) against its good raw rows up to p_horizon plus its
-- pruned rows. Rows beyond what is billed were committed and never counted
-- (the sequence moved back, so the cursor had passed their ids): they are
-- booked, as a late adjustment in the booking month, in this transaction.
-- A key with some raw rows but fewer than billed (rows deleted by hand,
-- then new ones) cannot tell its new rows from its old ones: it is
-- refused, recorded (kind 'closed'), and every run exits 65 until a person
-- decides (reopen the month and rebuild it, or book the rows with
-- `usage-agg adjust`). A key with no raw row left (a reset deleted them
-- all) has nothing uncounted: its billed totals are the record.
-- The rest is as before, with WHERE clauses on every DELETE (Supabase's
-- safeupdate refuses a DELETE without one in a PostgREST session).
CREATE OR REPLACE FUNCTION public.usage_agg_rebase(p_job text, p_owner text, p_horizon bigint)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  n       bigint;
  booked  jsonb;
  refused jsonb;
BEGIN
  PERFORM 1 FROM public.usage_aggregation_state
   WHERE job = p_job AND lease_owner = p_owner AND lease_expires_at > now()
     FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'usage_agg_rebase: % does not hold the lease of job %', p_owner, p_job
      USING ERRCODE = '55P03';
  END IF;
  IF p_horizon IS NULL THEN
    RAISE EXCEPTION 'usage_agg_rebase: no horizon' USING ERRCODE = '22023';
  END IF;
  LOCK TABLE public.usage_agg_closed_months IN SHARE MODE;

  CREATE TEMP TABLE IF NOT EXISTS usage_agg_closed_truth (
    portal_id bigint, month_year text, c bigint, s bigint, e bigint, at timestamp,
    billed_c bigint, billed_s bigint, billed_e bigint) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_closed_truth;
  INSERT INTO pg_temp.usage_agg_closed_truth
  WITH closed AS (
    SELECT month_year FROM public.usage_agg_closed_months WHERE closed
  ), raw AS (
    SELECT r.portal_id, r.month_year, count(*) AS c, count(*) FILTER (WHERE r.success) AS s,
           count(*) FILTER (WHERE NOT r.success) AS e, max(r.request_timestamp) AS at
      FROM public.usage_requests r
     WHERE r.month_year IN (SELECT month_year FROM closed) AND r.id <= p_horizon
       AND r.success IS NOT NULL AND public.usage_agg_valid_time(r.request_timestamp)
       AND public.usage_agg_valid_key(r.portal_id, r.month_year)
     GROUP BY 1, 2
  ), billed AS (
    SELECT portal_id, month_year, sum(c) AS c, sum(s) AS s, sum(e) AS e FROM (
      SELECT portal_id, month_year, request_count AS c, success_count AS s, error_count AS e
        FROM public.portal_usage_monthly WHERE month_year IN (SELECT month_year FROM closed)
      UNION ALL
      SELECT portal_id, month_year, request_count, success_count, error_count
        FROM public.portal_usage_adjustments
       WHERE source = 'late' AND month_year IN (SELECT month_year FROM closed)
      UNION ALL
      SELECT portal_id, month_year, -request_count, -success_count, -error_count
        FROM public.usage_agg_pruned WHERE month_year IN (SELECT month_year FROM closed)) x
     GROUP BY 1, 2
  )
  SELECT coalesce(raw.portal_id, billed.portal_id), coalesce(raw.month_year, billed.month_year),
         coalesce(raw.c, 0), coalesce(raw.s, 0), coalesce(raw.e, 0), raw.at,
         coalesce(billed.c, 0), coalesce(billed.s, 0), coalesce(billed.e, 0)
    FROM raw FULL JOIN billed ON raw.portal_id = billed.portal_id AND raw.month_year = billed.month_year;

  -- Rows above what is billed: booked late, where the next invoice shows them.
  WITH more AS (
    SELECT t.*, public.usage_agg_booking_month(t.month_year) AS booking
      FROM pg_temp.usage_agg_closed_truth t
     WHERE t.c > t.billed_c AND t.s >= t.billed_s AND t.e >= t.billed_e
  ), written AS (
    INSERT INTO public.portal_usage_adjustments AS a
           (portal_id, month_year, booked_month, source, request_count, success_count, error_count,
            last_request_at, last_request_id, idempotency_key, counted_from_id)
    SELECT portal_id, month_year, booking, 'late', c - billed_c, s - billed_s, e - billed_e, at, 0,
           'late:' || portal_id || ':' || month_year || ':' || booking, NULL
      FROM more
    ON CONFLICT (idempotency_key) DO UPDATE
       SET request_count = a.request_count + excluded.request_count,
           success_count = a.success_count + excluded.success_count,
           error_count = a.error_count + excluded.error_count,
           last_request_at = greatest(a.last_request_at, excluded.last_request_at),
           counted_from_id = NULL
    RETURNING a.portal_id, a.month_year
  )
  SELECT coalesce(jsonb_agg(jsonb_build_object('key', w.portal_id || ':' || w.month_year,
                                               'rows', m.c - m.billed_c)
                            ORDER BY w.portal_id, w.month_year), '[]')
    INTO booked FROM written w JOIN more m USING (portal_id, month_year);

  -- Open months' watermarks to 0 (the rebuild that follows writes them at
  -- the horizon); closed months' to the horizon, since every one of their
  -- rows up to it is booked now: a stale run that read rows before the
  -- rebase and books them after it finds them counted.
  PERFORM set_config('usage_agg.rebase', 'on', true);
  UPDATE public.portal_usage_monthly
     SET last_request_id = CASE WHEN public.usage_agg_is_closed(month_year) THEN p_horizon ELSE 0 END
   WHERE last_request_id IS DISTINCT FROM
         CASE WHEN public.usage_agg_is_closed(month_year) THEN p_horizon ELSE 0 END;
  GET DIAGNOSTICS n = ROW_COUNT;
  UPDATE public.portal_usage_adjustments
     SET last_request_id = CASE WHEN public.usage_agg_is_closed(month_year) THEN p_horizon ELSE 0 END
   WHERE source = 'late'
     AND last_request_id IS DISTINCT FROM
         CASE WHEN public.usage_agg_is_closed(month_year) THEN p_horizon ELSE 0 END;
  PERFORM set_config('usage_agg.rebase', 'off', true);
  UPDATE public.usage_aggregation_state
     SET cursor_id = NULL,
         reset_reason = coalesce(reset_reason, 'a rebase was started and has not finished'),
         reset_at = coalesce(reset_at, now()),
         updated_at = now()
   WHERE job = p_job;
  DELETE FROM public.usage_agg_refused_keys WHERE job = p_job;
  DELETE FROM public.usage_agg_deleted_keys WHERE true;

  -- Rows fewer than billed, or a mix: refused, recorded, never dropped.
  WITH fewer AS (
    INSERT INTO public.usage_agg_refused_keys (job, portal_id, month_year, stored_requests, raw_requests, kind)
    SELECT p_job, portal_id, month_year, billed_c, c, 'closed'
      FROM pg_temp.usage_agg_closed_truth
     WHERE (c, s, e) IS DISTINCT FROM (billed_c, billed_s, billed_e)
       AND NOT (c > billed_c AND s >= billed_s AND e >= billed_e)
       -- No raw row left at all (a reset that deleted them): nothing can
       -- be uncounted, and the billed totals are the record.
       AND c > 0
    RETURNING portal_id, month_year
  )
  SELECT coalesce(jsonb_agg(portal_id || ':' || month_year ORDER BY portal_id, month_year), '[]')
    INTO refused FROM fewer;
  RETURN jsonb_build_object('watermarks_reset', n, 'closed_booked', booked, 'closed_refused', refused);
END
$$;

-- The two-argument rebase dropped a closed month's uncounted rows: gone, so
-- an older binary stops at "function not found" instead.
DROP FUNCTION IF EXISTS public.usage_agg_rebase(text, text);

-- service_role only; usage_agg_book_folded is for the functions above alone.
DO $$
DECLARE
  fn text;
BEGIN
  REVOKE ALL ON FUNCTION public.usage_agg_book_folded(text, bigint, bigint, boolean) FROM PUBLIC;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
    REVOKE ALL ON FUNCTION public.usage_agg_book_folded(text, bigint, bigint, boolean) FROM anon, authenticated;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    REVOKE ALL ON FUNCTION public.usage_agg_book_folded(text, bigint, bigint, boolean) FROM service_role;
  END IF;
  FOREACH fn IN ARRAY ARRAY[
    'public.usage_agg_record_refusals(text, text, jsonb, bigint)',
    'public.usage_agg_preflight(text)',
    'public.usage_agg_book(text, bigint, bigint, jsonb, boolean, boolean, bigint)',
    'public.usage_agg_rpc_batch(text, bigint, integer, boolean)',
    'public.usage_agg_rebase(text, text, bigint)'
  ] LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
      EXECUTE format('REVOKE ALL ON FUNCTION %s FROM anon, authenticated', fn);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
      EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', fn);
    END IF;
  END LOOP;
END $$;

NOTIFY pgrst, 'reload schema';

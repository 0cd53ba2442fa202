-- usage-agg: the run-time checks behind "exit 0 means every total is right".
--
-- Apply after 20261127120000_usage_agg_incremental.sql (applying it again
-- changes nothing):
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f supabase/migrations/20261130120000_usage_agg_trust.sql
-- or `supabase db push`, or paste `usage-agg sql` (every migration, in order)
-- into Supabase's SQL editor.
--
-- What it adds (docs/semantics.md says why each exists):
--   * usage_agg_preflight(): the facts a run checks before it counts
--     anything (the id sequence, its cache, the id column's default, the
--     highest watermark, a reset recorded by the triggers below);
--   * TRUNCATE triggers on both tables, and an INSERT trigger that notices
--     ids at or below the cursor, recording the reset, so a table emptied or
--     a sequence set back and refilled past the cursor is never skipped;
--   * a log of portal_usage_monthly rows deleted by hand, and the function
--     that rebuilds those keys from all their rows;
--   * the keys a rebuild refused to lower, kept until a later run resolves them;
--   * usage_agg_rebase(): the repair after the id sequence moved backwards;
--   * the safe horizon counting prepared (two-phase) transactions as writers;
--   * the server-side batch refusing the timestamps the REST engine cannot
--     carry (infinity, years outside 1..9999), so both engines agree.
-- On the webhook's insert path, one statement-level trigger that looks at
-- one state row per INSERT statement (measured in docs/semantics.md,
-- "Assumptions"); the other trigger on usage_requests fires on TRUNCATE.

ALTER TABLE public.usage_aggregation_state
  ADD COLUMN IF NOT EXISTS reset_reason text,
  ADD COLUMN IF NOT EXISTS reset_at timestamptz;

-- A TRUNCATE of either table after the first run invalidates what the cursor
-- and the watermarks claim (with RESTART IDENTITY, new ids start again below
-- the cursor). Runs refuse to count until `usage-agg aggregate --rebase`.
CREATE OR REPLACE FUNCTION public.usage_agg_note_truncate()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
BEGIN
  UPDATE public.usage_aggregation_state
     SET reset_reason = format('%s was truncated', TG_TABLE_NAME), reset_at = now(), updated_at = now()
   WHERE cursor_id IS NOT NULL;
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS usage_agg_note_truncate ON public.usage_requests;
CREATE TRIGGER usage_agg_note_truncate
  AFTER TRUNCATE ON public.usage_requests
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_note_truncate();
DROP TRIGGER IF EXISTS usage_agg_note_truncate ON public.portal_usage_monthly;
CREATE TRIGGER usage_agg_note_truncate
  AFTER TRUNCATE ON public.portal_usage_monthly
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_note_truncate();

-- A row inserted with an id at or below a cursor breaks the one assumption
-- the cursor rests on: ids come from the sequence, which only moves forward.
-- It happens when the sequence is restarted or set back (ALTER SEQUENCE ...
-- RESTART, setval) or ids are given by hand, and it stays invisible once the
-- sequence has passed the cursor again. One call per INSERT statement, a
-- look at one state row; it writes only when it finds such a row.
CREATE OR REPLACE FUNCTION public.usage_agg_note_low_ids()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  low bigint;
BEGIN
  SELECT min(id) INTO low FROM usage_agg_new_rows;
  IF EXISTS (SELECT 1 FROM public.usage_aggregation_state WHERE cursor_id >= low) THEN
    UPDATE public.usage_aggregation_state
       SET reset_reason = format('a row was inserted into usage_requests with id %s, at or below the cursor %s '
                                 '(the id sequence was set back, or ids were given by hand)', low, cursor_id),
           reset_at = now(), updated_at = now()
     WHERE cursor_id >= low AND reset_reason IS NULL;
  END IF;
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS usage_agg_note_low_ids ON public.usage_requests;
CREATE TRIGGER usage_agg_note_low_ids
  AFTER INSERT ON public.usage_requests
  REFERENCING NEW TABLE AS usage_agg_new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_note_low_ids();

-- Keys whose monthly row was deleted (by hand, or by a restore that deletes
-- and reinserts). An incremental run would otherwise start such a key again
-- from its new rows only; instead the next run rebuilds it from all its rows.
CREATE TABLE IF NOT EXISTS public.usage_agg_deleted_keys (
  portal_id  bigint NOT NULL,
  month_year text NOT NULL,
  deleted_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (portal_id, month_year)
);
ALTER TABLE public.usage_agg_deleted_keys ENABLE ROW LEVEL SECURITY;

CREATE OR REPLACE FUNCTION public.usage_agg_note_deleted_key()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
BEGIN
  INSERT INTO public.usage_agg_deleted_keys (portal_id, month_year)
  VALUES (OLD.portal_id, OLD.month_year)
  ON CONFLICT (portal_id, month_year) DO UPDATE SET deleted_at = now();
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS usage_agg_note_deleted_key ON public.portal_usage_monthly;
CREATE TRIGGER usage_agg_note_deleted_key
  AFTER DELETE ON public.portal_usage_monthly
  FOR EACH ROW EXECUTE FUNCTION public.usage_agg_note_deleted_key();

-- Keys a rebuild found above their raw rows and, without --allow-decrease,
-- did not lower. They stand (status and every run exit 65) until a rebuild
-- of their month writes them or finds them right.
CREATE TABLE IF NOT EXISTS public.usage_agg_refused_keys (
  job             text NOT NULL,
  portal_id       bigint NOT NULL,
  month_year      text NOT NULL,
  stored_requests bigint NOT NULL,
  raw_requests    bigint NOT NULL,
  found_at        timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (job, portal_id, month_year)
);
ALTER TABLE public.usage_agg_refused_keys ENABLE ROW LEVEL SECURITY;

-- Replaces the refusals in a rebuild's scope (p_scope: 'all', or one month
-- as YYYY-MM) with the ones it found; returns how many stand in all.
CREATE OR REPLACE FUNCTION public.usage_agg_record_refusals(p_job text, p_scope text, p_keys jsonb)
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  n bigint;
BEGIN
  DELETE FROM public.usage_agg_refused_keys
   WHERE job = p_job AND (p_scope = 'all' OR month_year = p_scope);
  INSERT INTO public.usage_agg_refused_keys (job, portal_id, month_year, stored_requests, raw_requests)
  SELECT p_job, k.portal_id, k.month_year, k.stored_requests, k.raw_requests
    FROM jsonb_to_recordset(coalesce(p_keys, '[]')) AS k(portal_id bigint, month_year text,
                                                          stored_requests bigint, raw_requests bigint)
  ON CONFLICT (job, portal_id, month_year) DO UPDATE
     SET stored_requests = excluded.stored_requests, raw_requests = excluded.raw_requests;
  SELECT count(*) INTO n FROM public.usage_agg_refused_keys WHERE job = p_job;
  RETURN n;
END
$$;

-- The guard, now with one way past it: usage_agg_rebase sets
-- usage_agg.rebase for its own transaction only, to lower every watermark
-- after the id sequence moved backwards. Every other write keeps the rule.
CREATE OR REPLACE FUNCTION public.usage_agg_guard_watermark()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF current_setting('usage_agg.rebase', true) = 'on' THEN
    RETURN NEW;
  END IF;
  RETURN OLD;
END
$$;

-- Everything a run checks before counting, in one answer (docs/semantics.md,
-- "Assumptions"). The client decides what is wrong; this only reads.
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
BEGIN
  -- The newest id first, then the sequence: an id drawn between the two
  -- reads is then below the sequence's value, never above it.
  SELECT max(id) INTO newest FROM public.usage_requests;
  IF seq IS NOT NULL THEN
    seq_last := pg_sequence_last_value(seq::regclass);
    SELECT seqcache INTO seq_cache FROM pg_sequence WHERE seqrelid = seq::regclass;
  END IF;
  SELECT pg_get_expr(d.adbin, d.adrelid), a.attidentity INTO id_default, identity
    FROM pg_attribute a
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE a.attrelid = 'public.usage_requests'::regclass AND a.attname = 'id';
  SELECT * INTO st FROM public.usage_aggregation_state WHERE job = p_job;
  RETURN jsonb_build_object(
    'sequence', seq,
    'sequence_last_value', seq_last,
    'sequence_cache', seq_cache,
    'id_default', id_default,
    'id_from_sequence', coalesce(identity IN ('a', 'd')
                                 OR (seq IS NOT NULL AND id_default LIKE 'nextval(%'), false),
    'newest_id', newest,
    'cursor', st.cursor_id,
    'highest_watermark', (SELECT max(last_request_id) FROM public.portal_usage_monthly),
    'reset_reason', st.reset_reason,
    'reset_at', st.reset_at,
    'refused_keys', (SELECT count(*) FROM public.usage_agg_refused_keys WHERE job = p_job),
    'refused_since', (SELECT min(found_at) FROM public.usage_agg_refused_keys WHERE job = p_job),
    'refused_examples', (SELECT coalesce(jsonb_agg(x.k ORDER BY x.k), '[]') FROM (
        SELECT portal_id || ':' || month_year AS k FROM public.usage_agg_refused_keys
         WHERE job = p_job ORDER BY portal_id, month_year LIMIT 5) x),
    'deleted_keys', (SELECT count(*) FROM public.usage_agg_deleted_keys));
END
$$;

-- The repair after the id sequence moved backwards (or a table was
-- truncated): in one transaction, every watermark to 0 and the cursor to
-- none, so the rebuild that follows writes every key from its rows. Only
-- the lease holder may. The reset stays recorded until that rebuild ends
-- (usage_agg_finish_rebase): a rebase that dies midway is redone, never
-- mistaken for a normal first run.
CREATE OR REPLACE FUNCTION public.usage_agg_rebase(p_job text, p_owner text)
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  n bigint;
BEGIN
  PERFORM 1 FROM public.usage_aggregation_state
   WHERE job = p_job AND lease_owner = p_owner AND lease_expires_at > now()
     FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'usage_agg_rebase: % does not hold the lease of job %', p_owner, p_job
      USING ERRCODE = '55P03';
  END IF;
  PERFORM set_config('usage_agg.rebase', 'on', true);
  UPDATE public.portal_usage_monthly SET last_request_id = 0 WHERE last_request_id <> 0;
  GET DIAGNOSTICS n = ROW_COUNT;
  PERFORM set_config('usage_agg.rebase', 'off', true);
  UPDATE public.usage_aggregation_state
     SET cursor_id = NULL,
         reset_reason = coalesce(reset_reason, 'a rebase was started and has not finished'),
         reset_at = coalesce(reset_at, now()),
         updated_at = now()
   WHERE job = p_job;
  DELETE FROM public.usage_agg_refused_keys WHERE job = p_job;
  DELETE FROM public.usage_agg_deleted_keys;
  RETURN n;
END
$$;

-- The end of a rebase's rebuild: the cursor to the horizon it counted to,
-- and the reset cleared, together.
CREATE OR REPLACE FUNCTION public.usage_agg_finish_rebase(p_job text, p_cursor bigint)
RETURNS bigint
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  UPDATE public.usage_aggregation_state
     SET cursor_id = greatest(coalesce(cursor_id, 0), p_cursor), reset_reason = NULL, reset_at = NULL,
         updated_at = now()
   WHERE job = p_job
  RETURNING cursor_id;
$$;

-- Whether a request_timestamp is one both engines carry faithfully: NULL
-- (the seed allows it), or a finite time in years 1 to 9999. PostgREST
-- sends other values (infinity, 12025-..., ... BC) in forms a client cannot
-- write back, so they are bad rows in both engines.
CREATE OR REPLACE FUNCTION public.usage_agg_valid_time(p_at timestamp)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
  SELECT p_at IS NULL OR (isfinite(p_at) AND p_at >= '0001-01-01' AND p_at < '10000-01-01')
$$;

-- Rebuilds the keys whose monthly row was deleted, each from all its rows up
-- to the cursor, with the cursor as its watermark; a key some run already
-- counted past the cursor is left to that run. Returns the keys rebuilt.
CREATE OR REPLACE FUNCTION public.usage_agg_restore_deleted_keys(p_job text DEFAULT 'default')
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  c       bigint;
  restored jsonb;
BEGIN
  SELECT cursor_id INTO c FROM public.usage_aggregation_state WHERE job = p_job;
  IF c IS NULL THEN
    RETURN '[]'::jsonb; -- the next run is a rebuild of every key anyway
  END IF;
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_restore (portal_id bigint, month_year text) ON COMMIT DROP;
  TRUNCATE usage_agg_restore;
  WITH taken AS (
    DELETE FROM public.usage_agg_deleted_keys RETURNING portal_id, month_year
  )
  INSERT INTO usage_agg_restore SELECT portal_id, month_year FROM taken;
  WITH truth AS (
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

-- The safe horizon, as in 20261127120000, with one change: a prepared
-- (two-phase) transaction holds its locks with no backend, so its pg_locks
-- rows have a NULL pid, which `pid <> pg_backend_pid()` left out. It is a
-- writer like any other until COMMIT PREPARED or ROLLBACK PREPARED.
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
  candidate := coalesce(
    pg_sequence_last_value(pg_get_serial_sequence('public.usage_requests', 'id')::regclass), 0);
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

-- The server-side batch, as in 20261127120000, with one change: a row whose
-- request_timestamp fails usage_agg_valid_time is a bad row, as it is for
-- the REST engine.
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
  lo       bigint;
  hi       bigint;
  hz       jsonb;
  horizon  bigint;
  n_rows   bigint;
  n_keys   bigint;
  n_bad    bigint;
  bad_ids  bigint[];
  redo     jsonb;
  n_redo   bigint := 0;
  redo_rows bigint := 0;
BEGIN
  -- One batch at a time per job, whoever calls.
  IF NOT pg_try_advisory_xact_lock(hashtext('usage_agg_rpc_batch:' || p_job)) THEN
    RETURN jsonb_build_object('busy', true);
  END IF;
  SELECT cursor_id INTO lo FROM public.usage_aggregation_state WHERE job = p_job;
  IF lo IS NULL THEN
    -- The first run after the migration rebuilds every key (and reports
    -- drift): the CLI does that before the first batch.
    RETURN jsonb_build_object('needs_rebuild', true);
  END IF;
  hz := public.usage_agg_safe_horizon(p_max_wait_ms);
  horizon := (hz->>'horizon')::bigint;
  IF horizon IS NULL THEN
    RETURN jsonb_build_object('cursor', lo, 'horizon', NULL, 'writers_in_flight', hz->'writers_in_flight',
                              'prepared_in_flight', hz->'prepared_in_flight');
  END IF;
  hi := greatest(lo, least(horizon, lo + p_batch_ids));

  -- One pass over the batch's rows, grouped by key, then joined to what is
  -- stored. base: the stored watermark (-1: not stored yet).
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_batch (
    portal_id bigint, month_year varchar, good boolean, base bigint,
    c bigint, s bigint, e bigint, nulls bigint, at timestamp, w bigint) ON COMMIT DROP;
  TRUNCATE usage_agg_batch;
  INSERT INTO usage_agg_batch
  SELECT g.portal_id, g.month_year, public.usage_agg_valid_key(g.portal_id, g.month_year),
         coalesce(m.last_request_id, -1), g.c, g.s, g.e, g.nulls, g.at, g.w
    FROM (SELECT r.portal_id, r.month_year,
                 count(*) FILTER (WHERE r.success IS NOT NULL AND r.vt) AS c,
                 count(*) FILTER (WHERE r.success AND r.vt) AS s,
                 count(*) FILTER (WHERE NOT r.success AND r.vt) AS e,
                 count(*) FILTER (WHERE r.success IS NULL OR NOT r.vt) AS nulls,
                 max(r.request_timestamp) FILTER (WHERE r.success IS NOT NULL AND r.vt) AS at,
                 max(r.id) FILTER (WHERE r.success IS NOT NULL AND r.vt) AS w
            FROM (SELECT u.*, public.usage_agg_valid_time(u.request_timestamp) AS vt
                    FROM public.usage_requests u) r
           WHERE r.id > lo AND r.id <= hi
           GROUP BY 1, 2) g
    LEFT JOIN public.portal_usage_monthly m ON m.portal_id = g.portal_id AND m.month_year = g.month_year;

  SELECT coalesce(sum(b.c + b.nulls) FILTER (WHERE NOT b.good), 0) + coalesce(sum(b.nulls) FILTER (WHERE b.good), 0)
    INTO n_bad FROM usage_agg_batch b;
  IF n_bad > 0 THEN
    SELECT array_agg(id ORDER BY id) INTO bad_ids FROM (
      SELECT id FROM public.usage_requests
       WHERE id > lo AND id <= hi
         AND (success IS NULL OR NOT public.usage_agg_valid_key(portal_id, month_year)
              OR NOT public.usage_agg_valid_time(request_timestamp))
       ORDER BY id LIMIT 5) x;
  END IF;

  IF p_dry_run THEN
    SELECT count(*), coalesce(sum(c), 0) INTO n_keys, n_rows FROM usage_agg_batch WHERE good AND c > 0;
    RETURN jsonb_build_object('dry_run', true, 'from', lo, 'to', hi, 'horizon', horizon,
      'rows', n_rows, 'keys', n_keys, 'bad', n_bad, 'bad_ids', to_jsonb(coalesce(bad_ids, '{}')),
      'done', hi >= horizon);
  END IF;

  WITH upd AS (
    UPDATE public.portal_usage_monthly t
       SET request_count = coalesce(t.request_count, 0) + b.c,
           success_count = coalesce(t.success_count, 0) + b.s,
           error_count = coalesce(t.error_count, 0) + b.e,
           last_request_at = greatest(t.last_request_at, b.at),
           last_request_id = b.w,
           updated_at = now()
      FROM usage_agg_batch b
     WHERE b.good AND b.c > 0 AND b.base >= 0 AND b.base <= lo
       AND t.portal_id = b.portal_id AND t.month_year = b.month_year AND t.last_request_id = b.base
    RETURNING t.portal_id, t.month_year
  ), ins AS (
    INSERT INTO public.portal_usage_monthly
           (portal_id, month_year, request_count, success_count, error_count, last_request_at, last_request_id, updated_at)
    SELECT b.portal_id, b.month_year, b.c, b.s, b.e, b.at, b.w, now()
      FROM usage_agg_batch b WHERE b.good AND b.c > 0 AND b.base < 0
    ON CONFLICT (portal_id, month_year) DO NOTHING
    RETURNING portal_id, month_year
  ), written AS (
    SELECT portal_id, month_year FROM upd UNION ALL SELECT portal_id, month_year FROM ins
  )
  SELECT count(*) FILTER (WHERE d.portal_id IS NOT NULL),
         coalesce(sum(b.c) FILTER (WHERE d.portal_id IS NOT NULL), 0),
         coalesce(jsonb_agg(jsonb_build_object('p', b.portal_id, 'm', b.month_year)) FILTER (WHERE d.portal_id IS NULL), '[]')
    INTO n_keys, n_rows, redo
    FROM usage_agg_batch b
    LEFT JOIN written d ON d.portal_id = b.portal_id AND d.month_year = b.month_year
   WHERE b.good AND b.c > 0;

  -- The rest (rare): lock them, then count the batch's rows above each
  -- one's stored watermark in a single pass.
  IF jsonb_array_length(redo) > 0 THEN
    CREATE TEMP TABLE IF NOT EXISTS usage_agg_redo (portal_id bigint, month_year varchar, w bigint) ON COMMIT DROP;
    TRUNCATE usage_agg_redo;
    INSERT INTO usage_agg_redo
    SELECT t.portal_id, t.month_year, t.last_request_id
      FROM jsonb_to_recordset(redo) AS r(p bigint, m text)
      JOIN public.portal_usage_monthly t ON t.portal_id = r.p AND t.month_year = r.m
       FOR UPDATE OF t;
    WITH x AS (
      SELECT r.portal_id, r.month_year, count(*) AS c, count(*) FILTER (WHERE r.success) AS s,
             count(*) FILTER (WHERE NOT r.success) AS e, max(r.request_timestamp) AS at, max(r.id) AS w
        FROM public.usage_requests r
        JOIN usage_agg_redo k ON k.portal_id = r.portal_id AND k.month_year = r.month_year
       WHERE r.id > lo AND r.id <= hi AND r.id > k.w AND r.success IS NOT NULL
         AND public.usage_agg_valid_time(r.request_timestamp)
       GROUP BY 1, 2
    ), upd AS (
      UPDATE public.portal_usage_monthly t
         SET request_count = coalesce(t.request_count, 0) + x.c,
             success_count = coalesce(t.success_count, 0) + x.s,
             error_count = coalesce(t.error_count, 0) + x.e,
             last_request_at = greatest(t.last_request_at, x.at),
             last_request_id = x.w,
             updated_at = now()
        FROM x
       WHERE t.portal_id = x.portal_id AND t.month_year = x.month_year
      RETURNING x.c
    )
    SELECT count(*), coalesce(sum(c), 0) INTO n_redo, redo_rows FROM upd;
  END IF;

  INSERT INTO public.usage_aggregation_state AS st (job, cursor_id) VALUES (p_job, hi)
  ON CONFLICT (job) DO UPDATE SET cursor_id = greatest(coalesce(st.cursor_id, 0), excluded.cursor_id), updated_at = now();

  RETURN jsonb_build_object('from', lo, 'to', hi, 'horizon', horizon,
    'rows', n_rows + redo_rows, 'keys', n_keys + n_redo,
    'bad', n_bad, 'bad_ids', to_jsonb(coalesce(bad_ids, '{}')), 'raced_keys', n_redo, 'done', hi >= horizon);
END
$$;


-- service_role only: nothing for anon or authenticated, nor PUBLIC.
DO $$
DECLARE
  fn text;
BEGIN
  FOREACH fn IN ARRAY ARRAY[
    'public.usage_agg_preflight(text)',
    'public.usage_agg_rebase(text, text)',
    'public.usage_agg_finish_rebase(text, bigint)',
    'public.usage_agg_record_refusals(text, text, jsonb)',
    'public.usage_agg_restore_deleted_keys(text)',
    'public.usage_agg_valid_time(timestamp)',
    'public.usage_agg_safe_horizon(integer)',
    'public.usage_agg_rpc_batch(text, bigint, integer, boolean)'
  ] LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
      EXECUTE format('REVOKE ALL ON FUNCTION %s FROM anon, authenticated', fn);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
      EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', fn);
    END IF;
  END LOOP;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
    REVOKE ALL ON public.usage_agg_refused_keys, public.usage_agg_deleted_keys FROM anon, authenticated;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    GRANT SELECT ON public.usage_agg_refused_keys, public.usage_agg_deleted_keys TO service_role;
  END IF;
END $$;

NOTIFY pgrst, 'reload schema';

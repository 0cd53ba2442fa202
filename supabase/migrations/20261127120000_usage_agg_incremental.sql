-- usage-agg: incremental, exactly-once aggregation.
--
-- Apply once per project (applying it again changes nothing):
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f supabase/migrations/20261127120000_usage_agg_incremental.sql
-- or `supabase db push`, or paste `usage-agg sql` into Supabase's SQL editor.
--
-- What it adds (the contract is shared/design/semantics.md in the repo):
--   * usage_aggregation_state: the cursor (every raw id <= it is counted),
--     a lease, and the last run's outcome;
--   * portal_usage_monthly.last_request_id: each key's watermark, the newest
--     raw id its counts include, with a guard that refuses to lower it;
--   * functions for service_role: the safe horizon, and the lease.
-- Nothing here touches the webhook's insert path: no trigger and no index on
-- usage_requests.

-- The job's state: one row per job ('default').
CREATE TABLE IF NOT EXISTS public.usage_aggregation_state (
  job                  text PRIMARY KEY,
  -- Every usage_requests row with id <= cursor_id is counted. NULL: no
  -- incremental run has finished yet, so the first run rebuilds every key.
  cursor_id            bigint CHECK (cursor_id >= 0),
  lease_owner          text,
  lease_taken_at       timestamptz,
  lease_expires_at     timestamptz,
  last_run_started_at  timestamptz,
  last_run_finished_at timestamptz,
  last_run_outcome     text,
  last_run_rows        bigint,
  last_success_at      timestamptz,
  updated_at           timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE public.usage_aggregation_state ENABLE ROW LEVEL SECURITY;

-- Each key's watermark. Existing rows start at 0: the first run after this
-- migration rebuilds every key from its rows and sets it.
ALTER TABLE public.portal_usage_monthly
  ADD COLUMN IF NOT EXISTS last_request_id bigint NOT NULL DEFAULT 0;

-- Finds keys a run that died wrote past the cursor (semantics.md, trap 2).
CREATE INDEX IF NOT EXISTS portal_usage_monthly_last_request_id_idx
  ON public.portal_usage_monthly (last_request_id);

-- The safe horizon reads the id sequence's last value, which is only an
-- upper bound on ids in use if no session holds cached values: keep CACHE 1
-- (SERIAL's default).
DO $$
DECLARE
  seq text := pg_get_serial_sequence('public.usage_requests', 'id');
BEGIN
  IF seq IS NULL THEN
    RAISE EXCEPTION 'usage_requests.id has no sequence: usage-agg needs the seed schema (id SERIAL PRIMARY KEY)';
  END IF;
  EXECUTE format('ALTER SEQUENCE %s CACHE 1', seq);
END $$;

-- The guard (semantics.md, trap 3): a write that would move a key's
-- watermark backwards comes from a run that read older data than the row
-- already reflects. Keep the row as it is; the newest state always wins,
-- whatever order overlapping runs' writes land in. Returning OLD (rather
-- than NULL) keeps the row counted as matched, so a PATCH that loses this
-- race is not mistaken for a missing row.
CREATE OR REPLACE FUNCTION public.usage_agg_guard_watermark()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  RETURN OLD;
END
$$;

-- The WHEN clause is checked without calling the function, so ordinary
-- writes (the watermark going up) pay nothing for the guard.
DROP TRIGGER IF EXISTS usage_agg_guard_watermark ON public.portal_usage_monthly;
CREATE TRIGGER usage_agg_guard_watermark
  BEFORE UPDATE ON public.portal_usage_monthly
  FOR EACH ROW
  WHEN (NEW.last_request_id < OLD.last_request_id)
  EXECUTE FUNCTION public.usage_agg_guard_watermark();

-- The safe horizon (semantics.md, trap 4): the highest id H such that no
-- transaction that could still commit a row with id <= H is open.
--
-- An id is drawn when the row is inserted but becomes visible at commit, so
-- id 100 can appear after 101 was read. The technique is the one Citus'
-- incremental rollups use (and Crunchy Data's pg_incremental after it): read
-- the sequence's last value, then wait for every transaction that was
-- writing the table at that moment to end. Citus waits by taking
-- LOCK ... IN EXCLUSIVE MODE, which also queues the webhook's new inserts
-- behind it while it waits; here the same set of writers is read from
-- pg_locks (an INSERT takes ROW EXCLUSIVE on the table before it draws an
-- id, so any transaction holding an id <= H not yet committed holds that
-- lock when H is read) and polled until they are gone. The webhook is never
-- blocked. The wait is bounded: when writers outlast it, horizon is NULL
-- and the caller counts nothing new this time.
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
  first     boolean := true;
  deadline  timestamptz := clock_timestamp() + make_interval(secs => greatest(max_wait_ms, 0) / 1000.0);
BEGIN
  candidate := coalesce(
    pg_sequence_last_value(pg_get_serial_sequence('public.usage_requests', 'id')::regclass), 0);
  -- The writers at this moment, then the ones of them still there.
  LOOP
    SELECT array_agg(DISTINCT virtualtransaction) INTO writers
      FROM pg_locks
     WHERE locktype = 'relation'
       AND relation = 'public.usage_requests'::regclass
       AND mode = 'RowExclusiveLock'
       AND pid <> pg_backend_pid()
       AND (first OR virtualtransaction = ANY (writers));
    first := false;
    EXIT WHEN writers IS NULL OR clock_timestamp() >= deadline;
    PERFORM pg_sleep(0.005);
  END LOOP;
  IF writers IS NOT NULL THEN
    RETURN jsonb_build_object('horizon', NULL, 'candidate', candidate,
                              'writers_in_flight', cardinality(writers));
  END IF;
  RETURN jsonb_build_object('horizon', candidate, 'candidate', candidate, 'writers_in_flight', 0);
END
$$;

-- The lease: saves work when runs overlap (cron plus a manual run); the
-- counts never depend on it (leases expire under stalled processes). All
-- times are the database's clock, the one clock every run shares.
--
-- Takes the lease for p_owner unless another owner holds it unexpired, or
-- takes it from p_steal_from when that is who holds it (a run on the same
-- host whose process is gone). Returns the state either way.
CREATE OR REPLACE FUNCTION public.usage_agg_acquire_lease(
  p_job text, p_owner text, p_ttl_seconds integer, p_steal_from text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  s public.usage_aggregation_state;
BEGIN
  INSERT INTO public.usage_aggregation_state (job) VALUES (p_job) ON CONFLICT (job) DO NOTHING;
  SELECT * INTO s FROM public.usage_aggregation_state WHERE job = p_job FOR UPDATE;
  IF s.lease_owner IS NOT NULL AND s.lease_owner <> p_owner AND s.lease_expires_at > now()
     AND s.lease_owner IS DISTINCT FROM p_steal_from THEN
    RETURN jsonb_build_object('acquired', false, 'owner', s.lease_owner, 'since', s.lease_taken_at,
                              'expires_at', s.lease_expires_at, 'cursor', s.cursor_id, 'now', now());
  END IF;
  UPDATE public.usage_aggregation_state
     SET lease_owner = p_owner, lease_taken_at = now(),
         lease_expires_at = now() + make_interval(secs => p_ttl_seconds),
         last_run_started_at = now(), updated_at = now()
   WHERE job = p_job;
  RETURN jsonb_build_object('acquired', true, 'owner', p_owner, 'since', now(),
                            'expires_at', now() + make_interval(secs => p_ttl_seconds),
                            'cursor', s.cursor_id, 'now', now());
END
$$;

-- Extends the lease if p_owner still holds it; false when it was lost.
CREATE OR REPLACE FUNCTION public.usage_agg_renew_lease(p_job text, p_owner text, p_ttl_seconds integer)
RETURNS boolean
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  WITH renewed AS (
    UPDATE public.usage_aggregation_state
       SET lease_expires_at = now() + make_interval(secs => p_ttl_seconds), updated_at = now()
     WHERE job = p_job AND lease_owner = p_owner
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM renewed);
$$;

-- Moves the cursor forward, never back: every id <= p_cursor is counted.
-- Needs no lease: an overlapping run that counted up to p_cursor makes the
-- claim true whoever holds the lease.
CREATE OR REPLACE FUNCTION public.usage_agg_advance_cursor(p_job text, p_cursor bigint)
RETURNS bigint
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
  INSERT INTO public.usage_aggregation_state AS s (job, cursor_id) VALUES (p_job, p_cursor)
  ON CONFLICT (job) DO UPDATE
     SET cursor_id = greatest(coalesce(s.cursor_id, 0), excluded.cursor_id), updated_at = now()
  RETURNING cursor_id;
$$;

-- Records how the run ended and lets the lease go (if still ours).
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
         last_success_at = CASE WHEN p_outcome IN ('ok', 'bad_rows') THEN now() ELSE last_success_at END,
         lease_owner = CASE WHEN lease_owner = p_owner THEN NULL ELSE lease_owner END,
         lease_expires_at = CASE WHEN lease_owner = p_owner THEN NULL ELSE lease_expires_at END,
         lease_taken_at = CASE WHEN lease_owner = p_owner THEN NULL ELSE lease_taken_at END,
         updated_at = now()
   WHERE job = p_job;
$$;

-- The server-side engine (`usage-agg aggregate --engine rpc`): one batch of
-- the same work the REST engine does, in one transaction, for tables past
-- what paging rows over HTTP serves. Each call: rows in (cursor, min(safe
-- horizon, cursor + p_batch_ids)], each key counted from its own watermark
-- (so rows a REST run that died already counted are left out, exactly as
-- the REST engine does), bad rows skipped and counted, the cursor moved.
-- Returns a JSON summary. The CLI calls it until it reports done.

-- Whether a key is one a row may count toward (semantics.md, trap 5).
-- Checked per key, not per row: a batch has far fewer keys than rows, and
-- the regular expression is the costliest part of the scan.
CREATE OR REPLACE FUNCTION public.usage_agg_valid_key(p_portal_id bigint, p_month_year text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
  SELECT coalesce(p_portal_id > 0 AND p_month_year ~ '^[0-9]{4}-(0[1-9]|1[0-2])$', false)
$$;

-- Correct beside a REST run working at the same time: an existing key is
-- updated only if its watermark is still the one read with its rows
-- (Postgres re-checks that on the newest row version), a new key is
-- inserted only if nobody else did. Keys that lost either race, and keys a
-- REST run that died left with a watermark inside the batch, are then
-- locked and counted from their stored watermark, in one more pass.
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
    RETURN jsonb_build_object('cursor', lo, 'horizon', NULL, 'writers_in_flight', hz->'writers_in_flight');
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
                 count(r.success) AS c,
                 count(*) FILTER (WHERE r.success) AS s,
                 count(*) FILTER (WHERE NOT r.success) AS e,
                 count(*) FILTER (WHERE r.success IS NULL) AS nulls,
                 max(r.request_timestamp) FILTER (WHERE r.success IS NOT NULL) AS at,
                 max(r.id) FILTER (WHERE r.success IS NOT NULL) AS w
            FROM public.usage_requests r
           WHERE r.id > lo AND r.id <= hi
           GROUP BY 1, 2) g
    LEFT JOIN public.portal_usage_monthly m ON m.portal_id = g.portal_id AND m.month_year = g.month_year;

  SELECT coalesce(sum(b.c + b.nulls) FILTER (WHERE NOT b.good), 0) + coalesce(sum(b.nulls) FILTER (WHERE b.good), 0)
    INTO n_bad FROM usage_agg_batch b;
  IF n_bad > 0 THEN
    SELECT array_agg(id ORDER BY id) INTO bad_ids FROM (
      SELECT id FROM public.usage_requests
       WHERE id > lo AND id <= hi AND (success IS NULL OR NOT public.usage_agg_valid_key(portal_id, month_year))
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
    'public.usage_agg_safe_horizon(integer)',
    'public.usage_agg_acquire_lease(text, text, integer, text)',
    'public.usage_agg_renew_lease(text, text, integer)',
    'public.usage_agg_advance_cursor(text, bigint)',
    'public.usage_agg_finish_run(text, text, text, bigint)',
    'public.usage_agg_rpc_batch(text, bigint, integer, boolean)',
    'public.usage_agg_valid_key(bigint, text)'
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
    REVOKE ALL ON public.usage_aggregation_state FROM anon, authenticated;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    GRANT SELECT ON public.usage_aggregation_state TO service_role;
    GRANT SELECT, INSERT, UPDATE ON public.portal_usage_monthly TO service_role;
  END IF;
END $$;

-- Tell PostgREST to load the new table and functions.
NOTIFY pgrst, 'reload schema';

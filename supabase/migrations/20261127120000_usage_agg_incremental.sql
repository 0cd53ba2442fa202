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
  IF NEW.last_request_id < OLD.last_request_id THEN
    RETURN OLD;
  END IF;
  RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS usage_agg_guard_watermark ON public.portal_usage_monthly;
CREATE TRIGGER usage_agg_guard_watermark
  BEFORE UPDATE ON public.portal_usage_monthly
  FOR EACH ROW EXECUTE FUNCTION public.usage_agg_guard_watermark();

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
  deadline  timestamptz := clock_timestamp() + make_interval(secs => greatest(max_wait_ms, 0) / 1000.0);
BEGIN
  candidate := coalesce(
    pg_sequence_last_value(pg_get_serial_sequence('public.usage_requests', 'id')::regclass), 0);
  SELECT array_agg(DISTINCT virtualtransaction) INTO writers
    FROM pg_locks
   WHERE locktype = 'relation'
     AND relation = 'public.usage_requests'::regclass
     AND mode = 'RowExclusiveLock'
     AND pid <> pg_backend_pid();
  LOOP
    SELECT array_agg(DISTINCT virtualtransaction) INTO writers
      FROM pg_locks
     WHERE locktype = 'relation'
       AND relation = 'public.usage_requests'::regclass
       AND mode = 'RowExclusiveLock'
       AND virtualtransaction = ANY (writers);
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
    'public.usage_agg_finish_run(text, text, text, bigint)'
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

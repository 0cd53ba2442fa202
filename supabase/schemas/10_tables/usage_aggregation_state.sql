-- The job's state, one row per job ('default'): the cursor that makes runs
-- incremental, the lease that keeps overlapping runs from repeating work,
-- a reset that stops runs until a rebase, and what `status` shows of the
-- last run. Changed only through usage-agg's functions.
CREATE TABLE public.usage_aggregation_state (
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
  updated_at           timestamptz NOT NULL DEFAULT now(),
  -- Set when what the cursor and the watermarks claim no longer holds (a
  -- table truncated, a row inserted at or below the cursor, a rebase under
  -- way): runs refuse to count until `usage-agg aggregate --rebase`.
  reset_reason         text,
  reset_at             timestamptz,
  -- Who ran the last run: a CLI on some host, or pg_cron.
  last_run_by          text,
  -- The tally of rows rejected as bad data, and the first ids: once the
  -- cursor has passed them, no run reads them again.
  rejected_rows        bigint NOT NULL DEFAULT 0,
  rejected_ids         bigint[] NOT NULL DEFAULT '{}',
  -- The scheduled run's batch, halved after the statement timeout cut one,
  -- and the timeout it last ran under (usage_agg_run_scheduled).
  scheduled_batch_ids  bigint,
  scheduled_statement_timeout_ms bigint,
  -- Months a rebuild wrote (or is writing) over REST, outside the rule
  -- book, whose quotas' crossings are not yet recorded: set before its
  -- writes, cleared once they are recorded
  -- (usage_agg_sweep_pending_crossings, which every run calls first).
  crossings_pending    text[] NOT NULL DEFAULT '{}'
);
ALTER TABLE public.usage_aggregation_state ENABLE ROW LEVEL SECURITY;

-- Read by service_role, never written directly: the cursor and the lease
-- change only through the functions.
REVOKE ALL ON TABLE public.usage_aggregation_state FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE public.usage_aggregation_state TO service_role;

-- usage-agg: quotas' gaps found by an adversarial pass (issue 20).
--
-- Apply after 20261207151000_usage_agg_this_database.sql. Idempotent. The
-- current definitions are in supabase/schemas/.
--
-- A rebuild (the first run, --full, --month, --rebase) writes monthly rows
-- over REST, outside the rule book, then records their quotas' crossings
-- (usage_agg_record_crossings). Killed between the two while the cursor
-- did not move (a --month rerun after a bad row was fixed: horizon ==
-- cursor), its keys stood nowhere a later run looked, and the crossing was
-- lost until the key's next booking. A rebuild now notes its months as
-- pending in the job's state before its first write
-- (usage_agg_mark_crossings_pending), and clears them in the transaction
-- that records their crossings (usage_agg_sweep_pending_crossings), which
-- every CLI run calls before it counts: exact, and it costs the keys of the
-- pending months (a month_year index on portal_usage_monthly).
--
-- `--dry-run` of a rebuild showed no alerts: usage_agg_preview_crossings
-- answers what a run would record (pending months, keys above the cursor,
-- the rebuild's planned totals), recording nothing.
--
-- The scheduled run's summary has no alert counts: usage_agg_schedule_show
-- (redefined whole) gives each cron run the alerts recorded between its
-- start and its end, by an index on portal_usage_alerts(crossed_at).

ALTER TABLE public.usage_aggregation_state
  ADD COLUMN IF NOT EXISTS crossings_pending text[] NOT NULL DEFAULT '{}';

CREATE INDEX IF NOT EXISTS portal_usage_monthly_month_year_idx
  ON public.portal_usage_monthly (month_year);

CREATE INDEX IF NOT EXISTS portal_usage_alerts_crossed_at_idx
  ON public.portal_usage_alerts (crossed_at);

-- A rebuild's months whose quotas' crossings are still to be recorded
-- (docs/quotas.md, "Where crossings are recorded"): a rebuild writes
-- monthly rows over REST, outside the rule book, so it notes their months
-- here before its first write, and usage_agg_sweep_pending_crossings
-- records their crossings and clears them once it is done. A rebuild
-- killed in between leaves them here, where the next CLI run finds them,
-- whatever the cursor did.
CREATE OR REPLACE FUNCTION public.usage_agg_mark_crossings_pending(p_job text, p_months text[])
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  pending text[];
BEGIN
  IF p_months IS NULL OR EXISTS (SELECT 1 FROM unnest(p_months) m WHERE NOT public.usage_agg_valid_month(m)) THEN
    RAISE EXCEPTION 'usage_agg_mark_crossings_pending: months are YYYY-MM, got %', p_months USING ERRCODE = '22023';
  END IF;
  -- The closed months first, then the job's row: the rule book's order.
  LOCK TABLE public.usage_agg_closed_months IN SHARE MODE;
  UPDATE public.usage_aggregation_state s
     SET crossings_pending = ARRAY(SELECT DISTINCT m FROM unnest(s.crossings_pending || p_months) m ORDER BY m),
         updated_at = now()
   WHERE s.job = p_job
  RETURNING s.crossings_pending INTO pending;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'usage_agg_mark_crossings_pending: no job %', p_job USING ERRCODE = '22023';
  END IF;
  RETURN to_jsonb(pending);
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
REVOKE ALL ON FUNCTION public.usage_agg_mark_crossings_pending(text, text[]) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_mark_crossings_pending(text, text[]) TO service_role;

-- Records the quotas' crossings of the months a rebuild noted as pending
-- (usage_agg_mark_crossings_pending) and clears them, in one transaction:
-- a rebuild calls it after its writes, and every CLI run calls it before
-- it counts (the scheduled run is to call it before its batches), so the
-- crossings of a rebuild killed between its writes and their record are
-- recorded by the next run, once (the alerts' UNIQUE).
-- It costs the keys of the pending months (the month_year index), nothing
-- when none is pending. Returns the alerts recorded, as
-- usage_agg_record_crossings does.
CREATE OR REPLACE FUNCTION public.usage_agg_sweep_pending_crossings(p_job text DEFAULT 'default')
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  pending text[];
  alerts  jsonb;
BEGIN
  -- The closed months first, then the job's row: the rule book's order.
  LOCK TABLE public.usage_agg_closed_months IN SHARE MODE;
  SELECT s.crossings_pending INTO pending
    FROM public.usage_aggregation_state s WHERE s.job = p_job FOR UPDATE;
  IF coalesce(cardinality(pending), 0) = 0 THEN
    RETURN '[]'::jsonb;
  END IF;
  alerts := public.usage_agg_record_crossings(pending);
  UPDATE public.usage_aggregation_state s
     SET crossings_pending = '{}', updated_at = now()
   WHERE s.job = p_job;
  RETURN alerts;
END
$$;

-- service_role: the CLI calls it over REST with the service key; the
-- scheduled run calls it as its owner.
REVOKE ALL ON FUNCTION public.usage_agg_sweep_pending_crossings(text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_sweep_pending_crossings(text) TO service_role;

-- What a run would record as alerts, recording nothing (`--dry-run`): the
-- crossings of the job's pending months (usage_agg_sweep_pending_crossings),
-- of keys written above p_above (the catch-up before counting), and of a
-- rebuild that would write p_keys (each {portal_id, month_year, c}: the
-- monthly row's request_count it would write) and record the crossings of
-- p_months. A month's usage is its monthly row (or what p_keys would
-- write) plus its late adjustments, as usage_agg_record_crossings reads
-- it; closed months fire nothing; an alert already recorded is not shown.
-- NULL p_months and p_above mean none (not every one).
CREATE OR REPLACE FUNCTION public.usage_agg_preview_crossings(
  p_job text DEFAULT 'default', p_keys jsonb DEFAULT '[]', p_months text[] DEFAULT NULL,
  p_above bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  months text[];
  alerts jsonb;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM public.portal_usage_quotas) THEN
    RETURN '[]'::jsonb;
  END IF;
  SELECT coalesce(s.crossings_pending, '{}') || coalesce(p_months, '{}') INTO months
    FROM public.usage_aggregation_state s WHERE s.job = p_job;
  months := coalesce(months, p_months, '{}');
  WITH planned AS (
    SELECT (k->>'portal_id')::bigint AS portal_id, k->>'month_year' AS month_year, (k->>'c')::bigint AS c
      FROM jsonb_array_elements(coalesce(p_keys, '[]'::jsonb)) k
  ), stored AS (
    SELECT m.portal_id, m.month_year, m.request_count::bigint AS c
      FROM public.portal_usage_monthly m WHERE m.month_year = ANY (months)
    UNION
    SELECT m.portal_id, m.month_year, m.request_count::bigint
      FROM public.portal_usage_monthly m WHERE p_above IS NOT NULL AND m.last_request_id > p_above
  ), keys AS (
    SELECT coalesce(p.portal_id, s.portal_id) AS portal_id, coalesce(p.month_year, s.month_year) AS month_year,
           coalesce(p.c, s.c) AS c
      FROM stored s FULL JOIN planned p ON p.portal_id = s.portal_id AND p.month_year = s.month_year
  ), used AS (
    SELECT k.portal_id, k.month_year, k.c + coalesce(x.late_n, 0) AS n
      FROM keys k
      LEFT JOIN LATERAL (
        SELECT sum(a.request_count) AS late_n
          FROM public.portal_usage_adjustments a
         WHERE a.portal_id = k.portal_id AND a.month_year = k.month_year AND a.source = 'late') x ON true
     WHERE public.usage_agg_valid_key(k.portal_id, k.month_year)
       AND NOT public.usage_agg_is_closed(k.month_year)
  ), reached AS (
    SELECT u.portal_id, u.month_year, t.pct, q.request_limit, u.n
      FROM used u
      CROSS JOIN LATERAL (
        SELECT coalesce(own.monthly_request_limit, dflt.monthly_request_limit) AS request_limit,
               CASE WHEN own.monthly_request_limit IS NOT NULL THEN own.thresholds_percent
                    ELSE dflt.thresholds_percent END AS thresholds
          FROM (SELECT 1) one
          LEFT JOIN public.portal_usage_quotas own ON coalesce(own.portal_id, 0) = u.portal_id
          LEFT JOIN public.portal_usage_quotas dflt ON coalesce(dflt.portal_id, 0) = 0) q
      CROSS JOIN LATERAL unnest(q.thresholds) AS t(pct)
     WHERE q.request_limit IS NOT NULL
       AND u.n::numeric * 100 >= q.request_limit::numeric * t.pct
       AND NOT EXISTS (
         SELECT 1 FROM public.portal_usage_alerts al
          WHERE al.portal_id = u.portal_id AND al.month_year = u.month_year
            AND al.threshold_percent = t.pct AND al.request_limit = q.request_limit)
  )
  SELECT coalesce(jsonb_agg(jsonb_build_object(
           'portal_id', portal_id, 'month_year', month_year, 'threshold_percent', pct,
           'request_limit', request_limit, 'request_count', n)
           ORDER BY portal_id, month_year, pct), '[]')
    INTO alerts FROM reached;
  RETURN alerts;
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
REVOKE ALL ON FUNCTION public.usage_agg_preview_crossings(text, jsonb, text[], bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_preview_crossings(text, jsonb, text[], bigint) TO service_role;

-- The job 'usage-agg-<p_job>' (or null) and its last p_runs runs from
-- cron.job_run_details, newest first: what `schedule` and `status` show,
-- over the REST API alone. Each run with the alerts recorded between its
-- start and its end (alerts_recorded): its own, and any another writer
-- recorded meanwhile (a quota set, a reopening, or a CLI run when this one
-- found the lease held and stood aside).
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
    SELECT coalesce(jsonb_agg(to_jsonb(r) - 'command' - 'username' - 'database'
                              || jsonb_build_object('alerts_recorded', (
                                   SELECT count(*) FROM public.portal_usage_alerts al
                                    WHERE al.crossed_at >= r.start_time
                                      AND al.crossed_at <= coalesce(r.end_time, now())))
                              ORDER BY r.runid DESC), '[]')
      INTO runs
      FROM (SELECT * FROM cron.job_run_details d WHERE d.jobid = (j->>'jobid')::bigint
             ORDER BY d.runid DESC LIMIT greatest(p_runs, 0)) r;
  END IF;
  RETURN facts || jsonb_build_object('job', j, 'runs', coalesce(runs, '[]'::jsonb));
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_schedule_show(text, integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_schedule_show(text, integer) TO service_role;

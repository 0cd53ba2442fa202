-- The server-side engine (`usage-agg aggregate --engine rpc`, and the
-- scheduled run), for tables past what paging rows over HTTP serves: one
-- batch in one transaction. Rows in (cursor, min(safe horizon, cursor +
-- p_batch_ids)] are folded by key in SQL, bad rows counted (the first ids
-- named), then booked by the same rules as every engine
-- (usage_agg_book_folded), and the cursor moved. One batch at a time per
-- job. The caller calls it until it reports done. With p_aim_ms, it also
-- answers next_batch_ids, the size of the next batch to take about that
-- long (usage_agg_next_batch_ids, from this batch's rows, keys, and the
-- time its fold and its booking took, measured here, without the wait for
-- the horizon and the round trip).
--
-- p_sample_ids (with p_aim_ms): the ids from the cursor whose rows are
-- folded once more, read only, to size the next batch: how often rows
-- repeat a key shows only over many rows, and booking many keys only to
-- learn that costs a batch (issue 22: the first batch of 50,000 ids booked
-- every key of a uniform table, and the next booked them all again). The
-- first batch is then small (its booking gives the cost of a key), and
-- the sample gives how rows fall on keys and what folding them costs.
CREATE OR REPLACE FUNCTION public.usage_agg_rpc_batch(
  p_job text DEFAULT 'default',
  p_batch_ids bigint DEFAULT 1000000,
  p_max_wait_ms integer DEFAULT 2000,
  p_dry_run boolean DEFAULT false,
  p_aim_ms integer DEFAULT NULL,
  p_sample_ids bigint DEFAULT NULL)
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
  n_dirty bigint;
  bad_ids bigint[];
  booked  jsonb;
  n_keys  bigint;
  n_good  bigint;
  t_start timestamptz;
  t_fold  timestamptz;
  t_book  timestamptz;
  t_fixed double precision;
  t_sample timestamptz;
  s_dirty boolean;
  s_hi    bigint;
  s_rows  bigint;
  s_keys  bigint;
  s_ms    double precision;
  sized   bigint;
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
  t_start := clock_timestamp();

  CREATE TEMP TABLE IF NOT EXISTS usage_agg_fold (
    portal_id bigint, month_year text, c bigint, s bigint, e bigint, at timestamp, w bigint) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_fold;
  -- The fold, in the shape of a bare GROUP BY: bad rows are rare, so a
  -- group is folded as if every row were good, with a count of the rows
  -- that are not (no success, or a time no run can book); a group with
  -- one is folded again below, exactly, from its rows alone. Checking each
  -- row in every aggregate's filter made the fold twice the bare one.
  -- Keys are checked per key, not per row: a batch has far fewer keys
  -- than rows, and the regular expression is the costliest part.
  WITH g AS (
    SELECT u.portal_id, u.month_year, count(*) AS n, count(u.success) AS n_ok,
           count(*) FILTER (WHERE u.success) AS s,
           min(u.request_timestamp) AS first_at, max(u.request_timestamp) AS at, max(u.id) AS w
      FROM public.usage_requests u WHERE u.id > lo AND u.id <= hi
     GROUP BY 1, 2
  ), v AS (
    -- A group's times are all bookable when its earliest and its latest
    -- are (they are ordered, the infinities at the ends).
    SELECT g.*, public.usage_agg_valid_key(g.portal_id, g.month_year) AS good,
           g.n_ok < g.n OR NOT public.usage_agg_valid_time(g.first_at)
             OR NOT public.usage_agg_valid_time(g.at) AS dirty
      FROM g
  ), kept AS (
    INSERT INTO pg_temp.usage_agg_fold
    SELECT portal_id, month_year, n, s, n - s, at, w FROM v WHERE good AND NOT dirty
  )
  SELECT coalesce(sum(n) FILTER (WHERE NOT good), 0), count(*) FILTER (WHERE good AND dirty)
    INTO n_bad, n_dirty FROM v;
  IF n_dirty > 0 THEN
    -- The good keys with a bad row: their rows (every row of the range
    -- whose key is not folded yet, bad keys dropped again) folded with
    -- each row checked.
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
                FROM public.usage_requests u
               WHERE u.id > lo AND u.id <= hi
                 AND NOT EXISTS (SELECT 1 FROM pg_temp.usage_agg_fold f
                                  WHERE f.portal_id = u.portal_id AND f.month_year = u.month_year)) r
       GROUP BY 1, 2
    ), v AS (
      SELECT g.* FROM g WHERE public.usage_agg_valid_key(g.portal_id, g.month_year)
    ), kept AS (
      INSERT INTO pg_temp.usage_agg_fold
      SELECT portal_id, month_year, c, s, e, at, w FROM v WHERE c > 0
    )
    SELECT n_bad + coalesce(sum(nulls), 0) INTO n_bad FROM v;
  END IF;
  IF n_bad > 0 THEN
    SELECT array_agg(id ORDER BY id) INTO bad_ids FROM (
      SELECT id FROM public.usage_requests
       WHERE id > lo AND id <= hi
         AND (success IS NULL OR NOT public.usage_agg_valid_key(portal_id, month_year)
              OR NOT public.usage_agg_valid_time(request_timestamp))
       ORDER BY id LIMIT 5) x;
  END IF;
  SELECT count(*), coalesce(sum(c), 0) INTO n_keys, n_good FROM pg_temp.usage_agg_fold;
  t_fold := clock_timestamp();

  booked := public.usage_agg_book_folded(p_job, lo, hi, p_dry_run);
  t_book := clock_timestamp();
  IF NOT p_dry_run THEN
    UPDATE public.usage_aggregation_state
       SET cursor_id = greatest(cursor_id, hi), updated_at = now()
     WHERE job = p_job AND cursor_id >= lo;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'usage_agg_rpc_batch: the cursor of job % was reset while this batch was booked (a rebase): stop; the next run counts from there',
        p_job USING ERRCODE = '55000';
    END IF;
  END IF;
  t_fixed := extract(epoch FROM clock_timestamp() - t_book) * 1000;
  sized := public.usage_agg_next_batch_ids(
    hi - lo, n_good + n_bad, n_keys,
    extract(epoch FROM t_fold - t_start) * 1000, extract(epoch FROM t_book - t_fold) * 1000,
    t_fixed, p_aim_ms);
  s_hi := least(horizon, lo + coalesce(p_sample_ids, 0));
  IF p_aim_ms IS NOT NULL AND s_hi > hi AND n_keys > 0 THEN
    -- The sample: its rows and keys, and what folding them took; a key's
    -- booking costs what it cost in this batch. Its keys are counted with
    -- the fold's own grouping, so its time is the fold's.
    t_sample := clock_timestamp();
    -- (Every aggregate is read, or the planner would drop it.)
    SELECT count(*), coalesce(sum(g.n), 0), bool_or(g.n_ok < g.n OR g.s > g.n OR g.first_at > g.at OR g.w < 0)
      INTO s_keys, s_rows, s_dirty FROM (
      SELECT u.portal_id, u.month_year, count(*) AS n, count(u.success) AS n_ok,
             count(*) FILTER (WHERE u.success) AS s,
             min(u.request_timestamp) AS first_at, max(u.request_timestamp) AS at, max(u.id) AS w
        FROM public.usage_requests u WHERE u.id > lo AND u.id <= s_hi
       GROUP BY 1, 2) g;
    s_ms := extract(epoch FROM clock_timestamp() - t_sample) * 1000;
    IF s_rows > n_good + n_bad THEN
      sized := public.usage_agg_next_batch_ids(
        s_hi - lo, s_rows, s_keys, s_ms,
        extract(epoch FROM t_book - t_fold) * 1000 / n_keys * s_keys, t_fixed, p_aim_ms);
    END IF;
  END IF;
  RETURN (booked - 'changes') || jsonb_build_object('horizon', horizon, 'bad', n_bad,
    'bad_ids', to_jsonb(coalesce(bad_ids, '{}')), 'done', hi >= horizon, 'dry_run', p_dry_run,
    'fold_ms', round((extract(epoch FROM t_fold - t_start) * 1000)::numeric, 1),
    'book_ms', round((extract(epoch FROM t_book - t_fold) * 1000)::numeric, 1),
    'next_batch_ids', sized);
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_rpc_batch(text, bigint, integer, boolean, integer, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_rpc_batch(text, bigint, integer, boolean, integer, bigint) TO service_role;

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
CREATE OR REPLACE FUNCTION public.usage_agg_rpc_batch(
  p_job text DEFAULT 'default',
  p_batch_ids bigint DEFAULT 1000000,
  p_max_wait_ms integer DEFAULT 2000,
  p_dry_run boolean DEFAULT false,
  p_aim_ms integer DEFAULT NULL)
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
  n_keys  bigint;
  n_good  bigint;
  t_start timestamptz;
  t_fold  timestamptz;
  t_book  timestamptz;
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
  RETURN (booked - 'changes') || jsonb_build_object('horizon', horizon, 'bad', n_bad,
    'bad_ids', to_jsonb(coalesce(bad_ids, '{}')), 'done', hi >= horizon, 'dry_run', p_dry_run,
    'fold_ms', round((extract(epoch FROM t_fold - t_start) * 1000)::numeric, 1),
    'book_ms', round((extract(epoch FROM t_book - t_fold) * 1000)::numeric, 1),
    'next_batch_ids', public.usage_agg_next_batch_ids(
      hi - lo, n_good + n_bad, n_keys,
      extract(epoch FROM t_fold - t_start) * 1000, extract(epoch FROM t_book - t_fold) * 1000,
      extract(epoch FROM clock_timestamp() - t_book) * 1000, p_aim_ms));
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_rpc_batch(text, bigint, integer, boolean, integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_rpc_batch(text, bigint, integer, boolean, integer) TO service_role;

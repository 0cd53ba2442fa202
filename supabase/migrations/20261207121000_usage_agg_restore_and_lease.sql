-- usage-agg: fixes from an adversarial pass (issues 17 and 19).
--
-- Apply after 20261207120000_usage_agg_prune_guard.sql. Idempotent. The
-- current definition of each function is in supabase/schemas/.
--
-- 1. The restore of a deleted monthly row counted the key's raw rows up to
--    the cursor but took away all its late adjustments, which may count
--    rows above the cursor: a run that booked a closed month's late rows
--    and died before it moved the cursor, the month then reopened and the
--    key's monthly row deleted, was restored short by those rows, with
--    exit 0 (billed 5 against 7 rows). Each key is now counted up to its
--    highest watermark, the cursor or its late adjustments' above it.
-- 2. Taking the lease waited on the job's state row for as long as a
--    transaction that inserted a row at or below the cursor stayed open
--    (the trigger that records the reset holds the row until it ends): a
--    prepared one, for ever, and the run died at the statement timeout as
--    if the server had failed (exit 69). It now waits 3 s, then answers
--    that the row is blocked, naming the prepared transactions: the run
--    exits 75 and says which transaction to end.

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
  WITH bound AS (
    -- Each key's rows are counted up to its highest watermark: the cursor,
    -- or above it where a late adjustment of the key counts rows a run
    -- booked before it moved the cursor (it died between the two).
    SELECT k.portal_id, k.month_year,
           greatest(c, coalesce((SELECT max(a.last_request_id) FROM public.portal_usage_adjustments a
                                  WHERE a.portal_id = k.portal_id AND a.month_year = k.month_year
                                    AND a.source = 'late'), 0)) AS upto
      FROM usage_agg_restore k
  ), raw AS (
    SELECT k.portal_id, k.month_year, k.upto,
           count(r.id) AS n,
           count(r.id) FILTER (WHERE r.success) AS s,
           count(r.id) FILTER (WHERE NOT r.success) AS e,
           max(r.request_timestamp) AS at
      FROM bound k
      LEFT JOIN public.usage_requests r
        ON r.portal_id = k.portal_id AND r.month_year = k.month_year AND r.id <= k.upto
       AND r.success IS NOT NULL AND public.usage_agg_valid_time(r.request_timestamp)
     WHERE public.usage_agg_valid_key(k.portal_id, k.month_year)
     GROUP BY 1, 2, 3
  ), truth AS (
    SELECT raw.portal_id, raw.month_year, raw.upto,
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
    SELECT portal_id, month_year, n, s, e, at, upto, now() FROM truth WHERE n > 0
    ON CONFLICT (portal_id, month_year) DO UPDATE
       SET request_count = excluded.request_count, success_count = excluded.success_count,
           error_count = excluded.error_count, last_request_at = excluded.last_request_at,
           last_request_id = excluded.last_request_id, updated_at = now()
     WHERE t.last_request_id <= excluded.last_request_id
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
  held jsonb;
  was text := current_setting('lock_timeout');
BEGIN
  BEGIN
    -- Runs hold the row for milliseconds. A transaction that inserted a
    -- row at or below the cursor holds it until it ends (the trigger that
    -- records the reset wrote it): a prepared one, for good. The INSERT
    -- waits on that transaction too (it checks the key's newest version).
    PERFORM set_config('lock_timeout', '3s', true);
    INSERT INTO public.usage_aggregation_state (job) VALUES (p_job) ON CONFLICT (job) DO NOTHING;
    SELECT * INTO s FROM public.usage_aggregation_state WHERE job = p_job FOR UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    SELECT coalesce(jsonb_agg(x.gid ORDER BY x.prepared), '[]') INTO held FROM pg_catalog.pg_prepared_xacts x;
    RETURN jsonb_build_object('acquired', false, 'blocked', true, 'prepared', held, 'now', now());
  END;
  PERFORM set_config('lock_timeout', was, true);
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

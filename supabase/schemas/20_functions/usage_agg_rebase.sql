-- The repair after the id sequence moved backwards or a table was truncated
-- (`usage-agg aggregate --rebase`; only the lease holder may): in one
-- transaction, every watermark is reset and the cursor set to none, so the
-- rebuild that follows writes every key from its rows. The reset stays
-- recorded until that rebuild ends (usage_agg_finish_rebase): a rebase that
-- dies midway is redone, never mistaken for a normal first run.
--
-- Closed months (issue 17, case 2): before the watermarks go, each closed
-- month's key is compared with its rows up to the horizon the rebuild will
-- count to: what billing has for it (its monthly row and every late
-- adjustment) against its good raw rows up to p_horizon plus its pruned
-- rows. Rows beyond what is billed were committed and never counted (the
-- sequence moved back, so the cursor had passed their ids): they are
-- booked, as a late adjustment in the booking month, in this transaction.
-- A key with some raw rows but fewer than billed (rows deleted by hand,
-- then new ones) cannot tell its new rows from its old ones: it is
-- refused, recorded (kind 'closed'), and every run exits 65 until a person
-- decides (reopen the month and rebuild it, or book the rows with
-- `usage-agg adjust`). A key with no raw row left (a reset deleted them
-- all) has nothing uncounted: its billed totals are the record. Open
-- months' watermarks go to 0, closed months' to the horizon.
--
-- Every DELETE has a WHERE clause: Supabase's safeupdate refuses one
-- without, in a PostgREST session.
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

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_rebase(text, text, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_rebase(text, text, bigint) TO service_role;

-- Closes p_month in one transaction: refuses inside the grace window (by
-- the database's clock), while keys of the month stand refused or deleted,
-- and before the first rebuild; records the close and a snapshot of the
-- month's portal_usage_monthly rows. Closing a closed month changes nothing.
-- The caller has caught up and checked the month's keys against their raw
-- rows first (`usage-agg close`).
--
-- The locks: closes, reopenings and server-side batches take the closed
-- months in order (a batch reads them in SHARE mode for its whole
-- transaction), and a close waits for every write in flight to either
-- table to commit, so that every write is either before the close (and in
-- the snapshot, and seen by every later run) or after it (and checked
-- against it by the triggers).
CREATE OR REPLACE FUNCTION public.usage_agg_close_month(
  p_job text, p_month text, p_grace_seconds bigint, p_by text)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  c        public.usage_agg_closed_months;
  cur      bigint;
  earliest timestamptz;
  n_keys   bigint;
  n_req    bigint;
  n_ok     bigint;
  n_err    bigint;
  n_booked bigint;
  blocked  jsonb;
BEGIN
  LOCK TABLE public.usage_agg_closed_months IN SHARE ROW EXCLUSIVE MODE;
  LOCK TABLE public.portal_usage_monthly, public.portal_usage_adjustments IN SHARE MODE;
  IF NOT public.usage_agg_valid_month(p_month) THEN
    RETURN jsonb_build_object('refused', 'bad_month');
  END IF;
  SELECT * INTO c FROM public.usage_agg_closed_months WHERE month_year = p_month;
  IF FOUND AND c.closed THEN
    RETURN jsonb_build_object('already_closed', true, 'month', p_month, 'closed_at', c.closed_at,
                              'closed_by', c.closed_by, 'up_to_id', c.up_to_id, 'keys', c.keys,
                              'requests', c.request_count, 'successes', c.success_count,
                              'errors', c.error_count);
  END IF;
  earliest := public.usage_agg_month_end(p_month) + make_interval(secs => greatest(p_grace_seconds, 0));
  IF now() < earliest THEN
    RETURN jsonb_build_object('refused', 'grace', 'earliest_close_at', earliest, 'now', now());
  END IF;
  SELECT cursor_id INTO cur FROM public.usage_aggregation_state WHERE job = p_job;
  IF cur IS NULL THEN
    RETURN jsonb_build_object('refused', 'no_cursor');
  END IF;
  SELECT coalesce(jsonb_agg(k ORDER BY k), '[]') INTO blocked FROM (
    SELECT portal_id || ':' || month_year AS k FROM public.usage_agg_refused_keys
     WHERE job = p_job AND month_year = p_month
    UNION
    SELECT portal_id || ':' || month_year FROM public.usage_agg_deleted_keys WHERE month_year = p_month) x;
  IF jsonb_array_length(blocked) > 0 THEN
    RETURN jsonb_build_object('refused', 'keys', 'keys', blocked);
  END IF;
  SELECT count(*), coalesce(sum(request_count), 0), coalesce(sum(success_count), 0),
         coalesce(sum(error_count), 0)
    INTO n_keys, n_req, n_ok, n_err
    FROM public.portal_usage_monthly WHERE month_year = p_month;
  SELECT coalesce(sum(request_count), 0) INTO n_booked
    FROM public.portal_usage_adjustments WHERE booked_month = p_month;
  INSERT INTO public.usage_agg_closed_months AS t
         (month_year, closed, closed_at, closed_by, up_to_id, keys, request_count, success_count,
          error_count, booked_request_count, updated_at)
  VALUES (p_month, true, now(), p_by, cur, n_keys, n_req, n_ok, n_err, n_booked, now())
  ON CONFLICT (month_year) DO UPDATE
     SET closed = true, closed_at = now(), closed_by = excluded.closed_by, up_to_id = excluded.up_to_id,
         keys = excluded.keys, request_count = excluded.request_count,
         success_count = excluded.success_count, error_count = excluded.error_count,
         booked_request_count = excluded.booked_request_count, updated_at = now();
  INSERT INTO public.usage_agg_period_events
         (month_year, event, by, up_to_id, keys, request_count, success_count, error_count)
  VALUES (p_month, 'close', p_by, cur, n_keys, n_req, n_ok, n_err);
  RETURN jsonb_build_object('closed', true, 'month', p_month, 'closed_at', now(), 'closed_by', p_by,
                            'up_to_id', cur, 'keys', n_keys, 'requests', n_req, 'successes', n_ok,
                            'errors', n_err, 'booked_adjustments', n_booked);
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_close_month(text, text, bigint, text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_close_month(text, text, bigint, text) TO service_role;

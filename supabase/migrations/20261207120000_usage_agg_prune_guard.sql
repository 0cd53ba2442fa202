-- usage-agg: prune deletes only rows it knows are counted (issue 17).
--
-- Apply after 20261207110000_usage_agg_supabase.sql. Idempotent.
--
-- usage_agg_prune_batch deletes a closed month's raw rows up to the cursor
-- because "every row up to the cursor is counted". A run-time problem is
-- exactly a case where that does not hold: after a sequence restart, new
-- rows take ids below the cursor and are counted by no one until
-- `aggregate --rebase`. A prune then deleted them, recorded them as pruned,
-- and the rebase booked them late from that record, but with the latest
-- request time of the rows still there (found by the model-based test,
-- seed 2654341: a key's last_request_at stayed days early). A key the
-- rules refused (its rows disagree with what is billed, or its write was
-- lost) is the evidence a person needs to decide. So a batch is refused
-- ('problems') while the preflight reports a problem, and ('refused_keys')
-- while a key of a month it would prune is refused. The rest is as in
-- 20261201090000.
CREATE OR REPLACE FUNCTION public.usage_agg_prune_batch(
  p_job text, p_before text, p_batch_ids bigint DEFAULT 100000, p_dry_run boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  cur     bigint;
  months  text[];
  open_m  jsonb;
  problems jsonb;
  refused jsonb;
  lo      bigint;
  hi      bigint;
  n_del   bigint;
  n_good  bigint;
  left_rows bigint;
BEGIN
  -- No month can be reopened under a batch, and prunes take turns.
  LOCK TABLE public.usage_agg_closed_months IN SHARE ROW EXCLUSIVE MODE;
  IF NOT public.usage_agg_valid_month(p_before) THEN
    RETURN jsonb_build_object('refused', 'bad_month');
  END IF;
  SELECT cursor_id INTO cur FROM public.usage_aggregation_state WHERE job = p_job;
  IF cur IS NULL THEN
    RETURN jsonb_build_object('refused', 'no_cursor');
  END IF;
  problems := public.usage_agg_preflight(p_job)->'problems';
  IF jsonb_array_length(problems) > 0 THEN
    RETURN jsonb_build_object('refused', 'problems', 'problems', problems);
  END IF;
  SELECT coalesce(jsonb_agg(DISTINCT m.month_year ORDER BY m.month_year), '[]') INTO open_m
    FROM public.portal_usage_monthly m
   WHERE m.month_year < p_before AND NOT public.usage_agg_is_closed(m.month_year);
  IF jsonb_array_length(open_m) > 0 THEN
    RETURN jsonb_build_object('refused', 'open_months', 'months', open_m);
  END IF;
  SELECT array_agg(month_year ORDER BY month_year), min(pruned_through) INTO months, lo
    FROM public.usage_agg_closed_months WHERE closed AND month_year < p_before;
  IF months IS NULL THEN
    RETURN jsonb_build_object('done', true, 'months', '[]'::jsonb, 'deleted', 0, 'cursor', cur);
  END IF;
  SELECT coalesce(jsonb_agg(r.portal_id || ':' || r.month_year ORDER BY r.portal_id, r.month_year), '[]')
    INTO refused
    FROM public.usage_agg_refused_keys r
   WHERE r.job = p_job AND r.month_year = ANY (months);
  IF jsonb_array_length(refused) > 0 THEN
    RETURN jsonb_build_object('refused', 'refused_keys', 'keys', refused);
  END IF;
  -- Good rows still there, by the stored totals (no scan).
  SELECT coalesce(sum(x.n), 0) INTO left_rows FROM (
    SELECT request_count::bigint AS n FROM public.portal_usage_monthly WHERE month_year = ANY (months)
    UNION ALL
    SELECT request_count FROM public.portal_usage_adjustments WHERE source = 'late' AND month_year = ANY (months)
    UNION ALL
    SELECT -request_count FROM public.usage_agg_pruned WHERE month_year = ANY (months)) x;
  hi := least(cur, lo + greatest(p_batch_ids, 1));
  IF p_dry_run OR hi <= lo THEN
    RETURN jsonb_build_object('done', hi <= lo, 'dry_run', p_dry_run, 'months', to_jsonb(months),
                              'from', lo, 'to', hi, 'deleted', 0, 'rows_left', left_rows, 'cursor', cur);
  END IF;
  WITH del AS (
    DELETE FROM public.usage_requests r
     WHERE r.id > lo AND r.id <= hi AND r.month_year = ANY (months)
    RETURNING r.portal_id, r.month_year, r.success, r.request_timestamp
  ), g AS (
    SELECT d.portal_id, d.month_year,
           count(*) FILTER (WHERE d.success IS NOT NULL AND public.usage_agg_valid_time(d.request_timestamp)) AS c,
           count(*) FILTER (WHERE d.success AND public.usage_agg_valid_time(d.request_timestamp)) AS s,
           count(*) FILTER (WHERE NOT d.success AND public.usage_agg_valid_time(d.request_timestamp)) AS e,
           max(d.request_timestamp) FILTER (WHERE d.success IS NOT NULL AND public.usage_agg_valid_time(d.request_timestamp)) AS at,
           count(*) AS n
      FROM del d GROUP BY 1, 2
  ), led AS (
    INSERT INTO public.usage_agg_pruned AS p
           (portal_id, month_year, request_count, success_count, error_count, last_request_at, rows_deleted)
    SELECT portal_id, month_year, c, s, e, at, n FROM g WHERE public.usage_agg_valid_key(portal_id, month_year)
    ON CONFLICT (portal_id, month_year) DO UPDATE
       SET request_count = p.request_count + excluded.request_count,
           success_count = p.success_count + excluded.success_count,
           error_count = p.error_count + excluded.error_count,
           last_request_at = greatest(p.last_request_at, excluded.last_request_at),
           rows_deleted = p.rows_deleted + excluded.rows_deleted
    RETURNING 1
  )
  SELECT coalesce(sum(n), 0), coalesce(sum(c), 0) INTO n_del, n_good FROM g;
  UPDATE public.usage_agg_closed_months SET pruned_through = greatest(pruned_through, hi), updated_at = now()
   WHERE month_year = ANY (months);
  RETURN jsonb_build_object('done', hi >= cur, 'months', to_jsonb(months), 'from', lo, 'to', hi,
                            'deleted', n_del, 'good_deleted', n_good, 'rows_left', left_rows - n_good,
                            'cursor', cur);
END
$$;

-- CREATE OR REPLACE keeps the function's grants (service_role only, from
-- 20261207110000), so none are given here.

-- Retention: deletes one id range of the raw rows of closed months before
-- p_before, up to the cursor, adding the good ones to usage_agg_pruned per
-- key in the same transaction, so totals can still be checked once the rows
-- are gone. A batch is all or nothing, and a killed prune resumes where the
-- last batch ended (pruned_through). Call until done.
--
-- It deletes only rows it knows are counted. "Every row up to the cursor is
-- counted" does not hold while the run-time checks report a problem (after
-- a sequence restart, new rows take ids below the cursor and are counted by
-- no one until `aggregate --rebase`), so a batch is then refused
-- ('problems'); a refused key of a month it would prune is the evidence a
-- person needs to decide, so a batch is refused while one stands
-- ('refused_keys'); and it refuses while a month before p_before with usage
-- is open ('open_months').
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

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_prune_batch(text, text, bigint, boolean) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_prune_batch(text, text, bigint, boolean) TO service_role;

-- Rebuilds the keys whose monthly row was deleted (usage_agg_deleted_keys),
-- so that no key is left counting only its newer rows: each from all its
-- rows up to its highest watermark (the cursor, its late adjustments'
-- where a run booked them and died before it moved the cursor, or the
-- watermark of a monthly row a booking made again after the delete, which
-- holds only the rows of that booking), with that as its watermark; its
-- rows are its raw rows and its pruned rows, less what its late
-- adjustments hold. The keys' existing rows are locked first, so no
-- booking moves them meanwhile; a key a booking still wrote past that
-- (created meanwhile) goes back to the log for the next run. A closed
-- month is left alone (its rows cannot be deleted; a key logged before its
-- close is dropped). A restored key's refusals (a lost write, a refused
-- decrease) no longer stand, and are cleared. The log is taken with
-- `WHERE true` (Supabase's safeupdate refuses a DELETE without a WHERE in a
-- PostgREST session). Returns the keys rebuilt.
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
  PERFORM 1 FROM public.portal_usage_monthly m JOIN usage_agg_restore k
      ON m.portal_id = k.portal_id AND m.month_year = k.month_year
   ORDER BY m.portal_id, m.month_year FOR UPDATE OF m;
  WITH bound AS (
    -- Each key's rows are counted up to its highest watermark: the cursor,
    -- or above it where a late adjustment of the key counts rows a run
    -- booked before it moved the cursor (it died between the two).
    SELECT k.portal_id, k.month_year,
           greatest(c, coalesce((SELECT max(a.last_request_id) FROM public.portal_usage_adjustments a
                                  WHERE a.portal_id = k.portal_id AND a.month_year = k.month_year
                                    AND a.source = 'late'), 0),
                       coalesce((SELECT m.last_request_id FROM public.portal_usage_monthly m
                                  WHERE m.portal_id = k.portal_id AND m.month_year = k.month_year), 0)) AS upto
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
  ), relogged AS (
    -- A key with rows that was not written: a booking created its row
    -- past the bound meanwhile (after the lock above), from its own rows
    -- alone. Logged again, so the next run restores it from that row's
    -- watermark.
    INSERT INTO public.usage_agg_deleted_keys (portal_id, month_year)
    SELECT tr.portal_id, tr.month_year FROM truth tr
     WHERE tr.n > 0
       AND NOT EXISTS (SELECT 1 FROM written w WHERE w.portal_id = tr.portal_id AND w.month_year = tr.month_year)
    ON CONFLICT (portal_id, month_year) DO NOTHING
    RETURNING 1
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

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_restore_deleted_keys(text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_restore_deleted_keys(text) TO service_role;

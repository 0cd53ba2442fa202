-- usage-agg on a real Supabase project (issue 18): what a superuser's test
-- cluster hid.
--
-- Apply after 20261207100000_usage_agg_rule_book.sql (and
-- 20261207090000_usage_agg_adjust_rules.sql, whose function it grants). Idempotent.
--
-- 1. pg-safeupdate, loaded into every PostgREST session on Supabase, refuses
--    an UPDATE or DELETE without a WHERE clause, inside functions and CTEs
--    too (PostgREST answers 400 21000). Every such statement a function the
--    CLI calls over REST runs gets one: `WHERE true` where the whole table is
--    meant (the deleted-keys log is taken whole).
-- 4. Supabase's default privileges give anon, authenticated and
--    service_role ALL on every table, sequence and function postgres makes
--    in public, so a service key could PATCH the cursor or the lease, and
--    anon kept USAGE on the new sequences and EXECUTE on the trigger
--    functions. Every grant on usage-agg's own objects is revoked, then
--    exactly what each role needs is granted (the seed's two tables are the
--    app's, and keep theirs).

-- The restore of deleted monthly rows, as in 20261201090000, with a WHERE
-- clause on the DELETE that takes the log.
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
  WITH raw AS (
    SELECT k.portal_id, k.month_year,
           count(r.id) AS n,
           count(r.id) FILTER (WHERE r.success) AS s,
           count(r.id) FILTER (WHERE NOT r.success) AS e,
           max(r.request_timestamp) AS at
      FROM usage_agg_restore k
      LEFT JOIN public.usage_requests r
        ON r.portal_id = k.portal_id AND r.month_year = k.month_year AND r.id <= c
       AND r.success IS NOT NULL AND public.usage_agg_valid_time(r.request_timestamp)
     WHERE public.usage_agg_valid_key(k.portal_id, k.month_year)
     GROUP BY 1, 2
  ), truth AS (
    SELECT raw.portal_id, raw.month_year,
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
    SELECT portal_id, month_year, n, s, e, at, c, now() FROM truth WHERE n > 0
    ON CONFLICT (portal_id, month_year) DO UPDATE
       SET request_count = excluded.request_count, success_count = excluded.success_count,
           error_count = excluded.error_count, last_request_at = excluded.last_request_at,
           last_request_id = excluded.last_request_id, updated_at = now()
     WHERE t.last_request_id <= c
    RETURNING t.portal_id, t.month_year
  )
  SELECT coalesce(jsonb_agg(portal_id || ':' || month_year ORDER BY portal_id, month_year), '[]')
    INTO restored FROM written;
  RETURN restored;
END
$$;

-- 4. Grants: REVOKE ALL first, then exactly what each role needs.
DO $$
DECLARE
  api_roles text := 'PUBLIC';
  obj text;
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
    api_roles := api_roles || ', anon, authenticated';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    api_roles := api_roles || ', service_role';
  END IF;
  -- Every function and procedure of usage-agg's, trigger functions included.
  FOR obj IN
    SELECT p.oid::regprocedure::text
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = 'public' AND (p.proname LIKE 'usage\_agg\_%' OR p.proname = 'usage_current')
  LOOP
    EXECUTE format('REVOKE ALL ON ROUTINE %s FROM %s', obj, api_roles);
  END LOOP;
  -- Its own tables, and their sequences.
  FOREACH obj IN ARRAY ARRAY['public.usage_aggregation_state', 'public.usage_agg_deleted_keys',
                              'public.usage_agg_refused_keys', 'public.usage_agg_closed_months',
                              'public.usage_agg_period_events', 'public.portal_usage_adjustments',
                              'public.usage_agg_pruned'] LOOP
    EXECUTE format('REVOKE ALL ON TABLE %s FROM %s', obj, api_roles);
  END LOOP;
  FOR obj IN
    SELECT c.oid::regclass::text
      FROM pg_class c JOIN pg_depend d ON d.objid = c.oid AND d.classid = 'pg_class'::regclass
     WHERE c.relkind = 'S' AND d.refclassid = 'pg_class'::regclass
       AND d.refobjid IN ('public.usage_aggregation_state'::regclass, 'public.usage_agg_refused_keys'::regclass,
                          'public.usage_agg_deleted_keys'::regclass, 'public.usage_agg_closed_months'::regclass,
                          'public.usage_agg_period_events'::regclass, 'public.portal_usage_adjustments'::regclass,
                          'public.usage_agg_pruned'::regclass)
  LOOP
    EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM %s', obj, api_roles);
  END LOOP;

  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
    -- What the CLI calls over REST with the service key.
    FOREACH obj IN ARRAY ARRAY[
      'public.usage_agg_acquire_lease(text, text, integer, text)',
      'public.usage_agg_renew_lease(text, text, integer)',
      'public.usage_agg_advance_cursor(text, bigint)',
      'public.usage_agg_finish_run(text, text, text, bigint)',
      'public.usage_agg_safe_horizon(integer)',
      'public.usage_agg_preflight(text)',
      'public.usage_agg_book(text, bigint, bigint, jsonb, boolean, boolean)',
      'public.usage_agg_rpc_batch(text, bigint, integer, boolean)',
      'public.usage_agg_rebase(text, text, bigint)',
      'public.usage_agg_finish_rebase(text, bigint)',
      'public.usage_agg_record_refusals(text, text, jsonb)',
      'public.usage_agg_restore_deleted_keys(text)',
      'public.usage_agg_note_rejected(text, bigint, bigint[])',
      'public.usage_agg_periods()',
      'public.usage_agg_period_info(text, bigint)',
      'public.usage_agg_periods_status(bigint)',
      'public.usage_agg_close_month(text, text, bigint, text)',
      'public.usage_agg_reopen_month(text, text, text)',
      'public.usage_agg_adjust(bigint, text, bigint, bigint, bigint, text, text, text)',
      'public.usage_agg_adjust_bound()',
      'public.usage_agg_prune_batch(text, text, bigint, boolean)',
      'public.usage_agg_schedule(text, text, integer)',
      'public.usage_agg_unschedule(text)',
      'public.usage_agg_schedule_show(text, integer)',
      'public.usage_current(bigint, text)'
    ] LOOP
      EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', obj);
    END LOOP;
    -- Read, never written directly: the cursor, the lease, the refusals and
    -- the periods change only through the functions above.
    GRANT SELECT ON public.usage_aggregation_state, public.usage_agg_refused_keys,
                    public.usage_agg_closed_months, public.usage_agg_period_events,
                    public.portal_usage_adjustments, public.usage_agg_pruned TO service_role;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
    -- A quota check from the app, as a signed-in user.
    GRANT EXECUTE ON FUNCTION public.usage_current(bigint, text) TO authenticated;
  END IF;
END $$;

NOTIFY pgrst, 'reload schema';

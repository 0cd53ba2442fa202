-- Everything a run checks before counting, in one answer (docs/semantics.md,
-- "Assumptions"), so that "exit 0" means every total is right: the facts
-- (the id sequence, its cache and how far it has handed out ids, the id
-- column's default, the highest watermark of the monthly rows and of the
-- late adjustments, a recorded reset, the refused keys by kind, the deleted
-- keys, a lease whose holder is gone, the unique key the bulk upsert needs)
-- and 'problems', from usage_agg_problems. The CLI and the scheduled run
-- read the same judgement; Rust only maps each code to its exit status
-- (src/preflight.rs).
CREATE OR REPLACE FUNCTION public.usage_agg_preflight(p_job text DEFAULT 'default')
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  seq      text := pg_get_serial_sequence('public.usage_requests', 'id');
  seq_last bigint;
  seq_cache bigint;
  id_default text;
  identity char;
  st       public.usage_aggregation_state;
  newest   bigint;
  facts    jsonb;
BEGIN
  SELECT max(id) INTO newest FROM public.usage_requests;
  IF seq IS NOT NULL THEN
    seq_last := public.usage_agg_sequence_handed_out();
    SELECT seqcache INTO seq_cache FROM pg_sequence WHERE seqrelid = seq::regclass;
  END IF;
  SELECT pg_get_expr(d.adbin, d.adrelid), a.attidentity INTO id_default, identity
    FROM pg_attribute a
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE a.attrelid = 'public.usage_requests'::regclass AND a.attname = 'id';
  SELECT * INTO st FROM public.usage_aggregation_state WHERE job = p_job;
  facts := jsonb_build_object(
    'sequence', seq,
    'sequence_last_value', seq_last,
    'sequence_cache', seq_cache,
    'id_default', id_default,
    -- From the watched sequence itself: an identity column, or a default
    -- that depends on that sequence (a nextval() of another sequence would
    -- leave the watched one still while ids move on).
    'id_from_sequence', coalesce(identity IN ('a', 'd')
                                 OR (seq IS NOT NULL AND id_default LIKE 'nextval(%' AND EXISTS (
                                       SELECT 1 FROM pg_attrdef d
                                         JOIN pg_depend dep ON dep.classid = 'pg_attrdef'::regclass
                                                           AND dep.objid = d.oid
                                        WHERE d.adrelid = 'public.usage_requests'::regclass
                                          AND d.adnum = (SELECT attnum FROM pg_attribute
                                                          WHERE attrelid = 'public.usage_requests'::regclass
                                                            AND attname = 'id')
                                          AND dep.refclassid = 'pg_class'::regclass
                                          AND dep.refobjid = seq::regclass)), false),
    'newest_id', newest,
    'cursor', st.cursor_id,
    'highest_watermark', greatest(
        (SELECT max(last_request_id) FROM public.portal_usage_monthly),
        (SELECT max(last_request_id) FROM public.portal_usage_adjustments WHERE source = 'late')),
    'reset_reason', st.reset_reason,
    'reset_at', st.reset_at,
    'refused_keys', (SELECT count(*) FROM public.usage_agg_refused_keys WHERE job = p_job),
    'refused_since', (SELECT min(found_at) FROM public.usage_agg_refused_keys WHERE job = p_job),
    'refused_examples', (SELECT coalesce(jsonb_agg(x.k ORDER BY x.k), '[]') FROM (
        SELECT portal_id || ':' || month_year AS k FROM public.usage_agg_refused_keys
         WHERE job = p_job ORDER BY portal_id, month_year LIMIT 5) x),
    -- Of the refused keys, writes that were lost (a trigger or a hand edit
    -- undid them) and a rebase's closed-month keys: each a kind of its own.
    'lost_keys', (SELECT count(*) FROM public.usage_agg_refused_keys WHERE job = p_job AND kind = 'lost'),
    'closed_refused_keys', (SELECT count(*) FROM public.usage_agg_refused_keys
                             WHERE job = p_job AND kind = 'closed'),
    'deleted_keys', (SELECT count(*) FROM public.usage_agg_deleted_keys),
    -- The lease's holder is a run in this database (a scheduled run, or a
    -- CALL by hand) whose backend is gone: stale at once, whatever its
    -- expiry says (a run the statement timeout or a crash cut).
    'lease_holder_gone', (st.lease_owner ~ '^(pg_cron|sql)@.*:[0-9]{1,10}$'
                          AND substring(st.lease_owner, '^[a-z_]+@(.*):[0-9]+$') = current_database()
                          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                                           WHERE a.pid::bigint = substring(st.lease_owner, ':([0-9]+)$')::bigint)),
    -- A unique index on exactly (portal_id, month_year): what the bulk upsert's
    -- on_conflict needs (without it every key is written one by one).
    'unique_key', EXISTS (
      SELECT 1 FROM pg_index i
       WHERE i.indrelid = 'public.portal_usage_monthly'::regclass AND i.indisunique
         AND i.indnkeyatts = 2
         AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
                FROM pg_attribute a
               WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey))
             = ARRAY['month_year', 'portal_id']));
  -- Judged here, once, for the CLI and the scheduled run alike.
  RETURN facts || jsonb_build_object('problems', public.usage_agg_problems(facts));
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_preflight(text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_preflight(text) TO service_role;

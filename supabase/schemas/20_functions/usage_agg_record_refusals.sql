-- Keys a rebuild refused to change stand until a later rebuild resolves
-- them; this keeps that record. It replaces the refusals a rebuild's scope
-- can resolve (p_scope: 'all', or one month as YYYY-MM) with the ones it
-- found (each with an optional "kind", 'decrease' by default); returns how
-- many stand in all. A rebuild never writes a closed month, so it leaves
-- that month's refusals standing (kind 'closed': only a reopening and a
-- rebuild of the month resolve it). With p_horizon, the rebuild's horizon:
-- a lost write stands for a key whose highest watermark is above it, since
-- another run wrote the key after this rebuild read it, over the short
-- state, and this rebuild's write was superseded: the key is no more right
-- than before (found by the model-based soak: a --full beside an
-- incremental run cleared the record of a key that stayed short, and later
-- runs exited 0).
CREATE OR REPLACE FUNCTION public.usage_agg_record_refusals(
  p_job text, p_scope text, p_keys jsonb, p_horizon bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  n bigint;
BEGIN
  DELETE FROM public.usage_agg_refused_keys r
   WHERE r.job = p_job AND (p_scope = 'all' OR r.month_year = p_scope)
     AND NOT public.usage_agg_is_closed(r.month_year)
     AND NOT (r.kind = 'lost' AND p_horizon IS NOT NULL
              AND greatest(
                    (SELECT max(m.last_request_id) FROM public.portal_usage_monthly m
                      WHERE m.portal_id = r.portal_id AND m.month_year = r.month_year),
                    (SELECT max(a.last_request_id) FROM public.portal_usage_adjustments a
                      WHERE a.portal_id = r.portal_id AND a.month_year = r.month_year AND a.source = 'late'))
                  > p_horizon);
  INSERT INTO public.usage_agg_refused_keys (job, portal_id, month_year, stored_requests, raw_requests, kind)
  SELECT p_job, k.portal_id, k.month_year, k.stored_requests, k.raw_requests, coalesce(k.kind, 'decrease')
    FROM jsonb_to_recordset(coalesce(p_keys, '[]')) AS k(portal_id bigint, month_year text,
                                                          stored_requests bigint, raw_requests bigint,
                                                          kind text)
  ON CONFLICT (job, portal_id, month_year) DO UPDATE
     SET stored_requests = excluded.stored_requests, raw_requests = excluded.raw_requests,
         kind = excluded.kind;
  SELECT count(*) INTO n FROM public.usage_agg_refused_keys WHERE job = p_job;
  RETURN n;
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_record_refusals(text, text, jsonb, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_record_refusals(text, text, jsonb, bigint) TO service_role;

-- One month's place in its life, on the database's clock: whether it is
-- closed (by whom, when), and the earliest time it may close after a grace
-- of p_grace_seconds past its end. The clock is the database's so that no
-- host's clock decides when a month may close.
CREATE OR REPLACE FUNCTION public.usage_agg_period_info(p_month text, p_grace_seconds bigint DEFAULT 259200)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  c public.usage_agg_closed_months;
  earliest timestamptz;
BEGIN
  IF NOT public.usage_agg_valid_month(p_month) THEN
    RETURN jsonb_build_object('valid', false);
  END IF;
  SELECT * INTO c FROM public.usage_agg_closed_months WHERE month_year = p_month;
  earliest := public.usage_agg_month_end(p_month) + make_interval(secs => greatest(p_grace_seconds, 0));
  RETURN jsonb_build_object(
    'valid', true,
    'month', p_month,
    'closed', coalesce(c.closed, false),
    'closed_at', c.closed_at,
    'closed_by', c.closed_by,
    'up_to_id', c.up_to_id,
    'reopened_at', c.reopened_at,
    'reopened_by', c.reopened_by,
    'reopen_reason', c.reopen_reason,
    'now', now(),
    'current_month', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM'),
    'earliest_close_at', earliest,
    'can_close', now() >= earliest,
    'future', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM') < p_month);
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_period_info(text, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_period_info(text, bigint) TO service_role;

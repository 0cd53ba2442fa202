-- One delivery attempt of an alert (`usage-agg alerts deliver`).
CREATE OR REPLACE FUNCTION public.usage_agg_alert_attempt(p_id bigint, p_delivered boolean, p_error text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  result jsonb;
BEGIN
  UPDATE public.portal_usage_alerts a
     SET attempts = a.attempts + 1,
         last_attempt_at = now(),
         delivered_at = CASE WHEN p_delivered THEN coalesce(a.delivered_at, now()) ELSE a.delivered_at END,
         last_error = CASE WHEN p_delivered THEN a.last_error ELSE left(p_error, 1000) END
   WHERE a.id = p_id
  RETURNING jsonb_build_object('id', a.id, 'attempts', a.attempts, 'delivered_at', a.delivered_at,
                               'last_error', a.last_error)
    INTO result;
  RETURN coalesce(result, jsonb_build_object('id', p_id, 'missing', true));
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
REVOKE ALL ON FUNCTION public.usage_agg_alert_attempt(bigint, boolean, text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_alert_attempt(bigint, boolean, text) TO service_role;

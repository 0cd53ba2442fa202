-- Whether a request_timestamp is one both engines carry faithfully: NULL
-- (the seed allows it), or a finite time in years 1 to 9999. PostgREST
-- sends other values (infinity, 12025-..., ... BC) in forms a client cannot
-- write back, so they are bad rows in both engines, and both engines agree.
CREATE OR REPLACE FUNCTION public.usage_agg_valid_time(p_at timestamp)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
  SELECT p_at IS NULL OR (isfinite(p_at) AND p_at >= '0001-01-01' AND p_at < '10000-01-01')
$$;

-- Its owner alone: usage-agg's own functions call it, never the API.
REVOKE ALL ON FUNCTION public.usage_agg_valid_time(timestamp without time zone) FROM PUBLIC, anon, authenticated, service_role;

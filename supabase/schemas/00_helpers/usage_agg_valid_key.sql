-- Whether a key is one a row may count toward (docs/semantics.md, trap 5,
-- "Bad rows"): a row of any other key is a bad row, counted apart and never
-- booked. Checked per key, not per row: a batch has far fewer keys than
-- rows, and the regular expression is the costliest part of the scan.
CREATE OR REPLACE FUNCTION public.usage_agg_valid_key(p_portal_id bigint, p_month_year text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
  SELECT coalesce(p_portal_id > 0 AND p_month_year ~ '^[0-9]{4}-(0[1-9]|1[0-2])$', false)
$$;

-- Its owner alone: usage-agg's own functions call it, never the API.
REVOKE ALL ON FUNCTION public.usage_agg_valid_key(bigint, text) FROM PUBLIC, anon, authenticated, service_role;

-- usage_agg_period_events is the history of every close and reopening,
-- what tells why an invoice's month changed after it was sent: the trigger
-- usage_agg_append_only refuses every UPDATE and DELETE of it.
CREATE OR REPLACE FUNCTION public.usage_agg_append_only()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  RAISE EXCEPTION 'usage_agg: % is a history: it is never edited', TG_TABLE_NAME;
END
$$;

-- Its owner alone: it runs as a trigger, never called over REST.
REVOKE ALL ON FUNCTION public.usage_agg_append_only() FROM PUBLIC, anon, authenticated, service_role;

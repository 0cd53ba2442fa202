-- Logs a key whose monthly row was deleted (by hand, or by a restore that
-- deletes and reinserts): an incremental run would otherwise start such a
-- key again from its new rows only; instead the next run rebuilds it from
-- all its rows (usage_agg_restore_deleted_keys).
CREATE OR REPLACE FUNCTION public.usage_agg_note_deleted_key()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
BEGIN
  INSERT INTO public.usage_agg_deleted_keys (portal_id, month_year)
  VALUES (OLD.portal_id, OLD.month_year)
  ON CONFLICT (portal_id, month_year) DO UPDATE SET deleted_at = now();
  RETURN NULL;
END
$$;

-- Its owner alone: it runs as a trigger, never called over REST.
REVOKE ALL ON FUNCTION public.usage_agg_note_deleted_key() FROM PUBLIC, anon, authenticated, service_role;

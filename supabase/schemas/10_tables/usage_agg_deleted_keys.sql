-- Keys whose monthly row was deleted (by hand, or by a restore that deletes
-- and reinserts), logged by the trigger usage_agg_note_deleted_key. An
-- incremental run would otherwise start such a key again from its new rows
-- only; instead the next run rebuilds it from all its rows
-- (usage_agg_restore_deleted_keys).
CREATE TABLE public.usage_agg_deleted_keys (
  portal_id  bigint NOT NULL,
  month_year text NOT NULL,
  deleted_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (portal_id, month_year)
);
ALTER TABLE public.usage_agg_deleted_keys ENABLE ROW LEVEL SECURITY;

-- No API role reads or writes it: the preflight counts it, the restore
-- takes it.
REVOKE ALL ON TABLE public.usage_agg_deleted_keys FROM PUBLIC, anon, authenticated, service_role;

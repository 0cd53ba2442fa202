-- The guard (docs/semantics.md, trap 3), called by its trigger only when a
-- write would move a key's watermark backwards: such a write comes from a
-- run that read older data than the row already reflects. Keep the row as
-- it is; the newest state always wins, whatever order overlapping runs'
-- writes land in. Returning OLD (rather than NULL) keeps the row counted as
-- matched, so a PATCH that loses this race is not mistaken for a missing
-- row. One way past it: usage_agg_rebase sets usage_agg.rebase for its own
-- transaction only, to lower every watermark after the id sequence moved
-- backwards. Every other write keeps the rule.
CREATE OR REPLACE FUNCTION public.usage_agg_guard_watermark()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF current_setting('usage_agg.rebase', true) = 'on' THEN
    RETURN NEW;
  END IF;
  RETURN OLD;
END
$$;

-- Its owner alone: it runs as a trigger, never called over REST.
REVOKE ALL ON FUNCTION public.usage_agg_guard_watermark() FROM PUBLIC, anon, authenticated, service_role;

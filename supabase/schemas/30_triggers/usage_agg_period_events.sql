-- The history of closes and reopenings is append-only: what tells why a
-- month changed after its invoice must not itself change.
CREATE TRIGGER usage_agg_append_only
  BEFORE UPDATE OR DELETE ON public.usage_agg_period_events
  FOR EACH ROW EXECUTE FUNCTION public.usage_agg_append_only();

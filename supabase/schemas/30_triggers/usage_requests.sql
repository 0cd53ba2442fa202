-- What usage-agg watches on the app's raw table: a reset the cursor cannot
-- survive. Nothing else touches the webhook's insert path: one
-- statement-level trigger, a look at one state row per INSERT statement
-- (about 6 µs: docs/semantics.md, "Assumptions"); no row trigger, no index.

-- A row inserted at or below the cursor (a sequence set back, an id given
-- by hand): recorded as a reset.
CREATE TRIGGER usage_agg_note_low_ids
  AFTER INSERT ON public.usage_requests
  REFERENCING NEW TABLE AS usage_agg_new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_note_low_ids();

-- A TRUNCATE after the first run: recorded as a reset.
CREATE TRIGGER usage_agg_note_truncate
  AFTER TRUNCATE ON public.usage_requests
  FOR EACH STATEMENT EXECUTE FUNCTION public.usage_agg_note_truncate();

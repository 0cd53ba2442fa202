-- A row inserted with an id at or below a cursor breaks the one assumption
-- the cursor rests on: ids come from the sequence, which only moves forward.
-- It happens when the sequence is restarted or set back (ALTER SEQUENCE ...
-- RESTART, setval) or ids are given by hand, and it stays invisible once the
-- sequence has passed the cursor again, so it is recorded as a reset when
-- it happens. One call per INSERT statement, a look at one state row; it
-- writes only when it finds such a row (the webhook's insert path pays
-- about 6 µs: docs/semantics.md, "Assumptions").
CREATE OR REPLACE FUNCTION public.usage_agg_note_low_ids()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  low bigint;
BEGIN
  SELECT min(id) INTO low FROM usage_agg_new_rows;
  IF EXISTS (SELECT 1 FROM public.usage_aggregation_state WHERE cursor_id >= low) THEN
    UPDATE public.usage_aggregation_state
       SET reset_reason = format('a row was inserted into usage_requests with id %s, at or below the cursor %s '
                                 '(the id sequence was set back, or ids were given by hand)', low, cursor_id),
           reset_at = now(), updated_at = now()
     WHERE cursor_id >= low AND reset_reason IS NULL;
  END IF;
  RETURN NULL;
END
$$;

-- Its owner alone: it runs as a trigger, never called over REST.
REVOKE ALL ON FUNCTION public.usage_agg_note_low_ids() FROM PUBLIC, anon, authenticated, service_role;

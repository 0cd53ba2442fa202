-- The REST engine's door to the rules (usage_agg_book_folded): the client
-- pages through usage_requests, folds rows by key in memory, and hands the
-- folded keys here over /rpc/. p_keys is an array of folded keys,
-- {"portal_id", "month_year", "c", "s", "e", "at", "w"}, for the good rows
-- in (p_from, p_to] the client read. With p_advance, the cursor moves to
-- p_to in the same transaction (a batch is then all or nothing); that is
-- refused when the cursor is not at p_from or beyond (a rebase reset it
-- meanwhile, so the rows below p_from may not be counted), and unless
-- p_good_rows, the good rows the client folded over all the batch's calls,
-- is the number of good rows in (p_from, p_to]: a client that stopped
-- paging early (the server's silent row cap) or folded rows away can never
-- move the cursor over rows it did not count.
CREATE OR REPLACE FUNCTION public.usage_agg_book(
  p_job text, p_from bigint, p_to bigint, p_keys jsonb,
  p_advance boolean DEFAULT false, p_dry_run boolean DEFAULT false, p_good_rows bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
  c       bigint;
  result  jsonb;
  n_truth bigint;
  n_short bigint;
BEGIN
  IF jsonb_typeof(coalesce(p_keys, '[]')) <> 'array' THEN
    RAISE EXCEPTION 'usage_agg_book: p_keys must be an array' USING ERRCODE = '22023';
  END IF;
  SELECT cursor_id INTO c FROM public.usage_aggregation_state WHERE job = p_job;
  IF c IS NULL OR c < p_from THEN
    RAISE EXCEPTION 'usage_agg_book: the cursor of job % is at %, below % (a rebase reset it since this run read it): stop; the next run counts from there',
      p_job, coalesce(c::text, 'none'), p_from USING ERRCODE = '55000';
  END IF;
  CREATE TEMP TABLE IF NOT EXISTS usage_agg_fold (
    portal_id bigint, month_year text, c bigint, s bigint, e bigint, at timestamp, w bigint) ON COMMIT DROP;
  TRUNCATE pg_temp.usage_agg_fold;
  INSERT INTO pg_temp.usage_agg_fold
  SELECT k.portal_id, k.month_year, k.c, k.s, k.e, k.at, k.w
    FROM jsonb_to_recordset(coalesce(p_keys, '[]')) AS k(portal_id bigint, month_year text, c bigint,
                                                          s bigint, e bigint, at timestamp, w bigint);
  -- What a client sent is checked here, the door: every key one a good
  -- row can make, its counts adding up, its ids in the range, once.
  IF EXISTS (SELECT 1 FROM pg_temp.usage_agg_fold f
              WHERE NOT public.usage_agg_valid_key(f.portal_id, f.month_year)
                 OR f.c IS NULL OR f.s IS NULL OR f.e IS NULL
                 OR f.c < 1 OR f.s < 0 OR f.e < 0 OR f.c <> f.s + f.e OR f.c > p_to - p_from
                 OR f.w IS NULL OR f.w <= p_from OR f.w > p_to
                 OR NOT public.usage_agg_valid_time(f.at)) THEN
    RAISE EXCEPTION 'usage_agg_book: a folded key is not one a good row can make (bad key, counts that do not add up or exceed the range, or an id outside (%, %])', p_from, p_to
      USING ERRCODE = '22023';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_temp.usage_agg_fold GROUP BY portal_id, month_year HAVING count(*) > 1) THEN
    RAISE EXCEPTION 'usage_agg_book: a key is folded twice' USING ERRCODE = '22023';
  END IF;
  result := public.usage_agg_book_folded(p_job, p_from, p_to, p_dry_run);
  IF p_advance AND NOT p_dry_run THEN
    -- Every good row of the batch is counted before the cursor passes it:
    -- the client folded as many as there are over all the batch's calls,
    -- and every key with good rows there now holds its newest one (its
    -- monthly row or a late adjustment has a watermark at or above it),
    -- so a client that sent fewer keys is refused too, not only one that
    -- read fewer rows. One scan, the key checked per key.
    SELECT coalesce(sum(r.n), 0),
           count(*) FILTER (
             WHERE NOT EXISTS (SELECT 1 FROM public.portal_usage_monthly m
                                WHERE m.portal_id = r.portal_id AND m.month_year = r.month_year
                                  AND m.last_request_id >= r.w)
               AND NOT EXISTS (SELECT 1 FROM public.portal_usage_adjustments a
                                WHERE a.portal_id = r.portal_id AND a.month_year = r.month_year
                                  AND a.source = 'late' AND a.last_request_id >= r.w)
               -- A monthly row deleted meanwhile is logged, and the next
               -- run's restore counts it again from all its rows.
               AND NOT EXISTS (SELECT 1 FROM public.usage_agg_deleted_keys d
                                WHERE d.portal_id = r.portal_id AND d.month_year = r.month_year))
      INTO n_truth, n_short
      FROM (SELECT g.* FROM (
              SELECT u.portal_id, u.month_year, count(*) AS n, max(u.id) AS w
                FROM public.usage_requests u
               WHERE u.id > p_from AND u.id <= p_to AND u.success IS NOT NULL
                 AND public.usage_agg_valid_time(u.request_timestamp)
               GROUP BY 1, 2) g
             WHERE public.usage_agg_valid_key(g.portal_id, g.month_year)) r;
    IF p_good_rows IS DISTINCT FROM n_truth THEN
      RAISE EXCEPTION 'usage_agg_book: the batch (%, %] holds a different number of good rows than the % folded: not every row was read; nothing of this call is booked and the cursor stays',
        p_from, p_to, coalesce(p_good_rows::text, 'none') USING ERRCODE = '22023';
    END IF;
    IF n_short > 0 THEN
      RAISE EXCEPTION 'usage_agg_book: % keys with good rows in the batch (%, %] do not hold them yet: not every key was sent; nothing of this call is booked and the cursor stays',
        n_short, p_from, p_to USING ERRCODE = '22023';
    END IF;
    -- Checked again under the row's lock: a rebase that reset the cursor
    -- since the check above makes this batch roll back whole.
    UPDATE public.usage_aggregation_state
       SET cursor_id = greatest(cursor_id, p_to), updated_at = now()
     WHERE job = p_job AND cursor_id >= p_from
    RETURNING cursor_id INTO c;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'usage_agg_book: the cursor of job % was reset while this batch was booked (a rebase): stop; the next run counts from there',
        p_job USING ERRCODE = '55000';
    END IF;
    result := result || jsonb_build_object('cursor', c);
  END IF;
  RETURN result;
END
$$;

-- service_role alone: the CLI calls it over REST with the service key.
-- Supabase's default privileges give every new function to anon,
-- authenticated and service_role: all of it is revoked first.
REVOKE ALL ON FUNCTION public.usage_agg_book(text, bigint, bigint, jsonb, boolean, boolean, bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.usage_agg_book(text, bigint, bigint, jsonb, boolean, boolean, bigint) TO service_role;

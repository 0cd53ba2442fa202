-- Issue 22: the sizing rule costs a batch's fold per row and per key alike
-- (the fold checks each group and writes a line per key), not per row
-- alone. Measured on 1,000,000 uniform rows: the first batch (50,000 ids
-- into 30,000 keys) made a row look 1.9 microseconds to fold where the next
-- batch showed 0.6, so the second batch was sized short and a third wrote
-- every key once more. usage_agg_next_batch_ids is redefined whole; its
-- current definition is in supabase/schemas/20_functions/.

-- The next server-side batch's ids, so that it takes about p_aim_ms: the
-- one sizing rule of `aggregate --engine rpc` and of the scheduled run
-- (usage_agg_rpc_batch answers it as next_batch_ids).
--
-- A batch's time is its fold, which follows the rows it reads and the
-- keys they fold into (each group's checks and its line in the fold: the
-- fold is costed per row and per key alike), and its booking, which
-- follows the keys it books (each key written once, however many rows it
-- has), both measured on the batch just run, plus a small fixed part.
-- (Costing the fold per row alone made the small first batch, where keys
-- are many for its rows, look three times costlier a row than it is.) Sizing by time alone undershoots: twice the ids is not twice the
-- time when the rows fall on keys already in the batch, and every extra
-- batch writes those keys again (issue 22). So the keys a bigger batch
-- would touch are predicted as if its rows fell at random on K keys,
-- k = K (1 - exp(-r / K)), K solved from the batch just run (r rows on k
-- keys): where a few keys take most rows (one month active, a few big
-- portals) batches grow fast; where every row is its own key they grow in
-- proportion. The prediction is exact for rows spread at random and
-- overestimates keys (so undersizes) when rows come in runs of one key.
-- At most 64 times more and 4 times fewer ids than the batch just run
-- (the first batch is small, a guard: one step should reach the size the
-- model finds, or every key is written once more for nothing),
-- within [1000, 50,000,000]. NULL when p_aim_ms is NULL (a fixed size).
CREATE OR REPLACE FUNCTION public.usage_agg_next_batch_ids(
  p_ids bigint, p_rows bigint, p_keys bigint,
  p_fold_ms double precision, p_book_ms double precision, p_fixed_ms double precision,
  p_aim_ms double precision)
RETURNS bigint
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, public
AS $$
DECLARE
  ids     constant double precision := greatest(coalesce(p_ids, 0), 1);
  r       constant double precision := greatest(coalesce(p_rows, 0), 0);
  k       constant double precision := least(greatest(coalesce(p_keys, 0), 0), r);
  per_row constant double precision := greatest(coalesce(p_fold_ms, 0), 0) / greatest(r + k, 1);
  per_key constant double precision := greatest(coalesce(p_book_ms, 0), 0) / greatest(k, 1);
  fixed   constant double precision := greatest(coalesce(p_fixed_ms, 0), 0);
  density constant double precision := r / ids;
  lo_n    constant double precision := greatest(1000, least(50000000, floor(ids / 4)));
  hi_n    constant double precision := least(50000000, greatest(1000, ids * 64));
  big_k   double precision;
  lo      double precision;
  hi      double precision;
  mid     double precision;
  n       double precision;
  keys_n  double precision;
  t       double precision;
BEGIN
  IF p_aim_ms IS NULL THEN
    RETURN NULL;
  END IF;
  IF r = 0 THEN
    -- No row in the range (a gap in the ids): it cost next to nothing.
    RETURN hi_n::bigint;
  END IF;
  -- K, the keys the rows fall on: none to solve when no key repeated.
  IF k > 0 AND k < r * 0.999 THEN
    lo := k;
    hi := k * 2;
    WHILE hi * (1 - exp(-least(r / hi, 700))) < k AND hi < 1e15 LOOP
      hi := hi * 2;
    END LOOP;
    FOR i IN 1..60 LOOP
      mid := (lo + hi) / 2;
      IF mid * (1 - exp(-least(r / mid, 700))) < k THEN lo := mid; ELSE hi := mid; END IF;
    END LOOP;
    big_k := hi;
  END IF;
  -- The largest n whose predicted time fits the aim: the ends first, then
  -- halving the interval between them.
  lo := lo_n;
  hi := hi_n;
  FOR i IN 0..51 LOOP
    n := CASE i WHEN 0 THEN hi_n WHEN 1 THEN lo_n ELSE (lo + hi) / 2 END;
    keys_n := CASE WHEN big_k IS NULL THEN density * n
                   ELSE big_k * (1 - exp(-least(density * n / big_k, 700))) END;
    t := fixed + per_row * (density * n + keys_n) + per_key * keys_n;
    IF i = 0 THEN
      IF t <= p_aim_ms THEN RETURN hi_n::bigint; END IF;
    ELSIF i = 1 THEN
      IF t >= p_aim_ms THEN RETURN lo_n::bigint; END IF;
    ELSIF t <= p_aim_ms THEN
      lo := n;
    ELSE
      hi := n;
    END IF;
  END LOOP;
  RETURN round(lo)::bigint;
END
$$;

-- Its owner alone: usage_agg_rpc_batch calls it.
REVOKE ALL ON FUNCTION public.usage_agg_next_batch_ids(bigint, bigint, bigint, double precision, double precision, double precision, double precision) FROM PUBLIC, anon, authenticated, service_role;

//! The server-side engine (`--engine rpc`): the same work as the incremental
//! engine, done by `usage_agg_rpc_batch` in the migration, one transaction
//! per batch, until caught up. For tables past what paging rows over HTTP
//! serves: SQL aggregates millions of rows a second where paging moves
//! about a hundred thousand.

use super::{Mode, Options, Outcome};
use crate::aggregation::BadReason;
use crate::failpoint;
use crate::postgrest::{kind_of, Kind};
use crate::state::HorizonNotSafe;
use crate::store::{BatchAsk, Store, StoredFilter};

/// Ids per batch. Measured (docs/benchmarks.md): a batch of 1,000,000 rows
/// into 30,000 keys takes under a second on 2 cores, leaving a wide margin
/// under Supabase's 8 s statement timeout on a slower or busier database.
pub const DEFAULT_BATCH_IDS: u64 = 1_000_000;

/// The smallest batch the engine halves down to after statement timeouts.
pub const MIN_BATCH_IDS: u64 = 1_000;

/// The first batch when sizing by time: it books 1,000 ids, which gives
/// the cost of a key even on a slow instance where every row is its own
/// key (a batch's time follows the keys it writes), and the database folds
/// the first [`SIZING_SAMPLE_IDS`] read only, which gives how rows fall on
/// keys and what folding them costs; it sizes every batch after it from
/// those (`usage_agg_next_batch_ids`, the one sizing rule, which the
/// scheduled run uses too). A first batch of 50,000 ids booked every key of
/// a uniform table, and the next booked them all again (issue 22). With
/// `--aggressive` the first batch is the fixed default instead.
pub const FIRST_TIMED_BATCH_IDS: u64 = 1_000;

/// The ids the first timed batch folds read only, to size the next.
pub const SIZING_SAMPLE_IDS: u64 = 50_000;

/// The first timed batch without a sample: a dry run's one batch, which
/// previews this many ids (it books nothing, so a batch to learn a key's
/// cost from has no use there), and the first batch on a database before
/// the sample's migration, which sizes the next batch from itself.
pub const UNSAMPLED_FIRST_BATCH_IDS: u64 = 50_000;

/// The migration whose `usage_agg_rpc_batch` takes `p_sample_ids`.
const SAMPLE_MIGRATION: &str = "20261207230000_usage_agg_lean_batch.sql";

/// The largest batch: what `usage_agg_next_batch_ids` grows to at most.
pub const MAX_BATCH_IDS: u64 = 50_000_000;

/// How many times the batch lock is asked for again (100 ms apart) right
/// after our own batch timed out: two seconds for its rollback to finish.
const BUSY_RETRIES_AFTER_TIMEOUT: u32 = 20;

/// Whether a batch failed on the statement timeout (and so may shrink).
fn timed_out(e: &anyhow::Error) -> bool {
    kind_of(e) == Some(Kind::StatementTimeout)
}

/// Whether the database has no function taking the arguments sent (a
/// migration is missing).
fn function_missing(e: &anyhow::Error) -> bool {
    kind_of(e) == Some(Kind::MissingFunction)
}

/// Another call is running a batch for this job: exit 75, try later.
#[derive(Debug, thiserror::Error)]
#[error("another usage_agg_rpc_batch call is running for this job; it is doing this work")]
pub struct BatchBusy;

/// Calls batches until the cursor reaches the safe horizon. The caller has
/// made sure the first rebuild happened (cursor set).
pub async fn run<S: Store>(
    store: &S,
    cursor: i64,
    owner: Option<&str>,
    mut batch_ids: u64,
    opts: &Options,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome {
        mode: Mode::Rpc { batches: 0 },
        dry_run: opts.dry_run,
        ..Outcome::default()
    };
    let mut batches = 0;
    let mut last;
    let mut sample = None;
    if opts.batch_target.is_some() && opts.pace.settings().adaptive {
        if opts.dry_run {
            batch_ids = batch_ids.min(UNSAMPLED_FIRST_BATCH_IDS);
        } else {
            batch_ids = batch_ids.min(FIRST_TIMED_BATCH_IDS);
            sample = Some(SIZING_SAMPLE_IDS);
        }
    }
    // A size that ran past the statement timeout is never asked for again
    // (an aim longer than the timeout would otherwise grow back into it).
    let mut ceiling = MAX_BATCH_IDS;
    // The ids between the cursor and the safe horizon, as the last batch
    // answered (unknown before the first).
    let mut left: Option<u64> = None;
    // Busy answers right after one of our own batches timed out: that
    // batch's backend may still be rolling back and holding the batch lock
    // (the error reaches us before the lock is released), so the lock is
    // asked for again, a little later, a few times.
    let mut busy_after_timeout = 0;
    let mut lease = super::lease::Keeper::new(store, owner, opts.lease_ttl);
    loop {
        let started = std::time::Instant::now();
        let ask = BatchAsk {
            batch_ids,
            wait: opts.horizon_wait,
            dry_run: opts.dry_run,
            aim: opts.batch_target,
            sample,
        };
        // What the batch covered at most: a size past the ids the last
        // batch left covered only those, unless rows came since (a burst
        // past a few left is taken at the size asked for).
        let covered = batch_ids.min(left.filter(|&l| l > MIN_BATCH_IDS).unwrap_or(u64::MAX));
        let b = match store.rpc_batch(ask).await {
            Ok(b) => b,
            // A database before SAMPLE_MIGRATION: the first timed batch of
            // before, which sizes the next from itself.
            Err(e) if sample.is_some() && function_missing(&e) => {
                tracing::warn!(
                    "usage_agg_rpc_batch here predates {SAMPLE_MIGRATION}: apply it for a quicker catch-up; \
                     sizing from a first batch of {UNSAMPLED_FIRST_BATCH_IDS} ids instead"
                );
                sample = None;
                batch_ids = UNSAMPLED_FIRST_BATCH_IDS;
                continue;
            }
            // The first batch and its sample ran past the statement timeout
            // (a slow or busy instance): asked again without the sample,
            // which is most of it; the batch then sizes the next itself.
            Err(e) if timed_out(&e) && sample.is_some() => {
                tracing::warn!(
                    "the first batch and its sizing sample ran past the statement timeout; asking again without the sample"
                );
                sample = None;
                busy_after_timeout = BUSY_RETRIES_AFTER_TIMEOUT;
                continue;
            }
            // A batch is one transaction: one that ran past the statement
            // timeout was rolled back whole. Half the ids, and again, until
            // it fits (a small instance, a busy hour) or cannot shrink.
            Err(e) if timed_out(&e) && covered > MIN_BATCH_IDS => {
                // Half of what the batch covered, or it would cover them again.
                let smaller = (covered / 2).max(MIN_BATCH_IDS);
                tracing::warn!(
                    from = batch_ids,
                    to = smaller,
                    "a batch ran past the statement timeout; halving it"
                );
                outcome.batches_halved += 1;
                ceiling = smaller;
                batch_ids = smaller;
                busy_after_timeout = BUSY_RETRIES_AFTER_TIMEOUT;
                continue;
            }
            Err(e) => return Err(e),
        };
        if b.busy && busy_after_timeout > 0 {
            busy_after_timeout -= 1;
            tracing::debug!("the batch lock is still held after our timed-out batch; asking again");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        }
        busy_after_timeout = 0;
        if b.busy {
            return Err(BatchBusy.into());
        }
        anyhow::ensure!(
            !b.needs_rebuild,
            "the server-side engine needs a first rebuild; run `aggregate` once first"
        );
        let Some(to) = b.to else {
            return Err(HorizonNotSafe {
                writers: b.writers_in_flight,
                prepared: b.prepared_in_flight,
                waited_ms: opts.horizon_wait.as_millis() as u64,
            }
            .into());
        };
        batches += 1;
        sample = None;
        let took = started.elapsed();
        outcome.batch_longest = outcome.batch_longest.max(took);
        if let Some(next) = b.next_batch_ids {
            let next = next.min(ceiling).max(MIN_BATCH_IDS);
            if next != batch_ids {
                tracing::info!(from = batch_ids, to = next, took = ?took, fold_ms = b.fold_ms, book_ms = b.book_ms, "batch size");
            }
            batch_ids = next;
        }
        tracing::info!(
            from = b.from,
            to,
            rows = b.rows,
            keys = b.keys,
            raced = b.raced_keys,
            "batch"
        );
        outcome.rows_counted += b.rows;
        // Rows the database read for this run: counted, and rejected.
        outcome.rows_read += b.rows + b.bad;
        // Keys per batch, added; made distinct after the last batch (the
        // function does not return its keys, to keep answers small).
        outcome.keys_touched += b.keys;
        outcome.keys_changed += b.keys;
        outcome.write.written += if opts.dry_run { 0 } else { b.keys };
        // Writes that did not hold: recorded by the rule book, reported.
        outcome
            .write
            .lost
            .extend(b.lost.iter().filter_map(|k| crate::booking::parse_key(k)));
        outcome.late.rows += b.late_rows;
        outcome.late.keys += b.late_keys;
        outcome.alerts.extend(b.alerts);
        outcome.bad.count += b.bad;
        for id in b.bad_ids {
            if outcome.bad.examples.len() < crate::aggregation::BAD_EXAMPLES {
                outcome.bad.examples.push((id, BadReason::RejectedBySql));
            }
        }
        last = to;
        left = b.horizon.map(|h| h.saturating_sub(to).max(0) as u64);
        opts.progress
            .advance(cursor, to, b.horizon, outcome.rows_counted);
        failpoint::hit("page");
        if opts.dry_run {
            tracing::info!(new_keys = b.new_keys, "dry run: the next batch");
            break;
        }
        if b.done {
            break;
        }
        lease.renew(to).await?;
        // A good neighbour: the webhook's inserts get the database to
        // themselves between batches (none with --aggressive), and the
        // rows-per-second ceiling holds over the run.
        let rest = opts.pace.rest_after_batch(took, b.rows + b.bad)?;
        if !rest.is_zero() {
            tracing::debug!(?rest, "resting between batches");
            lease.rest(to, rest).await?;
            outcome.batch_rest += rest;
        }
    }
    opts.progress.finish();
    outcome.mode = Mode::Rpc { batches };
    if !opts.dry_run {
        outcome.cursor = Some((Some(cursor), last));
        if batches > 1 {
            // The keys this run wrote carry a watermark it counted up to:
            // counting those rows turns the per-batch sums into distinct
            // keys, in one call (usage_agg_run_keys); before
            // SAMPLE_MIGRATION, by reading them back (a page per 1,000).
            let written = match store.run_keys(cursor, last).await {
                Ok(n) => n,
                Err(e) if function_missing(&e) => store
                    .stored(StoredFilter::WatermarkAbove(cursor), true, 1000)
                    .await?
                    .values()
                    .filter(|t| t.last_request_id <= last)
                    .count(),
                Err(e) => return Err(e),
            };
            outcome.keys_touched = written;
            outcome.keys_changed = written;
            outcome.write.written = written;
        }
    }
    Ok(outcome)
}

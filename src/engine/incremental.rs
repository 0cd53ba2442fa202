//! The incremental engine: reads only rows above the cursor, up to the safe
//! horizon, and writes each touched key's full new state (stored state plus
//! its new rows, with the newest id counted as its watermark).
//!
//! Why this is exactly once (docs/semantics.md): a key's counts and watermark are
//! one row, written in one request, so a write either happened whole or not
//! at all; the new state is computed from the stored one and only rows above
//! its watermark, so repeating a write (after a crash, or in an overlapping
//! run) cannot count a row twice; the guard in the migration refuses to move
//! a watermark back, so an older run's late write cannot undo a newer one;
//! and the cursor moves only after every key below it is written, and only
//! to the safe horizon, below which no row can still appear.

use std::collections::{BTreeSet, HashMap};

use super::{Change, LateChange, Mode, Options, Outcome};
use crate::adjustments::LateKey;
use crate::aggregation::{Fold, Key, Totals};
use crate::failpoint;
use crate::periods::{Periods, PeriodsChanged};
use crate::store::{RawFilter, Store, StoredFilter};

/// The lease was lost mid-run (it expired and another run took it): stop at
/// the next safe point. What was written is correct; exit 75.
#[derive(Debug, thiserror::Error)]
#[error("the lease expired during the run and another run took it over; stopped after moving the cursor to {cursor}")]
pub struct LeaseLost {
    pub cursor: i64,
}

/// Each key's highest watermark, over its monthly row and its late
/// adjustments: its rows up to there are counted somewhere, so new rows are
/// counted from there (docs/semantics.md, "Closed months").
fn watermarks(
    monthly: &HashMap<Key, Totals>,
    late: &HashMap<LateKey, Totals>,
) -> HashMap<Key, i64> {
    let mut out: HashMap<Key, i64> = monthly
        .iter()
        .map(|(k, t)| (*k, t.last_request_id))
        .collect();
    for ((k, _), t) in late {
        let w = out.entry(*k).or_default();
        *w = (*w).max(t.last_request_id);
    }
    out
}

/// Counts rows in (cursor, horizon], in batches of about `opts.batch_rows`.
/// `owner` is the lease holder to renew after each batch (None when dry).
/// Rows of a month `periods` says is closed go to its late adjustment
/// booked in the open month, never to its monthly row.
pub async fn run<S: Store>(
    store: &S,
    cursor: i64,
    horizon: i64,
    owner: Option<&str>,
    periods: &Periods,
    opts: &Options,
) -> anyhow::Result<Outcome> {
    // Keys a run that died (or one running now) wrote past the cursor: for
    // them, rows up to their watermark are counted already.
    let dirty = watermarks(
        &store
            .stored(StoredFilter::WatermarkAbove(cursor), true, opts.page_size)
            .await?,
        &store
            .late(StoredFilter::WatermarkAbove(cursor), opts.page_size)
            .await?,
    );
    if !dirty.is_empty() {
        tracing::info!(
            keys = dirty.len(),
            "keys already counted past the cursor (an earlier run stopped midway)"
        );
    }

    let mut outcome = Outcome {
        mode: Mode::Incremental,
        dry_run: opts.dry_run,
        ..Outcome::default()
    };
    let mut touched = BTreeSet::new();
    let mut changed = BTreeSet::new();
    let mut late_changed = BTreeSet::new();
    // Batches by id range (ids and rows are nearly one to one). A dry run
    // cannot see its own unwritten batches: one batch, then.
    let batch_ids = if opts.dry_run {
        i64::MAX
    } else {
        opts.batch_rows.max(1).min(i64::MAX as u64) as i64
    };
    opts.progress.scan(cursor, Some(horizon));
    outcome.cursor = (!opts.dry_run).then_some((Some(cursor), cursor));
    let mut start = cursor;
    let mut lease = super::lease::Keeper::new(store, owner, opts.lease_ttl);
    while start < horizon {
        let end = start.saturating_add(batch_ids).min(horizon);
        let mut fold = Fold::default();
        let floor = |k: &Key| dirty.get(k).map_or(start, |w| (*w).max(start));
        let mut scan = store.scan(RawFilter::All, start, end, opts.page_size, &opts.pace);
        while let Some(page) = lease.wait(start, scan.next_page()).await?? {
            for row in &page {
                fold.add(row, |k, id| id > floor(k));
            }
            outcome.rows_read += page.len() as u64;
            opts.progress.advance(
                cursor,
                start + scan.rows_read as i64,
                Some(horizon),
                outcome.rows_read,
            );
            failpoint::hit("page");
            // A paced batch can outlast the lease: renewed every third of
            // its life, as rebuilds do, not only between batches.
            lease.renew_if_due(start).await?;
        }
        outcome.rows_counted += fold.good_rows();
        touched.extend(fold.groups.keys().copied());
        let (changes, late) = settle(store, &fold, start, end, &dirty, periods, opts).await?;
        if !opts.dry_run {
            if !changes.is_empty() {
                let states: Vec<_> = changes.iter().map(|c| (c.key, c.after)).collect();
                let w = store.write(&states, true).await;
                outcome
                    .write
                    .absorb(refused_if_periods_changed(store, periods, w).await?);
            }
            if !late.is_empty() {
                let states: Vec<_> = late
                    .iter()
                    .map(|c| ((c.key, c.booked), c.after, c.counted_from))
                    .collect();
                let w = store.write_late(&states).await;
                outcome
                    .write
                    .absorb(refused_if_periods_changed(store, periods, w).await?);
            }
            if !outcome.write.lost.is_empty() {
                // The cursor must not pass rows whose counts did not land:
                // stop here, loudly (exit 65); the next run tries again.
                break;
            }
            failpoint::hit("before-cursor");
            let now = store.advance(end).await?;
            failpoint::hit("after-cursor");
            outcome.cursor = Some((Some(cursor), now));
            if end < horizon {
                lease.renew(now).await?;
            }
        }
        outcome.bad.merge(fold.bad);
        changed.extend(changes.iter().map(|c| c.key));
        outcome.late.rows += late
            .iter()
            .map(|c| c.after.requests - c.before.map_or(0, |b| b.requests))
            .sum::<i64>() as u64;
        late_changed.extend(late.iter().map(|c| (c.key, c.booked)));
        if opts.dry_run {
            outcome.changes.extend(changes);
            outcome.late.changes.extend(late);
        }
        start = end;
    }
    opts.progress.finish();
    outcome.keys_touched = touched.len();
    outcome.keys_changed = changed.len();
    outcome.late.keys = late_changed.len();
    Ok(outcome)
}

/// A write the database refused because a month was closed or reopened
/// since the run read them is [`PeriodsChanged`] (exit 75): nothing wrong
/// was written, and the next run routes the rows by the new months.
pub(crate) async fn refused_if_periods_changed<S: Store, T>(
    store: &S,
    periods: &Periods,
    result: anyhow::Result<T>,
) -> anyhow::Result<T> {
    let err = match result {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    match store.periods().await {
        Ok(now) if now != *periods => Err(PeriodsChanged {
            now: now
                .closed()
                .map(|m| m.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            detail: format!("{err:#}"),
        }
        .into()),
        _ => Err(err),
    }
}

/// Each touched key's new state: what is stored now plus its rows above its
/// highest stored watermark, up to `end`, for its monthly row, or, when its
/// month is closed, for its late adjustment booked in the open month. The
/// rows folded assumed the watermarks read before the scan; when another
/// run has written the key since, its rows are read again from the new
/// watermark (rare: only under overlap).
async fn settle<S: Store>(
    store: &S,
    fold: &Fold,
    start: i64,
    end: i64,
    dirty: &HashMap<Key, i64>,
    periods: &Periods,
    opts: &Options,
) -> anyhow::Result<(Vec<Change>, Vec<LateChange>)> {
    let keys: Vec<Key> = fold.groups.keys().copied().collect();
    let (stored, late) = tokio::try_join!(
        store.stored_for(&keys, opts.page_size),
        store.late_for(&keys, opts.page_size)
    )?;
    let marks = watermarks(&stored, &late);
    // Keys another run wrote meanwhile are counted again from their new
    // watermark, all of them in one scan of the batch's range (one scan
    // per key made a run beside another hundreds of times slower).
    let mut settled: Vec<(Key, i64, Option<Totals>)> = Vec::new();
    let mut recount: HashMap<Key, i64> = HashMap::new();
    for (key, delta) in &fold.groups {
        let now = marks.get(key).copied().unwrap_or(0);
        let assumed = dirty.get(key).map_or(start, |w| (*w).max(start));
        let from = now.max(start);
        if from == assumed {
            settled.push((*key, from, Some(*delta)));
        } else if now < end {
            recount.insert(*key, from);
            settled.push((*key, from, None));
        } // else: another run counted this key further than we read
    }
    let recounted = if recount.is_empty() {
        HashMap::new()
    } else {
        tracing::info!(
            keys = recount.len(),
            "keys written by another run meanwhile; recounting their rows in one scan"
        );
        recount_keys(store, &recount, end, opts).await?
    };
    let mut changes = Vec::new();
    let mut late_changes = Vec::new();
    for (key, from, delta) in settled {
        let delta = delta.unwrap_or_else(|| recounted.get(&key).copied().unwrap_or_default());
        let key = &key;
        if delta.requests == 0 {
            continue;
        }
        if periods.is_closed(key.month) {
            let booked = periods.booking_month(key.month);
            let before = late.get(&(*key, booked)).copied();
            late_changes.push(LateChange {
                key: *key,
                booked,
                before,
                after: before.unwrap_or_default().plus(delta),
                counted_from: from,
            });
        } else {
            let before = stored.get(key).copied();
            changes.push(Change {
                key: *key,
                before,
                after: before.unwrap_or_default().plus(delta),
            });
        }
    }
    Ok((changes, late_changes))
}

/// Each key's rows above its own watermark (`from`), up to `upto`: one
/// scan of the range above the lowest of them, every row folded only into
/// a key it is above the watermark of.
async fn recount_keys<S: Store>(
    store: &S,
    from: &HashMap<Key, i64>,
    upto: i64,
    opts: &Options,
) -> anyhow::Result<HashMap<Key, Totals>> {
    let lowest = from.values().copied().min().unwrap_or(upto);
    let mut scan = store.scan(RawFilter::All, lowest, upto, opts.page_size, &opts.pace);
    let mut fold = Fold::default();
    while let Some(page) = scan.next_page().await? {
        for row in &page {
            fold.add(row, |k, id| from.get(k).is_some_and(|f| id > *f));
        }
    }
    Ok(fold.groups.into_iter().collect())
}

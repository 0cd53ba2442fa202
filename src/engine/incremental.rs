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

use std::collections::BTreeSet;

use futures_util::stream::{FuturesUnordered, StreamExt};

use super::{Change, LateChange, Mode, Options, Outcome};
use crate::aggregation::{Fold, Key, Totals};
use crate::booking::{Booked, KEYS_PER_CALL};
use crate::failpoint;
use crate::store::{RawFilter, Store};

/// Counts rows in (cursor, horizon], in batches of about `opts.batch_rows`:
/// each batch's rows are read, folded by key, and handed to the rule book
/// in the database (docs/semantics.md, "Booking a row"), which decides for
/// each key where its rows go and which of them are new, and moves the
/// cursor with the batch's last call. `owner` is the lease holder to renew
/// (None when dry).
pub async fn run<S: Store>(
    store: &S,
    cursor: i64,
    horizon: i64,
    owner: Option<&str>,
    opts: &Options,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome {
        mode: Mode::Incremental,
        dry_run: opts.dry_run,
        ..Outcome::default()
    };
    let mut touched = BTreeSet::new();
    let mut superseded = 0u64;
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
        let mut scan = store.scan(RawFilter::All, start, end, opts.page_size, &opts.pace);
        while let Some(page) = lease.wait(start, scan.next_page()).await?? {
            for row in &page {
                fold.add(row, |_, _| true);
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
        let good_rows = fold.good_rows();
        outcome.rows_counted += good_rows;
        touched.extend(fold.groups.keys().copied());
        outcome.bad.merge(std::mem::take(&mut fold.bad));
        let keys: Vec<(Key, Totals)> = fold.groups.into_iter().collect();
        // At least one call, so that a batch with no good rows still moves
        // the cursor; the last call moves it, after every other call of the
        // batch is booked. The others hold disjoint keys, so they go
        // `--concurrency` at a time: each is a transaction of its own and
        // its keys' locks, and a run killed between them leaves keys
        // counted past the cursor, which the next booking counts again
        // from their watermarks.
        let mut calls: Vec<&[(Key, Totals)]> = if keys.is_empty() {
            vec![&[]]
        } else {
            keys.chunks(KEYS_PER_CALL).collect()
        };
        let last_call = calls.pop().expect("at least one call");
        let mut waiting = calls.into_iter();
        let mut in_flight = FuturesUnordered::new();
        loop {
            while in_flight.len() < opts.pace.settings().max_concurrency {
                let Some(chunk) = waiting.next() else { break };
                failpoint::hit("chunk");
                in_flight.push(store.book(start, end, chunk, None, opts.dry_run));
            }
            let Some(b) = in_flight.next().await else {
                break;
            };
            let b = b?;
            superseded += b.superseded_keys;
            absorb(&mut outcome, b, opts.dry_run);
        }
        failpoint::hit("chunk");
        failpoint::hit("before-cursor");
        let b = store
            .book(
                start,
                end,
                last_call,
                (!opts.dry_run).then_some(good_rows),
                opts.dry_run,
            )
            .await?;
        superseded += b.superseded_keys;
        absorb(&mut outcome, b, opts.dry_run);
        if opts.dry_run {
            start = end;
            continue;
        }
        failpoint::hit("after-cursor");
        outcome.cursor = Some((Some(cursor), end));
        if end < horizon {
            lease.renew(end).await?;
        }
        start = end;
    }
    opts.progress.finish();
    outcome.keys_touched = touched.len();
    outcome.keys_changed = touched.len().saturating_sub(superseded as usize);
    Ok(outcome)
}

/// One booking's answer, added to the run's outcome.
fn absorb(outcome: &mut Outcome, b: Booked, dry_run: bool) {
    if !dry_run {
        outcome.write.written += b.keys;
    }
    outcome
        .write
        .lost
        .extend(b.lost.iter().filter_map(|k| crate::booking::parse_key(k)));
    outcome.late.rows += b.late_rows;
    outcome.late.keys += b.late_keys;
    outcome.alerts.extend(b.alerts);
    if b.raced_keys > 0 {
        tracing::info!(
            keys = b.raced_keys,
            "keys another run counted part of this batch for; counted again from their watermarks"
        );
    }
    for c in b.changes {
        let Some(key) = crate::booking::parse_key(&format!("{}:{}", c.portal_id, c.month_year))
        else {
            continue;
        };
        let before = c.before.as_ref().map(|t| t.totals());
        let after = c.after.totals();
        match c
            .booked_month
            .as_deref()
            .and_then(crate::aggregation::Month::parse)
        {
            Some(booked) => outcome.late.changes.push(LateChange {
                key,
                booked,
                before,
                after,
                counted_from: c.counted_from,
            }),
            None => outcome.changes.push(Change { key, before, after }),
        }
    }
}

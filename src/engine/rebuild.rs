//! Recomputing keys from all their rows: the engine without the migration,
//! and with it the first run, `--full`, `--month`, `--rebase` and `verify`.
//!
//! O(all rows) (or one month's), but it needs nothing beyond the seed's
//! schema, and a rerun changes nothing. Before overwriting, it reports every
//! stored key that disagreed with its own rows (drift), and it never lowers a
//! stored count unless told to (`--allow-decrease`): billing has read it.

use std::collections::{BTreeSet, HashMap};

use super::{Change, Mode, Options, Outcome};
use crate::aggregation::{Fold, Key, Month, Totals};
use crate::failpoint;
use crate::periods::{minus, Periods, PeriodsChanged};
use crate::progress::Progress;
use crate::store::{RawFilter, Refusal, RefusalKind, Store, StoredFilter};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    All,
    Month(Month),
}

/// With the migration: the cursor, and the safe horizon to count up to.
#[derive(Debug, Clone, Copy)]
pub struct Marks {
    pub cursor: Option<i64>,
    pub horizon: i64,
}

/// Rows counted three ways in one scan.
pub struct Recount {
    pub rows_read: u64,
    /// Every good row (up to the horizon): the state to write.
    pub fresh: Fold,
    /// Each key's rows up to the point its stored row claims to cover: what
    /// the stored row should hold, to tell drift from rows not yet counted.
    pub reference: Fold,
    /// Each stored key's rows above what it claims to cover, up to the
    /// horizon: what an incremental run would add. A key whose decrease is
    /// refused is still brought forward by these, so its new rows are
    /// counted while its excess stands (docs/semantics.md, "Rebuilds").
    pub above: Fold,
    /// Closed months' rows above the cursor, up to the horizon: a rebuild
    /// leaves closed months alone, so before it moves the cursor past these
    /// they go to the rule book, which books them late (or finds them
    /// counted).
    pub closed_new: Fold,
    /// The monthly rows in scope.
    pub stored: HashMap<Key, Totals>,
    /// Each key's late adjustments, summed (the watermark: their highest).
    pub late: HashMap<Key, Totals>,
    /// Each key's good raw rows that prune deleted.
    pub pruned: HashMap<Key, Totals>,
    /// The closed months when the scan started.
    pub periods: Periods,
    marks: Option<Marks>,
}

/// The lease a long scan keeps renewing: its holder and time to live.
#[derive(Debug, Clone, Copy)]
pub struct Renewal<'a> {
    pub owner: &'a str,
    pub ttl: std::time::Duration,
}

/// Counts `scope`'s rows against what is stored. With `renewal`, the lease
/// is renewed every third of its life, so a rebuild longer than the lease
/// keeps it (and stops, exit 75, if another run took it).
///
/// What is stored for a key is its monthly row plus its late adjustments
/// (docs/semantics.md, "Closed months"), and its rows are the raw rows
/// there now plus those prune deleted.
#[allow(clippy::too_many_arguments)]
pub async fn recount<S: Store>(
    store: &S,
    scope: Scope,
    marks: Option<Marks>,
    periods: &Periods,
    page_size: usize,
    pace: &crate::pace::Pace,
    progress: &Progress,
    renewal: Option<Renewal<'_>>,
) -> anyhow::Result<Recount> {
    // After the horizon, before the stored rows are read: where a run that
    // overlaps this one can write keys past the horizon (tests pause here).
    failpoint::hit("recount");
    let with_watermark = marks.is_some();
    let (raw_filter, stored_filter) = match scope {
        Scope::All => (RawFilter::All, StoredFilter::All),
        Scope::Month(m) => (RawFilter::Month(m), StoredFilter::Month(m)),
    };
    let stored = store
        .stored(stored_filter, with_watermark, page_size)
        .await?;
    let (late, pruned) = if with_watermark {
        let mut late: HashMap<Key, Totals> = HashMap::new();
        for ((k, _), t) in store.late(stored_filter, page_size).await? {
            let e = late.entry(k).or_default();
            *e = e.plus(t);
        }
        let month = match scope {
            Scope::All => None,
            Scope::Month(m) => Some(m),
        };
        (late, store.pruned(month, page_size).await?)
    } else {
        (HashMap::new(), HashMap::new())
    };
    // After what prune deleted is read, before the raw scan: a prune batch
    // here deletes rows the scan then does not see (`verify` checks such
    // months again; tests prune here).
    failpoint::hit("pruned");
    let counted = counted(&stored, &late);

    let cursor = marks.and_then(|m| m.cursor).unwrap_or(0);
    // A stored key with a watermark covers its rows up to it (and, once the
    // cursor passed, up to the cursor: no row of the key lies between). One
    // without (before the migration, or never written by it) claims all rows.
    // A watermark of 0 once the cursor is set (a key whose rows a rebase
    // took as counted: a reopened month's late adjustment, say) covers up
    // to the cursor like any other; only before the first cursor does it
    // mean a row written before the migration, which claims every row
    // (found by the model-based test: verify reported such a key as drift).
    let cursor_set = marks.and_then(|m| m.cursor).is_some();
    let covers = |key: &Key, id: i64| match counted.get(key) {
        Some(s) if with_watermark && (s.last_request_id > 0 || cursor_set) => {
            id <= s.last_request_id.max(cursor)
        }
        Some(_) => marks.is_none_or(|m| id <= m.horizon),
        None => !with_watermark || id <= cursor,
    };
    // Keys another run counted past the horizon are checked up to their own
    // watermark: those ids were below a horizon then, so they are complete.
    let scan_end = marks.map(|m| {
        counted
            .values()
            .map(|s| s.last_request_id)
            .fold(m.horizon, i64::max)
    });
    let horizon = marks.map(|m| m.horizon);

    let above_floor = |key: &Key, id: i64| {
        horizon.is_some_and(|h| id <= h)
            && counted
                .get(key)
                .is_some_and(|s| id > s.last_request_id.max(cursor))
    };
    let mut fresh = Fold::default();
    let mut reference = Fold::default();
    let mut above = Fold::default();
    let mut closed_new = Fold::default();
    let standing = marks.and_then(|m| m.cursor).unwrap_or(0);
    let mut lease = super::lease::Keeper::new(
        store,
        renewal.map(|r| r.owner),
        renewal.map_or(std::time::Duration::ZERO, |r| r.ttl),
    );
    // Without the migration there is no horizon: count what is there now.
    let end = match scan_end {
        Some(e) => e,
        None => store.newest_id().await?,
    };
    let mut scan = store.scan(raw_filter, 0, end, page_size, pace);
    progress.scan(0, Some(end));
    while let Some(page) = lease.wait(standing, scan.next_page()).await?? {
        for row in &page {
            fresh.add(row, |_, id| horizon.is_none_or(|h| id <= h));
            reference.add(row, covers);
            if with_watermark {
                above.add(row, above_floor);
                closed_new.add(row, |k, id| {
                    periods.is_closed(k.month) && id > cursor && horizon.is_some_and(|h| id <= h)
                });
            }
        }
        progress.advance(0, scan.rows_read as i64, Some(end), scan.rows_read);
        failpoint::hit("page");
        lease.renew_if_due(standing).await?;
    }
    progress.finish();
    Ok(Recount {
        rows_read: scan.rows_read,
        fresh,
        reference,
        above,
        closed_new,
        stored,
        late,
        pruned,
        periods: periods.clone(),
        marks,
    })
}

/// Each key's monthly row plus its late adjustments.
fn counted(stored: &HashMap<Key, Totals>, late: &HashMap<Key, Totals>) -> HashMap<Key, Totals> {
    let mut out = stored.clone();
    for (k, t) in late {
        let e = out.entry(*k).or_default();
        *e = e.plus(*t);
    }
    out
}

impl Recount {
    /// Takes `m`'s keys from `again`, a recount of that month alone, in
    /// place of this one's: every fold, stored row, adjustment and pruned
    /// row of the month (`verify`, when a prune deleted rows of it while
    /// this recount read them). Rows of other months, and the bad rows
    /// (those of `m` were seen by both), stay as this recount found them.
    pub fn replace_month(&mut self, m: Month, again: Recount) {
        fn take<V>(mine: &mut HashMap<Key, V>, m: Month, theirs: HashMap<Key, V>) {
            mine.retain(|k, _| k.month != m);
            mine.extend(theirs.into_iter().filter(|(k, _)| k.month == m));
        }
        fn take_fold(mine: &mut Fold, m: Month, theirs: Fold) {
            mine.groups.retain(|k, _| k.month != m);
            mine.groups
                .extend(theirs.groups.into_iter().filter(|(k, _)| k.month == m));
        }
        self.rows_read += again.rows_read;
        take_fold(&mut self.fresh, m, again.fresh);
        take_fold(&mut self.reference, m, again.reference);
        take_fold(&mut self.above, m, again.above);
        take(&mut self.stored, m, again.stored);
        take(&mut self.late, m, again.late);
        take(&mut self.pruned, m, again.pruned);
    }

    /// What is stored for a key: its monthly row plus its late adjustments.
    pub fn counted(&self, key: &Key) -> Option<Totals> {
        match (self.stored.get(key), self.late.get(key)) {
            (None, None) => None,
            (m, l) => Some(
                m.copied()
                    .unwrap_or_default()
                    .plus(l.copied().unwrap_or_default()),
            ),
        }
    }

    /// What a key's monthly row should hold, given what its rows hold:
    /// those rows, plus the ones prune deleted, minus its late adjustments.
    fn monthly_of(&self, key: &Key, rows: Totals) -> Totals {
        let pruned = self.pruned.get(key).copied().unwrap_or_default();
        let late = self.late.get(key).copied().unwrap_or_default();
        minus(
            rows.plus(Totals {
                last_request_id: 0,
                ..pruned
            }),
            late,
        )
    }

    /// Stored keys (monthly row and late adjustments together) whose values
    /// disagree with their own rows (those there, and those prune deleted);
    /// with `missing`, also keys whose rows should be counted but have no
    /// row.
    pub fn drift(&self, missing: bool) -> Vec<Change> {
        let keys: BTreeSet<&Key> = self
            .stored
            .keys()
            .chain(self.late.keys())
            .chain(self.pruned.keys())
            .chain(self.reference.groups.keys())
            .collect();
        keys.into_iter()
            .filter_map(|key| {
                let before = self.counted(key);
                let rows = self.reference.groups.get(key).copied().unwrap_or_default();
                let truth = match self.pruned.get(key) {
                    Some(p) => rows.plus(*p),
                    None => rows,
                };
                let differs = match before {
                    Some(b) => !b.same_values(&truth),
                    None => missing && truth.requests > 0,
                };
                differs.then_some(Change {
                    key: *key,
                    before,
                    after: truth,
                })
            })
            .collect()
    }

    /// The writes that bring every key in scope to "all its rows up to the
    /// horizon", with the horizon as its watermark (docs/semantics.md,
    /// "Rebuilds"): a deleted or moved newest row is then no obstacle, and
    /// a key another run counted past the horizon is left to that run (the
    /// guard would keep its state anyway). A write that would lower a
    /// stored count is refused unless `allow_decrease`; the key is then
    /// brought forward by its new rows only, as an incremental run would.
    ///
    /// A closed month's keys are left alone: their monthly rows never
    /// change (docs/semantics.md, "Closed months"). A key with late
    /// adjustments (its month was closed, then reopened) is brought to its
    /// rows minus those adjustments.
    pub fn plan(&self, allow_decrease: bool) -> Plan {
        let horizon = self.marks.map(|m| m.horizon);
        let keys: BTreeSet<&Key> = self
            .fresh
            .groups
            .keys()
            .chain(self.stored.keys())
            .chain(self.late.keys())
            .filter(|k| !self.periods.is_closed(k.month))
            .collect();
        let mut plan = Plan::default();
        for key in keys {
            let before = self.stored.get(key).copied();
            let newest = self.fresh.groups.get(key).copied().unwrap_or_default();
            let truth = self.monthly_of(key, newest);
            if let (Some(h), Some(c)) = (horizon, self.counted(key)) {
                if c.last_request_id > h {
                    continue;
                }
            }
            let after = match horizon {
                Some(h) => Totals {
                    last_request_id: h,
                    ..truth
                },
                None => truth,
            };
            let needed = match before {
                None => truth.requests > 0,
                // Same values: right at its own watermark too, unless rows
                // above that watermark are in the counts (a table written
                // before the migration, watermark 0).
                Some(b) => {
                    !b.same_values(&after)
                        || (horizon.is_some() && b.last_request_id < truth.last_request_id)
                }
            };
            if !needed {
                continue;
            }
            let change = Change {
                key: *key,
                before,
                after,
            };
            // Counted rows gone (deleted, or moved to another key) lower
            // what billing has read, even when new rows hide it in the total.
            let reference = self.monthly_of(
                key,
                self.reference.groups.get(key).copied().unwrap_or_default(),
            );
            let counted_gone = Change {
                key: *key,
                before,
                after: reference,
            };
            if allow_decrease || !(change.decreases() || counted_gone.decreases()) {
                plan.writes.push(change);
                continue;
            }
            if let (Some(h), Some(b)) = (horizon, before) {
                let new = self.above.groups.get(key).copied().unwrap_or_default();
                if new.requests > 0 {
                    plan.writes.push(Change {
                        key: *key,
                        before,
                        after: Totals {
                            last_request_id: h,
                            ..b.plus(new)
                        },
                    });
                }
            }
            plan.refused.push(if counted_gone.decreases() {
                counted_gone
            } else {
                change
            });
        }
        plan
    }
}

/// What a rebuild writes, and what it refuses to lower.
#[derive(Debug, Default)]
pub struct Plan {
    pub writes: Vec<Change>,
    pub refused: Vec<Change>,
}

/// Rebuilds `scope`, and with the migration and the whole table in scope,
/// moves the cursor to the horizon (for a rebase, ends the rebase too).
pub async fn run<S: Store>(
    store: &S,
    scope: Scope,
    marks: Option<Marks>,
    periods: &Periods,
    rebase: bool,
    opts: &Options,
) -> anyhow::Result<Outcome> {
    let renewal = opts.owner.as_deref().map(|owner| Renewal {
        owner,
        ttl: opts.lease_ttl,
    });
    if let Scope::Month(m) = scope {
        if periods.is_closed(m) {
            // Nothing to rebuild: its rows never change while it is closed.
            return Ok(Outcome {
                mode: Mode::Month(m),
                dry_run: opts.dry_run,
                closed_left_alone: vec![m],
                ..Outcome::default()
            });
        }
    }
    let rc = recount(
        store,
        scope,
        marks,
        periods,
        opts.page_size,
        &opts.pace,
        &opts.progress,
        renewal,
    )
    .await?;
    let plan = rc.plan(opts.allow_decrease);
    let mode = match (scope, marks) {
        _ if rebase => Mode::Rebase,
        (Scope::Month(m), _) => Mode::Month(m),
        (Scope::All, None) => Mode::RecomputeWithoutMigration,
        (Scope::All, Some(m)) => Mode::Rebuild {
            first_run: m.cursor.is_none(),
        },
    };
    let mut outcome = Outcome {
        mode,
        rows_read: rc.rows_read,
        rows_counted: rc.fresh.good_rows(),
        keys_touched: rc.fresh.groups.len(),
        drift: if marks.is_some() || scope != Scope::All {
            rc.drift(false)
                .into_iter()
                .filter(|c| !periods.is_closed(c.key.month))
                .collect()
        } else {
            Vec::new()
        },
        closed_left_alone: match scope {
            Scope::All => periods.closed().collect(),
            Scope::Month(_) => Vec::new(),
        },
        refused_decreases: plan.refused,
        dry_run: opts.dry_run,
        ..Outcome::default()
    };
    outcome.keys_changed = plan.writes.len();
    // The months whose quotas' crossings the writes may reach (closed
    // months are never written).
    let months: Vec<Month> = plan
        .writes
        .iter()
        .map(|c| c.key.month)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if opts.dry_run && marks.is_some() {
        // What the run would record (docs/quotas.md, "`--dry-run`"): the
        // database judges the planned totals as it would the written ones.
        let planned: Vec<(Key, i64)> = plan
            .writes
            .iter()
            .map(|c| (c.key, c.after.requests))
            .collect();
        outcome.alerts = store.preview_crossings(&planned, &months, None).await?;
    }
    if !opts.dry_run {
        // Before the first write, the months whose crossings are pending:
        // a rebuild writes outside the rule book, and one killed between
        // its writes and their record leaves them noted, for the next run
        // to record whatever the cursor did (docs/quotas.md, "Where
        // crossings are recorded").
        let pending = match marks {
            Some(_) if !months.is_empty() => store.mark_crossings_pending(&months).await?,
            _ => false,
        };
        if !plan.writes.is_empty() {
            let states: Vec<_> = plan.writes.iter().map(|c| (c.key, c.after)).collect();
            let w = store.write(&states, marks.is_some()).await;
            outcome.write = refused_if_periods_changed(store, periods, w).await?;
            outcome.keys_changed = outcome.write.written;
        }
        if let Some(m) = marks {
            // Refused decreases and lost writes stand alike, recorded,
            // until a rebuild of their month finds them right.
            let mut refused: Vec<Refusal> = outcome
                .refused_decreases
                .iter()
                .map(|c| Refusal {
                    key: c.key,
                    stored: c.before.map_or(0, |b| b.requests),
                    raw: c.after.requests,
                    kind: RefusalKind::Decrease,
                })
                .collect();
            refused.extend(
                plan.writes
                    .iter()
                    .filter(|c| outcome.write.lost.contains(&c.key))
                    .map(|c| Refusal {
                        key: c.key,
                        stored: c.before.map_or(0, |b| b.requests),
                        raw: c.after.requests,
                        kind: RefusalKind::Lost,
                    }),
            );
            let scope_name = match scope {
                Scope::Month(m) => m.to_string(),
                Scope::All => "all".to_string(),
            };
            outcome.refusals_standing.count = store
                .record_refusals(&scope_name, &refused, m.horizon)
                .await?;
            // Closed months' rows the cursor is about to pass: to the rule
            // book, which books them as late adjustments (a rebase books
            // them itself, before its watermarks go).
            if let (Scope::All, Some(cursor), false) = (scope, m.cursor, rebase) {
                let closed: Vec<(Key, Totals)> =
                    rc.closed_new.groups.iter().map(|(k, t)| (*k, *t)).collect();
                if !closed.is_empty() {
                    let b = store.book(cursor, m.horizon, &closed, None, false).await?;
                    outcome.late.rows += b.late_rows;
                    outcome.late.keys += b.late_keys;
                    outcome
                        .write
                        .lost
                        .extend(b.lost.iter().filter_map(|k| crate::booking::parse_key(k)));
                }
            }
            // The quotas' crossings of the months it wrote: a rebuild writes
            // outside the rule book, so it records them after its writes,
            // before the cursor moves, and clears the months it noted
            // pending, in one transaction (docs/quotas.md, "Where crossings
            // are recorded"). Without the migration that notes them, as
            // before it: every open month (a full rebuild) or its month.
            let record = || async {
                if pending {
                    store.sweep_pending_crossings().await
                } else {
                    let scoped = match scope {
                        Scope::Month(m) => Some(vec![m]),
                        Scope::All => None,
                    };
                    store.record_crossings(scoped.as_deref(), None).await
                }
            };
            if let (Scope::All, true) = (scope, outcome.write.lost.is_empty()) {
                failpoint::hit("before-cursor");
                outcome.alerts.extend(record().await?);
                let now = if rebase {
                    store.finish_rebase(m.horizon).await?
                } else {
                    store.advance(m.horizon).await?
                };
                failpoint::hit("after-cursor");
                outcome.cursor = Some((m.cursor, now));
            } else {
                outcome.alerts.extend(record().await?);
            }
        }
    }
    outcome.bad = rc.fresh.bad;
    if opts.dry_run {
        outcome.changes = plan.writes;
    }
    Ok(outcome)
}

/// A write the database refused because a month was closed or reopened
/// since the run read them is [`PeriodsChanged`] (exit 75): nothing wrong
/// was written, and the next run routes the rows by the new months.
async fn refused_if_periods_changed<S: Store, T>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::RawRow;
    use serde_json::json;

    const JAN: Month = Month {
        year: 2025,
        month: 1,
    };

    fn key(p: i64) -> Key {
        Key {
            portal_id: p,
            month: JAN,
        }
    }

    fn row(id: i64, portal: i64) -> RawRow {
        RawRow::from_json(&json!({
            "id": id,
            "portal_id": portal,
            "month_year": "2025-01",
            "success": true,
            "request_timestamp": "2025-01-02T00:00:00",
        }))
        .unwrap()
    }

    fn stored(requests: i64, watermark: i64) -> Totals {
        Totals {
            requests,
            successes: requests,
            errors: 0,
            last_request_at: crate::aggregation::parse_timestamp("2025-01-02T00:00:00"),
            last_request_id: watermark,
        }
    }

    /// A recount of `rows` against `stored`, cursor and horizon given.
    fn recount_of(rows: &[RawRow], stored: &[(Key, Totals)], cursor: i64, horizon: i64) -> Recount {
        let stored: HashMap<Key, Totals> = stored.iter().copied().collect();
        let mut fresh = Fold::default();
        let mut above = Fold::default();
        let mut reference = Fold::default();
        for r in rows {
            fresh.add(r, |_, id| id <= horizon);
            // As `recount`'s `covers`, for stored keys with a watermark.
            reference.add(r, |k, id| match stored.get(k) {
                Some(s) => id <= s.last_request_id.max(cursor),
                None => id <= cursor,
            });
            above.add(r, |k, id| {
                id <= horizon
                    && stored
                        .get(k)
                        .is_some_and(|s| id > s.last_request_id.max(cursor))
            });
        }
        Recount {
            rows_read: rows.len() as u64,
            fresh,
            reference,
            above,
            closed_new: Fold::default(),
            stored,
            late: HashMap::new(),
            pruned: HashMap::new(),
            periods: Periods::none(),
            marks: Some(Marks {
                cursor: Some(cursor),
                horizon,
            }),
        }
    }

    #[test]
    fn every_write_carries_the_horizon_as_its_watermark() {
        // Key 1's newest row (id 3) was deleted: stored says 3 rows up to 3.
        let rc = recount_of(&[row(1, 1), row(2, 1)], &[(key(1), stored(3, 3))], 3, 10);
        let plan = rc.plan(true);
        assert_eq!(plan.writes.len(), 1);
        assert_eq!(plan.writes[0].after.requests, 2);
        assert_eq!(plan.writes[0].after.last_request_id, 10);
        assert!(rc.plan(false).writes.is_empty());
    }

    #[test]
    fn a_refused_key_is_still_brought_forward_by_its_new_rows() {
        // Stored 5 up to id 4, but only 3 rows up to 4 remain; row 7 is new.
        let rows = [row(1, 1), row(2, 1), row(4, 1), row(7, 1)];
        let rc = recount_of(&rows, &[(key(1), stored(5, 4))], 4, 10);
        let plan = rc.plan(false);
        assert_eq!(plan.refused.len(), 1, "{plan:?}");
        assert_eq!(
            plan.refused[0].after.requests, 3,
            "shown: what remains of the counted rows"
        );
        assert_eq!(
            (
                plan.writes[0].after.requests,
                plan.writes[0].after.last_request_id
            ),
            (6, 10),
            "the stored 5 plus row 7"
        );
    }

    #[test]
    fn a_key_counted_past_the_horizon_is_left_to_the_newer_run() {
        let rc = recount_of(&[row(1, 1)], &[(key(1), stored(0, 20))], 5, 10);
        let plan = rc.plan(true);
        assert!(
            plan.writes.is_empty() && plan.refused.is_empty(),
            "{plan:?}"
        );
    }

    #[test]
    fn a_stored_key_with_no_rows_left_is_emptied_only_when_allowed() {
        let rc = recount_of(&[], &[(key(2), stored(4, 4))], 4, 10);
        assert_eq!(rc.plan(false).refused.len(), 1);
        assert!(rc.plan(false).writes.is_empty());
        let w = rc.plan(true).writes;
        assert_eq!((w[0].after.requests, w[0].after.last_request_id), (0, 10));
    }

    #[test]
    fn a_right_key_is_not_rewritten_unless_its_watermark_misses_rows() {
        let rc = recount_of(&[row(1, 1), row(2, 1)], &[(key(1), stored(2, 2))], 2, 10);
        assert!(rc.plan(false).writes.is_empty());
        let before_migration =
            recount_of(&[row(1, 1), row(2, 1)], &[(key(1), stored(2, 0))], 2, 10);
        assert_eq!(before_migration.plan(false).writes.len(), 1);
    }

    #[test]
    fn drift_compares_each_stored_key_with_its_rows_up_to_its_own_watermark() {
        // Key 1: stored 5 up to id 4, but 3 rows remain; row 7 is new, not drift.
        // Key 2: rows below the cursor, no stored row (missing).
        let rows = [row(1, 1), row(2, 1), row(4, 1), row(7, 1), row(3, 2)];
        let rc = recount_of(&rows, &[(key(1), stored(5, 4))], 4, 10);
        let drift = rc.drift(false);
        assert_eq!(drift.len(), 1);
        assert_eq!((drift[0].key, drift[0].after.requests), (key(1), 3));
        let with_missing = rc.drift(true);
        assert_eq!(with_missing.len(), 2);
        assert_eq!(with_missing[1].key, key(2));
        assert_eq!(with_missing[1].before, None);
    }
}

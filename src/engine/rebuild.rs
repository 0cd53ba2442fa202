//! Recomputing keys from all their rows: the engine without the migration,
//! and with it the first run, `--full`, `--month` and `verify`.
//!
//! O(all rows) (or one month's), but it needs nothing beyond the seed's
//! schema, and a rerun changes nothing. Before overwriting, it reports every
//! stored key that disagreed with its own rows (drift), and it never lowers a
//! stored count unless told to (`--allow-decrease`): billing has read it.

use std::collections::{BTreeSet, HashMap};

use chrono::Utc;

use super::{Change, Mode, Options, Outcome};
use crate::aggregation::{Fold, Key, Month, Totals};
use crate::failpoint;
use crate::postgrest::{Client, Query};
use crate::progress::Progress;
use crate::state::JobState;
use crate::tables::{self, ParallelScan};

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

/// Rows counted two ways in one scan.
pub struct Recount {
    pub rows_read: u64,
    /// Every good row (up to the horizon): the state to write.
    pub fresh: Fold,
    /// Each key's rows up to the point its stored row claims to cover: what
    /// the stored row should hold, to tell drift from rows not yet counted.
    pub reference: Fold,
    pub stored: HashMap<Key, Totals>,
    marks: Option<Marks>,
}

/// Counts `scope`'s rows against what is stored.
pub async fn recount(
    client: &Client,
    scope: Scope,
    marks: Option<Marks>,
    page_size: usize,
    concurrency: usize,
    progress: &Progress,
) -> anyhow::Result<Recount> {
    let with_watermark = marks.is_some();
    let scope_filter: Query = match scope {
        Scope::All => Query::new(),
        Scope::Month(m) => vec![("month_year".into(), format!("eq.{m}"))],
    };
    let mut stored = HashMap::new();
    tables::read_stored_where(
        client,
        &scope_filter,
        with_watermark,
        &mut stored,
        page_size,
    )
    .await?;

    let cursor = marks.and_then(|m| m.cursor).unwrap_or(0);
    // A stored row with a watermark covers its rows up to it (and, once the
    // cursor passed, up to the cursor: no row of the key lies between). One
    // without (before the migration, or never written by it) claims all rows.
    let covers = |key: &Key, id: i64| match stored.get(key) {
        Some(s) if with_watermark && s.last_request_id > 0 => id <= s.last_request_id.max(cursor),
        Some(_) => marks.is_none_or(|m| id <= m.horizon),
        None => !with_watermark || id <= cursor,
    };
    // Keys another run counted past the horizon are checked up to their own
    // watermark: those ids were below a horizon then, so they are complete.
    let scan_end = marks.map(|m| {
        stored
            .values()
            .map(|s| s.last_request_id)
            .fold(m.horizon, i64::max)
    });
    let horizon = marks.map(|m| m.horizon);

    let mut fresh = Fold::default();
    let mut reference = Fold::default();
    // Without the migration there is no horizon: count what is there now.
    let end = match scan_end {
        Some(e) => e,
        None => tables::newest_id(client).await?,
    };
    let mut scan = ParallelScan::start(client, scope_filter, 0, end, page_size, concurrency);
    progress.scan(0, Some(end));
    while let Some(page) = scan.next_page().await? {
        for row in &page {
            fresh.add(row, |_, id| horizon.is_none_or(|h| id <= h));
            reference.add(row, covers);
        }
        progress.advance(0, scan.rows_read as i64, Some(end), scan.rows_read);
        failpoint::hit("page");
    }
    progress.finish();
    Ok(Recount {
        rows_read: scan.rows_read,
        fresh,
        reference,
        stored,
        marks,
    })
}

impl Recount {
    /// Stored keys whose values disagree with their own rows; with
    /// `missing`, also keys whose rows should be counted but have no row.
    pub fn drift(&self, missing: bool) -> Vec<Change> {
        let keys: BTreeSet<&Key> = self
            .stored
            .keys()
            .chain(self.reference.groups.keys())
            .collect();
        keys.into_iter()
            .filter_map(|key| {
                let before = self.stored.get(key).copied();
                let truth = self.reference.groups.get(key).copied().unwrap_or_default();
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

    /// The writes that bring every key in scope to its rows' state. Keys
    /// another run already counted further are left to it; stored keys with
    /// no rows left are brought to zero (a decrease, so only when allowed).
    pub fn changes(&self) -> Vec<Change> {
        let with_watermark = self.marks.is_some();
        let mut out = Vec::new();
        for (key, new) in &self.fresh.groups {
            let before = self.stored.get(key).copied();
            let needed = match before {
                None => true,
                Some(b) if with_watermark && b.last_request_id > new.last_request_id => false,
                Some(b) => {
                    !b.same_values(new)
                        || (with_watermark && b.last_request_id != new.last_request_id)
                }
            };
            if needed {
                out.push(Change {
                    key: *key,
                    before,
                    after: *new,
                });
            }
        }
        for (key, b) in &self.stored {
            if !self.fresh.groups.contains_key(key)
                && (b.requests, b.successes, b.errors) != (0, 0, 0)
            {
                let emptied = Totals {
                    last_request_id: b.last_request_id,
                    ..Totals::default()
                };
                out.push(Change {
                    key: *key,
                    before: Some(*b),
                    after: emptied,
                });
            }
        }
        out.sort_by_key(|c| c.key);
        out
    }
}

/// Rebuilds `scope`, and with the migration and the whole table in scope,
/// moves the cursor to the horizon.
pub async fn run(
    client: &Client,
    scope: Scope,
    marks: Option<Marks>,
    opts: &Options,
) -> anyhow::Result<Outcome> {
    let rc = recount(
        client,
        scope,
        marks,
        opts.page_size,
        opts.concurrency,
        &opts.progress,
    )
    .await?;
    let (refused, changes): (Vec<Change>, Vec<Change>) = rc
        .changes()
        .into_iter()
        .partition(|c| c.decreases() && !opts.allow_decrease);
    let mode = match (scope, marks) {
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
        } else {
            Vec::new()
        },
        refused_decreases: refused,
        dry_run: opts.dry_run,
        ..Outcome::default()
    };
    if !opts.dry_run {
        if !changes.is_empty() {
            let states: Vec<_> = changes.iter().map(|c| (c.key, c.after)).collect();
            outcome.write =
                tables::write_states(client, &states, marks.is_some(), Utc::now().naive_utc())
                    .await?;
        }
        if let (Some(m), Scope::All) = (marks, scope) {
            failpoint::hit("before-cursor");
            let now = JobState::new(client).advance(m.horizon).await?;
            failpoint::hit("after-cursor");
            outcome.cursor = Some((m.cursor, now));
        }
    }
    outcome.bad = rc.fresh.bad;
    outcome.keys_changed = changes.len();
    outcome.changes = changes;
    Ok(outcome)
}

//! The engines: each reads raw rows and brings `portal_usage_monthly` to the
//! state `docs/semantics.md` defines. They share the outcome they
//! report, so the output and exit status do not care which one ran.
//!
//! - `rebuild`: every key (or one month's) recomputed from all its rows.
//!   Without the migration this is the only engine; with it, the first run,
//!   `--full` and `--month`.
//! - `incremental`: only rows above the cursor, up to the safe horizon.

pub mod incremental;
pub mod lease;
pub mod rebuild;
pub mod rpc;

use std::time::Duration;

use crate::aggregation::{BadRows, Key, Month, Totals};
use crate::tables::WriteStats;

/// Rows per page asked for. The server clamps it to its `max_rows` (1000 on
/// Supabase by default) without saying so, which is fine: paging goes on
/// until an empty page whatever the page size.
pub const DEFAULT_PAGE_SIZE: usize = 1000;

/// Which engine counts new rows (docs/engines.md): `Rest` pages rows over
/// PostgREST and folds them here; `Rpc` folds them in the database, batch
/// by batch. Both book through the same rule book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Rest,
    Rpc,
}

/// The REST engine's ids per batch when `--batch-size` is not given. Each
/// batch reads and writes every key it touched, so small batches made
/// catching up a backlog several times slower per row than a rebuild
/// (docs/benchmarks.md); memory follows keys, not rows, and a crash redoes
/// at most one batch, a few seconds of reading.
pub const DEFAULT_REST_BATCH_IDS: u64 = 1_000_000;

/// How long a run waits for inserts in flight below the newest id before
/// it counts up to the safe horizon (`--horizon-wait-ms`); verify and
/// close wait as long.
pub const DEFAULT_HORIZON_WAIT: std::time::Duration = std::time::Duration::from_millis(2000);

/// A key whose stored state differs from what its rows say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: Key,
    pub before: Option<Totals>,
    pub after: Totals,
}

impl Change {
    /// Whether writing this would lower a stored count.
    pub fn decreases(&self) -> bool {
        self.before.is_some_and(|b| {
            self.after.requests < b.requests
                || self.after.successes < b.successes
                || self.after.errors < b.errors
        })
    }
}

/// A late adjustment whose state changes: rows of a closed month counted
/// after its close, booked in `booked` (docs/semantics.md, "Closed months").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateChange {
    pub key: Key,
    pub booked: Month,
    pub before: Option<Totals>,
    pub after: Totals,
    /// The key's highest watermark when the run read it: the new rows are
    /// above it (the database checks it, docs/semantics.md, "Closed months").
    pub counted_from: i64,
}

/// What a run booked as late adjustments.
#[derive(Debug, Default, Clone)]
pub struct Late {
    /// Rows of closed months counted (into adjustments, never into their
    /// frozen monthly rows).
    pub rows: u64,
    /// Late adjustments written (or, dry, to write): distinct ones for
    /// the REST engine, summed over batches for the server-side one.
    pub keys: usize,
    /// The changes, kept where they are shown (a dry run).
    pub changes: Vec<LateChange>,
}

/// How a run went about it, for the operator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Mode {
    /// The migration is not applied: every key from all rows.
    #[default]
    RecomputeWithoutMigration,
    /// With the migration: every key from all rows up to the horizon.
    Rebuild { first_run: bool },
    /// One month's keys from that month's rows.
    Month(Month),
    /// Rows above the cursor up to the horizon.
    Incremental,
    /// The same, by the server-side function, in this many batches.
    Rpc { batches: u64 },
    /// `--rebase`: cursor and watermarks reset, every key rebuilt.
    Rebase,
}

/// Arguments that make sense alone but not here: exit 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// How a run ended, in one word. The exit status, the label stored in
/// `usage_aggregation_state.last_run_outcome` and the JSON `outcome` all
/// come from here (README, "Outcomes"), so they cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Ok,
    /// Rows rejected as bad data; the rest is counted.
    BadRows,
    /// Keys whose stored counts are above their raw rows were left as they
    /// are (this run's or an earlier run's refusals still stand).
    DecreasesRefused,
    /// Writes that should have taken effect and did not.
    WritesLost,
}

impl Verdict {
    /// Stored and sent as JSON `outcome`. Only `ok` and `bad_rows` count as
    /// a success (`last_success_at`): the totals are right for every row
    /// that can be counted.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::BadRows => "bad_rows",
            Verdict::DecreasesRefused => "decreases_refused",
            Verdict::WritesLost => "writes_lost",
        }
    }
}

/// What a run did, for the summary and the exit status.
#[derive(Debug, Default)]
pub struct Outcome {
    pub mode: Mode,
    /// Raw rows the server returned: the run's cost.
    pub rows_read: u64,
    /// Rows counted into some key.
    pub rows_counted: u64,
    pub bad: BadRows,
    /// Portal-month combinations the counted rows fall in.
    pub keys_touched: usize,
    /// Distinct keys whose stored state changed (or, dry, would change).
    pub keys_changed: usize,
    /// The changes themselves, kept only where they are shown (a dry run's
    /// table, a rebuild's): a long incremental run would otherwise hold one
    /// per key per batch.
    pub changes: Vec<Change>,
    /// Stored keys that disagreed with their own rows (rebuilds only).
    pub drift: Vec<Change>,
    /// Writes not made because they would lower a stored count.
    pub refused_decreases: Vec<Change>,
    pub write: WriteStats,
    pub dry_run: bool,
    /// The cursor before and after (with the migration).
    pub cursor: Option<(Option<i64>, i64)>,
    /// Refused keys standing after this run, this run's included (with the
    /// migration): how many, since when, a few of them.
    pub refusals_standing: Refusals,
    /// Keys whose monthly row had been deleted, rebuilt from all their rows.
    pub restored_keys: Vec<String>,
    /// Server-side batches halved after running past the statement timeout.
    pub batches_halved: u32,
    /// The longest server-side batch, and the rest taken between batches.
    pub batch_longest: std::time::Duration,
    pub batch_rest: std::time::Duration,
    /// What the scans' pace did (REST engine).
    pub pace: crate::pace::PaceReport,
    /// Rows of closed months booked as late adjustments.
    pub late: Late,
    /// Closed months in a rebuild's scope, left as they are.
    pub closed_left_alone: Vec<Month>,
    /// The quotas' thresholds this run's bookings reached, recorded with
    /// the totals (or, dry, that it would record): docs/quotas.md.
    pub alerts: Vec<crate::alerts::Crossing>,
}

/// Keys left above their raw rows, as recorded in the database.
#[derive(Debug, Default, Clone)]
pub struct Refusals {
    pub count: u64,
    /// Of them, writes that did not hold: the run's verdict is then
    /// `writes_lost`, whichever run lost them.
    pub lost: u64,
    /// Of them, closed months' keys a rebase could not book.
    pub closed: u64,
    pub since: Option<String>,
    pub examples: Vec<String>,
}

impl Outcome {
    /// The gravest thing the run knows about its own totals.
    pub fn verdict(&self) -> Verdict {
        if !self.write.lost.is_empty() || self.refusals_standing.lost > 0 {
            Verdict::WritesLost
        } else if !self.refused_decreases.is_empty() || self.refusals_standing.count > 0 {
            Verdict::DecreasesRefused
        } else if self.bad.count > 0 {
            Verdict::BadRows
        } else {
            Verdict::Ok
        }
    }
}

/// Settings every engine takes.
#[derive(Clone)]
pub struct Options {
    pub dry_run: bool,
    pub page_size: usize,
    /// Rows per batch: after this many, the incremental engine writes what
    /// it has and moves the cursor, bounding memory and the redo after a
    /// crash.
    pub batch_rows: u64,
    pub allow_decrease: bool,
    /// The lease holder to renew during long scans (None when dry).
    pub owner: Option<String>,
    pub lease_ttl: Duration,
    pub horizon_wait: Duration,
    pub progress: crate::progress::Progress,
    /// How hard scans lean on the database (speed only, never totals).
    pub pace: crate::pace::Pace,
    /// Server-side batches sized to take about this long, from the last
    /// one's duration (None: the fixed size asked for).
    pub batch_target: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::{Key, Month};

    #[test]
    fn the_verdict_is_the_gravest_thing_the_run_knows() {
        let key = Key {
            portal_id: 1,
            month: Month {
                year: 2025,
                month: 1,
            },
        };
        let mut o = Outcome::default();
        assert_eq!(o.verdict(), Verdict::Ok);
        o.bad.count = 1;
        assert_eq!(o.verdict().label(), "bad_rows");
        o.refusals_standing.count = 2;
        assert_eq!(o.verdict().label(), "decreases_refused");
        o.write.lost.push(key);
        assert_eq!(o.verdict().label(), "writes_lost");
        assert_ne!(o.verdict(), Verdict::Ok);
        // A write superseded by a newer run is the contract working.
        let fine = Outcome {
            write: crate::tables::WriteStats {
                superseded: vec![key],
                ..Default::default()
            },
            ..Outcome::default()
        };
        assert_eq!(fine.verdict(), Verdict::Ok);
    }
}

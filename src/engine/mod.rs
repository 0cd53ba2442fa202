//! The engines: each reads raw rows and brings `portal_usage_monthly` to the
//! state `shared/design/semantics.md` defines. They share the outcome they
//! report, so the output and exit status do not care which one ran.
//!
//! - `rebuild`: every key (or one month's) recomputed from all its rows.
//!   Without the migration this is the only engine; with it, the first run,
//!   `--full` and `--month`.
//! - `incremental`: only rows above the cursor, up to the safe horizon.

pub mod incremental;
pub mod rebuild;
pub mod rpc;

use std::time::Duration;

use crate::aggregation::{BadRows, Key, Month, Totals};
use crate::tables::WriteStats;

/// Rows per page asked for. The server clamps it to its `max_rows` (1000 on
/// Supabase by default) without saying so, which is fine: paging goes on
/// until an empty page whatever the page size.
pub const DEFAULT_PAGE_SIZE: usize = 1000;

/// Id ranges a scan reads at once. Measured (docs/benchmarks.md): on 2
/// cores a full run took 4.9 s with 1, 3.8 s with 2 and 3.2 s with 4; four
/// requests at a time is also modest for a Supabase project's pool.
pub const DEFAULT_CONCURRENCY: u16 = 4;

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
    pub lease_ttl: Duration,
    pub horizon_wait: Duration,
    pub progress: crate::progress::Progress,
    /// Id ranges scanned at once.
    pub concurrency: usize,
}

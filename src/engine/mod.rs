//! The engines: each reads raw rows and brings `portal_usage_monthly` to the
//! state `shared/design/semantics.md` defines. They share the outcome they
//! report, so the output and exit status do not care which one ran.

pub mod full;

use crate::aggregation::{BadRows, Key, Totals};
use crate::tables::WriteStats;

/// Rows per page asked for. The server clamps it to its `max_rows` (1000 on
/// Supabase by default) without saying so, which is fine: paging goes on
/// until an empty page whatever the page size.
pub const DEFAULT_PAGE_SIZE: usize = 1000;

/// A key whose stored state a run changes (or, dry, would change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: Key,
    pub before: Option<Totals>,
    pub after: Totals,
}

/// What a run did, for the summary and the exit status.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Rows the server returned.
    pub rows_read: u64,
    /// Rows counted into some key.
    pub rows_counted: u64,
    pub bad: BadRows,
    /// Portal-month combinations the counted rows fall in.
    pub keys_touched: usize,
    /// Keys whose stored state differed from the new one; written unless dry.
    pub changes: Vec<Change>,
    pub write: WriteStats,
    pub dry_run: bool,
}

/// Settings every engine takes.
#[derive(Debug, Clone)]
pub struct Options {
    pub dry_run: bool,
    pub page_size: usize,
}

//! The Store: everything a run reads and writes, named in this domain's
//! terms (keys, totals, the cursor, the lease), never in tables, columns or
//! PostgREST filters. [`rest::RestStore`] is the real one, over PostgREST;
//! the engines, the [`crate::job::Job`] and the commands know only this
//! trait, so the engines' logic is unit-tested against an in-memory store
//! (`memory`, tests only) in milliseconds, and the integration tests keep
//! the real stack.

pub mod rest;

#[cfg(test)]
pub mod memory;

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

use crate::adjustments::LateKey;
use crate::aggregation::{Key, Month, Totals};
use crate::booking::{Booked, Rebased};
use crate::ledger::{CloseAnswer, PeriodInfo, ReopenAnswer};
use crate::pace::Pace;
use crate::periods::Periods;
use crate::preflight::Facts;
use crate::schedule::CronAnswer;
use crate::state::{Lease, StateRow};
use crate::tables::{ParallelScan, WriteStats};

/// Which raw rows a scan reads (besides its id range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawFilter {
    All,
    Month(Month),
}

/// Which stored rows to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredFilter {
    All,
    Month(Month),
    /// Keys whose watermark is above this id (counted past the cursor).
    WatermarkAbove(i64),
    Portal(i64),
}

/// What one server-side batch answered (`usage_agg_rpc_batch`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Batch {
    pub busy: bool,
    pub needs_rebuild: bool,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub horizon: Option<i64>,
    pub writers_in_flight: i64,
    pub prepared_in_flight: i64,
    pub rows: u64,
    pub keys: usize,
    pub new_keys: usize,
    pub bad: u64,
    pub bad_ids: Vec<i64>,
    pub raced_keys: u64,
    /// Rows of closed months counted into late adjustments, and how many
    /// of them.
    pub late_rows: u64,
    pub late_keys: usize,
    /// Keys whose write did not hold (`portal:month`), recorded.
    pub lost: Vec<String>,
    /// The quotas' thresholds the batch's keys reached, recorded with it.
    pub alerts: Vec<crate::alerts::Crossing>,
    pub done: bool,
    /// The next batch's ids to take the aim asked for (the one sizing
    /// rule, `usage_agg_next_batch_ids`); none with a fixed size.
    pub next_batch_ids: Option<u64>,
    /// How long the batch's fold and its booking took in the database.
    pub fold_ms: f64,
    pub book_ms: f64,
}

/// What one server-side batch is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct BatchAsk {
    /// Ids past the cursor to cover, at most.
    pub batch_ids: u64,
    /// How long to wait for inserts in flight below the horizon.
    pub wait: Duration,
    pub dry_run: bool,
    /// With it, the batch answers the size of the next batch to take about
    /// that long.
    pub aim: Option<Duration>,
    /// With `aim` too: ids from the cursor folded read only, to size the
    /// next batch from.
    pub sample: Option<u64>,
}

pub use crate::booking::{Refusal, RefusalKind};

/// The two tables and the job's state. Every method is one idempotent step
/// (docs/semantics.md, "Idempotent writes"): a run that dies between any two
/// leaves what the next run needs.
// The futures are not required to be Send: a run is one task on a
// current-thread runtime, and the store's own helpers spawn what they need.
#[allow(async_fn_in_trait)]
pub trait Store {
    /// Raw rows with `after < id <= upto` matching `filter`, as pages in no
    /// particular order, as fast as `pace` allows.
    fn scan(
        &self,
        filter: RawFilter,
        after: i64,
        upto: i64,
        page_size: usize,
        pace: &Pace,
    ) -> ParallelScan;
    /// The newest raw id, 0 when there is none.
    async fn newest_id(&self) -> anyhow::Result<i64>;
    /// Stored totals matching `filter`; with `with_watermark`, each key's
    /// watermark too (only with the migration).
    async fn stored(
        &self,
        filter: StoredFilter,
        with_watermark: bool,
        page_size: usize,
    ) -> anyhow::Result<HashMap<Key, Totals>>;
    /// Stored totals (with watermarks) of these keys, those that exist.
    async fn stored_for(
        &self,
        keys: &[Key],
        page_size: usize,
    ) -> anyhow::Result<HashMap<Key, Totals>>;
    /// The newest month stored, if any.
    async fn newest_month(&self) -> anyhow::Result<Option<Month>>;
    /// A month's keys by requests, most first, at most `n`.
    async fn top_of_month(&self, month: Month, n: usize) -> anyhow::Result<Vec<(Key, Totals)>>;
    /// Writes each key's full state; says per key whether it took effect.
    async fn write(
        &self,
        states: &[(Key, Totals)],
        with_watermark: bool,
    ) -> anyhow::Result<WriteStats>;

    /// Reads one row of each table with every column used: a missing table
    /// or column fails here, by name.
    async fn probe(&self, with_watermark: bool) -> anyhow::Result<()>;

    /// Whether the migrations are applied (the state exists).
    async fn installed(&self) -> anyhow::Result<bool>;
    async fn state(&self) -> anyhow::Result<Option<StateRow>>;
    async fn acquire(
        &self,
        owner: &str,
        ttl: Duration,
        steal_from: Option<&str>,
    ) -> anyhow::Result<Lease>;
    async fn renew(&self, owner: &str, ttl: Duration) -> anyhow::Result<bool>;
    /// Moves the cursor to `to` unless it is further; returns where it is.
    async fn advance(&self, to: i64) -> anyhow::Result<i64>;
    async fn finish(&self, owner: &str, outcome: &str, rows: u64) -> anyhow::Result<()>;
    async fn safe_horizon(&self, wait: Duration) -> anyhow::Result<i64>;
    async fn preflight(&self) -> anyhow::Result<Facts>;
    /// Resets the cursor and the watermarks for a rebuild at `horizon`,
    /// booking (or refusing) closed months' uncounted rows first.
    async fn rebase(&self, owner: &str, horizon: i64) -> anyhow::Result<Rebased>;
    async fn finish_rebase(&self, to: i64) -> anyhow::Result<i64>;
    /// Replaces the refusals a rebuild at `horizon` resolves in `scope`
    /// with `keys`; a lost write on a key written past the horizon stands.
    async fn record_refusals(
        &self,
        scope: &str,
        keys: &[Refusal],
        horizon: i64,
    ) -> anyhow::Result<u64>;
    /// Books the folded rows of (from, to] (good rows only, every row of
    /// the range) by the one rule book in the database. With
    /// `advance = Some(n)`, `n` being the good rows folded over all the
    /// batch's calls, moves the cursor to `to` in the same transaction,
    /// once the database has found `n` good rows in the range.
    async fn book(
        &self,
        from: i64,
        to: i64,
        keys: &[(Key, Totals)],
        advance: Option<u64>,
        dry_run: bool,
    ) -> anyhow::Result<Booked>;
    async fn restore_deleted_keys(&self) -> anyhow::Result<Vec<String>>;
    /// Records the quotas' crossings of months a rebuild wrote (`None`:
    /// every open month), or of keys written above a watermark, as the
    /// rule book records a booking's.
    async fn record_crossings(
        &self,
        months: Option<&[Month]>,
        above: Option<i64>,
    ) -> anyhow::Result<Vec<crate::alerts::Crossing>>;
    /// Notes months a rebuild is about to write as months whose crossings
    /// are pending; false when the database cannot (no quota gaps
    /// migration).
    async fn mark_crossings_pending(&self, months: &[Month]) -> anyhow::Result<bool>;
    /// Records the pending months' crossings and clears them, at once.
    async fn sweep_pending_crossings(&self) -> anyhow::Result<Vec<crate::alerts::Crossing>>;
    /// The alerts a run would record, recording none (a dry run): the
    /// pending months', those of keys above `above`, and those of a
    /// rebuild writing `planned` (monthly request counts) over `months`.
    async fn preview_crossings(
        &self,
        planned: &[(Key, i64)],
        months: &[Month],
        above: Option<i64>,
    ) -> anyhow::Result<Vec<crate::alerts::Crossing>>;
    /// Adds a run's rejected rows to the job's tally (status, verify).
    async fn note_rejected(&self, count: u64, ids: &[i64]) -> anyhow::Result<()>;
    /// The closed months (docs/semantics.md, "Closed months").
    async fn periods(&self) -> anyhow::Result<Periods>;
    /// Late adjustments (rows of closed months counted after the close)
    /// whose key matches `filter` (`WatermarkAbove`: their own watermark),
    /// by key and booked month, with their watermarks.
    async fn late(
        &self,
        filter: StoredFilter,
        page_size: usize,
    ) -> anyhow::Result<HashMap<LateKey, Totals>>;
    /// The good raw rows prune deleted, per key: every key's, or one
    /// month's.
    async fn pruned(
        &self,
        month: Option<Month>,
        page_size: usize,
    ) -> anyhow::Result<HashMap<Key, Totals>>;
    /// One month's place in its life, on the database's clock.
    async fn period_info(&self, month: Month, grace_secs: u64) -> anyhow::Result<PeriodInfo>;
    /// Records the month closed, with its snapshot, in one transaction.
    async fn close_month(
        &self,
        month: Month,
        grace_secs: u64,
        by: &str,
    ) -> anyhow::Result<CloseAnswer>;
    /// Marks a closed month open again, recording who and why.
    async fn reopen_month(
        &self,
        month: Month,
        reason: &str,
        by: &str,
    ) -> anyhow::Result<ReopenAnswer>;
    /// One server-side batch (`--engine rpc`).
    async fn rpc_batch(&self, ask: BatchAsk) -> anyhow::Result<Batch>;
    /// How many keys have their monthly row or late adjustment's watermark
    /// in `(from, to]`: the keys a run over that range wrote
    /// (`usage_agg_run_keys`, 20261207230000).
    async fn run_keys(&self, from: i64, to: i64) -> anyhow::Result<usize>;

    /// The job scheduled in the database (pg_cron): installs or updates it
    /// to run on the `cron` expression, each run bounded to `max_seconds`.
    /// Answers `pg_cron: false` when the database has no pg_cron.
    async fn schedule(&self, cron: &str, max_seconds: u64) -> anyhow::Result<CronAnswer>;
    /// Removes the scheduled job, if there is one.
    async fn unschedule(&self) -> anyhow::Result<CronAnswer>;
    /// The scheduled job, if any, and its last `runs` runs.
    async fn schedule_show(&self, runs: usize) -> anyhow::Result<CronAnswer>;
}

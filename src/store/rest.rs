//! The Store over PostgREST: the two tables through [`crate::tables`], the
//! job's state and the migrations' functions through [`crate::state`].
//! These three modules are the only ones that know table and column names
//! and PostgREST filters.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use serde_json::json;

use super::{Batch, BatchAsk, RawFilter, Refusal, Store, StoredFilter};
use crate::adjustments::{self, LateKey};
use crate::aggregation::{Key, Month, Totals};
use crate::booking::{self, Booked, Rebased};
use crate::config::JOB;
use crate::ledger::{self, CloseAnswer, PeriodInfo, ReopenAnswer};
use crate::pace::Pace;
use crate::periods::Periods;
use crate::postgrest::{Client, Idempotent, Query};
use crate::preflight::Facts;
use crate::schedule::CronAnswer;
use crate::state::{JobState, Lease, StateRow};
use crate::tables::{self, ParallelScan, WriteStats};

/// The real store: one Supabase project's REST API.
#[derive(Clone)]
pub struct RestStore {
    client: Client,
    /// Bulk reads and writes of stored rows in flight at once.
    at_once: usize,
}

impl RestStore {
    pub fn new(client: Client) -> RestStore {
        RestStore {
            client,
            at_once: usize::from(crate::pace::DEFAULT_CONCURRENCY),
        }
    }

    /// Reads and writes of stored rows `n` at a time (`--concurrency`):
    /// on a distant server each is a round trip, and a catch-up makes
    /// dozens of them.
    pub fn at_once(mut self, n: usize) -> RestStore {
        self.at_once = n.max(1);
        self
    }

    /// The client, for the commands' calls that are not the engines'
    /// (adjust, prune, usage right now: [`crate::periods`]).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn state_fns(&self) -> JobState<'_> {
        JobState::new(&self.client)
    }
}

fn raw_query(filter: RawFilter) -> Query {
    match filter {
        RawFilter::All => Query::new(),
        RawFilter::Month(m) => vec![("month_year".into(), format!("eq.{m}"))],
    }
}

fn stored_query(filter: StoredFilter) -> Query {
    match filter {
        StoredFilter::All => Query::new(),
        StoredFilter::Month(m) => vec![("month_year".into(), format!("eq.{m}"))],
        StoredFilter::WatermarkAbove(id) => vec![("last_request_id".into(), format!("gt.{id}"))],
        StoredFilter::Portal(p) => vec![("portal_id".into(), format!("eq.{p}"))],
    }
}

impl Store for RestStore {
    fn scan(
        &self,
        filter: RawFilter,
        after: i64,
        upto: i64,
        page_size: usize,
        pace: &Pace,
    ) -> ParallelScan {
        ParallelScan::start(
            &self.client,
            raw_query(filter),
            after,
            upto,
            page_size,
            pace,
        )
    }

    async fn newest_id(&self) -> anyhow::Result<i64> {
        tables::newest_id(&self.client).await
    }

    async fn stored(
        &self,
        filter: StoredFilter,
        with_watermark: bool,
        page_size: usize,
    ) -> anyhow::Result<HashMap<Key, Totals>> {
        let mut out = HashMap::new();
        tables::read_stored_where(
            &self.client,
            &stored_query(filter),
            with_watermark,
            &mut out,
            page_size,
        )
        .await?;
        Ok(out)
    }

    async fn stored_for(
        &self,
        keys: &[Key],
        page_size: usize,
    ) -> anyhow::Result<HashMap<Key, Totals>> {
        tables::read_stored_for(
            &self.client,
            keys.iter().copied(),
            true,
            page_size,
            self.at_once,
        )
        .await
    }

    async fn newest_month(&self) -> anyhow::Result<Option<Month>> {
        tables::newest_month(&self.client).await
    }

    async fn top_of_month(&self, month: Month, n: usize) -> anyhow::Result<Vec<(Key, Totals)>> {
        tables::top_of_month(&self.client, month, n).await
    }

    async fn write(
        &self,
        states: &[(Key, Totals)],
        with_watermark: bool,
    ) -> anyhow::Result<WriteStats> {
        tables::write_states(
            &self.client,
            states,
            with_watermark,
            Utc::now().naive_utc(),
            self.at_once,
        )
        .await
    }

    async fn probe(&self, with_watermark: bool) -> anyhow::Result<()> {
        tables::probe(&self.client, with_watermark).await
    }

    async fn installed(&self) -> anyhow::Result<bool> {
        self.state_fns().installed().await
    }

    async fn state(&self) -> anyhow::Result<Option<StateRow>> {
        self.state_fns().read().await
    }

    async fn acquire(
        &self,
        owner: &str,
        ttl: Duration,
        steal_from: Option<&str>,
    ) -> anyhow::Result<Lease> {
        self.state_fns().acquire(owner, ttl, steal_from).await
    }

    async fn renew(&self, owner: &str, ttl: Duration) -> anyhow::Result<bool> {
        self.state_fns().renew(owner, ttl).await
    }

    async fn advance(&self, to: i64) -> anyhow::Result<i64> {
        self.state_fns().advance(to).await
    }

    async fn finish(&self, owner: &str, outcome: &str, rows: u64) -> anyhow::Result<()> {
        Ok(self.state_fns().finish(owner, outcome, rows).await?)
    }

    async fn safe_horizon(&self, wait: Duration) -> anyhow::Result<i64> {
        self.state_fns().safe_horizon(wait).await
    }

    async fn preflight(&self) -> anyhow::Result<Facts> {
        self.state_fns().preflight().await
    }

    async fn rebase(&self, owner: &str, horizon: i64) -> anyhow::Result<Rebased> {
        booking::rebase(&self.client, owner, horizon).await
    }

    async fn finish_rebase(&self, to: i64) -> anyhow::Result<i64> {
        self.state_fns().finish_rebase(to).await
    }

    async fn record_refusals(
        &self,
        scope: &str,
        keys: &[Refusal],
        horizon: i64,
    ) -> anyhow::Result<u64> {
        self.state_fns().record_refusals(scope, keys, horizon).await
    }

    async fn book(
        &self,
        from: i64,
        to: i64,
        keys: &[(Key, Totals)],
        advance: Option<u64>,
        dry_run: bool,
    ) -> anyhow::Result<Booked> {
        booking::book(&self.client, from, to, keys, advance, dry_run).await
    }

    async fn note_rejected(&self, count: u64, ids: &[i64]) -> anyhow::Result<()> {
        self.state_fns().note_rejected(count, ids).await
    }

    async fn restore_deleted_keys(&self) -> anyhow::Result<Vec<String>> {
        self.state_fns().restore_deleted_keys().await
    }

    async fn record_crossings(
        &self,
        months: Option<&[Month]>,
        above: Option<i64>,
    ) -> anyhow::Result<Vec<crate::alerts::Crossing>> {
        crate::alerts::record_crossings(&self.client, months, above).await
    }

    async fn mark_crossings_pending(&self, months: &[Month]) -> anyhow::Result<bool> {
        crate::alerts::mark_crossings_pending(&self.client, months).await
    }

    async fn sweep_pending_crossings(&self) -> anyhow::Result<Vec<crate::alerts::Crossing>> {
        crate::alerts::sweep_pending_crossings(&self.client).await
    }

    async fn preview_crossings(
        &self,
        planned: &[(Key, i64)],
        months: &[Month],
        above: Option<i64>,
    ) -> anyhow::Result<Vec<crate::alerts::Crossing>> {
        crate::alerts::preview_crossings(&self.client, planned, months, above).await
    }

    async fn periods(&self) -> anyhow::Result<Periods> {
        ledger::read(&self.client).await
    }

    async fn late(
        &self,
        filter: StoredFilter,
        page_size: usize,
    ) -> anyhow::Result<HashMap<LateKey, Totals>> {
        let mut out = HashMap::new();
        adjustments::read_late_where(&self.client, &stored_query(filter), &mut out, page_size)
            .await?;
        Ok(out)
    }

    async fn pruned(
        &self,
        month: Option<Month>,
        page_size: usize,
    ) -> anyhow::Result<HashMap<Key, Totals>> {
        let filter = month.map_or(StoredFilter::All, StoredFilter::Month);
        adjustments::read_pruned_where(&self.client, &stored_query(filter), page_size).await
    }

    async fn period_info(&self, month: Month, grace_secs: u64) -> anyhow::Result<PeriodInfo> {
        ledger::info(&self.client, month, grace_secs).await
    }

    async fn close_month(
        &self,
        month: Month,
        grace_secs: u64,
        by: &str,
    ) -> anyhow::Result<CloseAnswer> {
        ledger::close(&self.client, month, grace_secs, by).await
    }

    async fn reopen_month(
        &self,
        month: Month,
        reason: &str,
        by: &str,
    ) -> anyhow::Result<ReopenAnswer> {
        ledger::reopen(&self.client, month, reason, by).await
    }

    async fn rpc_batch(&self, ask: BatchAsk) -> anyhow::Result<Batch> {
        let mut args = json!({
            "p_job": JOB,
            "p_batch_ids": ask.batch_ids,
            "p_max_wait_ms": ask.wait.as_millis() as u64,
            "p_dry_run": ask.dry_run,
        });
        // Each sent only when asked for, so that a call without them also
        // works before the migration that added them (20261207170000 for
        // the aim, 20261207230000 for the sample).
        if let Some(aim) = ask.aim {
            args["p_aim_ms"] = json!(aim.as_millis() as u64);
        }
        if let Some(sample) = ask.sample {
            args["p_sample_ids"] = json!(sample);
        }
        // Safe to send again: a batch whose answer was lost either did not
        // commit (and is done again) or did (and the cursor moved past it,
        // so the next call starts where it ended).
        self.client
            .rpc("usage_agg_rpc_batch", &args, Idempotent::Yes)
            .await
            .context("running a server-side batch (usage_agg_rpc_batch)")
    }

    async fn run_keys(&self, from: i64, to: i64) -> anyhow::Result<usize> {
        self.client
            .rpc(
                "usage_agg_run_keys",
                &json!({ "p_from": from, "p_to": to }),
                Idempotent::Yes,
            )
            .await
            .context("counting the keys the run wrote (usage_agg_run_keys)")
    }

    async fn schedule(&self, cron: &str, max_seconds: u64) -> anyhow::Result<CronAnswer> {
        self.state_fns().schedule(cron, max_seconds).await
    }

    async fn unschedule(&self) -> anyhow::Result<CronAnswer> {
        self.state_fns().unschedule().await
    }

    async fn schedule_show(&self, runs: usize) -> anyhow::Result<CronAnswer> {
        self.state_fns().schedule_show(runs).await
    }
}

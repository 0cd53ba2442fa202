//! The billing functions in the database (the periods migration and those
//! after it): the closed months, close, reopen, adjust, prune, the periods'
//! status and `usage_current`. Like `state.rs`, this module knows those
//! functions' names and answers; the rules they keep are `periods.rs`'s,
//! and the engines see only `Periods`, through the `Store`.

use anyhow::Context;
use serde::Deserialize;
use serde_json::json;

use crate::aggregation::Month;
use crate::config::JOB;
use crate::periods::{who, Periods};
use crate::postgrest::{Client, Idempotent};

#[derive(Debug, Deserialize)]
struct PeriodsAnswer {
    closed: Vec<String>,
    #[serde(default)]
    generation: i64,
}

/// The closed months (`usage_agg_periods`).
pub async fn read(client: &Client) -> anyhow::Result<Periods> {
    let answer: PeriodsAnswer = client
        // Idempotent: it only reads.
        .rpc("usage_agg_periods", &json!({}), Idempotent::Yes)
        .await
        .context("reading the closed months (usage_agg_periods)")?;
    Ok(
        Periods::new(answer.closed.iter().filter_map(|m| Month::parse(m)))
            .at_generation(answer.generation),
    )
}

/// One month's place in its life (`usage_agg_period_info`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PeriodInfo {
    pub valid: bool,
    pub closed: bool,
    pub closed_at: Option<String>,
    pub closed_by: Option<String>,
    pub up_to_id: Option<i64>,
    pub reopened_at: Option<String>,
    pub reopened_by: Option<String>,
    pub reopen_reason: Option<String>,
    pub now: Option<String>,
    pub current_month: Option<String>,
    pub earliest_close_at: Option<String>,
    pub can_close: bool,
    pub future: bool,
}

pub async fn info(client: &Client, month: Month, grace_secs: u64) -> anyhow::Result<PeriodInfo> {
    client
        // Idempotent: it only reads.
        .rpc(
            "usage_agg_period_info",
            &json!({"p_month": month.to_string(), "p_grace_seconds": grace_secs}),
            Idempotent::Yes,
        )
        .await
        .with_context(|| format!("reading {month}'s period (usage_agg_period_info)"))
}

/// What closing answered (`usage_agg_close_month`): closed now, closed
/// already, or refused and why.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CloseAnswer {
    pub closed: bool,
    pub already_closed: bool,
    pub refused: Option<String>,
    pub earliest_close_at: Option<String>,
    pub now: Option<String>,
    pub keys: serde_json::Value,
    pub closed_at: Option<String>,
    pub closed_by: Option<String>,
    pub up_to_id: Option<i64>,
    pub requests: Option<i64>,
    pub successes: Option<i64>,
    pub errors: Option<i64>,
}

pub async fn close(
    client: &Client,
    month: Month,
    grace_secs: u64,
    by: &str,
) -> anyhow::Result<CloseAnswer> {
    client
        // Idempotent: closing a closed month changes nothing.
        .rpc(
            "usage_agg_close_month",
            &json!({"p_job": JOB, "p_month": month.to_string(), "p_grace_seconds": grace_secs, "p_by": by}),
            Idempotent::Yes,
        )
        .await
        .with_context(|| format!("closing {month} (usage_agg_close_month)"))
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ReopenAnswer {
    pub reopened: bool,
    pub not_closed: bool,
    pub refused: Option<String>,
    pub reopened_at: Option<String>,
    pub closed_at: Option<String>,
    pub closed_by: Option<String>,
}

pub async fn reopen(
    client: &Client,
    month: Month,
    reason: &str,
    by: &str,
) -> anyhow::Result<ReopenAnswer> {
    client
        // Idempotent: reopening an open month changes nothing.
        .rpc(
            "usage_agg_reopen_month",
            &json!({"p_month": month.to_string(), "p_reason": reason, "p_by": by}),
            Idempotent::Yes,
        )
        .await
        .with_context(|| format!("reopening {month} (usage_agg_reopen_month)"))
}

/// A closed month as `usage_agg_periods_status` reports it: its snapshot,
/// and the good raw rows of it still there (prunable).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct ClosedMonth {
    pub month: String,
    pub closed_at: Option<String>,
    pub closed_by: Option<String>,
    pub up_to_id: Option<i64>,
    pub keys: i64,
    pub requests: i64,
    pub successes: i64,
    pub errors: i64,
    /// Requests of the adjustments booked in it: at its close, and now.
    pub booked_adjustments: i64,
    pub booked_now: i64,
    pub pruned_through: i64,
    pub rows_left: i64,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Reopened {
    pub month: String,
    pub reopened_at: Option<String>,
    pub reopened_by: Option<String>,
    pub reason: Option<String>,
}

/// The periods at a glance, without scanning raw rows.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PeriodsStatus {
    pub closed: Vec<ClosedMonth>,
    pub newest_closed: Option<String>,
    pub reopened: Vec<Reopened>,
    /// Good raw rows of closed months still there.
    pub prunable_rows: i64,
    /// Months with usage, open, past their grace by the database's clock.
    pub closable: Vec<String>,
}

pub async fn status(client: &Client, grace_secs: u64) -> anyhow::Result<PeriodsStatus> {
    client
        // Idempotent: it only reads.
        .rpc(
            "usage_agg_periods_status",
            &json!({"p_grace_seconds": grace_secs}),
            Idempotent::Yes,
        )
        .await
        .context("reading the closed months (usage_agg_periods_status)")
}

/// What `usage_agg_adjust` answered.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AdjustAnswer {
    pub booked: bool,
    pub already: bool,
    pub refused: Option<String>,
    pub current_month: Option<String>,
    /// Where it would have been booked, and the earliest month with usage,
    /// when the booking month is one no invoice can show.
    pub booking_month: Option<String>,
    pub earliest_month: Option<String>,
    /// The bound on each count, when an amount is beyond it.
    pub bound: Option<i64>,
    pub adjustment: Option<crate::adjustments::Manual>,
}

/// A signed manual adjustment, once per idempotency key.
#[derive(Debug, Clone)]
pub struct AdjustRequest<'a> {
    pub portal_id: i64,
    pub month: Month,
    pub requests: i64,
    pub successes: i64,
    pub errors: i64,
    pub reason: &'a str,
    pub key: &'a str,
}

pub async fn adjust(client: &Client, r: &AdjustRequest<'_>) -> anyhow::Result<AdjustAnswer> {
    client
        // Idempotent: the idempotency key books it once however often it is sent.
        .rpc(
            "usage_agg_adjust",
            &json!({
                "p_portal_id": r.portal_id, "p_month": r.month.to_string(), "p_requests": r.requests,
                "p_successes": r.successes, "p_errors": r.errors, "p_reason": r.reason, "p_key": r.key,
                "p_by": who(),
            }),
            Idempotent::Yes,
        )
        .await
        .context("booking a manual adjustment (usage_agg_adjust)")
}

/// A month's usage right now (`usage_current`): stored totals, late
/// adjustments, and the good raw rows no run has counted yet.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct Current {
    pub request_count: i64,
    pub success_count: i64,
    pub error_count: i64,
    pub last_request_at: Option<String>,
}

/// The database's current month (UTC).
pub async fn current_month(client: &Client) -> anyhow::Result<Month> {
    #[derive(Deserialize)]
    struct Answer {
        current_month: String,
    }
    let a: Answer = client
        // Idempotent: it only reads.
        .rpc("usage_agg_periods", &json!({}), Idempotent::Yes)
        .await
        .context("reading the database's month (usage_agg_periods)")?;
    Month::parse(&a.current_month).context("the database's current month is not YYYY-MM")
}

pub async fn usage_current(client: &Client, portal: i64, month: Month) -> anyhow::Result<Current> {
    let rows: Vec<Current> = client
        // Idempotent: it only reads.
        .rpc(
            "usage_current",
            &json!({"p_portal_id": portal, "p_month": month.to_string()}),
            Idempotent::Yes,
        )
        .await
        .context("reading the usage right now (usage_current)")?;
    Ok(rows.into_iter().next().unwrap_or_default())
}

/// One prune batch's answer (`usage_agg_prune_batch`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PruneBatch {
    pub done: bool,
    pub dry_run: bool,
    pub refused: Option<String>,
    pub months: Vec<String>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub deleted: u64,
    pub good_deleted: u64,
    pub rows_left: i64,
    pub cursor: Option<i64>,
    /// With `refused: "problems"`: the run-time checks' problems.
    pub problems: Vec<crate::preflight::Problem>,
    /// With `refused: "refused_keys"`: the refused keys of those months.
    pub keys: Vec<String>,
}

pub async fn prune_batch(
    client: &Client,
    before: Month,
    batch_ids: u64,
    dry_run: bool,
) -> anyhow::Result<PruneBatch> {
    client
        // Idempotent: a batch that committed moved pruned_through past its
        // range, and rows deleted are gone, so a repeat finds nothing there.
        .rpc(
            "usage_agg_prune_batch",
            &json!({"p_job": JOB, "p_before": before.to_string(), "p_batch_ids": batch_ids,
                    "p_dry_run": dry_run}),
            Idempotent::Yes,
        )
        .await
        .context("pruning raw rows of closed months (usage_agg_prune_batch)")
}

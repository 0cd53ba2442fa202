//! Billing periods (docs/semantics.md, "Closed months"): which months are
//! closed, where an adjustment is booked, and the database functions of the
//! periods migration that close, reopen, adjust, prune and report. Like
//! [`crate::state`], this module knows those functions' names and answers;
//! the engines see only [`Periods`], through the [`crate::store::Store`].

use std::collections::BTreeSet;

use anyhow::Context;
use serde::Deserialize;
use serde_json::json;

use crate::aggregation::{Month, Totals};
use crate::config::JOB;
use crate::postgrest::{Client, Idempotent};

/// The grace after a month's end before it may close, by default: 72 hours
/// (Stripe's longest invoice grace period).
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(72 * 3600);

/// The months closed when a run read them. A run reads them once; a close
/// or a reopening during the run makes the database refuse the writes that
/// no longer fit (its triggers), and the run stops ([`PeriodsChanged`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Periods {
    closed: BTreeSet<Month>,
    /// Closes and reopenings so far: a reopen-then-close between a run's
    /// read and its writes leaves `closed` as it was, not this.
    generation: i64,
}

impl Periods {
    /// No month closed (also: the migration is not applied).
    pub fn none() -> Periods {
        Periods::default()
    }

    pub fn new(closed: impl IntoIterator<Item = Month>) -> Periods {
        Periods {
            closed: closed.into_iter().collect(),
            generation: 0,
        }
    }

    /// The same months, at this generation (closes and reopenings so far).
    pub fn at_generation(mut self, generation: i64) -> Periods {
        self.generation = generation;
        self
    }

    pub fn is_closed(&self, m: Month) -> bool {
        self.closed.contains(&m)
    }

    pub fn closed(&self) -> impl Iterator<Item = Month> + '_ {
        self.closed.iter().copied()
    }

    pub fn newest_closed(&self) -> Option<Month> {
        self.closed.iter().next_back().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.closed.is_empty()
    }

    /// Where an adjustment for `m` is booked: the open month after the
    /// newest closed one, or `m` itself when it is later. A function of the
    /// closed months alone, never of the clock: two runs that see the same
    /// closed months book the same rows in the same place, and the database
    /// refuses any other (`usage_agg_booking_month`).
    pub fn booking_month(&self, m: Month) -> Month {
        match self.newest_closed() {
            Some(n) => m.max(next_month(n)),
            None => m,
        }
    }
}

pub fn next_month(m: Month) -> Month {
    if m.month == 12 {
        Month {
            year: m.year + 1,
            month: 1,
        }
    } else {
        Month {
            year: m.year,
            month: m.month + 1,
        }
    }
}

/// Totals minus other totals: a key's monthly row is its rows minus its
/// late adjustments. The time and watermark stay `a`'s.
pub fn minus(a: Totals, b: Totals) -> Totals {
    Totals {
        requests: a.requests - b.requests,
        successes: a.successes - b.successes,
        errors: a.errors - b.errors,
        ..a
    }
}

/// A month was closed or reopened while this run was counting, and the
/// database refused a write that no longer fits: nothing wrong was written;
/// the next run books the rows where they now belong (exit 75).
#[derive(Debug, thiserror::Error)]
#[error(
    "the closed months changed during the run (now closed: {now}), and the database refused a write made for \
     the months as they were: nothing wrong was written, and the next run counts those rows where they now \
     belong ({detail})"
)]
pub struct PeriodsChanged {
    pub now: String,
    pub detail: String,
}

/// A prune kept deleting rows of these months while `verify` read them, so
/// it could not read their rows and what prune recorded consistently:
/// no verdict on them (exit 75, try again once the prune ends).
#[derive(Debug, thiserror::Error)]
#[error(
    "a prune kept deleting raw rows of {} while verify read them, each time it checked them again: their rows \
     and what prune recorded cannot be read consistently yet, so no verdict (nothing is wrong that verify \
     knows of); run verify again once the prune ends",
    .months.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
)]
pub struct PruneRunning {
    pub months: Vec<Month>,
}

/// A refusal a person must fix by asking differently: exit 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Something in the data stands in the way (drift, refused keys): exit 65.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Blocked(pub String);

/// Adds two counts that billing sums (a month's billed total, what
/// `verify` shows), never wrapping. Within the bound on manual adjustments
/// ([`ADJUST_BOUND`]) no such sum comes near 64 bits; one that
/// overflows holds an adjustment booked before the bound existed, and is
/// refused by name (exit 65) rather than shown wrapped to a wrong total.
pub fn add_counts(a: i64, b: i64, what: impl FnOnce() -> String) -> Result<i64, Blocked> {
    a.checked_add(b).ok_or_else(|| {
        Blocked(format!(
            "{} add up past what a 64-bit count holds ({a} and {b}): an adjustment beyond the bound of \
             {ADJUST_BOUND} (10^12) requests was booked before `usage_agg_adjust` refused such amounts \
             (migration 20261207090000); no total is shown rather than a wrong one. Find it with `SELECT * \
             FROM portal_usage_adjustments WHERE abs(request_count) > {ADJUST_BOUND}`",
            what()
        ))
    })
}

/// [`add_counts`] over many.
pub fn sum_counts(
    counts: impl IntoIterator<Item = i64>,
    what: impl Fn() -> String,
) -> Result<i64, Blocked> {
    counts
        .into_iter()
        .try_fold(0i64, |sum, n| add_counts(sum, n, &what))
}

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

/// Who does it, for the record: the operating-system user and the host.
pub fn who() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown-user".into());
    format!(
        "{user}@{} (usage-agg {})",
        crate::config::hostname(),
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Month {
        Month::parse(s).unwrap()
    }

    #[test]
    fn adjustments_are_booked_in_the_open_month_after_the_newest_closed_one() {
        let none = Periods::none();
        assert_eq!(none.booking_month(m("2025-05")), m("2025-05"));
        let p = Periods::new([m("2025-05"), m("2025-06")]);
        assert!(p.is_closed(m("2025-05")) && !p.is_closed(m("2025-07")));
        assert_eq!(p.booking_month(m("2025-05")), m("2025-07"));
        assert_eq!(p.booking_month(m("2025-06")), m("2025-07"));
        assert_eq!(p.booking_month(m("2025-09")), m("2025-09"));
        let dec = Periods::new([m("2024-12")]);
        assert_eq!(dec.booking_month(m("2024-01")), m("2025-01"));
    }
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

/// The most an adjustment adds or takes away, in each of requests,
/// successes and errors: 10^12, more than any portal's usage comes near.
/// Without a bound the sums billing reads (a month's billed total, the
/// snapshot `close` takes, `verify`'s) overflow 64 bits; within it they
/// cannot, short of millions of adjustments. `usage_agg_adjust` refuses the
/// same (migration 20261207090000), so no other client books past it
/// (docs/semantics.md, "Manual adjustments").
pub const ADJUST_BOUND: i64 = 1_000_000_000_000;

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

/// Ids per prune batch by default: a batch deletes at most this many rows
/// and books them, in one transaction far inside Supabase's 8 s statement
/// timeout (docs/semantics.md, "Closed months").
pub const DEFAULT_PRUNE_BATCH_IDS: u64 = 100_000;

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

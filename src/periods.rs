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
use crate::postgrest::{Client, Idempotent};
use crate::state::JOB;

/// The migration that adds periods, named when its functions are missing.
pub const PERIODS_MIGRATION: &str = "supabase/migrations/20261201090000_usage_agg_periods.sql";

/// The grace after a month's end before it may close, by default: 72 hours
/// (Stripe's longest invoice grace period).
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(72 * 3600);

/// The months closed when a run read them. A run reads them once; a close
/// or a reopening during the run makes the database refuse the writes that
/// no longer fit (its triggers), and the run stops ([`PeriodsChanged`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Periods {
    closed: BTreeSet<Month>,
}

impl Periods {
    /// No month closed (also: the migration is not applied).
    pub fn none() -> Periods {
        Periods::default()
    }

    pub fn new(closed: impl IntoIterator<Item = Month>) -> Periods {
        Periods {
            closed: closed.into_iter().collect(),
        }
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

/// A refusal a person must fix by asking differently: exit 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Something in the data stands in the way (drift, refused keys): exit 65.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Blocked(pub String);

#[derive(Debug, Deserialize)]
struct PeriodsAnswer {
    closed: Vec<String>,
}

/// The closed months (`usage_agg_periods`).
pub async fn read(client: &Client) -> anyhow::Result<Periods> {
    let answer: PeriodsAnswer = client
        // Idempotent: it only reads.
        .rpc("usage_agg_periods", &json!({}), Idempotent::Yes)
        .await
        .context("reading the closed months (usage_agg_periods)")?;
    Ok(Periods::new(
        answer.closed.iter().filter_map(|m| Month::parse(m)),
    ))
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

/// Who does it, for the record: the operating-system user and the host.
pub fn who() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown-user".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{user}@{host} (usage-agg {})", env!("CARGO_PKG_VERSION"))
}

/// `72h`, `90m`, `3d`, `0`: a grace period; negative ones are refused by
/// name (they would let a month close before it ends).
pub fn parse_grace(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!(
            "{s:?}: a grace period cannot be negative (a month cannot close before it ends); use e.g. 72h, or 0"
        ));
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad =
        || format!("{s:?} is not a grace period: expected a number with s, m, h or d, e.g. 72h");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => return Err(bad()),
    }
    .filter(|s| *s <= 366 * 86_400)
    .ok_or_else(|| format!("{s:?}: a grace period of more than a year is not one"))?;
    Ok(std::time::Duration::from_secs(secs))
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

    #[test]
    fn grace_takes_a_unit_and_is_never_negative() {
        assert_eq!(parse_grace("72h").unwrap().as_secs(), 72 * 3600);
        assert_eq!(parse_grace("0").unwrap().as_secs(), 0);
        assert_eq!(parse_grace("3d").unwrap().as_secs(), 3 * 86_400);
        assert!(parse_grace("-1h")
            .unwrap_err()
            .contains("cannot be negative"));
        assert!(parse_grace("2w").is_err() && parse_grace("").is_err());
        assert!(parse_grace("400d")
            .unwrap_err()
            .contains("more than a year"));
    }
}

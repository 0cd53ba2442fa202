//! The dashboard's numbers from the database: one portal's page
//! (`usage_portal_summary`, the call an app's usage page makes). Like
//! `ledger.rs`, it knows the function's name and answer.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::postgrest::{Client, Idempotent};

/// What `usage_portal_summary` answers (its fields are described in
/// `supabase/schemas/20_functions/usage_portal_summary.sql`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct PortalSummary {
    pub version: i64,
    pub portal_id: i64,
    pub as_of: String,
    pub current: CurrentMonth,
    pub months: Vec<SummaryMonth>,
    pub quota: Option<serde_json::Value>,
}

/// The current month, exact right now.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct CurrentMonth {
    pub month: String,
    pub requests: i64,
    pub successes: i64,
    pub errors: i64,
    pub success_rate: Option<f64>,
    pub error_rate: Option<f64>,
    pub last_request_at: Option<String>,
    pub month_start: String,
    pub month_end: String,
    pub elapsed: f64,
    pub projected_requests: Option<i64>,
}

/// One month as billing reads it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct SummaryMonth {
    pub month: String,
    pub requests: i64,
    pub successes: i64,
    pub errors: i64,
    pub success_rate: Option<f64>,
    pub error_rate: Option<f64>,
    pub adjustments: Adjusted,
    pub billed: i64,
    pub closed: bool,
}

/// Requests of the adjustments booked in a month.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Adjusted {
    pub late: i64,
    pub manual: i64,
}

/// One portal's page: `usage_portal_summary(portal, months)`.
pub async fn portal_summary(
    client: &Client,
    portal: i64,
    months: u16,
) -> anyhow::Result<PortalSummary> {
    client
        // Idempotent: it only reads.
        .rpc(
            "usage_portal_summary",
            &json!({"p_portal_id": portal, "p_months": months}),
            Idempotent::Yes,
        )
        .await
        .with_context(|| format!("reading portal {portal}'s usage (usage_portal_summary)"))
}

/// Whether the dashboard migration is applied (`doctor`): one call of
/// `usage_portal_summary` for one month of portal 1, which reads that
/// portal's rows of the month and the rows no run has counted yet.
pub async fn installed(client: &Client) -> anyhow::Result<bool> {
    match client
        // Idempotent: it only reads.
        .rpc::<_, PortalSummary>(
            "usage_portal_summary",
            &json!({"p_portal_id": 1, "p_months": 1}),
            Idempotent::Yes,
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == crate::postgrest::Kind::MissingFunction => Ok(false),
        Err(e) => Err(e).context("reading a portal's usage (usage_portal_summary)"),
    }
}

/// The quota status `usage_portal_summary` passes on, as far as the HTML
/// report reads it: the limit and the projection of the month's end. The
/// quotas migration is another's (issue 20); these are the names it is
/// read by, the first present of each list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub limit: Option<i64>,
    pub used: Option<i64>,
    pub projection: Option<i64>,
}

pub const QUOTA_LIMIT_FIELDS: &[&str] = &["limit", "request_limit", "monthly_request_limit"];
pub const QUOTA_USED_FIELDS: &[&str] = &["used", "request_count"];
pub const QUOTA_PROJECTION_FIELDS: &[&str] = &["projection", "projected", "projected_requests"];

impl Quota {
    pub fn read(v: &serde_json::Value) -> Quota {
        let first = |names: &[&str]| {
            names.iter().find_map(|n| {
                let x = v.get(*n)?;
                x.as_i64().or_else(|| x.as_f64().map(|f| f.round() as i64))
            })
        };
        Quota {
            limit: first(QUOTA_LIMIT_FIELDS),
            used: first(QUOTA_USED_FIELDS),
            projection: first(QUOTA_PROJECTION_FIELDS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_is_read_by_the_names_the_quotas_migration_may_use() {
        let q = Quota::read(&json!({"used": 80, "limit": 100, "percent": 80.0, "projection": 120}));
        assert_eq!(
            q,
            Quota {
                limit: Some(100),
                used: Some(80),
                projection: Some(120)
            }
        );
        let q = Quota::read(&json!({"request_limit": 5, "projected_requests": 7.4}));
        assert_eq!((q.limit, q.projection), (Some(5), Some(7)));
        assert_eq!(Quota::read(&json!({"limit": null})), Quota::default());
    }
}

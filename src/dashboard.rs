//! The dashboard's numbers from the database: one portal's page
//! (`usage_portal_summary`, the call an app's usage page makes) and the
//! all-portals overview `report --html` draws (the monthly rows and the
//! adjustments booked in a window of months, over PostgREST). Like
//! `ledger.rs`, it knows those functions' and tables' names and answers;
//! what a person sees of them is `html_report.rs`'s and `report`'s.

use std::collections::BTreeMap;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::aggregation::{Key, Month, Totals};
use crate::postgrest::{Client, Idempotent, Query};

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

/// A month of every portal: the sums of its monthly rows and of the
/// adjustments booked in it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MonthTotals {
    pub month: String,
    /// Portals with a monthly row.
    pub portals: u64,
    pub requests: i64,
    pub successes: i64,
    pub errors: i64,
    pub late: i64,
    pub manual: i64,
    pub billed: i64,
}

/// One portal in one month, as billing reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PortalMonth {
    pub portal_id: i64,
    pub requests: i64,
    pub successes: i64,
    pub errors: i64,
    pub late: i64,
    pub manual: i64,
    pub billed: i64,
}

/// The all-portals view: the window's monthly totals (oldest first), and
/// in `month` the top portals by requests and the portals with the highest
/// error rates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Overview {
    pub month: String,
    pub months: Vec<MonthTotals>,
    pub top: Vec<PortalMonth>,
    pub error_rates: Vec<PortalMonth>,
    /// Portals with a monthly row in `month`.
    pub portals: usize,
}

/// Reads the monthly rows and the adjustments booked in `window` (oldest
/// first; `month` is its last) and folds them into the overview.
pub async fn overview(
    client: &Client,
    window: &[Month],
    top: usize,
    page: usize,
) -> anyhow::Result<Overview> {
    let months = window
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut stored = std::collections::HashMap::new();
    crate::tables::read_stored_where(
        client,
        &vec![("month_year".into(), format!("in.({months})"))],
        false,
        &mut stored,
        page,
    )
    .await?;
    let filter: Query = vec![("booked_month".into(), format!("in.({months})"))];
    let booked = crate::adjustments::read_booked_where(client, &filter, page).await?;
    let booked: Vec<(i64, Month, bool, i64)> = booked
        .iter()
        .filter_map(|b| {
            Some((
                b.portal_id,
                Month::parse(&b.booked_month)?,
                b.source == "manual",
                b.request_count,
            ))
        })
        .collect();
    fold_overview(
        window,
        &stored.into_iter().collect::<Vec<_>>(),
        &booked,
        top,
    )
    .map_err(Into::into)
}

/// The overview of `rows` (monthly rows) and `booked` (portal, booked
/// month, manual or late, requests), every sum checked
/// ([`crate::periods::add_counts`]).
pub fn fold_overview(
    window: &[Month],
    rows: &[(Key, Totals)],
    booked: &[(i64, Month, bool, i64)],
    top: usize,
) -> Result<Overview, crate::periods::Blocked> {
    use crate::periods::add_counts;
    let Some(&last) = window.last() else {
        return Ok(Overview::default());
    };
    let mut months: BTreeMap<Month, MonthTotals> = window
        .iter()
        .map(|m| {
            (
                *m,
                MonthTotals {
                    month: m.to_string(),
                    ..MonthTotals::default()
                },
            )
        })
        .collect();
    let mut portals: BTreeMap<i64, PortalMonth> = BTreeMap::new();
    for (key, t) in rows {
        let Some(m) = months.get_mut(&key.month) else {
            continue;
        };
        let what = || format!("the requests of {}", key.month);
        m.portals += 1;
        m.requests = add_counts(m.requests, t.requests, what)?;
        m.successes = add_counts(m.successes, t.successes, what)?;
        m.errors = add_counts(m.errors, t.errors, what)?;
        m.billed = add_counts(m.billed, t.requests, what)?;
        if key.month == last {
            portals.insert(
                key.portal_id,
                PortalMonth {
                    portal_id: key.portal_id,
                    requests: t.requests,
                    successes: t.successes,
                    errors: t.errors,
                    late: 0,
                    manual: 0,
                    billed: t.requests,
                },
            );
        }
    }
    for &(portal, month, manual, n) in booked {
        let Some(m) = months.get_mut(&month) else {
            continue;
        };
        let what = || format!("the adjustments booked in {month} and its usage");
        if manual {
            m.manual = add_counts(m.manual, n, what)?;
        } else {
            m.late = add_counts(m.late, n, what)?;
        }
        m.billed = add_counts(m.billed, n, what)?;
        // As `report` lists the top portals: those with a monthly row.
        if month == last {
            if let Some(p) = portals.get_mut(&portal) {
                let what =
                    || format!("portal {portal}'s adjustments booked in {month} and its usage");
                if manual {
                    p.manual = add_counts(p.manual, n, what)?;
                } else {
                    p.late = add_counts(p.late, n, what)?;
                }
                p.billed = add_counts(p.billed, n, what)?;
            }
        }
    }
    let all: Vec<PortalMonth> = portals.into_values().collect();
    let mut by_requests = all.clone();
    by_requests.sort_by(|a, b| {
        b.requests
            .cmp(&a.requests)
            .then(a.portal_id.cmp(&b.portal_id))
    });
    by_requests.truncate(top);
    // The highest error rates: portals with errors, by rate (compared
    // exactly, as fractions), then by errors, then by id.
    let mut by_rate: Vec<PortalMonth> = all
        .iter()
        .filter(|p| p.errors > 0 && p.requests > 0)
        .cloned()
        .collect();
    by_rate.sort_by(|a, b| {
        let lhs = i128::from(b.errors) * i128::from(a.requests);
        let rhs = i128::from(a.errors) * i128::from(b.requests);
        lhs.cmp(&rhs)
            .then(b.errors.cmp(&a.errors))
            .then(a.portal_id.cmp(&b.portal_id))
    });
    by_rate.truncate(top);
    Ok(Overview {
        month: last.to_string(),
        months: months.into_values().collect(),
        top: by_requests,
        error_rates: by_rate,
        portals: all.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Month {
        Month::parse(s).unwrap()
    }

    fn row(portal: i64, month: &str, ok: i64, err: i64) -> (Key, Totals) {
        (
            Key {
                portal_id: portal,
                month: m(month),
            },
            Totals {
                requests: ok + err,
                successes: ok,
                errors: err,
                ..Totals::default()
            },
        )
    }

    #[test]
    fn the_overview_sums_every_month_and_ranks_the_last_one() {
        let window = [m("2025-06"), m("2025-07")];
        let rows = [
            row(1, "2025-06", 10, 0),
            row(2, "2025-06", 5, 5),
            row(1, "2025-07", 90, 10),
            row(2, "2025-07", 3, 1),
            row(3, "2025-07", 40, 0),
            row(4, "2025-07", 8, 2),
            // Outside the window: left out.
            row(1, "2025-05", 1000, 0),
        ];
        let booked = [
            (1, m("2025-07"), false, 4),
            (2, m("2025-07"), true, -1),
            (9, m("2025-07"), true, 7),
            (1, m("2025-06"), true, 2),
            (1, m("2025-04"), true, 100),
        ];
        let o = fold_overview(&window, &rows, &booked, 2).unwrap();
        assert_eq!(o.month, "2025-07");
        assert_eq!(o.portals, 4);
        assert_eq!(
            o.months[0],
            MonthTotals {
                month: "2025-06".into(),
                portals: 2,
                requests: 20,
                successes: 15,
                errors: 5,
                late: 0,
                manual: 2,
                billed: 22,
            }
        );
        assert_eq!(
            (
                o.months[1].requests,
                o.months[1].late,
                o.months[1].manual,
                o.months[1].billed
            ),
            (154, 4, 6, 164)
        );
        let top: Vec<(i64, i64)> = o.top.iter().map(|p| (p.portal_id, p.billed)).collect();
        assert_eq!(top, [(1, 104), (3, 40)]);
        // 2: 25%, 4: 20%, 1: 10%; 3 has no errors.
        let rates: Vec<i64> = o.error_rates.iter().map(|p| p.portal_id).collect();
        assert_eq!(rates, [2, 4]);
    }

    #[test]
    fn equal_error_rates_rank_by_errors_then_by_portal() {
        let window = [m("2025-07")];
        let rows = [
            row(5, "2025-07", 9, 1),
            row(6, "2025-07", 90, 10),
            row(4, "2025-07", 9, 1),
        ];
        let o = fold_overview(&window, &rows, &[], 10).unwrap();
        let rates: Vec<i64> = o.error_rates.iter().map(|p| p.portal_id).collect();
        assert_eq!(rates, [6, 4, 5]);
    }

    #[test]
    fn a_sum_past_64_bits_is_refused_not_wrapped() {
        let window = [m("2025-07")];
        let rows = [row(1, "2025-07", 10, 0)];
        let booked = [(1, m("2025-07"), true, i64::MAX)];
        assert!(fold_overview(&window, &rows, &booked, 10).is_err());
    }

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

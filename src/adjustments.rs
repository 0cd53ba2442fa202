//! The periods migration's tables over PostgREST: `portal_usage_adjustments`
//! (late rows of closed months, and manual corrections) and
//! `usage_agg_pruned` (the good raw rows prune deleted, per key). Like
//! [`crate::tables`], it knows the schema and nothing of runs.

use std::collections::HashMap;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::aggregation::{parse_timestamp, Key, Month, Totals};
use crate::postgrest::{Client, Query};

pub const ADJUSTMENTS_TABLE: &str = "portal_usage_adjustments";
pub const PRUNED_TABLE: &str = "usage_agg_pruned";
pub const CLOSED_MONTHS_TABLE: &str = "usage_agg_closed_months";

/// A late adjustment's key: the usage's key, and the month it is booked in.
pub type LateKey = (Key, Month);

const LATE_COLUMNS: &str =
    "id,portal_id,month_year,booked_month,request_count,success_count,error_count,\
                            last_request_at,last_request_id";
const MANUAL_COLUMNS: &str =
    "id,portal_id,month_year,booked_month,request_count,success_count,error_count,\
                              reason,idempotency_key,created_at,created_by";
const PRUNED_COLUMNS: &str =
    "id,portal_id,month_year,request_count,success_count,error_count,last_request_at";

/// The idempotency key of a late adjustment: one row per key and booked
/// month, so the one unique key of the table serves both sources.
pub fn late_key(key: &Key, booked: Month) -> String {
    format!("late:{}:{}:{booked}", key.portal_id, key.month)
}

#[derive(Debug, Clone, Deserialize)]
struct LateIn {
    id: i64,
    portal_id: i64,
    month_year: String,
    booked_month: String,
    request_count: i64,
    success_count: i64,
    error_count: i64,
    last_request_at: Option<String>,
    #[serde(default)]
    last_request_id: i64,
}

impl LateIn {
    fn late_key(&self) -> Option<LateKey> {
        Some((
            Key {
                portal_id: self.portal_id,
                month: Month::parse(&self.month_year)?,
            },
            Month::parse(&self.booked_month)?,
        ))
    }

    fn totals(&self) -> Totals {
        Totals {
            requests: self.request_count,
            successes: self.success_count,
            errors: self.error_count,
            last_request_at: self.last_request_at.as_deref().and_then(parse_timestamp),
            last_request_id: self.last_request_id,
        }
    }
}

/// Pages through a table by its own `id`, every page.
async fn read_all<T: serde::de::DeserializeOwned>(
    client: &Client,
    table: &str,
    select: &str,
    filters: &Query,
    page_size: usize,
    id: impl Fn(&T) -> i64,
) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::new();
    let mut after = 0i64;
    loop {
        let mut q = filters.clone();
        q.push(("select".into(), select.into()));
        q.push(("id".into(), format!("gt.{after}")));
        q.push(("order".into(), "id.asc".into()));
        q.push(("limit".into(), page_size.to_string()));
        let rows: Vec<T> = client
            .select(table, &q)
            .await
            .with_context(|| format!("reading {table}"))?;
        let Some(last) = rows.last() else {
            return Ok(out);
        };
        after = id(last);
        out.extend(rows);
    }
}

/// Late adjustments matching `filters`, by key and booked month.
pub async fn read_late_where(
    client: &Client,
    filters: &Query,
    into: &mut HashMap<LateKey, Totals>,
    page_size: usize,
) -> anyhow::Result<()> {
    let mut q = filters.clone();
    q.push(("source".into(), "eq.late".into()));
    let rows: Vec<LateIn> = read_all(
        client,
        ADJUSTMENTS_TABLE,
        LATE_COLUMNS,
        &q,
        page_size,
        |r: &LateIn| r.id,
    )
    .await?;
    for r in rows {
        if let Some(k) = r.late_key() {
            into.insert(k, r.totals());
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
struct PrunedIn {
    id: i64,
    portal_id: i64,
    month_year: String,
    request_count: i64,
    success_count: i64,
    error_count: i64,
    last_request_at: Option<String>,
}

/// What prune deleted, per key, matching `filters`.
pub async fn read_pruned_where(
    client: &Client,
    filters: &Query,
    page_size: usize,
) -> anyhow::Result<HashMap<Key, Totals>> {
    let rows: Vec<PrunedIn> = read_all(
        client,
        PRUNED_TABLE,
        PRUNED_COLUMNS,
        filters,
        page_size,
        |r: &PrunedIn| r.id,
    )
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let key = Key {
                portal_id: r.portal_id,
                month: Month::parse(&r.month_year)?,
            };
            Some((
                key,
                Totals {
                    requests: r.request_count,
                    successes: r.success_count,
                    errors: r.error_count,
                    last_request_at: r.last_request_at.as_deref().and_then(parse_timestamp),
                    last_request_id: 0,
                },
            ))
        })
        .collect())
}

/// How far each month is pruned (`usage_agg_closed_months.pruned_through`,
/// every month ever closed): every raw row of the month at or below it is
/// deleted and counted in usage_agg_pruned. A prune batch that deletes
/// rows of a month moves its mark in the same transaction, so marks read
/// unchanged on both sides of a read mean no batch touched the month in
/// between (`verify` relies on it).
pub async fn read_pruned_through(client: &Client) -> anyhow::Result<HashMap<Month, i64>> {
    #[derive(Deserialize)]
    struct Mark {
        month_year: String,
        pruned_through: i64,
    }
    let mut out = HashMap::new();
    let mut after = String::new();
    loop {
        let q: Query = vec![
            ("select".into(), "month_year,pruned_through".into()),
            ("month_year".into(), format!("gt.{after}")),
            ("order".into(), "month_year.asc".into()),
        ];
        let marks: Vec<Mark> = client
            .select(CLOSED_MONTHS_TABLE, &q)
            .await
            .with_context(|| {
                format!("reading how far each month is pruned ({CLOSED_MONTHS_TABLE})")
            })?;
        let Some(last) = marks.last() else {
            return Ok(out);
        };
        after = last.month_year.clone();
        out.extend(
            marks
                .into_iter()
                .filter_map(|m| Some((Month::parse(&m.month_year)?, m.pruned_through))),
        );
    }
}

/// A manual adjustment, as booked.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Manual {
    pub id: i64,
    pub portal_id: i64,
    pub month_year: String,
    pub booked_month: String,
    pub request_count: i64,
    pub success_count: i64,
    pub error_count: i64,
    pub reason: Option<String>,
    pub idempotency_key: String,
    pub created_at: Option<String>,
    pub created_by: Option<String>,
}

/// Manual adjustments matching `filters`.
pub async fn read_manual_where(
    client: &Client,
    filters: &Query,
    page_size: usize,
) -> anyhow::Result<Vec<Manual>> {
    let mut q = filters.clone();
    q.push(("source".into(), "eq.manual".into()));
    read_all(
        client,
        ADJUSTMENTS_TABLE,
        MANUAL_COLUMNS,
        &q,
        page_size,
        |r: &Manual| r.id,
    )
    .await
}

/// An adjustment of either source, as billing reads it: booked in
/// `booked_month`'s invoice.
#[derive(Debug, Clone, Deserialize)]
pub struct Booked {
    pub id: i64,
    pub portal_id: i64,
    pub month_year: String,
    pub booked_month: String,
    pub source: String,
    pub request_count: i64,
}

/// Adjustments (both sources) matching `filters`; none when the periods
/// migration is not applied (the table is missing): nothing was ever
/// adjusted.
pub async fn read_booked_where(
    client: &Client,
    filters: &Query,
    page_size: usize,
) -> anyhow::Result<Vec<Booked>> {
    let read = read_all(
        client,
        ADJUSTMENTS_TABLE,
        "id,portal_id,month_year,booked_month,source,request_count",
        filters,
        page_size,
        |r: &Booked| r.id,
    )
    .await;
    match read {
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<crate::postgrest::Failure>()
                    .is_some_and(|f| f.kind() == crate::postgrest::Kind::MissingTable)
            }) =>
        {
            Ok(Vec::new())
        }
        other => other,
    }
}

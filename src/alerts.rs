//! The quotas migration's calls (docs/quotas.md): quotas set and read,
//! a portal's month against its quota (`usage_quota_status`), the alerts
//! the rule book recorded, and their delivery attempts. Like `ledger.rs`,
//! it knows the functions' and tables' names and answers; the rules are the
//! database's (the rule book decides crossings) and `quota.rs`'s.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::aggregation::Month;
use crate::postgrest::{Client, Idempotent, Kind, Query};

pub const QUOTAS_TABLE: &str = "portal_usage_quotas";
pub const ALERTS_TABLE: &str = "portal_usage_alerts";

/// One row of `portal_usage_quotas`: a portal's quota, or the default
/// plan's (`portal_id` None).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Quota {
    pub portal_id: Option<i64>,
    pub monthly_request_limit: i64,
    pub thresholds_percent: Vec<i64>,
    pub updated_at: Option<String>,
    pub updated_by: Option<String>,
}

/// What `usage_agg_set_quota` answered: the quota set and the one it
/// replaced, or why it refused (writing nothing).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SetAnswer {
    pub refused: Option<String>,
    pub quota: Option<Quota>,
    pub previous: Option<PreviousQuota>,
    /// Thresholds the portal's open months (every portal's, for the
    /// default plan) had already reached, recorded with the quota.
    pub alerts: Vec<Crossing>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct PreviousQuota {
    pub monthly_request_limit: i64,
    pub thresholds_percent: Vec<i64>,
    pub updated_at: Option<String>,
    pub updated_by: Option<String>,
}

pub async fn set_quota(
    client: &Client,
    portal: Option<i64>,
    limit: i64,
    thresholds: &[u32],
    by: &str,
    new_portal: bool,
) -> anyhow::Result<SetAnswer> {
    let mut args = json!({
        "p_limit": limit,
        "p_thresholds": thresholds,
        "p_by": by,
        "p_new_portal": new_portal,
    });
    // The default plan's: left out, not null ("No JSON null arguments",
    // docs/postgrest.md).
    if let Some(p) = portal {
        args["p_portal_id"] = json!(p);
    }
    client
        // Idempotent: setting the same quota again leaves it as set.
        .rpc("usage_agg_set_quota", &args, Idempotent::Yes)
        .await
        .context("setting the quota (usage_agg_set_quota)")
}

/// Every quota: the default plan's first, then the portals' by id.
pub async fn quotas(client: &Client, portal: Option<i64>) -> anyhow::Result<Vec<Quota>> {
    const COLUMNS: &str =
        "portal_id,monthly_request_limit,thresholds_percent,updated_at,updated_by";
    let mut out: Vec<Quota> = client
        .select(
            QUOTAS_TABLE,
            &vec![
                ("select".into(), COLUMNS.into()),
                ("portal_id".into(), "is.null".into()),
            ],
        )
        .await
        .context("reading the default quota (portal_usage_quotas)")?;
    // Keyset pages by portal_id: the server caps every answer silently.
    let mut after = 0i64;
    loop {
        let mut q: Query = vec![
            ("select".into(), COLUMNS.into()),
            ("order".into(), "portal_id.asc".into()),
            ("limit".into(), "1000".into()),
        ];
        match portal {
            Some(p) if after == 0 => q.push(("portal_id".into(), format!("eq.{p}"))),
            Some(_) => break,
            None => q.push(("portal_id".into(), format!("gt.{after}"))),
        }
        let rows: Vec<Quota> = client
            .select(QUOTAS_TABLE, &q)
            .await
            .context("reading the quotas (portal_usage_quotas)")?;
        let Some(last) = rows.last().and_then(|r| r.portal_id) else {
            break;
        };
        after = last;
        out.extend(rows);
        if portal.is_some() {
            break;
        }
    }
    Ok(out)
}

/// A portal's month against its quota (`usage_quota_status`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct QuotaStatus {
    pub portal_id: i64,
    pub month_year: String,
    pub used: i64,
    pub request_limit: Option<i64>,
    pub percent: Option<f64>,
    pub projected: i64,
    pub projected_percent: Option<f64>,
    pub thresholds_percent: Option<Vec<i64>>,
    /// `portal`, `default` or `none`.
    pub quota: String,
    pub alerted_percent: Vec<i64>,
}

pub async fn quota_status(
    client: &Client,
    portal: i64,
    month: Option<Month>,
) -> anyhow::Result<QuotaStatus> {
    let mut args = json!({ "p_portal_id": portal });
    if let Some(m) = month {
        args["p_month"] = json!(m.to_string());
    }
    let rows: Vec<QuotaStatus> = client
        // Idempotent: it only reads.
        .rpc("usage_quota_status", &args, Idempotent::Yes)
        .await
        .context("reading the portal's use of its quota (usage_quota_status)")?;
    rows.into_iter()
        .next()
        .context("usage_quota_status answered no row")
}

/// One row of `portal_usage_alerts`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Alert {
    pub id: i64,
    pub portal_id: i64,
    pub month_year: String,
    pub threshold_percent: i64,
    pub request_limit: i64,
    pub request_count: i64,
    pub crossed_at: String,
    pub delivered_at: Option<String>,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<String>,
    /// The `webhook-id` of every delivery of it.
    pub webhook_id: String,
}

/// Which alerts to read.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlertFilter {
    pub undelivered: bool,
    pub portal: Option<i64>,
    pub month: Option<Month>,
}

/// Alerts, oldest first, every page (keyset by id).
pub async fn list(client: &Client, filter: AlertFilter) -> anyhow::Result<Vec<Alert>> {
    let mut out = Vec::new();
    let mut after = 0i64;
    loop {
        let mut q: Query = vec![
            ("select".into(), "*".into()),
            ("id".into(), format!("gt.{after}")),
            ("order".into(), "id.asc".into()),
            ("limit".into(), "1000".into()),
        ];
        if filter.undelivered {
            q.push(("delivered_at".into(), "is.null".into()));
        }
        if let Some(p) = filter.portal {
            q.push(("portal_id".into(), format!("eq.{p}")));
        }
        if let Some(m) = filter.month {
            q.push(("month_year".into(), format!("eq.{m}")));
        }
        let rows: Vec<Alert> = client
            .select(ALERTS_TABLE, &q)
            .await
            .context("reading the alerts (portal_usage_alerts)")?;
        let Some(last) = rows.last() else {
            return Ok(out);
        };
        after = last.id;
        out.extend(rows);
    }
}

/// Records one delivery attempt (`usage_agg_alert_attempt`).
pub async fn note_attempt(
    client: &Client,
    id: i64,
    delivered: bool,
    error: Option<&str>,
) -> anyhow::Result<()> {
    let mut args = json!({"p_id": id, "p_delivered": delivered});
    if let Some(e) = error {
        args["p_error"] = json!(e);
    }
    let _: serde_json::Value = client
        // Not sent twice: each call counts an attempt.
        .rpc("usage_agg_alert_attempt", &args, Idempotent::No)
        .await
        .with_context(|| {
            format!("recording the delivery attempt of alert {id} (usage_agg_alert_attempt)")
        })?;
    Ok(())
}

/// The undelivered alerts in numbers (`usage_agg_alerts_status`), by the
/// database's clock.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct AlertsStatus {
    pub undelivered: u64,
    pub oldest_crossed_at: Option<String>,
    pub oldest_age_seconds: Option<i64>,
    pub attempted: u64,
    pub last_error: Option<String>,
    pub quotas: u64,
    pub alerts: u64,
}

/// None when the quotas migration is not applied.
pub async fn status(client: &Client) -> anyhow::Result<Option<AlertsStatus>> {
    match client
        // Idempotent: it only reads.
        .rpc::<_, AlertsStatus>("usage_agg_alerts_status", &json!({}), Idempotent::Yes)
        .await
    {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == Kind::MissingFunction => Ok(None),
        Err(e) => Err(anyhow::Error::new(e)
            .context("reading the undelivered alerts (usage_agg_alerts_status)")),
    }
}

/// An alert the rule book recorded (or, dry, would record).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct Crossing {
    /// The alert's id; None for one a dry run would record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    pub portal_id: i64,
    pub month_year: String,
    pub threshold_percent: i64,
    pub request_limit: i64,
    pub request_count: i64,
}

/// Notes `months` as months whose crossings are pending
/// (`usage_agg_mark_crossings_pending`), before a rebuild writes them over
/// REST: a rebuild killed before it records their crossings leaves them
/// for the next run to sweep. False without the quota gaps migration (the
/// rebuild then records its months' crossings as before it).
pub async fn mark_crossings_pending(client: &Client, months: &[Month]) -> anyhow::Result<bool> {
    let args = json!({
        "p_job": crate::config::JOB,
        "p_months": months.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
    });
    match client
        // Idempotent: a month noted twice is noted once.
        .rpc::<_, serde_json::Value>("usage_agg_mark_crossings_pending", &args, Idempotent::Yes)
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == Kind::MissingFunction => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context(
            "noting the rebuilt months whose quotas' crossings are pending (usage_agg_mark_crossings_pending)",
        )),
    }
}

/// Records the crossings of the pending months and clears them, in one
/// transaction (`usage_agg_sweep_pending_crossings`); nothing without the
/// quota gaps migration.
pub async fn sweep_pending_crossings(client: &Client) -> anyhow::Result<Vec<Crossing>> {
    match client
        // Idempotent: a crossing recorded once is never recorded again.
        .rpc::<_, Vec<Crossing>>(
            "usage_agg_sweep_pending_crossings",
            &json!({"p_job": crate::config::JOB}),
            Idempotent::Yes,
        )
        .await
    {
        Ok(c) => Ok(c),
        Err(e) if e.kind() == Kind::MissingFunction => Ok(Vec::new()),
        Err(e) => Err(anyhow::Error::new(e).context(
            "recording the quotas' crossings of a rebuild's pending months (usage_agg_sweep_pending_crossings)",
        )),
    }
}

/// The alerts a run would record, recording none
/// (`usage_agg_preview_crossings`): those of the pending months, of keys
/// above `above`, and of a rebuild writing `planned` (each key's monthly
/// request count) and recording `months`' crossings. Nothing without the
/// quota gaps migration.
pub async fn preview_crossings(
    client: &Client,
    planned: &[(crate::aggregation::Key, i64)],
    months: &[Month],
    above: Option<i64>,
) -> anyhow::Result<Vec<Crossing>> {
    let keys: Vec<serde_json::Value> = planned
        .iter()
        .map(|(k, c)| json!({"portal_id": k.portal_id, "month_year": k.month.to_string(), "c": c}))
        .collect();
    let mut args = json!({
        "p_job": crate::config::JOB,
        "p_keys": keys,
        "p_months": months.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
    });
    if let Some(a) = above {
        args["p_above"] = json!(a);
    }
    match client
        // Idempotent: it only reads.
        .rpc::<_, Vec<Crossing>>("usage_agg_preview_crossings", &args, Idempotent::Yes)
        .await
    {
        Ok(c) => Ok(c),
        Err(e) if e.kind() == Kind::MissingFunction => Ok(Vec::new()),
        Err(e) => Err(anyhow::Error::new(e)
            .context("reading the alerts a run would record (usage_agg_preview_crossings)")),
    }
}

/// Whether the quota gaps migration is applied (its read-only
/// `usage_agg_preview_crossings` answers): `doctor`'s migrations check.
pub async fn quota_gaps_installed(client: &Client) -> anyhow::Result<bool> {
    match client
        // Idempotent: it only reads.
        .rpc::<_, Vec<Crossing>>(
            "usage_agg_preview_crossings",
            &json!({"p_job": crate::config::JOB}),
            Idempotent::Yes,
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == Kind::MissingFunction => Ok(false),
        Err(e) => Err(anyhow::Error::new(e)
            .context("reading the alerts a run would record (usage_agg_preview_crossings)")),
    }
}

/// The crossings of months a rebuild wrote (`usage_agg_record_crossings`);
/// nothing when the quotas migration is not applied.
pub async fn record_crossings(
    client: &Client,
    months: Option<&[Month]>,
    above: Option<i64>,
) -> anyhow::Result<Vec<Crossing>> {
    // NULL arguments are left out ("No JSON null arguments",
    // docs/postgrest.md): every open month, every key.
    let mut args = json!({});
    if let Some(ms) = months {
        args["p_months"] = json!(ms.iter().map(|m| m.to_string()).collect::<Vec<_>>());
    }
    if let Some(a) = above {
        args["p_above"] = json!(a);
    }
    match client
        // Idempotent: a crossing recorded once is never recorded again.
        .rpc::<_, Vec<Crossing>>("usage_agg_record_crossings", &args, Idempotent::Yes)
        .await
    {
        Ok(c) => Ok(c),
        Err(e) if e.kind() == Kind::MissingFunction => Ok(Vec::new()),
        Err(e) => Err(anyhow::Error::new(e).context(
            "recording the quotas' crossings of the rebuilt months (usage_agg_record_crossings)",
        )),
    }
}

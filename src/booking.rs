//! The one rule book's door (docs/semantics.md, "Booking a row"): every
//! engine books counted rows through `usage_agg_book_folded` in the
//! database. The REST engine folds rows by key in memory and hands the
//! folded keys to `usage_agg_book`; the server-side engine and the
//! scheduled run fold in SQL and call the same rules. Nothing here decides
//! where a row goes: this module only carries keys there and answers back.

use anyhow::Context;
use serde::Deserialize;
use serde_json::json;

use crate::aggregation::{format_timestamp, parse_timestamp, Key, Totals};
use crate::config::JOB;
use crate::postgrest::{Client, Idempotent};

/// Why a key stands refused (docs/semantics.md, "Rebuilds", "Verdicts").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Writing it would have lowered a stored count.
    Decrease,
    /// Its write did not hold.
    Lost,
}

impl RefusalKind {
    pub fn label(self) -> &'static str {
        match self {
            RefusalKind::Decrease => "decrease",
            RefusalKind::Lost => "lost",
        }
    }
}

/// A key a rebuild leaves refused: what is stored, what its rows say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub key: Key,
    pub stored: i64,
    pub raw: i64,
    pub kind: RefusalKind,
}

/// Keys per call. A call's keys are booked in one transaction; a batch with
/// more keys goes in several calls, the cursor moving with the last (a run
/// that dies between them leaves keys counted past the cursor, which the
/// next booking counts again from their watermarks, in the database).
pub const KEYS_PER_CALL: usize = 5_000;

/// What the rule book (`usage_agg_book`, docs/semantics.md, "Booking a
/// row") answered for one call: the facts; the engine decides nothing from
/// them but what to report.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Booked {
    /// Rows booked, in all and into late adjustments.
    pub rows: u64,
    pub late_rows: u64,
    /// Keys whose target was written (or, dry, would be), in all and late.
    pub keys: usize,
    pub late_keys: usize,
    /// Keys another run had counted part of the range for: counted again
    /// from the raw rows, in the database.
    pub raced_keys: u64,
    /// Keys another run had already counted past every folded row.
    pub superseded_keys: u64,
    /// Keys whose write did not hold (`portal:month`), recorded as refused
    /// keys of kind `lost`.
    pub lost: Vec<String>,
    /// With a dry run, each change the booking would make.
    pub changes: Vec<BookedChange>,
    /// The quotas' thresholds the booked keys' months reached, recorded in
    /// the same transaction (or, dry, that it would record).
    pub alerts: Vec<crate::alerts::Crossing>,
}

/// One change a dry booking would make.
#[derive(Debug, Clone, Deserialize)]
pub struct BookedChange {
    pub portal_id: i64,
    pub month_year: String,
    /// The month a late adjustment is booked in; None for a monthly row.
    pub booked_month: Option<String>,
    pub before: Option<Stated>,
    pub after: Stated,
    pub counted_from: i64,
}

/// What a rebase did to closed months before resetting the watermarks.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Rebased {
    pub watermarks_reset: i64,
    /// Closed months' keys whose uncounted rows were booked late.
    pub closed_booked: Vec<ClosedBooked>,
    /// Closed months' keys with fewer rows than billed: refused, recorded.
    pub closed_refused: Vec<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct ClosedBooked {
    pub key: String,
    pub rows: i64,
}

/// A target's counts as the database states them.
#[derive(Debug, Clone, Deserialize)]
pub struct Stated {
    pub request_count: i64,
    pub success_count: i64,
    pub error_count: i64,
    pub last_request_at: Option<String>,
    pub last_request_id: Option<i64>,
}

impl From<Totals> for Stated {
    fn from(t: Totals) -> Stated {
        Stated {
            request_count: t.requests,
            success_count: t.successes,
            error_count: t.errors,
            last_request_at: t.last_request_at.map(format_timestamp),
            last_request_id: Some(t.last_request_id),
        }
    }
}

impl Stated {
    pub fn totals(&self) -> Totals {
        Totals {
            requests: self.request_count,
            successes: self.success_count,
            errors: self.error_count,
            last_request_at: self.last_request_at.as_deref().and_then(parse_timestamp),
            last_request_id: self.last_request_id.unwrap_or(0),
        }
    }
}

/// A key as the database names it, `portal:YYYY-MM`.
pub fn parse_key(s: &str) -> Option<Key> {
    let (portal, month) = s.split_once(':')?;
    Some(Key {
        portal_id: portal.parse().ok()?,
        month: crate::aggregation::Month::parse(month)?,
    })
}

/// One folded key as `usage_agg_book` takes it.
fn folded(key: &Key, t: &Totals) -> serde_json::Value {
    json!({
        "portal_id": key.portal_id,
        "month_year": key.month.to_string(),
        "c": t.requests,
        "s": t.successes,
        "e": t.errors,
        "at": t.last_request_at.map(format_timestamp),
        "w": t.last_request_id,
    })
}

/// Books folded keys over REST (`usage_agg_book`).
pub async fn book(
    client: &Client,
    from: i64,
    to: i64,
    keys: &[(Key, Totals)],
    advance: Option<u64>,
    dry_run: bool,
) -> anyhow::Result<Booked> {
    let mut args = json!({
        "p_job": JOB,
        "p_from": from,
        "p_to": to,
        "p_keys": keys.iter().map(|(k, t)| folded(k, t)).collect::<Vec<_>>(),
        "p_advance": advance.is_some(),
        "p_dry_run": dry_run,
    });
    // Left out rather than null when not moving the cursor ("No JSON null
    // arguments", docs/postgrest.md).
    if let Some(good) = advance {
        args["p_good_rows"] = json!(good);
    }
    client
        // Safe to send again: a call whose answer was lost either did not
        // commit, or did, and then every key's watermark is past its rows,
        // so the second books nothing (and the cursor never moves back).
        .rpc("usage_agg_book", &args, Idempotent::Yes)
        .await
        .with_context(|| {
            format!(
                "booking {} keys of ids ({from}, {to}] (usage_agg_book)",
                keys.len()
            )
        })
}

/// Resets the cursor and the watermarks for a rebuild at `horizon`
/// (`usage_agg_rebase`), booking closed months' uncounted rows first.
pub async fn rebase(client: &Client, owner: &str, horizon: i64) -> anyhow::Result<Rebased> {
    client
        // Idempotent: a second call finds the watermarks at 0 already, and
        // the closed months' rows booked.
        .rpc(
            "usage_agg_rebase",
            &json!({"p_job": JOB, "p_owner": owner, "p_horizon": horizon}),
            Idempotent::Yes,
        )
        .await
        .context("resetting the cursor and the watermarks (usage_agg_rebase)")
}

//! `usage-agg verify`: recompute from raw rows, compare with the table,
//! write nothing. Exit 0 when every key agrees, 65 with the list otherwise.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::json;

use super::connect;
use crate::adjustments::read_pruned_through;
use crate::aggregation::{Month, Totals};
use crate::cli::VerifyArgs;
use crate::engine::rebuild::{self, Marks, Recount, Scope};
use crate::exit::Status;
use crate::ledger::status;
use crate::output::{self, Style};
use crate::periods::{sum_counts, Periods, PruneRunning};
use crate::ping::Ping;
use crate::postgrest::Client;
use crate::printer::{Printer, Report};
use crate::progress::Progress;
use crate::store::rest::RestStore;
use crate::store::Store;

/// How many times a month a prune deleted rows of during verify's reads is
/// read again, and the wait before the second time (doubling after): a
/// month that races again is one a prune is still working through, whose
/// batches come every few tenths of a second.
const PRUNE_RECHECKS: u32 = 4;
const PRUNE_RECHECK_WAIT: Duration = Duration::from_millis(500);

pub async fn run(args: VerifyArgs) -> Status {
    let printer = Printer::new("verify", &args.output);
    // The nightly check pings its own monitor: start, then the exit status
    // with what --json prints (or the error).
    let ping = match Ping::new(args.ping_url.as_deref()) {
        Ok(p) => p,
        Err(e) => return printer.fail(&e.into(), None),
    };
    ping.start().await;
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => {
            let status = printer.fail(&e, None);
            ping.finish(status, &printer.failure_json(status, &e)).await;
            return status;
        }
    };
    let printer = printer.against(&config);
    match verify(&args, &client).await {
        Ok(v) => {
            let status = printer.report(&v);
            ping.finish(status, &printer.json_of(&v)).await;
            status
        }
        Err(e) => {
            let status = printer.fail(&e, Some(&config));
            ping.finish(status, &printer.failure_json(status, &e)).await;
            status
        }
    }
}

/// What `verify` found: the keys that differ from their rows, the rows no
/// run can count, and the checks of closed months and adjustments.
struct Verified {
    drift: Vec<crate::engine::Change>,
    keys_checked: usize,
    rows_read: u64,
    bad: crate::aggregation::BadRows,
    checks: Checks,
    rechecked: Vec<Month>,
}

impl Verified {
    fn clean(&self) -> bool {
        self.drift.is_empty() && self.checks.snapshot_mismatches.is_empty()
    }
}

/// The documented JSON fields: the comparison, the rejected rows, the
/// checks, and the months read again beside a prune.
impl serde::Serialize for Verified {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut json = output::verify_json(&self.drift, self.keys_checked, self.rows_read);
        json["rows_rejected"] = self.bad.count.into();
        json["rejected_examples"] = self
            .bad
            .examples
            .iter()
            .map(|(id, why)| json!({"id": id, "reason": why.to_string()}))
            .collect();
        if let (Some(o), serde_json::Value::Object(extra)) =
            (json.as_object_mut(), self.checks.json())
        {
            o.extend(extra);
        }
        json["rechecked_after_prune"] = self.rechecked.iter().map(ToString::to_string).collect();
        json.serialize(s)
    }
}

impl Report for Verified {
    fn outcome(&self) -> &str {
        if self.clean() {
            "ok"
        } else {
            "drift"
        }
    }

    fn status(&self) -> Status {
        if self.clean() {
            Status::Ok
        } else {
            Status::DataErr
        }
    }

    fn render(&self, style: Style) -> String {
        let mut s = output::verify_report(style, &self.drift, self.keys_checked, self.rows_read);
        if self.bad.count > 0 {
            s.push_str(&format!(
                "{} rejected as bad data and counted nowhere: {}\n",
                output::count(self.bad.count, "row is", "rows are"),
                self.bad
                    .examples
                    .iter()
                    .map(|(id, why)| format!("id {id} ({why})"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        s.push_str(&self.checks.render());
        if !self.rechecked.is_empty() {
            s.push_str(&format!(
                "  Checked again: {} (a prune deleted rows of them while they were read; each was read again \
                 with no prune batch in between)\n",
                self.rechecked
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        s
    }
}

/// The comparison.
async fn verify(args: &VerifyArgs, client: &Client) -> anyhow::Result<Verified> {
    let scope = args.month.map_or(Scope::All, Scope::Month);
    let store = RestStore::new(client.clone());
    let marks = if store.installed().await? {
        let cursor = store.state().await?.and_then(|s| s.cursor_id);
        Some(Marks {
            cursor,
            horizon: store
                .safe_horizon(crate::engine::DEFAULT_HORIZON_WAIT)
                .await?,
        })
    } else {
        None
    };
    let periods = if marks.is_some() {
        store.periods().await?
    } else {
        Periods::none()
    };
    let progress = Progress::for_terminal(args.output.quiet || args.output.json);
    let pace = crate::pace::Pace::with_deadline(args.scan.pace(None), client.deadline());
    let recount = |scope| {
        rebuild::recount(
            &store,
            scope,
            marks,
            &periods,
            args.scan.page_size,
            &pace,
            &progress,
            None,
        )
    };
    // Without the migrations nothing is closed, so nothing is pruned.
    let (rc, rechecked) = if marks.is_some() {
        recount_beside_prune(client, scope, recount).await?
    } else {
        (recount(scope).await?, Vec::new())
    };
    // Closed months' snapshots and the adjustments: with the periods
    // migration (whose absence the periods read above already refused).
    let checks = if marks.is_some() {
        Checks::gather(client, &rc, args.month, args.scan.page_size).await?
    } else {
        Checks::default()
    };
    Ok(Verified {
        drift: rc.drift(true),
        keys_checked: rc.stored.len(),
        rows_read: rc.rows_read,
        bad: rc.fresh.bad.clone(),
        checks,
        rechecked,
    })
}

/// A recount whose raw rows and pruned rows are read consistently beside a
/// concurrent `prune`, and the months read again for that.
///
/// A prune batch deletes raw rows and books them in usage_agg_pruned in one
/// transaction, but verify reads the pruned record and then scans the raw
/// rows over many requests: a batch in between deletes rows counted in
/// neither (before, verify reported that as drift), and one during the scan
/// deletes some rows the scan had already seen. The scan is unordered
/// (parallel sub-ranges), so which rows it saw before a batch cannot be
/// worked out afterwards. What can be known is whether a batch ran: each
/// batch moves its months' `pruned_through` in the same transaction, so a
/// month whose mark reads the same before the recount and after it was not
/// touched by any batch in between, and its keys were read consistently. A
/// month whose mark moved is read again on its own, between two reads of
/// the marks, until one is consistent; after [`PRUNE_RECHECKS`] tries no
/// verdict is given on it ([`PruneRunning`], exit 75): never a drift a
/// prune made up. A month is usually read again once, at the cost of
/// `verify --month` (its rows are then mostly pruned, but the server walks
/// the id range); a prune beside a verify is rare, so this is not worth a
/// scan of several months at once.
async fn recount_beside_prune<F, Fut>(
    client: &Client,
    scope: Scope,
    recount: F,
) -> anyhow::Result<(Recount, Vec<Month>)>
where
    F: Fn(Scope) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Recount>>,
{
    let in_scope = |m: &Month| match scope {
        Scope::All => true,
        Scope::Month(want) => *m == want,
    };
    let before = read_pruned_through(client).await?;
    let mut rc = recount(scope).await?;
    let after = read_pruned_through(client).await?;
    let mut racing: BTreeSet<Month> = moved(&before, &after)
        .into_iter()
        .filter(in_scope)
        .collect();
    let rechecked: Vec<Month> = racing.iter().copied().collect();
    let mut wait = PRUNE_RECHECK_WAIT;
    for attempt in 0..PRUNE_RECHECKS {
        if racing.is_empty() {
            break;
        }
        if attempt > 0 {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
        let mut still = BTreeSet::new();
        for m in racing {
            let before = read_pruned_through(client).await?;
            let again = recount(Scope::Month(m)).await?;
            let after = read_pruned_through(client).await?;
            if moved(&before, &after).contains(&m) {
                still.insert(m);
            } else {
                rc.replace_month(m, again);
            }
        }
        racing = still;
    }
    if !racing.is_empty() {
        return Err(PruneRunning {
            months: racing.into_iter().collect(),
        }
        .into());
    }
    Ok((rc, rechecked))
}

/// The months whose prune mark differs between two reads (a month not
/// there is marked 0: never pruned).
fn moved(before: &HashMap<Month, i64>, after: &HashMap<Month, i64>) -> BTreeSet<Month> {
    let mark = |marks: &HashMap<Month, i64>, m: &Month| marks.get(m).copied().unwrap_or(0);
    before
        .keys()
        .chain(after.keys())
        .filter(|m| mark(before, m) != mark(after, m))
        .copied()
        .collect()
}

/// What `verify` checks and shows besides each key's rows
/// (docs/semantics.md, "Closed months").
#[derive(Debug, Default, Clone)]
pub struct Checks {
    /// Closed months whose monthly rows no longer add up to their snapshot
    /// (the trigger was bypassed: disabled, or a superuser's session).
    pub snapshot_mismatches: Vec<String>,
    pub closed_checked: usize,
    /// Late adjustments: counted rows, part of the invariant.
    pub late_keys: usize,
    pub late_requests: i64,
    /// Manual adjustments: corrections, shown apart, never compared with
    /// raw rows.
    pub manual_count: usize,
    pub manual_requests: i64,
    /// Good raw rows prune deleted, counted through usage_agg_pruned.
    pub pruned_rows: i64,
}

impl Checks {
    /// Compares each closed month in scope with its snapshot, and sums the
    /// adjustments, from what the recount read.
    pub async fn gather(
        client: &Client,
        rc: &crate::engine::rebuild::Recount,
        month: Option<Month>,
        page_size: usize,
    ) -> anyhow::Result<Checks> {
        let mut c = Checks {
            late_keys: rc.late.len(),
            late_requests: sum_counts(rc.late.values().map(|t| t.requests), || {
                "the late adjustments".into()
            })?,
            pruned_rows: sum_counts(rc.pruned.values().map(|t| t.requests), || {
                "the pruned rows".into()
            })?,
            ..Checks::default()
        };
        for closed in status(client, 0).await?.closed {
            let Some(m) = Month::parse(&closed.month) else {
                continue;
            };
            if month.is_some_and(|want| want != m) {
                continue;
            }
            c.closed_checked += 1;
            let rows: Vec<&Totals> = rc
                .stored
                .iter()
                .filter(|(k, _)| k.month == m)
                .map(|(_, t)| t)
                .collect();
            let what = || format!("{m}'s monthly rows");
            let now = (
                rows.len() as i64,
                sum_counts(rows.iter().map(|t| t.requests), what)?,
                sum_counts(rows.iter().map(|t| t.successes), what)?,
                sum_counts(rows.iter().map(|t| t.errors), what)?,
            );
            let then = (
                closed.keys,
                closed.requests,
                closed.successes,
                closed.errors,
            );
            if now != then {
                c.snapshot_mismatches.push(format!(
                    "{m}: closed with {} keys, {} requests ({} successes, {} errors); now {} keys, {} requests \
                     ({} successes, {} errors)",
                    then.0, then.1, then.2, then.3, now.0, now.1, now.2, now.3
                ));
            }
            if closed.booked_now != closed.booked_adjustments {
                c.snapshot_mismatches.push(format!(
                    "{m}: closed with {} requests of adjustments booked in it; now {}",
                    closed.booked_adjustments, closed.booked_now
                ));
            }
        }
        let filters: crate::postgrest::Query = match month {
            Some(m) => vec![("month_year".into(), format!("eq.{m}"))],
            None => Vec::new(),
        };
        let manual = crate::adjustments::read_manual_where(client, &filters, page_size).await?;
        c.manual_count = manual.len();
        c.manual_requests = sum_counts(manual.iter().map(|a| a.request_count), || {
            "the manual adjustments".into()
        })?;
        Ok(c)
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "closed_months_checked": self.closed_checked,
            "snapshot_mismatches": self.snapshot_mismatches,
            "late_adjustments": {"keys": self.late_keys, "requests": self.late_requests},
            "manual_adjustments": {"count": self.manual_count, "requests": self.manual_requests},
            "pruned_rows": self.pruned_rows,
        })
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        if self.closed_checked > 0 {
            if self.snapshot_mismatches.is_empty() {
                s.push_str(&format!(
                    "  Closed months: {} checked, each still adds up to the snapshot taken at its close\n",
                    self.closed_checked
                ));
            } else {
                s.push_str(&format!(
                    "  Closed months: {} of {} no longer add up to the snapshot taken at their close (their rows \
                     were changed past the trigger):\n",
                    self.snapshot_mismatches.len(),
                    self.closed_checked
                ));
                for m in &self.snapshot_mismatches {
                    s.push_str(&format!("    {m}\n"));
                }
            }
        }
        if self.late_keys > 0 {
            s.push_str(&format!(
                "  Late adjustments: {} requests in {} keys, checked with their months' rows above\n",
                self.late_requests, self.late_keys
            ));
        }
        if self.pruned_rows > 0 {
            s.push_str(&format!(
                "  Pruned rows: {} (checked through what prune recorded when it deleted them)\n",
                self.pruned_rows
            ));
        }
        if self.manual_count > 0 {
            s.push_str(&format!(
                "  Manual adjustments: {} entries, {:+} requests in all (corrections, not counted rows: never \
                 compared with raw rows; `usage-agg report` lists them)\n",
                self.manual_count, self.manual_requests
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_month_whose_prune_mark_moved_is_read_again_and_one_never_pruned_is_not() {
        let m = |s: &str| Month::parse(s).unwrap();
        let before = HashMap::from([(m("2025-01"), 100), (m("2025-02"), 100)]);
        let after = HashMap::from([
            (m("2025-01"), 100),
            (m("2025-02"), 300),
            // Closed and pruned meanwhile.
            (m("2025-03"), 300),
            // Closed meanwhile, not pruned yet.
            (m("2025-04"), 0),
        ]);
        assert_eq!(
            moved(&before, &after).into_iter().collect::<Vec<_>>(),
            [m("2025-02"), m("2025-03")]
        );
        assert!(moved(&after, &after).is_empty());
    }
}

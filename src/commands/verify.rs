//! `usage-agg verify`: recompute from raw rows, compare with the table,
//! write nothing. Exit 0 when every key agrees, 65 with the list otherwise.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use super::{connect, failure_json, report_error};
use crate::adjustments::read_pruned_through;
use crate::aggregation::Month;
use crate::cli::VerifyArgs;
use crate::engine::rebuild::{self, Marks, Recount, Scope};
use crate::exit::Status;
use crate::output::{self, Style};
use crate::periods::{Checks, Periods, PruneRunning};
use crate::ping::Ping;
use crate::postgrest::Client;
use crate::progress::Progress;
use crate::store::rest::RestStore;
use crate::store::Store;

/// Verify waits for writers as briefly as aggregate does by default.
const HORIZON_WAIT: Duration = Duration::from_millis(2000);

/// How many times a month a prune deleted rows of during verify's reads is
/// read again, and the wait before the second time (doubling after): a
/// month that races again is one a prune is still working through, whose
/// batches come every few tenths of a second.
const PRUNE_RECHECKS: u32 = 4;
const PRUNE_RECHECK_WAIT: Duration = Duration::from_millis(500);

pub async fn run(args: VerifyArgs) -> Status {
    // The nightly check pings its own monitor: start, then the exit status
    // with what --json prints (or the error).
    let ping = match Ping::new(args.ping_url.as_deref()) {
        Ok(p) => p,
        Err(e) => return report_error(&e.into(), None),
    };
    ping.start().await;
    let (status, json) = verify(&args).await;
    ping.finish(status, &json).await;
    status
}

/// The comparison, printed; its exit status and its JSON.
async fn verify(args: &VerifyArgs) -> (Status, serde_json::Value) {
    let style = Style::detect();
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => {
            let status = report_error(&e, None);
            return (status, failure_json("verify", None, status, &e));
        }
    };
    let scope = args.month.map_or(Scope::All, Scope::Month);
    let result = async {
        let store = RestStore::new(client.clone());
        let marks = if store.installed().await? {
            let cursor = store.state().await?.and_then(|s| s.cursor_id);
            Some(Marks {
                cursor,
                horizon: store.safe_horizon(HORIZON_WAIT).await?,
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
            recount_beside_prune(&client, scope, recount).await?
        } else {
            (recount(scope).await?, Vec::new())
        };
        // Closed months' snapshots and the adjustments: with the periods
        // migration (whose absence the periods read above already refused).
        let checks = if marks.is_some() {
            Checks::gather(&client, &rc, args.month, args.scan.page_size).await?
        } else {
            Checks::default()
        };
        anyhow::Ok((rc, checks, rechecked))
    }
    .await;
    match result {
        Ok((rc, checks, rechecked)) => {
            let drift = rc.drift(true);
            let mut json = output::verify_json(&drift, rc.stored.len(), rc.rows_read);
            json["environment"] = config.environment.upper().into();
            let clean = drift.is_empty() && checks.snapshot_mismatches.is_empty();
            json["exit_status"] = if clean { 0 } else { 65 }.into();
            json["outcome"] = if clean { "ok" } else { "drift" }.into();
            // The rows no run can count, as they stand now: bad rows are
            // shown by every verify until someone fixes or deletes them.
            let bad = &rc.fresh.bad;
            json["rows_rejected"] = bad.count.into();
            json["rejected_examples"] = bad
                .examples
                .iter()
                .map(|(id, why)| serde_json::json!({"id": id, "reason": why.to_string()}))
                .collect();
            if let (Some(o), serde_json::Value::Object(extra)) =
                (json.as_object_mut(), checks.json())
            {
                o.extend(extra);
            }
            json["rechecked_after_prune"] = rechecked.iter().map(ToString::to_string).collect();
            if args.output.json {
                crate::outln!("{json}");
            } else if !args.output.quiet {
                crate::out!(
                    "{}",
                    output::verify_report(style, &drift, rc.stored.len(), rc.rows_read)
                );
                if bad.count > 0 {
                    crate::outln!(
                        "{} rejected as bad data and counted nowhere: {}",
                        output::count(bad.count, "row is", "rows are"),
                        bad.examples
                            .iter()
                            .map(|(id, why)| format!("id {id} ({why})"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    );
                }
                crate::out!("{}", checks.render());
                if !rechecked.is_empty() {
                    crate::outln!(
                        "  Checked again: {} (a prune deleted rows of them while they were read; each was read \
                         again with no prune batch in between)",
                        rechecked
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            let status = if drift.is_empty() && checks.snapshot_mismatches.is_empty() {
                Status::Ok
            } else {
                Status::DataErr
            };
            (status, json)
        }
        Err(e) => {
            let status = report_error(&e, Some(&config));
            let env = config.environment.upper();
            (status, failure_json("verify", Some(env), status, &e))
        }
    }
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

//! `usage-agg verify`: recompute from raw rows, compare with the table,
//! write nothing. Exit 0 when every key agrees, 65 with the list otherwise.

use std::time::Duration;

use super::{connect, failure_json, report_error};
use crate::cli::VerifyArgs;
use crate::engine::rebuild::{self, Marks, Scope};
use crate::exit::Status;
use crate::output::{self, Style};
use crate::periods::{Checks, Periods};
use crate::ping::Ping;
use crate::progress::Progress;
use crate::store::rest::RestStore;
use crate::store::Store;

/// Verify waits for writers as briefly as aggregate does by default.
const HORIZON_WAIT: Duration = Duration::from_millis(2000);

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
        let rc = rebuild::recount(
            &store,
            scope,
            marks,
            &periods,
            args.scan.page_size,
            &crate::pace::Pace::with_deadline(args.scan.pace(None), client.deadline()),
            &progress,
            None,
        )
        .await?;
        // Closed months' snapshots and the adjustments: with the periods
        // migration (whose absence the periods read above already refused).
        let checks = if marks.is_some() {
            Checks::gather(&client, &rc, args.month, args.scan.page_size).await?
        } else {
            Checks::default()
        };
        anyhow::Ok((rc, checks))
    }
    .await;
    match result {
        Ok((rc, checks)) => {
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

//! `usage-agg reopen --month YYYY-MM --reason TEXT`: mark a closed month
//! open again, recorded (who, when, why) in usage_agg_closed_months and its
//! history. Its monthly rows may then change again: rows of it that arrive
//! from now on are counted there, and adjustments are booked after the
//! newest month still closed (docs/semantics.md, "Closed months").

use serde_json::json;

use super::{connect, failure_json, report_error};
use crate::cli::ReopenArgs;
use crate::exit::Status;
use crate::periods::{self, Refusal};
use crate::store::rest::RestStore;
use crate::store::Store;

pub async fn run(args: ReopenArgs) -> Status {
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => return report_error(&e, None),
    };
    let env = config.environment.upper();
    let store = RestStore::new(client);
    let by = periods::who();
    let result = async {
        anyhow::ensure!(
            store.installed().await?,
            "the usage-agg migrations are not applied, so no month is closed"
        );
        let a = store.reopen_month(args.month, &args.reason, &by).await?;
        if let Some(r) = &a.refused {
            return Err(Refusal(format!("{} was not reopened: {r}", args.month)).into());
        }
        Ok(a)
    }
    .await;
    match result {
        Ok(a) => {
            let outcome = if a.reopened { "reopened" } else { "not_closed" };
            if args.output.json {
                crate::outln!(
                    "{}",
                    json!({
                        "version": 1, "command": "reopen", "environment": env, "exit_status": 0,
                        "outcome": outcome, "month": args.month.to_string(), "reason": args.reason,
                        "reopened_by": by, "reopened_at": a.reopened_at,
                        "was_closed_at": a.closed_at, "was_closed_by": a.closed_by, "error": null,
                    })
                );
            } else if !args.output.quiet {
                if a.reopened {
                    crate::outln!(
                        "Reopened {} (closed at {} by {}), by {by}, because: {}. Its monthly rows may change again; \
                         close it again with `usage-agg close --month {}`",
                        args.month,
                        a.closed_at.as_deref().unwrap_or("?"),
                        a.closed_by.as_deref().unwrap_or("?"),
                        args.reason,
                        args.month
                    );
                } else {
                    crate::outln!("{} is not closed; nothing to do", args.month);
                }
            }
            Status::Ok
        }
        Err(e) => {
            let status = report_error(&e, Some(&config));
            if args.output.json {
                crate::outln!("{}", failure_json("reopen", Some(env), status, &e));
            }
            status
        }
    }
}

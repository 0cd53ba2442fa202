//! `usage-agg prune --before YYYY-MM`: deletes the raw rows of closed months
//! before that month, in id-range batches of one transaction each, each
//! booking the good rows it deletes per key (usage_agg_pruned) so that
//! `verify` still checks those months; resumable after a kill (each month
//! records how far it is pruned). An open month before it refuses the
//! prune, named (docs/semantics.md, "Closed months").

use serde_json::json;

use super::{connect, failure_json, report_error};
use crate::cli::PruneArgs;
use crate::exit::Status;
use crate::periods::{self, Blocked, Refusal};
use crate::store::rest::RestStore;
use crate::store::Store;

#[derive(Debug, Default)]
struct Pruned {
    months: Vec<String>,
    batches: u64,
    deleted: u64,
    good_deleted: u64,
    rows_left: i64,
    through: Option<i64>,
}

pub async fn run(args: PruneArgs) -> Status {
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => return report_error(&e, None),
    };
    let env = config.environment.upper();
    let store = RestStore::new(client);
    match prune(&store, &args).await {
        Ok(p) => {
            if args.output.json {
                crate::outln!(
                    "{}",
                    json!({
                        "version": 1, "command": "prune", "environment": env, "exit_status": 0,
                        "dry_run": args.dry_run, "before": args.before.to_string(), "months": p.months,
                        "batches": p.batches, "rows_deleted": p.deleted, "good_rows_deleted": p.good_deleted,
                        "rows_left": p.rows_left, "pruned_through": p.through, "error": null,
                    })
                );
            } else if !args.output.quiet {
                if p.months.is_empty() {
                    crate::outln!("No closed month before {}: nothing to prune", args.before);
                } else if args.dry_run {
                    crate::outln!(
                        "Dry run: about {} good raw rows of the closed months {} are still there and would be \
                         deleted (up to the cursor, {}); nothing was deleted",
                        p.rows_left,
                        p.months.join(", "),
                        p.through.map_or("?".into(), |c| c.to_string())
                    );
                } else {
                    crate::outln!(
                        "Pruned {} raw rows ({} counted ones, booked per key in usage_agg_pruned) of the closed \
                         months {}, in {} batches, through id {}; `usage-agg verify` checks them from what was \
                         booked",
                        p.deleted,
                        p.good_deleted,
                        p.months.join(", "),
                        p.batches,
                        p.through.map_or("?".into(), |c| c.to_string())
                    );
                }
            }
            Status::Ok
        }
        Err(e) => {
            let status = report_error(&e, Some(&config));
            if args.output.json {
                crate::outln!("{}", failure_json("prune", Some(env), status, &e));
            }
            status
        }
    }
}

async fn prune(store: &RestStore, args: &PruneArgs) -> anyhow::Result<Pruned> {
    anyhow::ensure!(
        store.installed().await?,
        "the usage-agg migrations are not applied, so no month is closed and nothing can be pruned"
    );
    let mut p = Pruned::default();
    loop {
        let b = periods::prune_batch(store.client(), args.before, args.batch_size, args.dry_run)
            .await?;
        match b.refused.as_deref() {
            None => {}
            Some("open_months") => {
                return Err(Refusal(format!(
                    "months before {} are open: {}; only closed months are pruned (close them first: `usage-agg \
                     close --month ...`, or prune --before an earlier month)",
                    args.before,
                    b.months.join(", ")
                ))
                .into())
            }
            Some("no_cursor") => {
                return Err(Blocked(
                    "no run has counted anything yet (no cursor): nothing is known counted, so nothing is pruned"
                        .into(),
                )
                .into())
            }
            // Prune deletes what it knows is counted: rows up to the
            // cursor. A run-time problem (a sequence restart, say) or a
            // refused key means rows there may be counted nowhere.
            Some("problems") => {
                return Err(anyhow::Error::new(crate::preflight::Refused(b.problems)).context(
                    "refused to prune: a run-time check failed, so rows below the cursor may not be counted; \
                     nothing was deleted (repair what it names, then prune again)",
                ))
            }
            Some("refused_keys") => {
                return Err(Blocked(format!(
                    "refused to prune: keys of these months are refused ({}), and their raw rows are what \
                     decides them; nothing was deleted (`usage-agg status` names each and its repair; prune \
                     once they are settled)",
                    b.keys.join(", ")
                ))
                .into())
            }
            Some(other) => return Err(Blocked(format!("the prune was refused ({other})")).into()),
        }
        if p.batches == 0 {
            p.rows_left = b.rows_left;
        }
        p.months = b.months;
        p.through = b.to.or(b.cursor);
        if b.dry_run {
            return Ok(p);
        }
        p.batches += 1;
        p.deleted += b.deleted;
        p.good_deleted += b.good_deleted;
        p.rows_left = b.rows_left;
        tracing::info!(from = b.from, to = b.to, deleted = b.deleted, "prune batch");
        crate::failpoint::hit("page");
        if b.done {
            return Ok(p);
        }
    }
}

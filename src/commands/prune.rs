//! `usage-agg prune --before YYYY-MM`: deletes the raw rows of closed months
//! before that month, in id-range batches of one transaction each, each
//! booking the good rows it deletes per key (usage_agg_pruned) so that
//! `verify` still checks those months; resumable after a kill (each month
//! records how far it is pruned). An open month before it refuses the
//! prune, named (docs/semantics.md, "Closed months").

use serde::Serialize;

use super::connect;
use crate::cli::PruneArgs;
use crate::exit::Status;
use crate::ledger;
use crate::output::Style;
use crate::periods::{Blocked, Refusal};
use crate::printer::{Printer, Report};
use crate::store::rest::RestStore;
use crate::store::Store;

/// What a prune deleted (or, dry, would).
#[derive(Debug, Default, Serialize)]
struct Pruned {
    dry_run: bool,
    before: String,
    months: Vec<String>,
    batches: u64,
    #[serde(rename = "rows_deleted")]
    deleted: u64,
    #[serde(rename = "good_rows_deleted")]
    good_deleted: u64,
    rows_left: i64,
    #[serde(rename = "pruned_through")]
    through: Option<i64>,
}

impl Report for Pruned {
    fn outcome(&self) -> &str {
        // The JSON has had no outcome of its own: its exit status says it.
        "ok"
    }

    fn render(&self, _: Style) -> String {
        let through = self.through.map_or("?".into(), |c| c.to_string());
        if self.months.is_empty() {
            format!("No closed month before {}: nothing to prune\n", self.before)
        } else if self.dry_run {
            format!(
                "Dry run: about {} good raw rows of the closed months {} are still there and would be deleted (up \
                 to the cursor, {through}); nothing was deleted\n",
                self.rows_left,
                self.months.join(", "),
            )
        } else {
            format!(
                "Pruned {} raw rows ({} counted ones, booked per key in usage_agg_pruned) of the closed months {}, \
                 in {}, through id {through}; `usage-agg verify` checks them from what was booked\n",
                self.deleted,
                self.good_deleted,
                self.months.join(", "),
                crate::output::count(self.batches, "batch", "batches"),
            )
        }
    }
}

pub async fn run(args: PruneArgs) -> Status {
    let printer = Printer::new("prune", &args.output);
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => return printer.fail(&e, None),
    };
    let printer = printer.against(&config);
    let store = RestStore::new(client);
    match prune(&store, &args).await {
        Ok(p) => printer.report(&p),
        Err(e) => printer.fail(&e, Some(&config)),
    }
}

async fn prune(store: &RestStore, args: &PruneArgs) -> anyhow::Result<Pruned> {
    anyhow::ensure!(
        store.installed().await?,
        "the usage-agg migrations are not applied, so no month is closed and nothing can be pruned"
    );
    let mut p = Pruned {
        dry_run: args.dry_run,
        before: args.before.to_string(),
        ..Pruned::default()
    };
    loop {
        let b =
            ledger::prune_batch(store.client(), args.before, args.batch_size, args.dry_run).await?;
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
                let refused = crate::preflight::Refused(b.problems);
                let message = format!(
                    "refused to prune: a run-time check failed, so rows below the cursor may be counted by no \
                     one; nothing was deleted. Repair it, then prune again: {}",
                    refused
                        .0
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                return Err(match refused.kind() {
                    crate::preflight::ProblemKind::Schema => crate::config::ConfigError(message).into(),
                    crate::preflight::ProblemKind::Data => Blocked(message).into(),
                });
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

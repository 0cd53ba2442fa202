//! `usage-agg reopen --month YYYY-MM --reason TEXT`: mark a closed month
//! open again, recorded (who, when, why) in usage_agg_closed_months and its
//! history. Its monthly rows may then change again: rows of it that arrive
//! from now on are counted there, and adjustments are booked after the
//! newest month still closed (docs/semantics.md, "Closed months").

use serde::Serialize;

use super::connect;
use crate::cli::ReopenArgs;
use crate::exit::Status;
use crate::output::{human_time, Style};
use crate::periods::{self, Refusal};
use crate::printer::{Printer, Report};
use crate::store::rest::RestStore;
use crate::store::Store;

/// What `reopen` did: the month, and who had closed it when.
#[derive(Debug, Serialize)]
struct Reopened {
    #[serde(skip)]
    reopened: bool,
    month: String,
    reason: String,
    reopened_by: String,
    reopened_at: Option<String>,
    was_closed_at: Option<String>,
    was_closed_by: Option<String>,
}

impl Report for Reopened {
    fn outcome(&self) -> &str {
        if self.reopened {
            "reopened"
        } else {
            "not_closed"
        }
    }

    fn render(&self, _: Style) -> String {
        if self.reopened {
            format!(
                "Reopened {} by {}, because: {} (it was closed at {} by {}). Its monthly rows may change \
                 again; close it again with `usage-agg close --month {}`\n",
                self.month,
                self.reopened_by,
                self.reason,
                self.was_closed_at.as_deref().map_or("?".into(), human_time),
                self.was_closed_by.as_deref().unwrap_or("?"),
                self.month
            )
        } else {
            format!("{} is not closed; nothing to do\n", self.month)
        }
    }
}

pub async fn run(args: ReopenArgs) -> Status {
    let printer = Printer::new("reopen", &args.output);
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => return printer.fail(&e, None),
    };
    let printer = printer.against(&config);
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
        // Open again, the month fires what its usage has reached (a closed
        // month fires nothing; its late rows may have crossed meanwhile,
        // and no new row of it may ever come: an adversarial pass).
        if a.reopened {
            store.record_crossings(Some(&[args.month]), None).await?;
        }
        Ok(a)
    }
    .await;
    match result {
        Ok(a) => printer.report(&Reopened {
            reopened: a.reopened,
            month: args.month.to_string(),
            reason: args.reason,
            reopened_by: by,
            reopened_at: a.reopened_at,
            was_closed_at: a.closed_at,
            was_closed_by: a.closed_by,
        }),
        Err(e) => printer.fail(&e, Some(&config)),
    }
}

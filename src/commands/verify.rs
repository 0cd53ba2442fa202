//! `usage-agg verify`: recompute from raw rows, compare with the table,
//! write nothing. Exit 0 when every key agrees, 65 with the list otherwise.

use std::time::Duration;

use super::{connect, report_error};
use crate::cli::VerifyArgs;
use crate::engine::rebuild::{self, Marks, Scope};
use crate::exit::Status;
use crate::output::{self, Style};
use crate::progress::Progress;
use crate::state::JobState;

/// Verify waits for writers as briefly as aggregate does by default.
const HORIZON_WAIT: Duration = Duration::from_millis(2000);

pub async fn run(args: VerifyArgs) -> Status {
    let style = Style::detect();
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => return report_error(&e, None),
    };
    let scope = args.month.map_or(Scope::All, Scope::Month);
    let result = async {
        let state = JobState::new(&client);
        let marks = if state.installed().await? {
            let cursor = state.read().await?.and_then(|s| s.cursor_id);
            Some(Marks {
                cursor,
                horizon: state.safe_horizon(HORIZON_WAIT).await?,
            })
        } else {
            None
        };
        let progress = Progress::for_terminal(args.output.quiet || args.output.json);
        rebuild::recount(
            &client,
            scope,
            marks,
            args.scan.page_size,
            usize::from(args.scan.concurrency),
            &progress,
            None,
        )
        .await
    }
    .await;
    match result {
        Ok(rc) => {
            let drift = rc.drift(true);
            if args.output.json {
                println!(
                    "{}",
                    output::verify_json(&drift, rc.stored.len(), rc.rows_read)
                );
            } else if !args.output.quiet {
                print!(
                    "{}",
                    output::verify_report(style, &drift, rc.stored.len(), rc.rows_read)
                );
            }
            if drift.is_empty() {
                Status::Ok
            } else {
                Status::DataErr
            }
        }
        Err(e) => report_error(&e, Some(&config)),
    }
}

//! `usage-agg aggregate`: turn the arguments into a [`Job`], run it against
//! the project's store, print the summary (or the JSON), ping the monitor.

use std::time::{Duration, Instant};

use super::{connect, report_error};
use crate::cli::{AggregateArgs, Engine};
use crate::engine::rebuild::Scope;
use crate::engine::{Options, Outcome, Verdict};
use crate::exit::Status;
use crate::job::Job;
use crate::output::{self, RunRecord, Style};
use crate::ping::Ping;
use crate::postgrest::Client;
use crate::progress::Progress;
use crate::state;
use crate::store::rest::RestStore;

pub async fn run(args: AggregateArgs) -> Status {
    let style = Style::detect();
    let human = !args.output.json && !args.output.quiet;
    let ping = match Ping::new(args.ping_url.as_deref()) {
        Ok(p) => p,
        Err(e) => return report_error(&e.into(), None),
    };
    ping.start().await;
    let started = chrono::Utc::now();
    let clock = Instant::now();
    let mut warnings = Vec::new();

    let connected = connect(&args.connection);
    let (result, env) = match &connected {
        Ok((config, client)) => {
            let env = config.environment.upper();
            if human {
                print!(
                    "{}",
                    output::header(style, started, env, &config.chosen_by, args.dry_run)
                );
            }
            let progress = Progress::for_terminal(!human);
            (
                aggregate(client, &args, progress, &mut warnings).await,
                Some(env),
            )
        }
        Err(_) => (Err(anyhow::anyhow!("not configured")), None),
    };
    let status = match (&connected, &result) {
        (Err(e), _) => report_error(e, None),
        (Ok(_), Ok(o)) => o.verdict().status(),
        (Ok((config, _)), Err(e)) => {
            if human {
                print!("{}", output::failure(style, &format!("{e:#}")));
            }
            report_error(e, Some(config))
        }
    };
    // --auto-close: after a run whose totals are right, close the months
    // past their grace (docs/semantics.md, "Closed months").
    let auto = match (&connected, &result, args.auto_close) {
        (Ok((_, client)), Ok(o), Some(grace))
            if matches!(o.verdict(), Verdict::Ok | Verdict::BadRows) =>
        {
            Some(super::close::auto_close(&RestStore::new(client.clone()), grace).await)
        }
        _ => None,
    };
    let status = match (&auto, &connected) {
        (Some(Err(e)), Ok((config, _))) => {
            let s = report_error(e, Some(config));
            if status == Status::Ok {
                s
            } else {
                status
            }
        }
        (Some(Ok(a)), _) if !a.refused.is_empty() && status == Status::Ok => Status::DataErr,
        _ => status,
    };
    if human {
        if let (Ok(outcome), Some(env)) = (&result, env) {
            for w in &warnings {
                print!("{}", output::warning(style, w));
            }
            print!("{}", output::summary(style, outcome, env, clock.elapsed()));
            if let Some(Ok(a)) = &auto {
                print!("{}", a.render());
            }
        }
    } else {
        for w in &warnings {
            tracing::warn!("{w}");
        }
    }
    let error = connected.as_ref().err();
    let record = RunRecord {
        command: "aggregate",
        environment: env,
        started_at: started,
        duration: clock.elapsed(),
        dry_run: args.dry_run,
        status,
        result: match (&result, error) {
            (_, Some(e)) => Err(e),
            (Ok(o), None) => Ok(o),
            (Err(e), None) => Err(e),
        },
        warnings: &warnings,
    };
    let mut json = output::run_json(&record);
    if let (Some(Ok(a)), Some(o)) = (&auto, json.as_object_mut()) {
        if let serde_json::Value::Object(extra) = a.json() {
            o.extend(extra);
        }
    }
    if args.output.json {
        println!("{json}");
    }
    ping.finish(status, &json).await;
    status
}

async fn aggregate(
    client: &Client,
    args: &AggregateArgs,
    progress: Progress,
    warnings: &mut Vec<String>,
) -> anyhow::Result<Outcome> {
    let job = Job {
        scope: args.month.map_or(Scope::All, Scope::Month),
        full: args.full,
        rebase: args.rebase,
        engine: args.engine,
        batch_ids: args.batch_ids_for(Engine::Rpc),
        opts: Options {
            dry_run: args.dry_run,
            page_size: args.scan.page_size,
            batch_rows: args.batch_ids_for(Engine::Rest),
            allow_decrease: args.allow_decrease,
            owner: None,
            lease_ttl: Duration::from_secs(args.lease_ttl),
            horizon_wait: Duration::from_millis(args.horizon_wait_ms),
            progress,
            concurrency: usize::from(args.scan.concurrency),
        },
        owner: state::owner_id(),
    };
    job.run(&RestStore::new(client.clone()), warnings).await
}

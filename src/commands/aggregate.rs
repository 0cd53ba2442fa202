//! `usage-agg aggregate`: take the lease, pick the engine, run it, record
//! the run, print the summary (or the JSON), ping the monitor.

use std::time::{Duration, Instant};

use super::{connect, report_error};
use crate::cli::AggregateArgs;
use crate::cli::Engine;
use crate::engine::rebuild::{self, Marks, Scope};
use crate::engine::{incremental, rpc, Mode, Options, Outcome, Refusals, UsageError};
use crate::exit::{self, Status};
use crate::output::{self, RunRecord, Style};
use crate::ping::Ping;
use crate::postgrest::Client;
use crate::preflight;
use crate::progress::Progress;
use crate::state::{self, JobState, LeaseHeld, MIGRATION_FILE};

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
    if human {
        if let (Ok(outcome), Some(env)) = (&result, env) {
            for w in &warnings {
                print!("{}", output::warning(style, w));
            }
            print!("{}", output::summary(style, outcome, env, clock.elapsed()));
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
    let json = output::run_json(&record);
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
    let state = JobState::new(client);
    let owner = state::owner_id();
    let mut opts = Options {
        dry_run: args.dry_run,
        page_size: args.scan.page_size,
        batch_rows: args.batch_ids_for(Engine::Rest),
        allow_decrease: args.allow_decrease || args.rebase,
        owner: None,
        lease_ttl: Duration::from_secs(args.lease_ttl),
        horizon_wait: Duration::from_millis(args.horizon_wait_ms),
        progress,
        concurrency: usize::from(args.scan.concurrency),
    };
    let scope = args.month.map_or(Scope::All, Scope::Month);
    if !state.installed().await? {
        if args.rebase {
            return Err(UsageError(format!(
                "--rebase resets the cursor and the watermarks, which only exist with the migrations; \
                 without them every run recomputes every key anyway: run without --rebase, or apply {MIGRATION_FILE} first"
            ))
            .into());
        }
        warnings.push(format!(
            "the usage-agg migration is not applied, so every key is recomputed from all rows (slow on big \
             tables, and overlapping runs are not guarded); apply {MIGRATION_FILE} (`usage-agg sql | psql`)"
        ));
        return rebuild::run(client, scope, None, false, &opts).await;
    }

    // Before anything is counted: the assumptions the counts rest on.
    let facts = state.preflight().await?;
    let blocking: Vec<_> = preflight::problems(&facts)
        .into_iter()
        .filter(|p| !(args.rebase && p.rebase_repairs()))
        .collect();
    if !blocking.is_empty() {
        return Err(preflight::Refused(blocking).into());
    }

    let cursor = if args.dry_run {
        facts.cursor
    } else {
        let cursor = take_lease(&state, &owner, opts.lease_ttl, warnings).await?;
        opts.owner = Some(owner.clone());
        cursor
    };
    let result = async {
        let horizon = state.safe_horizon(opts.horizon_wait).await?;
        if args.rebase {
            let lowered = state.rebase(&owner).await?;
            tracing::info!(keys = lowered, "watermarks reset for the rebase");
            let marks = Marks {
                cursor: None,
                horizon,
            };
            return rebuild::run(client, Scope::All, Some(marks), true, &opts).await;
        }
        let restored = if facts.deleted_keys > 0 && !args.dry_run {
            state.restore_deleted_keys().await?
        } else {
            Vec::new()
        };
        if !restored.is_empty() {
            warnings.push(format!(
                "{} keys had their portal_usage_monthly row deleted; rebuilt from all their rows: {}",
                restored.len(),
                restored.iter().take(20).cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let marks = Marks { cursor, horizon };
        let owner = (!args.dry_run).then_some(owner.as_str());
        let mut outcome = match cursor {
            Some(c) if scope == Scope::All && !args.full && args.engine == Engine::Rpc => {
                rpc::run(client, c, owner, args.batch_ids_for(Engine::Rpc), &opts).await?
            }
            Some(c) if scope == Scope::All && !args.full => {
                incremental::run(client, c, horizon, owner, &opts).await?
            }
            _ => rebuild::run(client, scope, Some(marks), false, &opts).await?,
        };
        if matches!(outcome.mode, Mode::Incremental | Mode::Rpc { .. }) || args.dry_run {
            outcome.refusals_standing = Refusals {
                count: facts.refused_keys,
                since: facts.refused_since.clone(),
                examples: facts.refused_examples.clone(),
            };
        }
        outcome.restored_keys = restored;
        Ok(outcome)
    }
    .await;
    if !args.dry_run {
        let (label, rows) = match &result {
            Ok(o) => (o.verdict().label(), o.rows_counted),
            Err(e) if exit::classify(e) == Status::TempFail => ("stopped", 0),
            Err(_) => ("failed", 0),
        };
        if let Err(e) = state.finish(&owner, label, rows).await {
            tracing::warn!("could not record the run's outcome: {e}");
        }
    }
    result
}

/// Takes the lease, or takes it over from a run on this host whose process
/// is gone; returns the cursor.
async fn take_lease(
    state: &JobState<'_>,
    owner: &str,
    ttl: Duration,
    warnings: &mut Vec<String>,
) -> anyhow::Result<Option<i64>> {
    let lease = state.acquire(owner, ttl, None).await?;
    if lease.acquired {
        return Ok(lease.cursor);
    }
    if state::owner_is_dead_here(&lease.owner) {
        let taken = state.acquire(owner, ttl, Some(&lease.owner)).await?;
        if taken.acquired {
            warnings.push(format!(
                "took over the lease from {}, whose process is gone",
                lease.owner
            ));
            return Ok(taken.cursor);
        }
    }
    Err(LeaseHeld {
        owner: lease.owner,
        since: lease.since.unwrap_or_default(),
        expires_at: lease.expires_at.unwrap_or_default(),
    }
    .into())
}

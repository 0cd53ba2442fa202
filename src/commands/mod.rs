//! One module per subcommand, and what they share: connecting, and reporting
//! an error the same way.

pub mod adjust;
pub mod aggregate;
pub mod close;
pub mod prune;
pub mod reopen;
pub mod report;
pub mod sql;
pub mod status;
pub mod verify;

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cli::{Cli, Command, Connection};
use crate::config::{Config, Sources};
use crate::exit::{self, Status};
use crate::postgrest::{Client, RetryPolicy};

/// Runs the command the user asked for; returns the exit status.
pub async fn run(cli: Cli) -> Status {
    match cli.command {
        Command::Aggregate(args) => aggregate::run(args).await,
        Command::Verify(args) => verify::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Report(args) => report::run(args).await,
        Command::Sql => sql::run(),
        Command::Close(args) => close::run(args).await,
        Command::Reopen(args) => reopen::run(args).await,
        Command::Adjust(args) => adjust::run(args).await,
        Command::Prune(args) => prune::run(args).await,
    }
}

/// Configuration and a client for it.
pub fn connect(conn: &Connection) -> anyhow::Result<(Config, Client)> {
    let dir = std::env::current_dir().context("reading the working directory")?;
    let sources = Sources::load(&dir)?;
    let config = Config::resolve(conn.env, &sources)?;
    let client = Client::new(
        config.rest_url.clone(),
        &config.key,
        config.key_kind,
        Duration::from_secs(conn.timeout),
        RetryPolicy {
            max_retries: usize::from(conn.max_retries),
            deadline: conn
                .deadline
                .map(|d| Instant::now() + Duration::from_secs(d)),
            ..RetryPolicy::default()
        },
    )?;
    tracing::info!(rest_url = %config.rest_url, from = %config.url_var, env = config.environment.upper(), "configured");
    Ok((config, client))
}

/// What a monitor is sent (`--ping-url`) when a command ends in an error
/// before it has a result: the fields of aggregate's JSON that say so.
pub fn failure_json(
    command: &str,
    environment: Option<&str>,
    status: Status,
    e: &anyhow::Error,
) -> serde_json::Value {
    serde_json::json!({
        "version": 1,
        "command": command,
        "environment": environment,
        "exit_status": status.code(),
        "outcome": "failed",
        "error": format!("{e:#}"),
    })
}

/// Prints the error (and a hint when there is one) on stderr; returns the
/// exit status it maps to.
pub fn report_error(e: &anyhow::Error, config: Option<&Config>) -> Status {
    eprintln!("usage-agg: error: {e:#}");
    if let Some(h) = exit::hint(e, config) {
        eprintln!("usage-agg: hint: {h}");
    }
    exit::classify(e)
}

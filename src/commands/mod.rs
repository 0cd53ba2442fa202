//! One module per subcommand, and what they share: connecting. What each
//! prints goes through `crate::printer`.

pub mod adjust;
pub mod aggregate;
pub mod alerts;
pub mod close;
pub mod doctor;
pub mod prune;
pub mod quota;
pub mod reopen;
pub mod report;
pub mod schedule;
pub mod sql;
pub mod status;
pub mod verify;

use std::time::Instant;

use anyhow::Context;

use crate::cli::{Cli, Command, Connection};
use crate::config::{Config, Sources};
use crate::exit::Status;
use crate::postgrest::{Client, RetryPolicy};

/// Runs the command the user asked for; returns the exit status.
pub async fn run(cli: Cli) -> Status {
    match cli.command {
        Command::Aggregate(args) => aggregate::run(args).await,
        Command::Verify(args) => verify::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Report(args) => report::run(args).await,
        Command::Sql => sql::run(),
        Command::Doctor(args) => doctor::run(args).await,
        Command::Close(args) => close::run(args).await,
        Command::Reopen(args) => reopen::run(args).await,
        Command::Adjust(args) => adjust::run(args).await,
        Command::Prune(args) => prune::run(args).await,
        Command::Schedule(args) => schedule::run(args).await,
        Command::Quota(args) => quota::run(args).await,
        Command::Alerts(args) => alerts::run(args).await,
    }
}

/// Configuration and a client for it.
pub fn connect(conn: &Connection) -> anyhow::Result<(Config, Client)> {
    let dir = std::env::current_dir().context("reading the working directory")?;
    let sources = Sources::load(&dir, conn.env_file.as_deref())?;
    let config = Config::resolve(conn.env, &sources)?;
    let client = Client::new(
        config.rest_url.clone(),
        &config.key,
        config.key_kind,
        conn.timeout,
        RetryPolicy {
            max_retries: usize::from(conn.max_retries),
            deadline: conn.deadline.map(|d| Instant::now() + d),
            ..RetryPolicy::default()
        },
    )?;
    tracing::info!(rest_url = %config.rest_url, from = %config.url_var, env = config.environment.upper(), "configured");
    Ok((config, client))
}

pub use crate::printer::report_error;

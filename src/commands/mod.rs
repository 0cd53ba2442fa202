//! One module per subcommand, and what they share: connecting, and reporting
//! an error the same way.

pub mod adjust;
pub mod aggregate;
pub mod close;
pub mod doctor;
pub mod prune;
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
        Command::Doctor(args) => doctor::run(args).await,
        Command::Close(args) => close::run(args).await,
        Command::Reopen(args) => reopen::run(args).await,
        Command::Adjust(args) => adjust::run(args).await,
        Command::Prune(args) => prune::run(args).await,
        Command::Schedule(args) => schedule::run(args).await,
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
    let status = exit::classify(e);
    // "Try later" (a lease held, writers in flight, a deadline) is a notice:
    // the job is fine and the next run does the work.
    let level = if status == Status::TempFail {
        "notice"
    } else {
        "error"
    };
    let hint = exit::hint(e, config);
    // An answer from (or no answer from) the server: name where it was
    // asked, scheme to path (a URL never holds the key).
    let http = e.chain().any(|c| {
        c.downcast_ref::<crate::postgrest::Failure>().is_some()
            || c.downcast_ref::<crate::postgrest::ApiError>().is_some()
    });
    let at = match config {
        Some(c) if http => format!(" [REST URL {}]", c.rest_url),
        _ => String::new(),
    };
    if JSON_LOGS.get().copied().unwrap_or(false) {
        let line = serde_json::json!({
            "level": level.to_uppercase(),
            "message": format!("{e:#}{at}"),
            "hint": hint,
            "exit_status": status.code(),
        });
        crate::errln!("{line}");
    } else {
        crate::errln!("usage-agg: {level}: {e:#}{at}");
        if let Some(h) = hint {
            crate::errln!("usage-agg: hint: {h}");
        }
    }
    status
}

/// Whether stderr carries JSON lines (`--log-format json`), so that the
/// final error is one too; set once by the binary.
pub static JSON_LOGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

//! usage-agg: see README.md. I/O lives at the edges (config, postgrest,
//! tables, output); the aggregation core is pure.

mod aggregation;
mod cli;
mod commands;
mod config;
mod engine;
mod exit;
mod failpoint;
mod output;
mod ping;
mod postgrest;
mod preflight;
mod progress;
mod state;
mod tables;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};
use crate::exit::Status;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version are not errors; everything else is exit 64.
            let status = if e.use_stderr() {
                Status::Usage
            } else {
                Status::Ok
            };
            let _ = e.print();
            std::process::exit(status.code());
        }
    };
    init_logging(cli.global.log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("usage-agg: cannot start the async runtime: {e}");
            std::process::exit(Status::Software.code());
        }
    };
    let status = runtime.block_on(async {
        match cli.command {
            Command::Aggregate(args) => commands::aggregate::run(args, &cli.global).await,
            Command::Verify(args) => commands::verify::run(args, &cli.global).await,
            Command::Status(args) => commands::status::run(args, &cli.global).await,
            Command::Report(args) => commands::report::run(args, &cli.global).await,
            Command::Sql => commands::sql::run(),
        }
    });
    std::process::exit(status.code());
}

/// Logs go to stderr (the summary owns stdout); `RUST_LOG` picks the level,
/// warnings by default.
fn init_logging(format: cli::LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        cli::LogFormat::Json => builder.json().init(),
        cli::LogFormat::Text => {
            let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(ansi).init()
        }
    }
}

//! The command line. One subcommand a file under `commands/`.

use clap::{Args, Parser, Subcommand};

use crate::config::EnvChoice;

/// Rolls usage_requests up into portal_usage_monthly over Supabase's REST
/// API (PostgREST): every row counted exactly once, safe to rerun.
#[derive(Debug, Parser)]
#[command(name = "usage-agg", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Aggregate usage_requests into portal_usage_monthly
    Aggregate(AggregateArgs),
}

#[derive(Debug, Args)]
pub struct AggregateArgs {
    /// Which project: dev, prod, or auto (prod when APP_ENV, else NODE_ENV, is production or prod)
    #[arg(long, value_enum, default_value = "auto")]
    pub env: EnvChoice,

    /// Read everything and show what would be written; write nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Rows asked for per page (the server may cap it lower, which is fine)
    #[arg(long, default_value_t = crate::engine::DEFAULT_PAGE_SIZE, value_parser = page_size)]
    pub page_size: usize,

    /// Seconds before a single request is abandoned
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
}

fn page_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=100_000).contains(&n) => Ok(n),
        _ => Err("expected a number of rows from 1 to 100000".into()),
    }
}

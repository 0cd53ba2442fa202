//! `usage-agg aggregate`: configuration, one engine run, the summary.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cli::AggregateArgs;
use crate::config::{Config, Sources};
use crate::engine::{self, Options};
use crate::exit::{self, Status};
use crate::output::{self, Style};
use crate::postgrest::Client;

pub async fn run(args: AggregateArgs) -> Status {
    let style = Style::detect();
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("usage-agg: {e:#}");
            return exit::classify(&e);
        }
    };
    let env = config.environment.upper();
    let key_var = format!("SUPABASE_{env}_SERVICE_ROLE_KEY");
    let started = chrono::Utc::now();
    let clock = Instant::now();
    print!(
        "{}",
        output::header(style, started, env, &config.chosen_by, args.dry_run)
    );
    tracing::info!(rest_url = %config.rest_url, env, "starting");

    let result = async {
        let client = Client::new(
            config.rest_url.clone(),
            &config.key,
            config.key_kind,
            Duration::from_secs(args.timeout),
        )?;
        let opts = Options {
            dry_run: args.dry_run,
            page_size: args.page_size,
        };
        engine::full::run(&client, &opts).await
    }
    .await;

    match result {
        Ok(outcome) => {
            print!("{}", output::summary(style, &outcome, env, clock.elapsed()));
            if outcome.bad.count > 0 {
                Status::DataErr
            } else {
                Status::Ok
            }
        }
        Err(e) => {
            let status = exit::classify(&e);
            print!("{}", output::failure(style, &format!("{e:#}")));
            eprintln!("usage-agg: error: {e:#}");
            if let Some(h) = exit::hint(&e, &key_var) {
                eprintln!("usage-agg: hint: {h}");
            }
            status
        }
    }
}

fn load_config(args: &AggregateArgs) -> anyhow::Result<Config> {
    let dir = std::env::current_dir().context("reading the working directory")?;
    let sources = Sources::load(&dir)?;
    Ok(Config::resolve(args.env, &sources)?)
}

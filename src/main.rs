//! The usage-agg binary: parses the command line, sets up logging and the
//! runtime, runs the command (the library does the work) and exits with its
//! status. See README.md.

use tracing_subscriber::EnvFilter;

use usage_agg::cli::{self, Cli};
use usage_agg::commands;
use usage_agg::config::Sources;
use usage_agg::exit::Status;

fn main() {
    export_tool_settings();
    let cli = match Cli::try_parse_checked() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version are not errors; everything else is exit 64.
            let status = if e.use_stderr() {
                Status::Usage
            } else {
                Status::Ok
            };
            let _ = e.print();
            if status == Status::Usage {
                usage_error_json(&e);
            }
            std::process::exit(status.code());
        }
    };
    init_logging(cli.global.log_format);
    let _ = usage_agg::printer::JSON_LOGS.set(cli.global.log_format == cli::LogFormat::Json);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            usage_agg::errln!("usage-agg: cannot start the async runtime: {e}");
            std::process::exit(Status::Software.code());
        }
    };
    let status = runtime.block_on(commands::run(cli));
    std::process::exit(status.code());
}

/// `--json` promises one JSON object on stdout in every outcome: a command
/// line clap refuses gets the failure object too (its first line is the
/// error; the usage is on stderr).
fn usage_error_json(e: &clap::Error) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--json") {
        return;
    }
    let Some(command) = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .filter(|a| cli::Cli::takes_json(a))
        .cloned()
    else {
        return;
    };
    let rendered = e.render().to_string();
    let first = rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ");
    usage_agg::outln!(
        "{}",
        serde_json::json!({
            "version": 1,
            "command": command,
            "environment": null,
            "exit_status": Status::Usage.code(),
            "outcome": "failed",
            "error": first,
        })
    );
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

/// `USAGE_AGG_*` settings written in the env files (or `--env-file`) count
/// as if set in the environment, before the options that read them are
/// parsed. Errors in the files are reported later, where the configuration
/// is read, with the file and the line.
fn export_tool_settings() {
    let args: Vec<String> = std::env::args().collect();
    let env_file = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--env-file=")
            .map(str::to_string)
            .or_else(|| {
                (a == "--env-file")
                    .then(|| args.get(i + 1).cloned())
                    .flatten()
            })
    });
    let Ok(dir) = std::env::current_dir() else {
        return;
    };
    if let Ok(sources) = Sources::load(&dir, env_file.as_deref().map(std::path::Path::new)) {
        sources.export_tool_settings();
    }
}

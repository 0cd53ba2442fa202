//! Starts a private stack (PostgreSQL 15 + postrust), loads sample rows, runs
//! a command with `SUPABASE_DEV_*` pointing at the stack, then removes it all.
//!
//!     local-stack [--rows N] [--max-rows N] [--migrate FILE] -- COMMAND [ARGS...]
//!
//! The command also gets `DATABASE_URL`, a direct connection. Exits with the command's status. Used by `scripts/demo` and `scripts/bench`.

use std::process::Command;

const USAGE: &str =
    "usage: local-stack [--rows N] [--max-rows N] [--migrate FILE]... -- COMMAND [ARGS...]

Starts PostgreSQL 15 and postrust on loopback, loads N sample rows (default 20000),
applies each --migrate FILE in order, runs COMMAND with SUPABASE_DEV_URL,
SUPABASE_DEV_REST_URL, SUPABASE_DEV_SERVICE_ROLE_KEY and DATABASE_URL pointing at the
stack, removes it all, and exits with the command's status.";

/// A bad argument: the usage on stderr, exit 64 (as usage-agg does).
fn usage_error(what: &str) -> ! {
    eprintln!("local-stack: {what}\n\n{USAGE}");
    std::process::exit(64);
}

fn main() {
    if std::env::args()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--help" || a == "-h")
    {
        println!("{USAGE}");
        return;
    }
    let mut args = std::env::args().skip(1);
    let mut rows: i64 = 20_000;
    let mut max_rows = stack::MAX_ROWS;
    let mut migrations = Vec::new();
    let mut command = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rows" => {
                rows = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage_error("--rows takes a number"))
            }
            "--migrate" => migrations.push(
                args.next()
                    .unwrap_or_else(|| usage_error("--migrate takes a SQL file")),
            ),
            "--max-rows" => {
                max_rows = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage_error("--max-rows takes a number"))
            }
            "--" => {
                command.extend(args.by_ref());
            }
            other => usage_error(&format!("unknown argument {other}")),
        }
    }
    if command.is_empty() {
        usage_error("no command given after --");
    }

    eprintln!("local-stack: starting PostgreSQL 15 and postrust on loopback...");
    let cluster = stack::Cluster::start();
    let code = {
        let mut s = stack::Stack::with_max_rows(&cluster, max_rows);
        for m in &migrations {
            let out = s.psql_file(std::path::Path::new(m));
            assert!(
                out.status.success(),
                "{m}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let portals = (rows / 50).clamp(1, 10_000);
        stack::insert_sample_rows(
            &mut s.sql(),
            rows,
            portals,
            &["2025-05", "2025-06", "2025-07"],
        );
        eprintln!(
            "local-stack: {rows} sample rows for {portals} portals loaded; REST at {}; running {}",
            s.rest_url,
            command.join(" ")
        );
        let status = Command::new(&command[0])
            .args(&command[1..])
            .envs(s.env())
            .env("DATABASE_URL", &s.database_url)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", command[0]));
        status.code().unwrap_or(70)
    };
    cluster.stop();
    std::process::exit(code);
}

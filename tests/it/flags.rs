//! The command line: each subcommand accepts exactly the options it
//! honours, refuses the rest with clap's message (exit 64), and every option
//! it accepts does what its help says.

use crate::common::*;
use stack::proxy::Recorder;

/// A URL nothing listens on: a port just bound and released.
fn dead_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

#[test]
fn every_option_a_subcommand_would_ignore_is_refused_with_64() {
    // (arguments, what clap's message says). No configuration is given: an
    // accepted command line would get as far as exit 78.
    let cases: &[(&[&str], &str)] = &[
        (&["sql", "--json"], "unexpected argument '--json'"),
        (&["sql", "--quiet"], "unexpected argument '--quiet'"),
        (
            &["sql", "--ping-url", "http://x"],
            "unexpected argument '--ping-url'",
        ),
        (&["sql", "--env", "dev"], "unexpected argument '--env'"),
        (&["--json", "status"], "unexpected argument '--json'"),
        (&["--quiet", "aggregate"], "unexpected argument '--quiet'"),
        (
            &["status", "--page-size", "10"],
            "unexpected argument '--page-size'",
        ),
        (
            &["status", "--concurrency", "2"],
            "unexpected argument '--concurrency'",
        ),
        (
            &["report", "--page-size", "10"],
            "unexpected argument '--page-size'",
        ),
        (
            &["report", "--concurrency", "2"],
            "unexpected argument '--concurrency'",
        ),
        (
            &["report", "--ping-url", "http://x"],
            "unexpected argument '--ping-url'",
        ),
        (
            &["report", "--portal", "42", "--top", "5"],
            "cannot be used with '--top",
        ),
        (
            &["report", "--portal", "42", "--live", "--month", "2025-07"],
            "cannot be used with '--month",
        ),
        (&["report", "--months", "3"], "--portal <PORTAL>"),
        (&["report", "--force"], "--html <FILE>"),
        (
            &["report", "--html", "r.html", "--format", "csv"],
            "'--html <FILE>' cannot be used with '--format",
        ),
        (
            &["report", "--portal", "42", "--live", "--html", "r.html"],
            "cannot be used with '--html",
        ),
        (
            &["report", "--json", "--format", "csv"],
            "cannot be used with '--format",
        ),
        (
            &["report", "--quiet", "--format", "csv"],
            "cannot be used with '--format",
        ),
        (
            &["status", "--json", "--quiet"],
            "cannot be used with '--quiet'",
        ),
        (
            &["aggregate", "--engine", "rpc", "--full"],
            "'--engine rpc' cannot be used with '--full'",
        ),
        (
            &["aggregate", "--engine", "rpc", "--month", "2025-07"],
            "'--engine rpc' cannot be used with '--month'",
        ),
        (
            &["aggregate", "--engine", "rpc", "--rebase"],
            "'--engine rpc' cannot be used with '--rebase'",
        ),
        (
            &["aggregate", "--allow-decrease"],
            "<--full|--month <MONTH>>",
        ),
        (
            &["aggregate", "--batch-size", "10", "--full"],
            "cannot be used with '--full'",
        ),
        (
            &["aggregate", "--batch-rows", "10", "--month", "2025-07"],
            "cannot be used with '--month",
        ),
        (
            &["aggregate", "--batch-ids", "10", "--rebase"],
            "cannot be used with '--rebase'",
        ),
        (
            &["aggregate", "--batch-rows", "10", "--batch-ids", "10"],
            "cannot be used multiple times",
        ),
        (&["aggregate", "--batch-size", "0"], "--batch-size <IDS>"),
    ];
    for (args, message) in cases {
        let run = usage_agg(&workdir(), &[], args);
        assert_eq!(run.status, 64, "{args:?}\n{}", run.stderr);
        assert!(
            run.stderr.starts_with("error: ") && run.stderr.contains(message),
            "{args:?}: stderr lacks {message:?}\n{}",
            run.stderr
        );
        if args.contains(&"--json") && args.iter().any(|a| !a.starts_with('-') && *a != "sql") {
            // --json's promise, where the command takes it: one JSON
            // object, the failure, even here.
            let v: serde_json::Value = serde_json::from_str(run.stdout.trim())
                .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", run.stdout));
            assert_eq!(v["exit_status"], 64, "{args:?}: {v}");
        } else {
            assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
        }
    }
    // The one truly global option goes before or after the subcommand.
    for args in [
        &["--log-format", "json", "sql"][..],
        &["sql", "--log-format", "json"],
    ] {
        usage_agg(&workdir(), &[], args)
            .assert_status(0)
            .assert_stdout_has("-- ==== ");
    }
}

#[test]
fn status_and_verify_ping_their_own_monitor() {
    let stack = migrated_stack();
    insert_rows(&stack, 120, 3);
    aggregate(&stack, &[]).assert_status(0);
    // aggregate's variable is its own check's: status and verify ignore it.
    let aggregates = Recorder::start();
    let env = env_with(
        &stack,
        "USAGE_AGG_PING_URL",
        &format!("{}/agg", aggregates.url),
    );
    let monitor = Recorder::start();

    let status_url = format!("{}/status-check", monitor.url);
    usage_agg(
        &workdir(),
        &env,
        &[
            "status",
            "--env",
            "dev",
            "--quiet",
            "--ping-url",
            &status_url,
        ],
    )
    .assert_status(0);
    let seen = monitor.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen[0].0.starts_with("GET /status-check/start "),
        "{seen:?}"
    );
    assert!(seen[1].0.starts_with("POST /status-check/0 "), "{seen:?}");
    let body: serde_json::Value = serde_json::from_str(&seen[1].1).unwrap();
    assert_eq!(
        (&body["command"], &body["cursor"], &body["stale"]),
        (&"status".into(), &120.into(), &false.into())
    );

    let verify_url = format!("{}/verify-check", monitor.url);
    usage_agg(
        &workdir(),
        &env,
        &[
            "verify",
            "--env",
            "dev",
            "--quiet",
            "--ping-url",
            &verify_url,
        ],
    )
    .assert_status(0);
    let seen = monitor.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(
        seen[2].0.starts_with("GET /verify-check/start "),
        "{seen:?}"
    );
    assert!(seen[3].0.starts_with("POST /verify-check/0 "), "{seen:?}");
    let body: serde_json::Value = serde_json::from_str(&seen[3].1).unwrap();
    assert_eq!(body["command"], "verify");
    assert_eq!(body["rows_read"], 120);
    assert!(!format!("{seen:?}").contains(&stack.key));

    // A failure pings its exit status: totals that differ (verify, 65), a
    // stale job (status --max-age, 75), a server that cannot be reached (69,
    // with the error as the body).
    stack
        .sql()
        .batch_execute(
            "UPDATE portal_usage_monthly SET request_count = request_count + 1
             WHERE (portal_id, month_year) = (SELECT portal_id, month_year FROM portal_usage_monthly LIMIT 1);
             UPDATE usage_aggregation_state SET last_success_at = now() - interval '1 day'",
        )
        .unwrap();
    usage_agg(
        &workdir(),
        &env,
        &[
            "verify",
            "--env",
            "dev",
            "--quiet",
            "--ping-url",
            &verify_url,
        ],
    )
    .assert_status(65);
    assert!(monitor.seen()[5].0.starts_with("POST /verify-check/65 "));
    usage_agg(
        &workdir(),
        &env,
        &[
            "status",
            "--env",
            "dev",
            "--max-age",
            "1h",
            "--ping-url",
            &status_url,
        ],
    )
    .assert_status(75);
    assert!(monitor.seen()[7].0.starts_with("POST /status-check/75 "));
    let unreachable = env_via(&stack, &dead_url());
    usage_agg(
        &workdir(),
        &unreachable,
        &[
            "status",
            "--env",
            "dev",
            "--max-retries",
            "0",
            "--ping-url",
            &status_url,
        ],
    )
    .assert_status(69);
    let seen = monitor.seen();
    assert_eq!(seen.len(), 10, "{seen:?}");
    assert!(seen[9].0.starts_with("POST /status-check/69 "), "{seen:?}");
    let body: serde_json::Value = serde_json::from_str(&seen[9].1).unwrap();
    assert_eq!(
        (&body["command"], &body["exit_status"]),
        (&"status".into(), &69.into())
    );
    assert!(body["error"].is_string(), "{body}");

    assert!(aggregates.seen().is_empty(), "{:?}", aggregates.seen());
    // A ping URL that is not one is said before anything runs.
    usage_agg(
        &workdir(),
        &stack.env(),
        &["verify", "--env", "dev", "--ping-url", "hc-ping.com/x"],
    )
    .assert_status(78)
    .assert_stderr_has("not an http(s) URL");
}

/// Starts a run with `args` that dies right after its first batch moved the
/// cursor; returns the cursor it left.
fn first_batch(stack: &Stack, engine: &str, args: &[&str]) -> i64 {
    // The REST engine moves the cursor, then reaches after-cursor; the RPC
    // engine's batch moves it in the database, then the run reaches page.
    let point = if engine == "rpc" {
        "page"
    } else {
        "after-cursor"
    };
    let env = failing(stack, &format!("{point}=abort@1"));
    let mut all = vec!["aggregate", "--env", "dev", "--engine", engine];
    all.extend_from_slice(args);
    let killed = usage_agg(&workdir(), &env, &all);
    assert_eq!(killed.status, -1, "{all:?}: killed\n{}", killed.all());
    cursor(stack).unwrap()
}

#[test]
fn batch_size_is_ids_per_batch_in_both_engines_and_the_old_names_still_work() {
    let stack = migrated_stack();
    insert_rows(&stack, 500, 3);
    aggregate(&stack, &[]).assert_status(0);
    for (engine, flag) in [
        ("rest", "--batch-size"),
        ("rpc", "--batch-size"),
        ("rest", "--batch-rows"),
        ("rpc", "--batch-ids"),
        // One option now: the old names are no longer tied to one engine.
        ("rest", "--batch-ids"),
        ("rpc", "--batch-rows"),
    ] {
        let before = cursor(&stack).unwrap();
        insert_rows(&stack, 1000, 3);
        assert_eq!(
            first_batch(&stack, engine, &[flag, "300"]),
            before + 300,
            "{engine} {flag} 300: the first batch is 300 ids"
        );
        // The rest, in batches of 300 ids: 300, 300 and 100.
        let run = aggregate(&stack, &["--engine", engine, flag, "300"]);
        run.assert_status(0);
        if engine == "rpc" {
            run.assert_stdout_has("server-side (--engine rpc), 3 batches");
        }
        assert_eq!(cursor(&stack), Some(before + 1000));
        assert_no_drift(&stack);
    }
    // Without it, each engine keeps its default: far more than 1000 ids.
    for engine in ["rest", "rpc"] {
        let before = cursor(&stack).unwrap();
        insert_rows(&stack, 1000, 3);
        assert_eq!(first_batch(&stack, engine, &[]), before + 1000, "{engine}");
        aggregate(&stack, &["--engine", engine]).assert_status(0);
    }
    assert_no_drift(&stack);
    assert_watermarks(&stack);
}

#[test]
fn report_quiet_prints_nothing_and_keeps_the_exit_status() {
    let stack = Stack::new();
    insert_rows(&stack, 200, 4);
    aggregate(&stack, &[]).assert_status(0);
    for args in [
        &["report", "--env", "dev", "--quiet"][..],
        &["report", "--env", "dev", "-q", "--portal", "1"],
        &[
            "report", "--env", "dev", "-q", "--month", "2025-06", "--top", "2",
        ],
    ] {
        let run = usage_agg(&workdir(), &stack.env(), args);
        run.assert_status(0);
        assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
    }
    // Without --quiet the same report prints its table.
    usage_agg(&workdir(), &stack.env(), &["report", "--env", "dev"])
        .assert_status(0)
        .assert_stdout_has("All 4 portals by requests");
    // A report that cannot be read still fails, with its status.
    let run = usage_agg(
        &workdir(),
        &env_via(&stack, &dead_url()),
        &["report", "--env", "dev", "--quiet", "--max-retries", "0"],
    );
    run.assert_status(69).assert_stderr_has("usage-agg: error:");
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}

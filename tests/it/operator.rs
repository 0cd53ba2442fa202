//! What the operator sees: machine-readable output, logs, monitoring pings.

use crate::common::*;
use stack::proxy::Recorder;

#[test]
fn json_prints_one_object_with_the_documented_fields_and_nothing_else() {
    let stack = migrated_stack();
    insert_rows(&stack, 700, 4);
    let run = usage_agg(
        &workdir(),
        &stack.env(),
        &["aggregate", "--env", "dev", "--json"],
    );
    run.assert_status(0);
    let v: serde_json::Value =
        serde_json::from_str(run.stdout.trim()).expect("stdout is one JSON object");
    assert_eq!(run.stdout.trim().lines().count(), 1);
    assert_eq!(v["command"], "aggregate");
    assert_eq!(v["environment"], "DEV");
    assert_eq!(v["exit_status"], 0);
    assert_eq!(v["outcome"], "ok");
    assert_eq!(v["mode"], "first_rebuild");
    assert_eq!(v["rows_read"], 700);
    assert_eq!(v["rows_counted"], 700);
    assert_eq!(v["rows_rejected"], 0);
    assert_eq!(v["keys_touched"], 12);
    assert_eq!(v["keys_written"], 12);
    assert_eq!(v["cursor_after"], 700);
    assert!(
        v["error"].is_null() && v["started_at"].is_string() && v["duration_seconds"].is_number()
    );

    // A failure is JSON too, with the error and its exit status.
    stack.sql().batch_execute("UPDATE usage_aggregation_state SET lease_owner = 'usage-agg@elsewhere:1', lease_expires_at = now() + interval '1 hour'").unwrap();
    let run = usage_agg(
        &workdir(),
        &stack.env(),
        &["aggregate", "--env", "dev", "--json"],
    );
    run.assert_status(75);
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        (v["outcome"].as_str(), v["exit_status"].as_i64()),
        (Some("failed"), Some(75))
    );
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("usage-agg@elsewhere:1"));
}

#[test]
fn log_format_json_writes_one_json_object_per_log_line() {
    let stack = Stack::new();
    insert_rows(&stack, 50, 2);
    let mut env = stack.env();
    env.push(("RUST_LOG".into(), "debug".into()));
    let run = usage_agg(
        &workdir(),
        &env,
        &[
            "aggregate",
            "--env",
            "dev",
            "--log-format",
            "json",
            "--quiet",
        ],
    );
    run.assert_status(0);
    assert!(
        run.stdout.is_empty(),
        "--quiet prints nothing on stdout: {}",
        run.stdout
    );
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert!(lines.len() > 3);
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string());
    }
}

#[test]
fn pings_start_then_the_exit_status_with_the_summary_and_never_the_key() {
    let stack = migrated_stack();
    insert_rows(&stack, 100, 2);
    let monitor = Recorder::start();
    let mut env = stack.env();
    env.push((
        "USAGE_AGG_PING_URL".into(),
        format!("{}/ping/abc", monitor.url),
    ));
    usage_agg(&workdir(), &env, &["aggregate", "--env", "dev"]).assert_status(0);
    let seen = monitor.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].0.starts_with("GET /ping/abc/start "), "{seen:?}");
    assert!(seen[1].0.starts_with("POST /ping/abc/0 "), "{seen:?}");
    let body: serde_json::Value = serde_json::from_str(&seen[1].1).unwrap();
    assert_eq!(body["rows_counted"], 100);
    assert!(!format!("{seen:?}").contains(&stack.key));

    // A run that fails pings its status.
    stack.sql().batch_execute("UPDATE usage_aggregation_state SET lease_owner = 'x', lease_expires_at = now() + interval '1 hour'").unwrap();
    usage_agg(&workdir(), &env, &["aggregate", "--env", "dev"]).assert_status(75);
    assert!(monitor.seen()[3].0.starts_with("POST /ping/abc/75 "));
}

#[test]
fn a_ping_that_fails_never_fails_the_run() {
    let stack = Stack::new();
    insert_rows(&stack, 100, 2);
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = usage_agg(
        &workdir(),
        &stack.env(),
        &[
            "aggregate",
            "--env",
            "dev",
            "--ping-url",
            &format!("http://127.0.0.1:{dead}/x"),
        ],
    );
    run.assert_status(0)
        .assert_stderr_has("monitoring ping failed");
    assert_no_drift(&stack);
    usage_agg(
        &workdir(),
        &stack.env(),
        &["aggregate", "--env", "dev", "--ping-url", "hc-ping.com/x"],
    )
    .assert_status(78)
    .assert_stderr_has("not an http(s) URL");
}

#[test]
fn status_shows_cursor_backlog_lease_and_last_run_and_checks_age() {
    let stack = Stack::new();
    insert_rows(&stack, 40, 2);
    let status = |args: &[&str]| {
        let mut all = vec!["status", "--env", "dev"];
        all.extend_from_slice(args);
        usage_agg(&workdir(), &stack.env(), &all)
    };
    status(&[])
        .assert_status(0)
        .assert_stdout_has("Migration:     NOT applied");

    let mut stack = stack;
    migrate(&mut stack);
    let status = |args: &[&str]| {
        let mut all = vec!["status", "--env", "dev"];
        all.extend_from_slice(args);
        usage_agg(&workdir(), &stack.env(), &all)
    };
    status(&["--max-age", "1h"])
        .assert_status(75)
        .assert_stdout_has("Last success:  never")
        .assert_stdout_has("STALE");
    aggregate(&stack, &[]).assert_status(0);
    insert_rows(&stack, 25, 2);
    let run = status(&["--max-age", "1h"]);
    run.assert_status(0)
        .assert_stdout_has("Cursor:        40 (every row up to this id is counted)")
        .assert_stdout_has("about 25 rows waiting (newest id 65)")
        .assert_stdout_has("Lease:         free")
        .assert_stdout_has(", ok, 40 rows, took ");
    let v: serde_json::Value = serde_json::from_str(status(&["--json"]).stdout.trim()).unwrap();
    assert_eq!(
        (v["cursor"].as_i64(), v["backlog_estimate"].as_i64()),
        (Some(40), Some(25))
    );
    assert_eq!(v["last_run_outcome"], "ok");
    assert_eq!(v["migration_installed"], true);
}

#[test]
fn report_shows_a_portal_by_month_and_the_top_portals_of_a_month() {
    let stack = Stack::new();
    stack
        .sql()
        .batch_execute(
            "INSERT INTO usage_requests (portal_id, success, month_year)
             SELECT 42, g % 10 <> 0, '2025-06' FROM generate_series(1, 100) g;
             INSERT INTO usage_requests (portal_id, success, month_year)
             SELECT 42, true, '2025-07' FROM generate_series(1, 50) g;
             INSERT INTO usage_requests (portal_id, success, month_year)
             SELECT 7, true, '2025-07' FROM generate_series(1, 80) g;",
        )
        .unwrap();
    aggregate(&stack, &[]).assert_status(0);
    let report = |args: &[&str]| {
        let mut all = vec!["report", "--env", "dev"];
        all.extend_from_slice(args);
        usage_agg(&workdir(), &stack.env(), &all)
    };
    let run = report(&["--portal", "42", "--month", "2025-07"]);
    run.assert_status(0)
        .assert_stdout_has("Portal 42, 2024-08 to 2025-07 (12 months)");
    let june = run.stdout.lines().find(|l| l.contains("2025-06")).unwrap();
    assert!(
        june.contains("100")
            && june.contains("90")
            && june.contains("90.0%")
            && june.ends_with(&format!("{}{}", "#".repeat(27), "xxx")),
        "{june}"
    );
    // Every month of the window is a line, those without usage too.
    assert_eq!(
        run.stdout
            .lines()
            .filter(|l| l.contains("  2025-0") || l.contains("  2024-"))
            .count(),
        12
    );

    let top = report(&[]);
    top.assert_status(0)
        .assert_stdout_has("All 2 portals by requests, 2025-07");
    let order: Vec<&str> = top
        .stdout
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(order, ["7", "42"]);
    // Fewer portals than --top: "All 2"; more: "Top N".
    report(&["--top", "1"])
        .assert_status(0)
        .assert_stdout_has("Top 1 portal by requests, 2025-07");

    let csv = report(&["--month", "2025-06", "--format", "csv"]);
    assert_eq!(
        csv.stdout,
        "portal_id,month,requests,successes,errors,success_rate,late_adjustments,manual_adjustments,billed\n\
         42,2025-06,100,90,10,90.0,0,0,100\n"
    );
    let json: serde_json::Value = serde_json::from_str(
        report(&["--portal", "7", "--month", "2025-07", "--json"])
            .stdout
            .trim(),
    )
    .unwrap();
    assert_eq!(json["rows"][0]["requests"], 80);
}

#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    // The reader closes its end at once, before usage-agg writes: every
    // write meets a closed pipe.
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(r#""$0" sql | (exec 0<&-; :); exit "${PIPESTATUS[0]}""#)
        .arg(env!("CARGO_BIN_EXE_usage-agg"))
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

#[test]
fn status_during_a_run_shows_it_running_and_a_dead_runs_lease_as_stale() {
    let stack = migrated_stack();
    insert_rows(&stack, 300, 3);
    aggregate(&stack, &[]).assert_status(0);
    insert_rows(&stack, 300, 3);
    let running = paused_run(&stack, "page");
    let status = usage_agg(&workdir(), &stack.env(), &["status", "--env", "dev"]);
    status
        .assert_status(0)
        .assert_stdout_has("Running:       since ")
        .assert_stdout_has("Last run:      finished ");
    assert!(!status.stdout.contains("took -"), "{}", status.stdout);
    resume(running);
    // A lease left by a process of this host that is gone.
    let me = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    stack
        .sql()
        .execute(
            "UPDATE usage_aggregation_state SET lease_owner = $1, lease_expires_at = now() + interval '1 hour'",
            &[&format!("usage-agg@{}:{}", me.trim(), u32::MAX - 3)],
        )
        .unwrap();
    usage_agg(&workdir(), &stack.env(), &["status", "--env", "dev"])
        .assert_stdout_has("stale: held by usage-agg@")
        .assert_stdout_has("the next run takes it over");
}

#[test]
fn rejected_rows_stay_visible_in_status_and_verify_until_someone_looks() {
    let stack = migrated_stack();
    insert_rows(&stack, 100, 2);
    aggregate(&stack, &[]).assert_status(0);
    stack
        .sql()
        .batch_execute(
            "INSERT INTO usage_requests (portal_id, success, month_year) VALUES (0, true, '2025-07'), (5, true, '2025-13')",
        )
        .unwrap();
    aggregate(&stack, &[]).assert_status(65);
    // Later runs are clean, and the rows are still shown.
    insert_rows(&stack, 10, 2);
    aggregate(&stack, &[]).assert_status(0);
    aggregate(&stack, &["--full"]).assert_status(65);
    usage_agg(&workdir(), &stack.env(), &["status", "--env", "dev"])
        .assert_stdout_has("Rejected:      2 rows as bad data so far (first ids 101, 102)");
    usage_agg(&workdir(), &stack.env(), &["verify", "--env", "dev"])
        .assert_stdout_has("2 rows are rejected as bad data and counted nowhere: id 101");
    let json: serde_json::Value = serde_json::from_str(
        &usage_agg(
            &workdir(),
            &stack.env(),
            &["status", "--env", "dev", "--json"],
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(
        json["rejected_rows"], 2,
        "a --full rebuild does not count them again"
    );
}

#[test]
fn every_json_answer_has_one_shape_first() {
    let stack = migrated_stack();
    insert_rows(&stack, 60, 2);
    for (args, command) in [
        (vec!["aggregate", "--env", "dev", "--json"], "aggregate"),
        (vec!["status", "--env", "dev", "--json"], "status"),
        (vec!["verify", "--env", "dev", "--json"], "verify"),
        (vec!["report", "--env", "dev", "--json"], "report"),
        (vec!["doctor", "--env", "dev", "--json"], "doctor"),
    ] {
        let run = usage_agg(&workdir(), &stack.env(), &args);
        let v: serde_json::Value = serde_json::from_str(run.stdout.trim())
            .unwrap_or_else(|e| panic!("{command}: {e}\n{}", run.stdout));
        assert_eq!(v["version"], 1, "{command}");
        assert_eq!(v["command"], command);
        assert_eq!(v["environment"], "DEV", "{command}");
        assert_eq!(v["exit_status"], run.status, "{command}");
        assert!(v["outcome"].is_string(), "{command}: {v}");
    }
}

#[test]
fn a_closed_stderr_keeps_the_exit_status_and_the_end_ping() {
    let stack = migrated_stack();
    insert_rows(&stack, 100, 2);
    aggregate(&stack, &[]).assert_status(0);
    stack
        .sql()
        .batch_execute(
            "UPDATE usage_aggregation_state SET lease_owner = 'usage-agg@elsewhere:1',
               lease_expires_at = now() + interval '1 hour'",
        )
        .unwrap();
    let monitor = Recorder::start();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_usage-agg"))
        .args([
            "aggregate",
            "--env",
            "dev",
            "--ping-url",
            &format!("{}/p", monitor.url),
        ])
        .current_dir(workdir())
        .env_clear()
        .envs(stack.env())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take()); // the reader went away
    assert_eq!(
        child.wait().unwrap().code(),
        Some(75),
        "the real status: the lease is held"
    );
    let seen = monitor.seen();
    assert!(
        seen.iter().any(|s| s.0.starts_with("POST /p/75 ")),
        "{seen:?}"
    );
}

#[test]
fn a_run_that_rewrote_keys_never_ends_with_nothing_to_do() {
    let stack = migrated_stack();
    insert_rows(&stack, 100, 3);
    aggregate(&stack, &[]).assert_status(0);
    stack
        .sql()
        .batch_execute("DELETE FROM portal_usage_monthly WHERE portal_id = 1000")
        .unwrap();
    let run = aggregate(&stack, &[]);
    run.assert_status(0);
    assert!(
        !run.stdout.contains("No pending requests"),
        "{}",
        run.stdout
    );
    assert_no_drift(&stack);
    stack
        .sql()
        .batch_execute("TRUNCATE usage_requests")
        .unwrap();
    aggregate(&stack, &[]).assert_status(65);
    let run = aggregate(&stack, &["--rebase"]);
    run.assert_status(0);
    assert!(
        !run.stdout.contains("No pending requests"),
        "{}",
        run.stdout
    );
}

/// `--auto-close` that leaves a month open (its keys drift) or fails: the
/// JSON's outcome says why the status is not 0 (it said "ok" with 65 and
/// 69), the error is there when it failed, and with --quiet the reason is
/// on stderr (an adversarial pass).
#[test]
fn auto_close_that_leaves_a_month_open_or_fails_says_so_in_the_outcome() {
    use stack::proxy::{Fault, FaultProxy};
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 5);
    insert_month(&stack, 1, "2025-06", 5);
    aggregate(&stack, &[]).assert_status(0);
    stack
        .sql()
        .batch_execute(
            "UPDATE portal_usage_monthly SET request_count = request_count + 1, success_count = success_count + 1
              WHERE month_year = '2025-05'",
        )
        .unwrap();
    let r = aggregate(&stack, &["--auto-close", "72h", "--json"]);
    r.assert_status(65);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(
        (v["exit_status"].as_i64(), v["outcome"].as_str()),
        (Some(65), Some("auto_close_refused")),
        "{v}"
    );
    let quiet = aggregate(&stack, &["--auto-close", "72h", "--quiet"]);
    quiet
        .assert_status(65)
        .assert_stderr_has("--auto-close left 2025-05 open");
    assert!(quiet.stdout.is_empty());

    let proxy = FaultProxy::start(&stack.rest_url);
    proxy.inject(
        "POST",
        "/rpc/usage_agg_close_month",
        Fault::html(502, "502 Bad Gateway"),
        100,
    );
    stack
        .sql()
        .batch_execute(
            "UPDATE portal_usage_monthly SET request_count = request_count - 1, success_count = success_count - 1
              WHERE month_year = '2025-05'",
        )
        .unwrap();
    let r = usage_agg(
        &workdir(),
        &env_via(&stack, &proxy.url),
        &[
            "aggregate",
            "--env",
            "dev",
            "--auto-close",
            "72h",
            "--json",
            "--max-retries",
            "0",
        ],
    );
    assert_ne!(r.status, 0, "{}{}", r.stdout, r.stderr);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["exit_status"].as_i64(), Some(i64::from(r.status)));
    assert_eq!(v["outcome"], "failed", "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("502")),
        "{v}"
    );
}

/// `--json` prints one JSON object in every outcome, a bad ping URL
/// before the run included (an adversarial pass); a ping URL whose status
/// would land in a query or a fragment is refused.
#[test]
fn a_bad_ping_url_is_refused_with_json_and_a_query_or_fragment_is_bad() {
    let stack = migrated_stack();
    for url in [
        "not a url",
        "http://127.0.0.1:9/push/tok?status=up&msg=OK",
        "http://127.0.0.1:9/hc/uuid#frag",
    ] {
        let r = aggregate(&stack, &["--json", "--ping-url", url]);
        r.assert_status(78);
        let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
            .unwrap_or_else(|e| panic!("no JSON on stdout ({e}): {:?}", r.stdout));
        assert_eq!(
            (v["exit_status"].as_i64(), v["outcome"].as_str()),
            (Some(78), Some("failed"))
        );
    }
}

/// A command line clap refuses prints the failure object too under --json
/// (exit 64); its error is the first line of clap's message.
#[test]
fn a_refused_command_line_prints_one_json_object_under_json() {
    for args in [
        &["close", "--env", "dev", "--month", "2025-13", "--json"][..],
        &["aggregate", "--env", "dev", "--json", "--allow-decrease"],
        &["status", "--env", "dev", "--json", "--max-age", "-1h"],
    ] {
        let r = usage_agg(&workdir(), &[], args);
        r.assert_status(64);
        let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
            .unwrap_or_else(|e| panic!("{args:?}: no JSON on stdout ({e}): {:?}", r.stdout));
        assert_eq!(
            (
                v["exit_status"].as_i64(),
                v["outcome"].as_str(),
                v["command"].as_str()
            ),
            (Some(64), Some("failed"), Some(args[0])),
            "{args:?}: {v}"
        );
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
}

//! What a person sees, as snapshots (issue 19): every command's `--help`
//! and the text each command prints in its main outcomes, run against the
//! real stack with fixed data (months of 2025). The other modules check
//! facts in the output; these keep the whole of it under review, so a
//! change of wording, alignment or order shows up as a diff of a `.snap`
//! file under `tests/it/snapshots/` (docs/testing.md says how to review
//! and accept one).
//!
//! What changes from run to run is replaced by filters (see [`settings`]):
//! times and dates of the day the test runs, ages and durations, how many
//! requests the pace let in flight, the current month, ports, temporary
//! paths, the host and process ids, the version. Data times (2025) are
//! kept: they are the test's own. `schedule --show` is seen only without
//! pg_cron: the one database that has it belongs to `schedule.rs`.

use crate::common::*;

/// One run, as a person would read it in a terminal session: the command
/// line, the exit status, stdout and stderr.
fn shown(args: &[&str], run: &Run) -> String {
    let line: Vec<String> = args.iter().map(|a| quoted(a)).collect();
    let mut text = format!(
        "$ usage-agg {}\nexit status: {}\n",
        line.join(" "),
        run.status
    );
    for (name, out) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        if out.is_empty() {
            text.push_str(&format!("--- {name}: (empty)\n"));
        } else {
            text.push_str(&format!("--- {name}\n{out}"));
            if !out.ends_with('\n') {
                text.push_str("\n(no newline at the end)\n");
            }
        }
    }
    text
}

/// An argument as a shell needs it written.
fn quoted(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// A stack of this harness's own, or none when the tests run against
/// another PostgREST (its URL, owners and settings are not these
/// snapshots').
fn local_stack() -> Option<Stack> {
    let stack = migrated_stack();
    if stack.is_external() {
        eprintln!("snapshots: skipped against an external PostgREST");
        return None;
    }
    Some(stack)
}

/// The environment of every snapshot run: the stack's (if any), a fixed
/// user (`close` and `reopen` record who), no colour.
fn env(stack: Option<&Stack>) -> Vec<(String, String)> {
    let mut env = stack.map(Stack::env).unwrap_or_default();
    env.push(("USER".into(), "operator".into()));
    env.push(("NO_COLOR".into(), "1".into()));
    env
}

/// Runs `usage-agg ARGS` (with `--env dev` after them when there is a
/// stack) and snapshots what it printed under `name`, through the
/// filters; asserts its exit status after the snapshot, so a changed
/// outcome shows as a diff first. Returns the run.
#[track_caller]
fn snap(name: &str, stack: Option<&Stack>, args: &[&str], status: i32) -> Run {
    let mut all = args.to_vec();
    if stack.is_some() {
        all.extend_from_slice(&["--env", "dev"]);
    }
    let run = usage_agg(&workdir(), &env(stack), &all);
    let text = shown(&all, &run);
    settings().bind(|| insta::assert_snapshot!(name, text));
    run.assert_status(status);
    run
}

/// [`snap`] with the locale and `NO_COLOR` as given (`None`: unset),
/// for what a terminal draws differently.
#[track_caller]
fn snap_in(
    name: &str,
    stack: &Stack,
    lang: &str,
    no_color: Option<&str>,
    args: &[&str],
    status: i32,
) -> Run {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--env", "dev"]);
    let mut vars: Vec<(String, String)> = env(Some(stack))
        .into_iter()
        .filter(|(k, _)| k != "NO_COLOR")
        .collect();
    vars.push(("LANG".into(), lang.into()));
    if let Some(v) = no_color {
        vars.push(("NO_COLOR".into(), v.into()));
    }
    let run = usage_agg(&workdir(), &vars, &all);
    let mut shown_env = format!("LANG={lang}");
    if let Some(v) = no_color {
        shown_env.push_str(&format!(" NO_COLOR={v}"));
    }
    let text = format!("# {shown_env}\n{}", shown(&all, &run));
    settings().bind(|| insta::assert_snapshot!(name, text));
    run.assert_status(status);
    run
}

/// `s` with the characters a regex gives a meaning to escaped.
fn literal(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$#&-~".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// The snapshots' settings: no expression in the file (the command line is
/// in the snapshot), and the filters, each replacing what changes from run
/// to run by a name in brackets. Applied in this order.
fn settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_prepend_module_to_snapshot(false);
    s.set_omit_expression(true);
    // Times of the day the test runs (the clock of the runs and of the
    // database), in the three forms the output uses: RFC 3339 with
    // milliseconds or microseconds, and `2026-12-07 04:39:38 UTC`. The
    // day before counts too, for a test that runs across midnight. The
    // rows' own times (2025) are the test's data and stay.
    let now = chrono::Utc::now();
    let days: Vec<String> = [now, now - chrono::Duration::days(1)]
        .iter()
        .map(|d| d.format("%Y-%m-%d").to_string())
        .collect();
    let days = days.join("|");
    s.add_filter(
        &format!(
            r"\b(?:{days})[T ]\d{{2}}:\d{{2}}:\d{{2}}(?:\.\d+)?(?:Z|[+-]\d{{2}}:\d{{2}}| UTC)?"
        ),
        "[TIMESTAMP]",
    );
    s.add_filter(&format!(r"\b(?:{days})\b"), "[TODAY]");
    // The current month (status and close name it when it has usage).
    s.add_filter(&format!(r"\b{}\b", now.format("%Y-%m")), "[THIS MONTH]");
    // Ages and durations.
    s.add_filter(r"\b\d+ (?:seconds|minutes|hours|days) ago\b", "[AGE] ago");
    s.add_filter(r"\bin \d+ (?:seconds|minutes|hours|days)\b", "in [AGE]");
    s.add_filter(r"\b\d+(?:\.\d+)? (?:seconds|s)\b", "[DURATION]");
    s.add_filter(r#""(\w*seconds\w*)":[0-9.]+"#, r#""$1":"[DURATION]""#);
    // How many requests the pace let in flight follows the server's latency.
    s.add_filter(r"Pace: up to .*", "Pace: [PACE]");
    // Every new migration would change doctor's line; that it names the
    // newest is tested in tests/it/doctor.rs.
    s.add_filter(
        r"all \d+ applied \(up to supabase/migrations/[^)]+\)",
        "all [N] applied (up to [NEWEST MIGRATION])",
    );
    s.add_filter(
        r#""(concurrency_cuts|peak_concurrency)":\d+"#,
        r#""$1":"[PACE]""#,
    );
    // The stack's free ports, and each test's working directory.
    s.add_filter(r"\b127\.0\.0\.1:\d+\b", "127.0.0.1:[PORT]");
    s.add_filter(
        &format!(
            r"{}/usage-agg-wd-\d+-\d+",
            literal(&std::env::temp_dir().display().to_string())
        ),
        "[WORKDIR]",
    );
    // Who ran it: the lease holder is usage-agg@HOST:PID; close, reopen and
    // adjust record USER@HOST (usage-agg VERSION).
    s.add_filter(r"usage-agg@[^:\s]+:\d+", "usage-agg@[HOST]:[PID]");
    if let Some(host) = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
    {
        s.add_filter(&format!(r"@{}\b", literal(&host)), "@[HOST]");
    }
    s.add_filter(
        &format!(r"usage-agg {}\b", literal(env!("CARGO_PKG_VERSION"))),
        "usage-agg [VERSION]",
    );
    s
}

/// Every command's `--help` from the binary (docs/cli.md holds the same
/// text, checked by `cli_reference`): unfiltered, nothing in it varies.
#[test]
fn snapshot_help_of_every_command() {
    for (words, _, _) in crate::cli_reference::commands() {
        let mut args: Vec<&str> = words.iter().map(String::as_str).collect();
        args.push("--help");
        let run = usage_agg(&workdir(), &env(None), &args);
        let text = shown(&args, &run);
        let name = format!("help_{}", words.join("_"));
        let mut plain = insta::Settings::clone_current();
        plain.set_prepend_module_to_snapshot(false);
        plain.set_omit_expression(true);
        plain.bind(|| insta::assert_snapshot!(name.trim_end_matches('_'), text));
        run.assert_status(0);
    }
}

#[test]
fn snapshot_errors_before_any_request() {
    // No configuration at all: exit 78, naming what is missing and where it looked.
    snap(
        "error_missing_configuration",
        None,
        &["status", "--env", "dev"],
        78,
    );
    // Bad arguments: exit 64, clap's usage.
    snap(
        "error_bad_month",
        None,
        &["report", "--month", "2025-13"],
        64,
    );
    snap(
        "error_engine_rpc_with_full",
        None,
        &["aggregate", "--engine", "rpc", "--full"],
        64,
    );
    snap(
        "error_schedule_every_7m",
        None,
        &["schedule", "--every", "7m"],
        64,
    );
    snap(
        "error_allow_decrease_without_rebuild",
        None,
        &["aggregate", "--rebase", "--allow-decrease"],
        64,
    );
}

#[test]
fn snapshot_sql_first_lines() {
    let run = usage_agg(&workdir(), &env(None), &["sql"]);
    run.assert_status(0);
    let head: String = run
        .stdout
        .lines()
        .take(12)
        .map(|l| format!("{l}\n"))
        .collect();
    let text = format!(
        "$ usage-agg sql | head -12\nexit status: {}\n--- stdout\n{head}--- stderr: {}\n",
        run.status,
        if run.stderr.is_empty() {
            "(empty)"
        } else {
            &run.stderr
        }
    );
    settings().bind(|| insta::assert_snapshot!("sql_head", text));
}

/// Aggregate's outcomes, then what status, report and verify show of them.
#[test]
fn snapshot_aggregate_status_report_verify() {
    let Some(stack) = local_stack() else {
        return;
    };
    insert_rows(&stack, 300, 5);
    snap("aggregate_first_run", Some(&stack), &["aggregate"], 0);
    insert_rows(&stack, 40, 5);
    snap("aggregate_new_rows", Some(&stack), &["aggregate"], 0);
    snap("aggregate_nothing_to_do", Some(&stack), &["aggregate"], 0);
    snap(
        "aggregate_nothing_to_do_verbose",
        Some(&stack),
        &["aggregate", "--verbose"],
        0,
    );
    insert_rows(&stack, 25, 5);
    snap(
        "aggregate_dry_run",
        Some(&stack),
        &["aggregate", "--dry-run"],
        0,
    );
    snap("aggregate_json", Some(&stack), &["aggregate", "--json"], 0);

    snap("status", Some(&stack), &["status"], 0);
    snap("status_json", Some(&stack), &["status", "--json"], 0);
    snap(
        "report_top_portals",
        Some(&stack),
        &["report", "--month", "2025-06"],
        0,
    );
    snap(
        "report_one_portal",
        Some(&stack),
        &["report", "--portal", "1001", "--month", "2025-07"],
        0,
    );
    snap(
        "report_csv",
        Some(&stack),
        &["report", "--month", "2025-06", "--format", "csv"],
        0,
    );
    snap("verify_clean", Some(&stack), &["verify"], 0);

    // Drift made by hand: one key counts one request too many, another has
    // lost its row.
    stack
        .sql()
        .batch_execute(
            "UPDATE portal_usage_monthly SET request_count = request_count + 1, success_count = success_count + 1
              WHERE portal_id = 1001 AND month_year = '2025-06';
             DELETE FROM portal_usage_monthly WHERE portal_id = 1002 AND month_year = '2025-07'",
        )
        .unwrap();
    snap("verify_drift", Some(&stack), &["verify"], 65);
    // A rebuild restores the lost key, but lowers nothing unless allowed.
    snap(
        "aggregate_full_with_drift",
        Some(&stack),
        &["aggregate", "--full"],
        65,
    );
    snap(
        "aggregate_full_allow_decrease",
        Some(&stack),
        &["aggregate", "--full", "--allow-decrease"],
        0,
    );
    snap("verify_repaired", Some(&stack), &["verify", "--json"], 0);
}

/// A run refused by the run-time checks: the id sequence restarted below
/// the cursor. What aggregate, status and doctor say, then the repair.
#[test]
fn snapshot_a_refused_run_and_its_repair() {
    let Some(stack) = local_stack() else {
        return;
    };
    insert_rows(&stack, 200, 4);
    aggregate(&stack, &[]).assert_status(0);
    stack
        .sql()
        .batch_execute("DELETE FROM usage_requests; ALTER SEQUENCE usage_requests_id_seq RESTART")
        .unwrap();
    insert_rows(&stack, 30, 4);
    snap(
        "aggregate_refused_sequence_restart",
        Some(&stack),
        &["aggregate"],
        65,
    );
    snap(
        "status_refused_sequence_restart",
        Some(&stack),
        &["status"],
        65,
    );
    snap(
        "doctor_refused_sequence_restart",
        Some(&stack),
        &["doctor"],
        65,
    );
    snap(
        "aggregate_rebase",
        Some(&stack),
        &["aggregate", "--rebase"],
        0,
    );
}

/// Billing months: close (dry run, for real, twice), adjust (booked, then
/// the same id again), reopen, prune (dry run, for real), and what status
/// and doctor show then.
#[test]
fn snapshot_billing_months_and_doctor() {
    let Some(stack) = local_stack() else {
        return;
    };
    insert_rows(&stack, 150, 5);
    aggregate(&stack, &[]).assert_status(0);
    snap("doctor_healthy", Some(&stack), &["doctor"], 0);
    snap(
        "close_dry_run",
        Some(&stack),
        &["close", "--month", "2025-05", "--dry-run"],
        0,
    );
    snap("close", Some(&stack), &["close", "--month", "2025-05"], 0);
    snap(
        "close_again",
        Some(&stack),
        &["close", "--month", "2025-05"],
        0,
    );
    let adjust = [
        "adjust",
        "--portal",
        "1001",
        "--month",
        "2025-05",
        "--requests",
        "-3",
        "--reason",
        "refund: duplicate submissions",
        "--id",
        "ticket-42",
    ];
    snap("adjust", Some(&stack), &adjust, 0);
    snap("adjust_same_id_again", Some(&stack), &adjust, 0);
    snap(
        "reopen",
        Some(&stack),
        &[
            "reopen",
            "--month",
            "2025-05",
            "--reason",
            "invoice disputed",
        ],
        0,
    );
    snap(
        "reopen_not_closed",
        Some(&stack),
        &["reopen", "--month", "2025-05", "--reason", "again"],
        0,
    );
    for month in ["2025-05", "2025-06"] {
        usage_agg(
            &workdir(),
            &env(Some(&stack)),
            &["close", "--month", month, "--env", "dev"],
        )
        .assert_status(0);
    }
    snap(
        "prune_dry_run",
        Some(&stack),
        &["prune", "--before", "2025-07", "--dry-run"],
        0,
    );
    snap("prune", Some(&stack), &["prune", "--before", "2025-07"], 0);
    snap("status_with_closed_months", Some(&stack), &["status"], 0);
    snap(
        "report_with_adjustment",
        Some(&stack),
        &[
            "report", "--portal", "1001", "--month", "2025-07", "--months", "4",
        ],
        0,
    );
    // Without pg_cron in this database, schedule says how to enable it.
    snap(
        "schedule_show_without_pg_cron",
        Some(&stack),
        &["schedule", "--show"],
        78,
    );
}

/// Quotas and alerts (docs/quotas.md): the quotas set and shown, a run
/// that records alerts, the alerts listed, delivered to a receiver on
/// loopback, and listed again; report's use of the quota; a portal never
/// seen.
#[test]
fn snapshot_quotas_and_alerts() {
    let Some(stack) = local_stack() else {
        return;
    };
    stack
        .sql()
        .batch_execute(
            "INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
             SELECT 1001, '2025-06-10 09:00:00', g % 10 <> 0, '2025-06' FROM generate_series(1, 75) g;
             INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
             SELECT 1002, '2025-06-11 09:00:00', true, '2025-06' FROM generate_series(1, 30) g",
        )
        .unwrap();
    aggregate(&stack, &[]).assert_status(0);
    snap("quota_show_none", Some(&stack), &["quota", "show"], 0);
    snap(
        "quota_set_default",
        Some(&stack),
        &["quota", "set", "--default", "--limit", "100"],
        0,
    );
    snap(
        "quota_set_portal_already_reached",
        Some(&stack),
        &[
            "quota",
            "set",
            "--portal",
            "1002",
            "--limit",
            "25",
            "--thresholds",
            "50,100",
        ],
        0,
    );
    snap(
        "quota_set_unknown_portal",
        Some(&stack),
        &["quota", "set", "--portal", "4242", "--limit", "25"],
        64,
    );
    snap("quota_show", Some(&stack), &["quota", "show"], 0);
    stack
        .sql()
        .batch_execute(
            "INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
             SELECT 1001, '2025-06-20 09:00:00', true, '2025-06' FROM generate_series(1, 10) g",
        )
        .unwrap();
    snap("aggregate_records_alerts", Some(&stack), &["aggregate"], 0);
    snap(
        "quota_show_portal",
        Some(&stack),
        &["quota", "show", "--portal", "1001", "--month", "2025-06"],
        0,
    );
    snap(
        "report_with_quotas",
        Some(&stack),
        &["report", "--month", "2025-06"],
        0,
    );
    snap(
        "alerts_list_undelivered",
        Some(&stack),
        &["alerts", "list", "--undelivered"],
        0,
    );
    let receiver = crate::quotas::Receiver::start(vec![crate::quotas::Answer::Status(500)]);
    let mut all = vec!["alerts", "deliver", "--retry-delay", "10ms", "--env", "dev"];
    let env = {
        let mut e = env(Some(&stack));
        e.push(("USAGE_AGG_ALERTS_WEBHOOK_URL".into(), receiver.url()));
        e.push((
            "USAGE_AGG_ALERTS_WEBHOOK_SECRET".into(),
            crate::quotas::SECRET.into(),
        ));
        e
    };
    let run = usage_agg(&workdir(), &env, &all);
    let text = shown(&all, &run);
    settings().bind(|| insta::assert_snapshot!("alerts_deliver", text));
    run.assert_status(0);
    all.truncate(0);
    snap("alerts_list", Some(&stack), &["alerts", "list"], 0);
}

/// `report --portal`'s chart (issue 21): one bar a month, successes and
/// errors told apart, the numbers beside, every month of the window; in
/// UTF-8 blocks where the locale is UTF-8, in ASCII where it is not or
/// `NO_COLOR` is set, and nothing drawn in CSV or JSON.
#[test]
fn snapshot_report_charts_in_utf8_and_ascii() {
    let Some(stack) = local_stack() else {
        return;
    };
    // Fixed months of 2025, errors in some, one month without usage.
    stack
        .sql()
        .batch_execute(
            "INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
             SELECT 42, '2025-03-05 10:00:00', g % 10 <> 0, '2025-03' FROM generate_series(1, 120) g;
             INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
             SELECT 42, '2025-04-05 10:00:00', g % 4 <> 0, '2025-04' FROM generate_series(1, 80) g;
             INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
             SELECT 42, '2025-06-05 10:00:00', true, '2025-06' FROM generate_series(1, 45) g;
             INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
             SELECT 42, '2025-07-05 10:00:00', g % 50 <> 0, '2025-07' FROM generate_series(1, 150) g;
             INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
             SELECT 43, '2025-07-05 10:00:00', g % 3 <> 0, '2025-07' FROM generate_series(1, 60) g;",
        )
        .unwrap();
    aggregate(&stack, &[]).assert_status(0);
    let portal = [
        "report", "--portal", "42", "--month", "2025-07", "--months", "6",
    ];
    let utf8 = snap_in("report_chart_utf8", &stack, "C.UTF-8", None, &portal, 0);
    assert!(utf8.stdout.contains('█') && utf8.stdout.contains('░'));
    let ascii = snap_in("report_chart_ascii", &stack, "C", None, &portal, 0);
    assert!(ascii.stdout.is_ascii() && ascii.stdout.contains("#x"));
    // NO_COLOR in a UTF-8 terminal: ASCII too.
    let no_color = snap_in(
        "report_chart_no_color",
        &stack,
        "C.UTF-8",
        Some("1"),
        &portal,
        0,
    );
    assert_eq!(no_color.stdout, ascii.stdout);
    snap_in(
        "report_top_chart_utf8",
        &stack,
        "C.UTF-8",
        None,
        &["report", "--month", "2025-07"],
        0,
    );
    // Nothing drawn for a program.
    for format in [&["--format", "csv"][..], &["--json"][..]] {
        let mut args = portal.to_vec();
        args.extend_from_slice(format);
        let run = snap_in(
            &format!(
                "report_chart_{}",
                format.last().unwrap().trim_start_matches('-')
            ),
            &stack,
            "C.UTF-8",
            None,
            &args,
            0,
        );
        assert!(
            !run.stdout.contains('█') && !run.stdout.contains('#'),
            "{}",
            run.stdout
        );
    }
}

//! Quotas and usage alerts (issue 20, docs/quotas.md): a threshold of a
//! portal's quota fires exactly once per portal, month, threshold and
//! limit, recorded by the rule book in the transaction that books the rows,
//! in every engine and the scheduled run; and alerts are delivered to a
//! webhook, signed as Standard Webhooks specify, at least once with a stable
//! webhook-id. Ground truth is SQL on a direct connection; the receiver is a
//! real HTTP server on loopback (below); every delivered request is checked
//! by the standard's own verifier (the `standardwebhooks` package from PyPI,
//! which scripts/setup installs).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

/// A month no clock reaches: open unless a test closes it.
const M: &str = "2025-03";

/// The secret of the tests' webhook (32 random bytes).
pub(crate) const SECRET: &str = "whsec_7ZbFyqWQKm2CxR5n0x9OMQk8hY6cJ3yL1sVtAeUdGfI=";

fn run(stack: &Stack, args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--env", "dev"]);
    usage_agg(&workdir(), &stack.env(), &all)
}

fn run_with(env: &[(String, String)], args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--env", "dev"]);
    usage_agg(&workdir(), env, &all)
}

/// The alerts recorded: (portal, month, threshold, limit) -> request_count.
fn alerts(stack: &Stack) -> BTreeMap<(i64, String, i32, i64), i64> {
    stack
        .sql()
        .query(
            "SELECT portal_id, month_year, threshold_percent, request_limit, request_count
               FROM portal_usage_alerts ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get(1), r.get(2), r.get(3)), r.get(4)))
        .collect()
}

fn alert_rows(stack: &Stack) -> i64 {
    count(stack, "SELECT count(*) FROM portal_usage_alerts")
}

fn key(portal: i64, month: &str, threshold: i32, limit: i64) -> (i64, String, i32, i64) {
    (portal, month.to_string(), threshold, limit)
}

/// One run of `engine`: `rest`, `rpc`, or `scheduled` (the procedure
/// pg_cron calls, on a direct connection).
fn count_with(stack: &Stack, engine: &str) {
    match engine {
        "scheduled" => {
            stack
                .sql()
                .batch_execute("CALL public.usage_agg_run_scheduled(30)")
                .unwrap();
        }
        e => {
            aggregate(stack, &["--engine", e]).assert_status(0);
        }
    }
}

/// The thresholds a month's usage reached under `limit`: what the alerts
/// must be (each once), whatever the runs were.
fn reached(usage: i64, limit: i64, thresholds: &[i32]) -> Vec<i32> {
    thresholds
        .iter()
        .copied()
        .filter(|t| usage * 100 >= limit * i64::from(*t))
        .collect()
}

#[test]
fn a_threshold_fires_once_per_portal_month_threshold_and_limit_in_every_engine() {
    for engine in ["rest", "rpc", "scheduled"] {
        let stack = migrated_stack();
        insert_month(&stack, 9, M, 1);
        aggregate(&stack, &[]).assert_status(0); // the first run sets the cursor
        run(&stack, &["quota", "set", "--default", "--limit", "100"]).assert_status(0);
        run(
            &stack,
            &[
                "quota",
                "set",
                "--portal",
                "2",
                "--limit",
                "1000",
                "--new-portal",
            ],
        )
        .assert_status(0);

        // Under the first threshold: nothing.
        insert_month(&stack, 1, M, 79);
        insert_month(&stack, 2, M, 150);
        count_with(&stack, engine);
        assert_eq!(alert_rows(&stack), 0, "{engine}: 79 of 100 fires nothing");

        // Hovering: one row at a time across 80, in runs of their own.
        for _ in 0..3 {
            insert_month(&stack, 1, M, 1);
            count_with(&stack, engine);
        }
        assert_eq!(
            alerts(&stack),
            BTreeMap::from([(key(1, M, 80, 100), 80)]),
            "{engine}: 80% fired once, at the booking that reached it, and not again at 81 or 82"
        );

        // Usage taken back below 80 (rows deleted, a rebuild allowed to
        // lower), then back above it: hovering does not fire again.
        stack
            .sql()
            .batch_execute(&format!(
                "DELETE FROM usage_requests WHERE id IN (SELECT id FROM usage_requests
                  WHERE portal_id = 1 AND month_year = '{M}' ORDER BY id DESC LIMIT 10)"
            ))
            .unwrap();
        aggregate(&stack, &["--month", M, "--allow-decrease"]).assert_status(0);
        insert_month(&stack, 1, M, 12);
        count_with(&stack, engine);
        assert_eq!(
            alerts(&stack).len(),
            1,
            "{engine}: 72 -> 84 re-fires nothing"
        );

        // Several thresholds in one booking, the portal's own quota over
        // the default plan's.
        insert_month(&stack, 1, M, 30);
        insert_month(&stack, 2, M, 700);
        count_with(&stack, engine);
        assert_eq!(
            alerts(&stack),
            BTreeMap::from([
                (key(1, M, 80, 100), 80),
                (key(1, M, 100, 100), 114),
                (key(2, M, 80, 1000), 850),
            ]),
            "{engine}"
        );
        assert_consistent(&stack);
    }
}

#[test]
fn raising_the_limit_arms_the_thresholds_of_the_new_one() {
    let stack = migrated_stack();
    insert_month(&stack, 9, M, 1);
    aggregate(&stack, &[]).assert_status(0);
    run(
        &stack,
        &[
            "quota",
            "set",
            "--portal",
            "1",
            "--limit",
            "100",
            "--new-portal",
        ],
    )
    .assert_status(0);
    insert_month(&stack, 1, M, 120);
    aggregate(&stack, &[]).assert_status(0);
    assert_eq!(alerts(&stack).len(), 2, "80% and 100% of 100");

    // A new limit: its thresholds are armed; none is reached yet.
    run(&stack, &["quota", "set", "--portal", "1", "--limit", "200"])
        .assert_status(0)
        .assert_stdout_has("was 100 requests a month");
    insert_month(&stack, 1, M, 10);
    aggregate(&stack, &["--engine", "rpc"]).assert_status(0);
    assert_eq!(alerts(&stack).len(), 2, "130 of 200 reaches nothing");
    insert_month(&stack, 1, M, 40);
    aggregate(&stack, &[]).assert_status(0);
    assert_eq!(
        alerts(&stack).get(&key(1, M, 80, 200)),
        Some(&170),
        "80% of the new limit fired"
    );

    // Back to the old limit: its thresholds fired this month already.
    run(&stack, &["quota", "set", "--portal", "1", "--limit", "100"]).assert_status(0);
    insert_month(&stack, 1, M, 1);
    aggregate(&stack, &[]).assert_status(0);
    assert_eq!(
        alerts(&stack).len(),
        3,
        "once per portal, month, threshold and limit"
    );

    // New thresholds on the same limit: those the counted usage already
    // reached fire as the quota is set, in its transaction; the rest with
    // the booking that reaches them.
    run(
        &stack,
        &[
            "quota",
            "set",
            "--portal",
            "1",
            "--limit",
            "100",
            "--thresholds",
            "50,80,100,150,200",
        ],
    )
    .assert_status(0)
    .assert_stdout_has("2 thresholds already reached by counted usage, recorded as alerts now")
    .assert_stdout_has(&format!("portal 1 {M}: 150% of 100 (171 counted)"));
    let a = alerts(&stack);
    assert_eq!(a.len(), 5, "{a:?}");
    assert_eq!(a.get(&key(1, M, 50, 100)), Some(&171));
    assert_eq!(a.get(&key(1, M, 150, 100)), Some(&171));
    insert_month(&stack, 1, M, 29);
    aggregate(&stack, &["--engine", "rpc"]).assert_status(0);
    assert_eq!(alerts(&stack).get(&key(1, M, 200, 100)), Some(&200));
    assert_eq!(alert_rows(&stack), 6);
}

#[test]
fn a_late_row_fires_once_in_its_month_and_a_closed_month_fires_nothing() {
    let stack = migrated_stack();
    let (jan, feb) = ("2025-01", "2025-02");
    run(&stack, &["quota", "set", "--default", "--limit", "100"]).assert_status(0);
    insert_month(&stack, 1, jan, 79);
    insert_month(&stack, 1, feb, 10);
    aggregate(&stack, &[]).assert_status(0);
    assert_eq!(alert_rows(&stack), 0);

    // A late row of January, after February's: January's 80% fires, once,
    // in January.
    insert_month(&stack, 1, feb, 5);
    insert_month(&stack, 1, jan, 1);
    aggregate(&stack, &[]).assert_status(0);
    insert_month(&stack, 1, jan, 1);
    aggregate(&stack, &["--engine", "rpc"]).assert_status(0);
    assert_eq!(alerts(&stack), BTreeMap::from([(key(1, jan, 80, 100), 80)]));

    // January closed: its late rows are booked as adjustments (counted),
    // and cross nothing, whichever engine books them.
    stack
        .sql()
        .query_one(
            "SELECT usage_agg_close_month('default', $1, 0, 'test')::text",
            &[&jan],
        )
        .unwrap();
    insert_month(&stack, 1, jan, 30);
    aggregate(&stack, &[]).assert_status(0);
    insert_month(&stack, 1, jan, 30);
    aggregate(&stack, &["--engine", "rpc"]).assert_status(0);
    insert_month(&stack, 1, jan, 30);
    stack
        .sql()
        .batch_execute("CALL public.usage_agg_run_scheduled(30)")
        .unwrap();
    assert_eq!(
        count(
            &stack,
            &format!(
                "SELECT sum(request_count)::bigint FROM portal_usage_adjustments WHERE source = 'late' AND month_year = '{jan}'"
            )
        ),
        90
    );
    assert_eq!(alerts(&stack).len(), 1, "a closed month fires nothing new");

    // Reopened, January is open again: the reopening fires what its usage
    // (monthly row plus late adjustments, 171) reached, and its next
    // booking nothing more.
    run(&stack, &["reopen", "--month", jan, "--reason", "test"]).assert_status(0);
    assert_eq!(alerts(&stack).get(&key(1, jan, 100, 100)), Some(&171));
    insert_month(&stack, 1, jan, 1);
    aggregate(&stack, &[]).assert_status(0);
    assert_eq!(alerts(&stack).get(&key(1, jan, 100, 100)), Some(&171));
}

/// A closed month fires nothing, even as its late rows push it past a
/// threshold; reopened, it fires what it has reached at once, since no new
/// row of it may ever come (an adversarial pass: no alert after every
/// engine ran, and closing it again made that for good).
#[test]
fn a_reopened_month_fires_what_it_reached_while_closed() {
    let stack = migrated_stack();
    run(&stack, &["quota", "set", "--default", "--limit", "100"]).assert_status(0);
    insert_month(&stack, 1, "2025-01", 79);
    insert_month(&stack, 1, "2025-02", 1);
    aggregate(&stack, &[]).assert_status(0);
    run(&stack, &["close", "--month", "2025-01"]).assert_status(0);
    insert_month(&stack, 1, "2025-01", 30);
    aggregate(&stack, &[]).assert_status(0);
    assert!(alerts(&stack).is_empty(), "a closed month fires nothing");
    run(
        &stack,
        &["reopen", "--month", "2025-01", "--reason", "audit"],
    )
    .assert_status(0);
    let fired: Vec<i32> = alerts(&stack).keys().map(|k| k.2).collect();
    assert_eq!(fired, reached(109, 100, &[80, 100]));
    aggregate(&stack, &[]).assert_status(0);
    assert_eq!(alert_rows(&stack), 2, "once each");
}

#[test]
fn a_rebuild_records_its_crossings_and_one_killed_before_is_caught_up_by_the_next_run() {
    let stack = migrated_stack();
    insert_month(&stack, 1, M, 5);
    aggregate(&stack, &[]).assert_status(0);
    run(&stack, &["quota", "set", "--default", "--limit", "10"]).assert_status(0);
    // A rebuild writes totals outside the rule book; it records what they
    // reached before it moves the cursor.
    insert_month(&stack, 1, M, 5);
    aggregate(&stack, &["--full"])
        .assert_status(0)
        .assert_stdout_has("Quotas: 2 thresholds reached");
    assert_eq!(
        alerts(&stack),
        BTreeMap::from([(key(1, M, 80, 10), 10), (key(1, M, 100, 10), 10)])
    );
    insert_month(&stack, 2, M, 4);
    aggregate(&stack, &["--month", M]).assert_status(0);
    insert_month(&stack, 2, M, 5);
    aggregate(&stack, &["--month", M]).assert_status(0);
    assert_eq!(
        alerts(&stack).get(&key(2, M, 80, 10)),
        Some(&9),
        "--month too"
    );

    // Killed after its writes, before it recorded their crossings: the
    // keys stand above the cursor, and the next run (of either engine)
    // records them before it counts.
    for (portal, engine) in [(3, "rest"), (4, "rpc")] {
        insert_month(&stack, portal, M, 8);
        let killed = aggregate_failing(&stack, "before-cursor=abort@1", &["--full"]);
        assert_eq!(killed.status, -1);
        assert!(!alerts(&stack).contains_key(&key(portal, M, 80, 10)));
        aggregate(&stack, &["--engine", engine])
            .assert_status(0)
            .assert_stdout_has(&format!(
                "portal {portal} {M}: 80% of 10 requests (8 counted)"
            ));
        assert_eq!(
            alerts(&stack).get(&key(portal, M, 80, 10)),
            Some(&8),
            "{engine}"
        );
    }
    assert_eq!(alert_rows(&stack), 5);
}

/// A row of `portal` in month `M` with a malformed month: rejected (exit
/// 65) until corrected, and then counted only by a rebuild of its month,
/// since the cursor has passed it.
fn insert_bad(stack: &Stack, portal: i64) {
    stack
        .sql()
        .batch_execute(&format!(
            "INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
             VALUES ({portal}, '{M}-03 10:00:00', true, '2025-3')"
        ))
        .unwrap();
}

fn crossings_pending(stack: &Stack) -> Vec<String> {
    stack
        .sql()
        .query_one(
            "SELECT crossings_pending FROM usage_aggregation_state WHERE job = 'default'",
            &[],
        )
        .unwrap()
        .get(0)
}

/// A `--month` rebuild after a bad row was corrected (docs/semantics.md),
/// with no row since the last run: its horizon is the cursor, so its
/// writes stand at the cursor, not above it. Killed after its writes and
/// before it records their crossings (the `chunk` failpoint, after the
/// write), the month is left noted as pending, and the next run of either
/// engine (or the scheduled run, which sweeps first) records the crossing,
/// once. Before the pending months, no later run looked at those keys.
#[test]
fn a_rebuild_killed_between_its_writes_and_their_crossings_at_the_cursor_loses_no_crossing() {
    let stack = migrated_stack();
    run(&stack, &["quota", "set", "--default", "--limit", "10"]).assert_status(0);
    for (portal, next) in [(1, "rest"), (2, "rpc"), (3, "sweep")] {
        insert_month(&stack, portal, M, 7);
        insert_bad(&stack, portal);
        aggregate(&stack, &[]).assert_status(65);
        assert!(
            !alerts(&stack).contains_key(&key(portal, M, 80, 10)),
            "7 of 10"
        );
        stack
            .sql()
            .batch_execute(
                "UPDATE usage_requests SET month_year = '2025-03' WHERE month_year = '2025-3'",
            )
            .unwrap();
        let before = cursor(&stack);
        let mut env = stack.env();
        env.push(("USAGE_AGG_FAILPOINTS".into(), "chunk=abort@1".into()));
        assert_eq!(run_with(&env, &["aggregate", "--month", M]).status, -1);
        assert_eq!(
            count(
                &stack,
                &format!(
                    "SELECT request_count::bigint FROM portal_usage_monthly
                      WHERE portal_id = {portal} AND month_year = '{M}'"
                )
            ),
            8,
            "the rebuild wrote the corrected row's count"
        );
        assert_eq!(cursor(&stack), before, "the cursor did not move");
        assert!(!alerts(&stack).contains_key(&key(portal, M, 80, 10)));
        assert_eq!(crossings_pending(&stack), vec![M.to_string()]);
        // A dry run shows what the next run will record, and records none.
        aggregate(&stack, &["--dry-run"])
            .assert_status(0)
            .assert_stdout_has(&format!(
                "portal {portal} {M}: 80% of 10 requests (8 counted)"
            ));
        assert!(!alerts(&stack).contains_key(&key(portal, M, 80, 10)));
        match next {
            "sweep" => {
                // The scheduled run sweeps before its batches, and counts
                // the alert in its summary. (The killed run's lease stands
                // until its TTL: expired here, as ten minutes would.)
                stack
                    .sql()
                    .batch_execute("UPDATE usage_aggregation_state SET lease_expires_at = now() WHERE job = 'default'")
                    .unwrap();
                let messages = stack
                    .sql()
                    .simple_query("CALL public.usage_agg_run_scheduled(30)")
                    .unwrap();
                let summary: serde_json::Value = messages
                    .iter()
                    .find_map(|m| match m {
                        postgres::SimpleQueryMessage::Row(r) => {
                            serde_json::from_str(r.get(0).unwrap()).ok()
                        }
                        _ => None,
                    })
                    .expect("CALL returns its summary");
                assert_eq!(summary["outcome"], "ok", "{summary}");
                assert_eq!(summary["alerts"], 1, "{summary}");
            }
            engine => {
                aggregate(&stack, &["--engine", engine])
                    .assert_status(0)
                    .assert_stdout_has(&format!(
                        "portal {portal} {M}: 80% of 10 requests (8 counted)"
                    ));
            }
        }
        assert_eq!(
            alerts(&stack).get(&key(portal, M, 80, 10)),
            Some(&8),
            "{next}"
        );
        assert!(crossings_pending(&stack).is_empty(), "{next}");
    }
    // Nothing is recorded twice by the runs that follow.
    for engine in ["rest", "rpc", "scheduled"] {
        count_with(&stack, engine);
    }
    aggregate(&stack, &["--month", M]).assert_status(0);
    assert_eq!(alert_rows(&stack), 3);
}

/// Before the quota gaps migration, a rebuild records its months'
/// crossings as it did (usage_agg_record_crossings), and doctor names the
/// migration that is missing.
#[test]
fn without_the_quota_gaps_migration_rebuilds_record_as_before_and_doctor_names_it() {
    let mut stack = Stack::new();
    let gaps = *MIGRATIONS
        .iter()
        .find(|m| m.ends_with("_usage_agg_quota_gaps.sql"))
        .expect("the quota gaps migration");
    for m in MIGRATIONS.iter().filter(|m| **m != gaps) {
        migrate_file(&mut stack, m);
    }
    run(&stack, &["quota", "set", "--default", "--limit", "10"]).assert_status(0);
    insert_month(&stack, 1, M, 9);
    aggregate(&stack, &[])
        .assert_status(0)
        .assert_stdout_has(&format!("portal 1 {M}: 80% of 10 requests (9 counted)"));
    insert_month(&stack, 1, M, 1);
    aggregate(&stack, &["--full"]).assert_status(0);
    assert_eq!(
        alerts(&stack),
        BTreeMap::from([(key(1, M, 80, 10), 9), (key(1, M, 100, 10), 10)])
    );
    let doctor = run(&stack, &["doctor"]);
    doctor.assert_status(78);
    assert!(
        doctor
            .stdout
            .lines()
            .any(|l| l.starts_with("FAIL migrations")
                && l.contains("the pending crossings are missing")),
        "{}",
        doctor.stdout
    );
    doctor.assert_stdout_has("20261207175000_usage_agg_quota_gaps.sql");
}

/// `--dry-run` of a rebuild (the first run, `--full`, `--month`) shows the
/// alerts the run would record, and records none.
#[test]
fn a_dry_run_of_a_rebuild_shows_the_alerts_the_rebuild_would_record() {
    let stack = migrated_stack();
    run(&stack, &["quota", "set", "--default", "--limit", "10"]).assert_status(0);
    insert_month(&stack, 1, M, 12);
    insert_month(&stack, 2, M, 8);
    let shown = |args: &[&str]| -> BTreeMap<(i64, String, i32, i64), i64> {
        let mut all = args.to_vec();
        all.push("--json");
        let r = aggregate(&stack, &all);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        v["alerts"]
            .as_array()
            .unwrap_or_else(|| panic!("{args:?}: no alerts in {v}"))
            .iter()
            .map(|a| {
                (
                    (
                        a["portal_id"].as_i64().unwrap(),
                        a["month_year"].as_str().unwrap().to_string(),
                        a["threshold_percent"].as_i64().unwrap() as i32,
                        a["request_limit"].as_i64().unwrap(),
                    ),
                    a["request_count"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    // The first run.
    let dry = shown(&["--dry-run"]);
    assert_eq!(alert_rows(&stack), 0, "a dry run records nothing");
    aggregate(&stack, &["--dry-run"])
        .assert_status(0)
        .assert_stdout_has("Quotas: 3 thresholds reached, which would be recorded as alerts");
    let real = shown(&[]);
    assert_eq!(dry, real, "the first run");
    assert_eq!(real, alerts(&stack));
    // --full and --month, each with a key their rebuild writes.
    for (portal, args) in [(3, &["--full"][..]), (4, &["--month", M][..])] {
        insert_month(&stack, portal, M, 9);
        let mut dry_args = args.to_vec();
        dry_args.push("--dry-run");
        let dry = shown(&dry_args);
        assert_eq!(
            dry,
            BTreeMap::from([(key(portal, M, 80, 10), 9)]),
            "{args:?}"
        );
        assert!(!alerts(&stack).contains_key(&key(portal, M, 80, 10)));
        assert_eq!(shown(args), dry, "{args:?}");
        assert_eq!(alerts(&stack).get(&key(portal, M, 80, 10)), Some(&9));
    }
    assert_eq!(alert_rows(&stack), 5);
}

#[test]
fn a_dry_run_shows_the_alerts_it_would_record_and_records_none() {
    let stack = migrated_stack();
    insert_month(&stack, 9, M, 1);
    aggregate(&stack, &[]).assert_status(0);
    run(&stack, &["quota", "set", "--default", "--limit", "10"]).assert_status(0);
    insert_month(&stack, 3, M, 12);
    for engine in ["rest", "rpc"] {
        aggregate(&stack, &["--dry-run", "--engine", engine])
            .assert_status(0)
            .assert_stdout_has("Quotas: 2 thresholds reached, which would be recorded as alerts")
            .assert_stdout_has(&format!("portal 3 {M}: 100% of 10 requests (12 counted)"));
        let json = aggregate(&stack, &["--dry-run", "--json", "--engine", engine]);
        let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
        assert_eq!(v["alerts_recorded"], 0, "{engine}");
        assert_eq!(v["alerts"].as_array().unwrap().len(), 2, "{engine}: {v}");
        assert_eq!(alert_rows(&stack), 0, "{engine}: a dry run records nothing");
    }
    aggregate(&stack, &[])
        .assert_status(0)
        .assert_stdout_has("Quotas: 2 thresholds reached, recorded with the totals as alerts");
    assert_eq!(alert_rows(&stack), 2);
}

#[test]
fn killed_and_concurrent_runs_leave_exactly_one_alert_per_crossing() {
    let stack = migrated_stack();
    let mut rng = Rng(2020);
    insert_random(&stack, &mut rng, 200, 12);
    aggregate(&stack, &[]).assert_status(0);
    let thresholds = [10, 25, 50, 80, 100, 150, 300];
    run(
        &stack,
        &[
            "quota",
            "set",
            "--default",
            "--limit",
            "20",
            "--thresholds",
            "10,25,50,80,100,150,300",
        ],
    )
    .assert_status(0);
    // The limit is the default plan's throughout; what must be recorded is
    // every threshold each month's usage reached, once.
    let expected = |stack: &Stack| -> BTreeSet<(i64, String, i32, i64)> {
        ground_truth(stack)
            .into_iter()
            .flat_map(|(portal, month, n, ..)| {
                reached(n, 20, &thresholds)
                    .into_iter()
                    .map(move |t| (portal, month.clone(), t, 20))
            })
            .collect()
    };
    let points = ["page", "chunk", "before-cursor", "after-cursor"];
    let mut kills = 0;
    for i in 0..24 {
        let n = 20 + rng.below(60) as usize;
        insert_random(&stack, &mut rng, n, 12);
        let (engine, point) = if i % 3 == 2 {
            ("rpc", "page")
        } else {
            ("rest", points[rng.below(4) as usize])
        };
        let killed = aggregate_failing(
            &stack,
            &format!("{point}=abort@{}", 1 + rng.below(2)),
            &[
                "--engine",
                engine,
                "--page-size",
                "20",
                "--batch-size",
                "25",
            ],
        );
        assert!(matches!(killed.status, -1 | 0), "{}", killed.all());
        kills += usize::from(killed.status == -1);
        // Two at once, one per engine, then one to finish what they left.
        let a = {
            let env = stack.env();
            std::thread::spawn(move || {
                usage_agg(
                    &workdir(),
                    &env,
                    &["aggregate", "--env", "dev", "--batch-size", "30"],
                )
            })
        };
        let b = {
            let env = stack.env();
            std::thread::spawn(move || {
                usage_agg(
                    &workdir(),
                    &env,
                    &[
                        "aggregate",
                        "--env",
                        "dev",
                        "--engine",
                        "rpc",
                        "--batch-size",
                        "30",
                    ],
                )
            })
        };
        for r in [a.join().unwrap(), b.join().unwrap()] {
            // One of them may find the other's lease (75).
            assert!(matches!(r.status, 0 | 75), "{}", r.all());
        }
        aggregate(&stack, &[]).assert_status(0);
        let recorded: BTreeSet<_> = alerts(&stack).into_keys().collect();
        assert_eq!(
            recorded,
            expected(&stack),
            "iteration {i} ({engine} {point})"
        );
        assert_eq!(alert_rows(&stack) as usize, recorded.len());
        // Each recorded at the booking that reached it: at or above its
        // threshold's count, at most the month's usage now.
        let bad = count(
            &stack,
            "SELECT count(*) FROM portal_usage_alerts a
               JOIN portal_usage_monthly m USING (portal_id, month_year)
              WHERE a.request_count * 100 < a.request_limit * a.threshold_percent
                 OR a.request_count > m.request_count",
        );
        assert_eq!(bad, 0, "iteration {i}");
        assert_consistent(&stack);
    }
    assert!(
        kills >= 10,
        "only {kills} of 24 runs were killed: the failpoints are not reached"
    );
    assert!(alert_rows(&stack) > 30, "crossings were exercised");
}

#[test]
fn bad_quota_input_gets_a_clear_message_and_nothing_written() {
    let stack = migrated_stack();
    insert_month(&stack, 1, M, 3);
    aggregate(&stack, &[]).assert_status(0);
    for (args, needle) in [
        (&["--default", "--limit", "0"][..], "1 request or more"),
        (&["--default", "--limit", "-5"][..], "1 request or more"),
        (&["--portal", "1", "--limit", "ten"][..], "not a limit"),
        (
            &["--default", "--limit", "10", "--thresholds", "0,100"][..],
            "outside 1..1000",
        ),
        (
            &["--default", "--limit", "10", "--thresholds", "80,1001"][..],
            "outside 1..1000",
        ),
        (
            &["--default", "--limit", "10", "--thresholds", "-5"][..],
            "-5 is outside 1..1000",
        ),
        (
            &["--default", "--limit", "10", "--thresholds", "-5,80"][..],
            "-5 is outside 1..1000",
        ),
        (
            &["--default", "--limit", "10", "--thresholds", "100,80"][..],
            "not ascending",
        ),
        (
            &["--default", "--limit", "10", "--thresholds", "80,80"][..],
            "not ascending",
        ),
        (&["--portal", "0", "--limit", "10"][..], "not a portal id"),
        (&["--limit", "10"][..], "--portal"),
        (
            &["--portal", "1", "--default", "--limit", "10"][..],
            "cannot be used with",
        ),
        // --new-portal is a portal's: with the default plan it meant
        // nothing, and was ignored.
        (
            &["--default", "--limit", "10", "--new-portal"][..],
            "'--default' cannot be used with '--new-portal'",
        ),
    ] {
        let mut all = vec!["quota", "set"];
        all.extend_from_slice(args);
        run(&stack, &all)
            .assert_status(64)
            .assert_stderr_has(needle);
    }
    // A portal usage-agg has never seen: refused by the database, 64.
    run(&stack, &["quota", "set", "--portal", "77", "--limit", "10"])
        .assert_status(64)
        .assert_stderr_has("portal 77 is unknown")
        .assert_stderr_has("--new-portal");
    assert_eq!(count(&stack, "SELECT count(*) FROM portal_usage_quotas"), 0);
    // A portal whose rows no run has counted yet is known.
    insert_month(&stack, 78, M, 1);
    run(&stack, &["quota", "set", "--portal", "78", "--limit", "10"]).assert_status(0);
    // The database refuses bad input from any client too.
    for sql in [
        "INSERT INTO portal_usage_quotas (portal_id, monthly_request_limit) VALUES (5, 0)",
        "INSERT INTO portal_usage_quotas (monthly_request_limit, thresholds_percent) VALUES (5, '{100,80}')",
        "INSERT INTO portal_usage_quotas (portal_id, monthly_request_limit) VALUES (78, 5)",
    ] {
        assert!(stack.sql().batch_execute(sql).is_err(), "{sql}");
    }
    // The webhook's settings: an http URL to another host, a missing or
    // bad secret: 78, before any request.
    let before = cursor(&stack);
    for (url, secret, needle) in [
        (
            "http://example.com/hook",
            SECRET,
            "plain http to example.com",
        ),
        (
            "https://example.com/hook",
            "",
            "USAGE_AGG_ALERTS_WEBHOOK_SECRET is empty",
        ),
        (
            "https://example.com/hook",
            "whsec_c2hvcnQ=",
            "fewer than the 24",
        ),
        ("ftp://example.com/hook", SECRET, "the scheme must be https"),
    ] {
        let env = webhook_env(&stack, url, secret);
        for args in [
            &["alerts", "deliver"][..],
            &["aggregate", "--deliver-alerts"][..],
        ] {
            let r = run_with(&env, args);
            r.assert_status(78).assert_stderr_has(needle);
            assert!(!r.all().contains("c2hvcnQ"), "the secret is never shown");
        }
    }
    assert_eq!(
        cursor(&stack),
        before,
        "a refused aggregate --deliver-alerts counted nothing"
    );
}

pub(crate) fn webhook_env(stack: &Stack, url: &str, secret: &str) -> Vec<(String, String)> {
    let mut env = stack.env();
    env.push(("USAGE_AGG_ALERTS_WEBHOOK_URL".into(), url.into()));
    env.push(("USAGE_AGG_ALERTS_WEBHOOK_SECRET".into(), secret.into()));
    env
}

/// What the receiver does with one request, in order; after the script,
/// it answers 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    Ok,
    Status(u16),
    /// Reads the request and never answers (the client times out).
    Hang,
    /// Reads the request and drops the connection.
    Reset,
    /// 307 to another port on loopback, which records whatever reaches it.
    Redirect(u16),
    /// This status with `Retry-After: N` (seconds).
    RetryAfter(u16, u32),
    /// This status with `Retry-After:` an HTTP date N seconds from now.
    RetryAt(u16, u32),
}

/// One request the receiver read.
#[derive(Debug, Clone)]
struct Received {
    headers: BTreeMap<String, String>,
    body: String,
    answered: Answer,
    /// When it was read.
    at: Instant,
}

/// A real HTTP receiver on loopback: one request per connection, each
/// recorded before it is answered as the script says.
pub(crate) struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    pub(crate) fn start(script: Vec<Answer>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
        let seen = got.clone();
        std::thread::spawn(move || {
            let mut hung = Vec::new();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let answer = script.lock().unwrap().pop_front().unwrap_or(Answer::Ok);
                if let Some(mut s) = serve(stream, answer, &seen) {
                    // Held open, unanswered, until the client gives up.
                    let _ = s.flush();
                    hung.push(s);
                }
            }
        });
        Receiver { port, got }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/usage?token=abc", self.port)
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

/// Reads one request, records it, answers; a hung stream is handed back.
fn serve(stream: TcpStream, answer: Answer, seen: &Arc<Mutex<Vec<Received>>>) -> Option<TcpStream> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    seen.lock().unwrap().push(Received {
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        answered: answer,
        at: Instant::now(),
    });
    let mut stream = stream;
    let reply = |status: &str, extra: &str| {
        format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n{extra}\r\nok")
    };
    match answer {
        Answer::Ok => {
            let _ = stream.write_all(reply("200 OK", "").as_bytes());
        }
        Answer::Status(s) => {
            let _ = stream.write_all(reply(&format!("{s} Failing"), "").as_bytes());
        }
        Answer::Redirect(port) => {
            let _ = stream.write_all(
                reply(
                    "307 Temporary Redirect",
                    &format!("Location: http://127.0.0.1:{port}/elsewhere\r\n"),
                )
                .as_bytes(),
            );
        }
        Answer::RetryAfter(s, secs) => {
            let _ = stream.write_all(
                reply(&format!("{s} Busy"), &format!("Retry-After: {secs}\r\n")).as_bytes(),
            );
        }
        Answer::RetryAt(s, secs) => {
            let at = chrono::Utc::now() + chrono::Duration::seconds(i64::from(secs));
            let date = at.format("%a, %d %b %Y %H:%M:%S GMT");
            let _ = stream.write_all(
                reply(&format!("{s} Busy"), &format!("Retry-After: {date}\r\n")).as_bytes(),
            );
        }
        Answer::Reset => {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        Answer::Hang => return Some(stream),
    }
    None
}

/// The standard's own verifier (PyPI `standardwebhooks`), run on every
/// request: each must verify; the same with its body changed must not; and
/// one signed (by the library) at a timestamp ten minutes old must not.
fn verify_independently(received: &[Received]) {
    let python = std::env::var("USAGE_AGG_TEST_WEBHOOKS_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        let cache = std::env::var("USAGE_AGG_CACHE").unwrap_or(format!("{home}/.cache/usage-agg"));
        format!("{cache}/standardwebhooks-venv/bin/python")
    });
    assert!(
        std::path::Path::new(&python).exists(),
        "the Standard Webhooks verifier is missing ({python}): run scripts/setup, which installs the \
         standardwebhooks package from PyPI"
    );
    let requests: Vec<serde_json::Value> = received
        .iter()
        .map(|r| serde_json::json!({"headers": r.headers, "body": r.body}))
        .collect();
    let script = r#"
import json, sys
from datetime import datetime, timedelta, timezone
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
secret, requests = sys.argv[1], json.load(sys.stdin)
wh = Webhook(secret)
for r in requests:
    h = {k: v for k, v in r["headers"].items() if k.startswith("webhook-")}
    wh.verify(r["body"], h)
    try:
        wh.verify(r["body"].replace("threshold", "Threshold"), h)
        sys.exit("a changed body verified")
    except WebhookVerificationError:
        pass
    old = datetime.now(timezone.utc) - timedelta(minutes=10)
    stale = dict(h, **{"webhook-timestamp": str(int(old.timestamp())),
                       "webhook-signature": wh.sign(h["webhook-id"], old, r["body"])})
    try:
        wh.verify(r["body"], stale)
        sys.exit("an old timestamp verified")
    except WebhookVerificationError:
        pass
print(len(requests), "verified")
"#;
    let mut child = std::process::Command::new(&python)
        .args(["-c", script, SECRET])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&requests).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Standard Webhooks verifier refused a request: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{} verified", received.len())
    );
}

/// report's "of quota" counts a month's usage as the crossings do (and
/// `quota show`, `usage_current`): its monthly row plus its own rows
/// counted after its close (late adjustments, booked in the next month).
#[test]
fn report_of_quota_counts_a_months_late_rows_as_its_alerts_do() {
    let stack = migrated_stack();
    let (jan, feb) = ("2025-01", "2025-02");
    run(&stack, &["quota", "set", "--default", "--limit", "100"]).assert_status(0);
    insert_month(&stack, 1, jan, 79);
    insert_month(&stack, 1, feb, 1);
    aggregate(&stack, &[]).assert_status(0);
    run(&stack, &["close", "--month", jan]).assert_status(0);
    insert_month(&stack, 1, jan, 30);
    aggregate(&stack, &[]).assert_status(0);
    let used: i64 = stack
        .sql()
        .query_one(
            &format!("SELECT used FROM usage_quota_status(1, '{jan}')"),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(used, 109, "79 in its monthly row, 30 late");
    // The top list of the month, and the portal's window of months.
    for args in [
        &["report", "--month", jan][..],
        &["report", "--portal", "1", "--month", feb][..],
    ] {
        run(&stack, args)
            .assert_status(0)
            .assert_stdout_has("109.0% of 100");
        let mut json = args.to_vec();
        json.extend_from_slice(&["--format", "json"]);
        let r = run(&stack, &json);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let row = v["rows"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .find(|l| l["month"] == jan && l["portal_id"] == 1)
            .unwrap_or_else(|| panic!("{v}"))
            .clone();
        assert_eq!(row["requests"], 79, "{row}");
        assert_eq!(row["quota_used"], used, "{row}");
        assert_eq!(row["quota_percent"], 109.0, "{row}");
    }
}

/// A receiver that asks to be left alone for a while (429 or 503 with
/// `Retry-After`, in seconds or as an HTTP date) is given that long before
/// the next attempt, whatever the backoff says; a 304 is neither delivered
/// nor a redirect: the alert is tried again, and the run says what it was.
#[test]
fn delivery_honours_retry_after_and_a_304_is_not_called_a_redirect() {
    let stack = migrated_stack();
    insert_month(&stack, 9, M, 1);
    aggregate(&stack, &[]).assert_status(0);
    run(&stack, &["quota", "set", "--default", "--limit", "10"]).assert_status(0);
    insert_month(&stack, 1, M, 8);
    aggregate(&stack, &[]).assert_status(0);
    assert_eq!(alert_rows(&stack), 1);

    let receiver = Receiver::start(vec![
        Answer::RetryAfter(503, 2),
        Answer::RetryAt(429, 3),
        Answer::Ok,
    ]);
    run_with(
        &webhook_env(&stack, &receiver.url(), SECRET),
        &[
            "alerts",
            "deliver",
            "--retry-delay",
            "10ms",
            "--attempts",
            "3",
        ],
    )
    .assert_status(0)
    .assert_stdout_has("delivered at attempt 3 of this run");
    let got = receiver.received();
    assert_eq!(got.len(), 3);
    let waited = |i: usize| got[i + 1].at.duration_since(got[i].at);
    // The backoff alone waits about 10 ms, then 20 ms.
    assert!(
        waited(0) >= Duration::from_millis(1950),
        "Retry-After: 2 waited {:?}",
        waited(0)
    );
    // An HTTP date has whole seconds: three from now is two at least.
    assert!(
        waited(1) >= Duration::from_millis(1950),
        "Retry-After: <date 3 s on> waited {:?}",
        waited(1)
    );
    verify_independently(&got);

    // 304 Not Modified: not delivered, not a redirect (which would stop the
    // run with 78); tried again, and left for the next run (75).
    insert_month(&stack, 2, M, 8);
    aggregate(&stack, &[]).assert_status(0);
    let receiver = Receiver::start(vec![Answer::Status(304), Answer::Status(304)]);
    let r = run_with(
        &webhook_env(&stack, &receiver.url(), SECRET),
        &[
            "alerts",
            "deliver",
            "--retry-delay",
            "10ms",
            "--attempts",
            "2",
        ],
    );
    r.assert_status(75).assert_stdout_has(
        "the receiver answered 304 Not Modified, which is neither a 2xx (delivered) nor a redirect",
    );
    assert!(!r.stdout.contains("redirects"), "{}", r.stdout);
    assert_eq!(receiver.received().len(), 2, "tried again");
    let last_error: String = stack
        .sql()
        .query_one(
            "SELECT last_error FROM portal_usage_alerts WHERE portal_id = 2",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(last_error.contains("304 Not Modified"), "{last_error}");
}

#[test]
fn delivery_retries_with_backoff_and_is_at_least_once_with_a_stable_webhook_id() {
    let stack = migrated_stack();
    insert_month(&stack, 9, M, 1);
    aggregate(&stack, &[]).assert_status(0);
    run(&stack, &["quota", "set", "--default", "--limit", "10"]).assert_status(0);
    insert_month(&stack, 1, M, 8);
    insert_month(&stack, 2, M, 11);
    aggregate(&stack, &[]).assert_status(0);
    assert_eq!(alert_rows(&stack), 3);

    // Undelivered: status, doctor and the metrics say so, with the age.
    let metrics = workdir().join("status.prom");
    let status = run(
        &stack,
        &[
            "status",
            "--json",
            "--metrics-file",
            metrics.to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["alerts"]["undelivered"], 3, "{v}");
    assert!(v["alerts"]["oldest_age_seconds"].as_i64().unwrap() >= 0);
    run(&stack, &["status"]).assert_stdout_has("3 undelivered, the oldest reached");
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.lines()
            .any(|l| l.starts_with("usage_agg_status_alerts_undelivered{") && l.ends_with(" 3")),
        "{prom}"
    );
    assert!(
        prom.contains("usage_agg_status_alerts_oldest_undelivered_age_seconds"),
        "{prom}"
    );
    run(&stack, &["doctor"])
        .assert_status(75)
        .assert_stdout_has("3 undelivered")
        .assert_stdout_has("usage-agg alerts deliver");
    run(&stack, &["alerts", "list", "--undelivered"]).assert_stdout_has("no, not tried yet");

    // The first alert fails three ways (500, no answer, a cut
    // connection), then goes through; the others at once.
    let receiver = Receiver::start(vec![
        Answer::Status(500),
        Answer::Hang,
        Answer::Reset,
        Answer::Ok,
    ]);
    let env = webhook_env(&stack, &receiver.url(), SECRET);
    let started = Instant::now();
    // At the most talkative log level, the secret still shows nowhere.
    let mut loud = env.clone();
    loud.push(("RUST_LOG".into(), "trace".into()));
    let r = run_with(
        &loud,
        &[
            "alerts",
            "deliver",
            "--attempt-timeout",
            "1s",
            "--retry-delay",
            "100ms",
            "--attempts",
            "4",
        ],
    );
    r.assert_status(0)
        .assert_stdout_has("Alerts: 3 of 3 delivered");
    assert!(
        started.elapsed() >= Duration::from_millis(1300),
        "it waited between attempts, and for the hung one"
    );
    assert!(
        !r.all().contains(SECRET) && !r.all().contains("token=abc"),
        "{}",
        r.all()
    );
    let got = receiver.received();
    assert_eq!(
        got.len(),
        6,
        "4 attempts of the first alert, 1 of each other"
    );
    let ids: Vec<&str> = got
        .iter()
        .map(|g| g.headers["webhook-id"].as_str())
        .collect();
    assert!(
        ids[..4].iter().all(|id| *id == ids[0]),
        "one webhook-id for every attempt: {ids:?}"
    );
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 3);
    for g in &got {
        assert!(
            !format!("{g:?}").contains(&SECRET[6..]),
            "the secret is never sent"
        );
        assert_eq!(g.headers["content-type"], "application/json");
    }
    let rows = stack
        .sql()
        .query(
            "SELECT attempts, delivered_at IS NOT NULL, last_error, webhook_id::text
               FROM portal_usage_alerts ORDER BY id",
            &[],
        )
        .unwrap();
    let first: (i32, bool, Option<String>, String) = (
        rows[0].get(0),
        rows[0].get(1),
        rows[0].get(2),
        rows[0].get(3),
    );
    assert_eq!((first.0, first.1), (4, true), "{first:?}");
    assert_eq!(first.3, ids[0], "the webhook-id is the alert's webhook_id");
    assert!(first.2.is_some(), "the last failure is kept");
    for r in &rows[1..] {
        assert_eq!((r.get::<_, i32>(0), r.get::<_, bool>(1)), (1, true));
    }
    let body: serde_json::Value = serde_json::from_str(&got[3].body).unwrap();
    assert_eq!(body["type"], "usage.quota_threshold_reached");
    assert_eq!(body["data"]["portal_id"], 1);
    assert_eq!(body["data"]["threshold_percent"], 80);
    assert_eq!(body["data"]["request_limit"], 10);
    verify_independently(&got);
    run(&stack, &["alerts", "deliver"])
        .assert_status(78)
        .assert_stderr_has("USAGE_AGG_ALERTS_WEBHOOK_URL is not set");
    run_with(&env, &["alerts", "deliver"])
        .assert_status(0)
        .assert_stdout_has("none to deliver");
    assert_eq!(
        receiver.received().len(),
        6,
        "a delivered alert is never posted again"
    );

    // A deliverer killed after the receiver's 2xx, before it recorded it:
    // the next posts it again, with the same webhook-id (at least once),
    // and a receiver that dedups by it processes it once.
    insert_month(&stack, 2, M, 1);
    run(
        &stack,
        &[
            "quota",
            "set",
            "--portal",
            "2",
            "--limit",
            "12",
            "--thresholds",
            "100",
        ],
    )
    .assert_status(0);
    aggregate(&stack, &[]).assert_status(0);
    assert_eq!(alert_rows(&stack), 4);
    let mut killed_env = env.clone();
    killed_env.push(("USAGE_AGG_FAILPOINTS".into(), "posted=abort@1".into()));
    assert_eq!(run_with(&killed_env, &["alerts", "deliver"]).status, -1);
    run_with(&env, &["alerts", "deliver"])
        .assert_status(0)
        .assert_stdout_has("Alerts: 1 of 1 delivered");
    let got = receiver.received();
    assert_eq!(got.len(), 8);
    assert_eq!(got[6].headers["webhook-id"], got[7].headers["webhook-id"]);
    assert_eq!(got[6].body, got[7].body, "the same alert, the same body");
    let processed: BTreeSet<&str> = got
        .iter()
        .filter(|g| g.answered == Answer::Ok)
        .map(|g| g.headers["webhook-id"].as_str())
        .collect();
    assert_eq!(processed.len(), 4, "deduped by webhook-id: each alert once");
    verify_independently(&got[6..]);

    // A receiver that stays down: the run stops at the first alert (75),
    // records its attempts and leaves the rest.
    insert_month(&stack, 3, M, 10);
    insert_month(&stack, 4, M, 10);
    aggregate(&stack, &[]).assert_status(0);
    let down = Receiver::start(vec![Answer::Status(503); 10]);
    let r = run_with(
        &webhook_env(&stack, &down.url(), SECRET),
        &[
            "alerts",
            "deliver",
            "--retry-delay",
            "10ms",
            "--attempts",
            "2",
        ],
    );
    r.assert_status(75)
        .assert_stdout_has("not delivered after 2 attempts (the receiver answered 503")
        .assert_stdout_has("4 alerts left for the next run");
    assert_eq!(down.received().len(), 2);
    run(&stack, &["alerts", "list", "--undelivered"])
        .assert_stdout_has("no, 2 attempts failed: the receiver answered 503");

    // A redirect is never followed (78), and nothing reaches its target.
    let target = Receiver::start(vec![]);
    let redirecting = Receiver::start(vec![Answer::Redirect(target.port)]);
    run_with(
        &webhook_env(&stack, &redirecting.url(), SECRET),
        &["alerts", "deliver", "--retry-delay", "10ms"],
    )
    .assert_status(78)
    .assert_stdout_has("a redirect to http://127.0.0.1")
    .assert_stdout_has("redirects are never followed");
    assert_eq!(redirecting.received().len(), 1, "not asked again");
    assert!(
        target.received().is_empty(),
        "the redirect's target was never asked"
    );

    // aggregate --deliver-alerts: counts, then delivers, in one line of cron.
    let ok = Receiver::start(vec![]);
    let r = run_with(
        &webhook_env(&stack, &ok.url(), SECRET),
        &["aggregate", "--deliver-alerts", "--json"],
    );
    r.assert_status(0);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["alerts_delivery"]["left"], 0, "{v}");
    assert_eq!(ok.received().len(), 4);
    verify_independently(&ok.received());
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM portal_usage_alerts WHERE delivered_at IS NULL"
        ),
        0
    );
    run(&stack, &["doctor"]).assert_stdout_has("all delivered");
}

#[test]
fn quota_show_gives_the_month_right_now_and_a_straight_line_projection() {
    let stack = migrated_stack();
    let month: String = stack
        .sql()
        .query_one("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM')", &[])
        .unwrap()
        .get(0);
    insert_month(&stack, 5, &month, 40);
    aggregate(&stack, &[]).assert_status(0);
    run(&stack, &["quota", "set", "--portal", "5", "--limit", "100"]).assert_status(0);
    insert_month(&stack, 5, &month, 5); // not yet counted: right now counts it
    let r = run(&stack, &["quota", "show", "--portal", "5", "--json"]);
    r.assert_status(0);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let st = &v["status"];
    assert_eq!(st["used"], 45);
    assert_eq!(st["request_limit"], 100);
    assert_eq!(st["percent"], 45.0);
    assert_eq!(st["quota"], "portal");
    // The projection is the database's: used over the month elapsed.
    let projected: i64 = stack
        .sql()
        .query_one("SELECT projected FROM usage_quota_status(5)", &[])
        .unwrap()
        .get(0);
    // Read a moment apart, while the month elapses: within a request.
    let shown = st["projected"].as_i64().unwrap();
    assert!(projected >= 45 && shown >= 45, "{projected} {shown}");
    assert!(
        (shown - projected).abs() <= 1 + projected / 100,
        "{shown} {projected}"
    );
    // A portal under the default plan, and one under none.
    let none = run(&stack, &["quota", "show", "--portal", "6", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&none.stdout).unwrap();
    assert_eq!(v["status"]["quota"], "none");
    run(&stack, &["quota", "set", "--default", "--limit", "1000"]).assert_status(0);
    let v: serde_json::Value =
        serde_json::from_str(&run(&stack, &["quota", "show", "--portal", "6", "--json"]).stdout)
            .unwrap();
    assert_eq!(v["status"]["quota"], "default");
    assert_eq!(v["status"]["request_limit"], 1000);
    // report shows each portal's use of its quota.
    let r = run(&stack, &["report", "--month", &month]);
    r.assert_status(0).assert_stdout_has("of quota");
    r.assert_stdout_has("40.0% of 100");
    // service_role reads the function and the tables; anon and
    // authenticated nothing of them.
    for (role, allowed) in [
        ("service_role", true),
        ("anon", false),
        ("authenticated", false),
    ] {
        for what in [
            "SELECT * FROM public.usage_quota_status(5)",
            "SELECT * FROM public.portal_usage_quotas",
            "SELECT * FROM public.portal_usage_alerts",
        ] {
            let mut db = stack.sql();
            let ok = db
                .batch_execute(&format!("BEGIN; SET LOCAL ROLE {role}; {what}; ROLLBACK"))
                .is_ok();
            let _ = db.batch_execute("ROLLBACK");
            assert_eq!(ok, allowed, "{role}: {what}");
        }
    }
}

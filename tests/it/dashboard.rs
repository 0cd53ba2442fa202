//! The dashboard's numbers and pictures (issue 21; docs/dashboard.md):
//! `usage_portal_summary`, the app's one call; `report --portal`'s window
//! of months drawn as bars; `report --html`, checked as a file here and in
//! a real browser (`browser_*`). Every figure is compared with ground truth
//! computed by SQL on a direct connection, on a scenario with a closed
//! month, late rows booked in later months, manual adjustments, rows no
//! run has counted yet, and months on both sides of the window's edge.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::common::*;

/// The portal the scenario is about, and the ones around it.
const PORTAL: i64 = 7;
/// The dashboard's migration, by the end of its file name.
const DASHBOARD: &str = "_usage_agg_dashboard.sql";

/// `month` moved `n` months back (written here, not with the crate's
/// window, so the test does not share the code it checks).
fn back(month: &str, n: i32) -> String {
    let y: i32 = month[..4].parse().unwrap();
    let m: i32 = month[5..].parse().unwrap();
    let k = y * 12 + (m - 1) - n;
    format!("{:04}-{:02}", k.div_euclid(12), k.rem_euclid(12) + 1)
}

/// The `n` months up to `last`, oldest first.
fn window(last: &str, n: i32) -> Vec<String> {
    (0..n).rev().map(|i| back(last, i)).collect()
}

fn usage(stack: &Stack, args: &[&str]) -> Run {
    usage_env(stack, &[("NO_COLOR", "1")], args)
}

/// `usage-agg ARGS --env dev` with more environment.
fn usage_env(stack: &Stack, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--env", "dev"]);
    let mut vars = stack.env();
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    usage_agg(&workdir(), &vars, &all)
}

/// The months the scenario writes in, around the database's current one.
struct Scenario {
    now: String,
    prev: String,
    prev2: String,
    /// The first month of the default (12-month) window, and the one
    /// before it.
    first: String,
    before: String,
}

/// A portal's history with everything billing knows, around the current
/// month C:
/// - C-12, just outside the default window: 4 requests;
/// - C-11, its first month: 3 successes and 2 errors at the month's first
///   instant;
/// - C-2: 8 and 2, closed; then 2 late rows (1 error) booked in C-1, and
///   after C-1 closed, 3 more booked in C;
/// - C-1: 5 and 1 at the month's last microsecond, closed with its late
///   rows booked in it;
/// - C: 6 and 3 counted, a manual adjustment of -2 (for C-1, booked in C),
///   and 3 + 1 more rows no run has counted yet.
///
/// Other portals, with rows and adjustments in the same months, must not
/// leak into portal 7's numbers (and make the all-portals view's top list
/// and error rates: 9 and 10 tie at 25%).
fn scenario(stack: &Stack) -> Scenario {
    let now: String = stack
        .sql()
        .query_one("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM')", &[])
        .unwrap()
        .get(0);
    let s = Scenario {
        prev: back(&now, 1),
        prev2: back(&now, 2),
        first: back(&now, 11),
        before: back(&now, 12),
        now,
    };
    let last_instant = |m: &str| -> String {
        stack
            .sql()
            .query_one(
                "SELECT to_char(($1 || '-01')::date + interval '1 month' - interval '1 microsecond',
                                'YYYY-MM-DD HH24:MI:SS.US')",
                &[&m],
            )
            .unwrap()
            .get(0)
    };
    insert_requests(
        stack,
        PORTAL,
        &s.before,
        4,
        0,
        &format!("{}-15 12:00:00", s.before),
    );
    insert_requests(
        stack,
        PORTAL,
        &s.first,
        3,
        2,
        &format!("{}-01 00:00:00", s.first),
    );
    insert_requests(
        stack,
        PORTAL,
        &s.prev2,
        8,
        2,
        &format!("{}-10 08:00:00", s.prev2),
    );
    insert_requests(stack, PORTAL, &s.prev, 5, 1, &last_instant(&s.prev));
    insert_requests(
        stack,
        PORTAL,
        &s.now,
        6,
        3,
        &format!("{}-01 00:00:00", s.now),
    );
    insert_requests(stack, 8, &s.prev, 11, 0, &format!("{}-02 00:00:00", s.prev));
    insert_requests(stack, 8, &s.now, 40, 4, &format!("{}-02 00:00:00", s.now));
    insert_requests(stack, 9, &s.now, 15, 5, &format!("{}-02 00:00:00", s.now));
    insert_requests(stack, 10, &s.now, 3, 1, &format!("{}-02 00:00:00", s.now));
    insert_requests(stack, 11, &s.now, 30, 0, &format!("{}-02 00:00:00", s.now));
    aggregate(stack, &[]).assert_status(0);
    close_sql(stack, &s.prev2);
    insert_requests(
        stack,
        PORTAL,
        &s.prev2,
        1,
        1,
        &format!("{}-28 23:00:00", s.prev2),
    );
    aggregate(stack, &[]).assert_status(0);
    close_sql(stack, &s.prev);
    insert_requests(
        stack,
        PORTAL,
        &s.prev2,
        3,
        0,
        &format!("{}-28 23:30:00", s.prev2),
    );
    insert_requests(stack, 8, &s.prev, 2, 0, &format!("{}-28 23:30:00", s.prev));
    aggregate(stack, &[]).assert_status(0);
    for (portal, n, id) in [(PORTAL, "-2", "dash-1"), (8, "5", "dash-2")] {
        usage(
            stack,
            &[
                "adjust",
                "--portal",
                &portal.to_string(),
                "--month",
                &s.prev,
                "--requests",
                n,
                "--reason",
                "dashboard test",
                "--id",
                id,
            ],
        )
        .assert_status(0);
    }
    // The tables are true to the raw rows before the tail arrives.
    usage(stack, &["verify"]).assert_status(0);
    insert_requests(
        stack,
        PORTAL,
        &s.now,
        3,
        1,
        &format!("{}-03 09:00:00", s.now),
    );
    s
}

/// One month of a portal as billing reads it, by SQL.
#[derive(Debug, Clone, PartialEq)]
struct Truth {
    month: String,
    requests: i64,
    successes: i64,
    errors: i64,
    late: i64,
    manual: i64,
    billed: i64,
    closed: bool,
    /// round(100 * errors / requests, 2) by SQL, when there are requests.
    error_rate: Option<f64>,
    success_rate: Option<f64>,
}

fn truth(stack: &Stack, portal: i64, months: &[String]) -> Vec<Truth> {
    let mut db = stack.sql();
    months
        .iter()
        .map(|m| {
            let r = db
                .query_one(
                    "SELECT coalesce(t.request_count, 0)::bigint, coalesce(t.success_count, 0)::bigint,
                            coalesce(t.error_count, 0)::bigint,
                            (SELECT coalesce(sum(a.request_count), 0)::bigint FROM portal_usage_adjustments a
                              WHERE a.portal_id = $1 AND a.booked_month = $2 AND a.source = 'late'),
                            (SELECT coalesce(sum(a.request_count), 0)::bigint FROM portal_usage_adjustments a
                              WHERE a.portal_id = $1 AND a.booked_month = $2 AND a.source = 'manual'),
                            EXISTS (SELECT 1 FROM usage_agg_closed_months c WHERE c.month_year = $2 AND c.closed),
                            CASE WHEN t.request_count > 0
                                 THEN round(100 * t.error_count::numeric / t.request_count, 2)::float8 END,
                            CASE WHEN t.request_count > 0
                                 THEN round(100 * t.success_count::numeric / t.request_count, 2)::float8 END
                       FROM (SELECT 1) one
                       LEFT JOIN portal_usage_monthly t ON t.portal_id = $1 AND t.month_year = $2",
                    &[&portal, m],
                )
                .unwrap();
            let (requests, late, manual): (i64, i64, i64) = (r.get(0), r.get(3), r.get(4));
            Truth {
                month: m.clone(),
                requests,
                successes: r.get(1),
                errors: r.get(2),
                late,
                manual,
                billed: requests + late + manual,
                closed: r.get(5),
                error_rate: r.get(6),
                success_rate: r.get(7),
            }
        })
        .collect()
}

/// A portal's month right now, from its good raw rows alone: (requests,
/// successes, errors).
fn raw_truth(stack: &Stack, portal: i64, month: &str) -> (i64, i64, i64) {
    let r = stack
        .sql()
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE success), count(*) FILTER (WHERE NOT success)
               FROM usage_requests WHERE portal_id = $1 AND month_year = $2 AND success IS NOT NULL",
            &[&portal, &month],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

fn summary(stack: &Stack, portal: i64, months: Option<i32>) -> Value {
    let text: String = match months {
        Some(n) => stack
            .sql()
            .query_one("SELECT usage_portal_summary($1, $2)::text", &[&portal, &n])
            .unwrap()
            .get(0),
        None => stack
            .sql()
            .query_one("SELECT usage_portal_summary($1)::text", &[&portal])
            .unwrap()
            .get(0),
    };
    serde_json::from_str(&text).unwrap()
}

/// A summary's month as a [`Truth`], to compare whole.
fn as_truth(m: &Value) -> Truth {
    Truth {
        month: m["month"].as_str().unwrap().into(),
        requests: m["requests"].as_i64().unwrap(),
        successes: m["successes"].as_i64().unwrap(),
        errors: m["errors"].as_i64().unwrap(),
        late: m["adjustments"]["late"].as_i64().unwrap(),
        manual: m["adjustments"]["manual"].as_i64().unwrap(),
        billed: m["billed"].as_i64().unwrap(),
        closed: m["closed"].as_bool().unwrap(),
        error_rate: m["error_rate"].as_f64(),
        success_rate: m["success_rate"].as_f64(),
    }
}

#[test]
fn the_portal_summary_equals_the_truth_across_a_closed_month_adjustments_and_the_tail() {
    let stack = migrated_stack();
    let s = scenario(&stack);
    let v = summary(&stack, PORTAL, None);
    assert_eq!(
        v["current"]["month"], s.now,
        "the month changed during the test (it ran at a month's end): run it again"
    );
    assert_eq!(
        (v["version"].as_i64(), v["portal_id"].as_i64()),
        (Some(1), Some(PORTAL))
    );

    // The months: the 12 up to the current one, oldest first, every one
    // of them, as billing reads them.
    let months = window(&s.now, 12);
    let got: Vec<Truth> = v["months"]
        .as_array()
        .unwrap()
        .iter()
        .map(as_truth)
        .collect();
    let want = truth(&stack, PORTAL, &months);
    assert_eq!(got, want);
    assert_eq!(got[0].month, s.first);
    // What the scenario built, by hand: C-11 first; C-2 closed, its late
    // rows booked after it; C-1 closed with 2 late rows; C with 3 late rows
    // and a manual -2, its tail not in the monthly row.
    let by: BTreeMap<&str, &Truth> = got.iter().map(|t| (t.month.as_str(), t)).collect();
    let brief = |m: &str| {
        let t = by[m];
        (
            t.requests,
            t.successes,
            t.errors,
            t.late,
            t.manual,
            t.billed,
            t.closed,
        )
    };
    assert_eq!(brief(&s.first), (5, 3, 2, 0, 0, 5, false));
    assert_eq!(brief(&s.prev2), (10, 8, 2, 0, 0, 10, true));
    assert_eq!(brief(&s.prev), (6, 5, 1, 2, 0, 8, true));
    assert_eq!(brief(&s.now), (9, 6, 3, 3, -2, 10, false));
    assert_eq!(by[s.first.as_str()].error_rate, Some(40.0));
    assert!(!by.contains_key(s.before.as_str()));
    assert_eq!(
        got.iter().map(|t| t.billed).sum::<i64>(),
        5 + 10 + 8 + 10,
        "nothing else in the window"
    );

    // The current month right now: every good raw row of it, the tail
    // included (the monthly row alone says 9).
    let c = &v["current"];
    let (n, ok, err) = raw_truth(&stack, PORTAL, &s.now);
    assert_eq!((n, ok, err), (13, 9, 4));
    assert_eq!(
        (
            c["requests"].as_i64(),
            c["successes"].as_i64(),
            c["errors"].as_i64()
        ),
        (Some(n), Some(ok), Some(err))
    );
    assert_eq!(c["month_start"], format!("{}-01T00:00:00.000000Z", s.now));
    assert_eq!(
        c["month_end"],
        format!("{}-01T00:00:00.000000Z", back(&s.now, -1))
    );
    // Rates, elapsed and the projection, recomputed by SQL from what it
    // answered (the projection is a straight line from the month's start
    // through `as_of`).
    let r = stack
        .sql()
        .query_one(
            &format!(
                "SELECT round(100 * {err}::numeric / {n}, 2)::float8, round(100 * {ok}::numeric / {n}, 2)::float8,
                        round(extract(epoch FROM a - s) / extract(epoch FROM e - s), 6)::float8,
                        round({n} * extract(epoch FROM e - s) / extract(epoch FROM a - s))::bigint,
                        a <= now() AND a > now() - interval '1 minute'
                   FROM (SELECT '{}'::timestamptz AS a, '{}'::timestamptz AS s, '{}'::timestamptz AS e) t",
                v["as_of"].as_str().unwrap(),
                c["month_start"].as_str().unwrap(),
                c["month_end"].as_str().unwrap()
            ),
            &[],
        )
        .unwrap();
    let (error_rate, success_rate, elapsed, projected, recent): (f64, f64, f64, i64, bool) =
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
    assert_eq!(c["error_rate"].as_f64(), Some(error_rate));
    assert_eq!(c["success_rate"].as_f64(), Some(success_rate));
    assert_eq!(c["elapsed"].as_f64(), Some(elapsed));
    assert_eq!(c["projected_requests"].as_i64(), Some(projected));
    assert!(
        projected >= n,
        "a projection never falls below what is used"
    );
    assert!(recent, "as_of is the database's time now: {}", v["as_of"]);
    // No quota is set: the quota function's answer says so.
    assert_eq!(v["quota"]["quota"], "none", "{}", v["quota"]);
    assert_eq!(v["quota"]["request_limit"], Value::Null);

    // Across a year's end: 14 months always cross one.
    let v14 = summary(&stack, PORTAL, Some(14));
    let months14 = window(&s.now, 14);
    let got14: Vec<Truth> = v14["months"]
        .as_array()
        .unwrap()
        .iter()
        .map(as_truth)
        .collect();
    assert_eq!(got14, truth(&stack, PORTAL, &months14));
    assert!(
        months14.iter().any(|m| m.ends_with("-01")) && months14.iter().any(|m| m.ends_with("-12"))
    );
    assert_eq!(by_month(&got14, &s.before).requests, 4);
    // One month: the current one alone.
    let v1 = summary(&stack, PORTAL, Some(1));
    assert_eq!(v1["months"].as_array().unwrap().len(), 1);
    assert_eq!(as_truth(&v1["months"][0]), want[11]);
    // A portal with no usage: zeros, no rates, no projection above zero.
    let none = summary(&stack, 999, None);
    assert!(none["months"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["billed"] == 0 && m["error_rate"].is_null()));
    assert_eq!(
        (
            none["current"]["requests"].as_i64(),
            none["current"]["error_rate"].is_null()
        ),
        (Some(0), true)
    );

    // `report --portal` shows the same window, newest first, as JSON, CSV
    // and the table's numbers; `--live` the current month right now.
    let run = usage(&stack, &["report", "--portal", "7", "--json"]);
    run.assert_status(0);
    let j: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 12);
    for (row, t) in rows.iter().zip(want.iter().rev()) {
        assert_eq!(
            (
                row["month"].as_str().unwrap(),
                row["requests"].as_i64().unwrap(),
                row["successes"].as_i64().unwrap(),
                row["errors"].as_i64().unwrap(),
                row["adjustments"]["late"].as_i64().unwrap(),
                row["adjustments"]["manual"].as_i64().unwrap(),
                row["billed"].as_i64().unwrap(),
            ),
            (
                t.month.as_str(),
                t.requests,
                t.successes,
                t.errors,
                t.late,
                t.manual,
                t.billed
            ),
            "{row}"
        );
    }
    let csv = usage(
        &stack,
        &[
            "report", "--portal", "7", "--months", "14", "--format", "csv",
        ],
    );
    csv.assert_status(0);
    let lines: Vec<&str> = csv.stdout.lines().skip(1).collect();
    assert_eq!(lines.len(), 14);
    for (line, t) in lines
        .iter()
        .zip(truth(&stack, PORTAL, &months14).iter().rev())
    {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(
            (f[1], f[2], f[3], f[4], f[6], f[7], f[8]),
            (
                t.month.as_str(),
                t.requests.to_string().as_str(),
                t.successes.to_string().as_str(),
                t.errors.to_string().as_str(),
                t.late.to_string().as_str(),
                t.manual.to_string().as_str(),
                t.billed.to_string().as_str()
            ),
            "{line}"
        );
    }
    let text = usage(&stack, &["report", "--portal", "7"]);
    text.assert_status(0)
        .assert_stdout_has(&format!("Portal 7, {} to {} (12 months)", s.first, s.now))
        .assert_stdout_has(&format!(
            "{} is the month so far, as of the last run",
            s.now
        ));
    for t in &want {
        let line = text
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&t.month))
            .unwrap_or_else(|| panic!("no line for {}\n{}", t.month, text.stdout));
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            &f[..7],
            [
                t.month.clone(),
                t.requests.to_string(),
                t.successes.to_string(),
                t.errors.to_string(),
                format!("{:+}", t.late),
                format!("{:+}", t.manual),
                t.billed.to_string()
            ],
            "{line}"
        );
        // A bar of successes and errors where the month has requests.
        let bar = f.get(8).copied().unwrap_or("");
        assert_eq!(bar.contains('#'), t.successes > 0, "{line}");
        assert_eq!(bar.contains('x'), t.errors > 0, "{line}");
    }
    let live = usage(&stack, &["report", "--portal", "7", "--live", "--json"]);
    let l: Value = serde_json::from_str(live.assert_status(0).stdout.trim()).unwrap();
    assert_eq!(
        (
            l["rows"][0]["requests"].as_i64(),
            l["rows"][0]["errors"].as_i64()
        ),
        (Some(n), Some(err))
    );
    // A window of the past (`--month`) ends there.
    let past = usage(
        &stack,
        &[
            "report", "--portal", "7", "--month", &s.prev, "--months", "3", "--format", "csv",
        ],
    );
    let months_shown: Vec<&str> = past
        .stdout
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap())
        .collect();
    assert_eq!(
        months_shown,
        [s.prev.as_str(), s.prev2.as_str(), back(&s.now, 3).as_str()]
    );
}

fn by_month<'a>(t: &'a [Truth], month: &str) -> &'a Truth {
    t.iter().find(|t| t.month == month).unwrap()
}

#[test]
fn the_portal_summary_is_service_roles_alone_and_refuses_bad_arguments() {
    let stack = migrated_stack();
    stack
        .sql()
        .batch_execute("SET ROLE service_role; SELECT usage_portal_summary(1); RESET ROLE")
        .unwrap();
    for role in ["anon", "authenticated"] {
        let refused = stack
            .sql()
            .batch_execute(&format!("SET ROLE {role}; SELECT usage_portal_summary(1)"));
        assert!(
            format!("{:?}", refused.unwrap_err()).contains("permission denied"),
            "{role}"
        );
    }
    for (args, says) in [
        ("0, 12", "the portal id must be a positive bigint"),
        ("NULL, 12", "the portal id must be a positive bigint"),
        ("1, 0", "p_months must be from 1 to 240"),
        ("1, 241", "p_months must be from 1 to 240"),
        ("1, NULL", "p_months must be from 1 to 240"),
    ] {
        let e = stack
            .sql()
            .batch_execute(&format!("SELECT usage_portal_summary({args})"))
            .unwrap_err();
        let db = e.as_db_error().unwrap();
        assert_eq!(db.code().code(), "22023", "{args}");
        assert!(db.message().contains(says), "{args}: {}", db.message());
    }
    // Applying the migration again changes nothing (idempotent).
    let mut stack = stack;
    migrate_file(&mut stack, migration(DASHBOARD));
    let grants: String = stack
        .sql()
        .query_one(
            "SELECT array_to_string(proacl, ',') FROM pg_proc WHERE oid = 'usage_portal_summary(bigint,integer)'::regprocedure",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        grants.contains("service_role=X/")
            && !grants.contains("anon")
            && !grants.contains("authenticated")
            && !grants.starts_with("=X"),
        "{grants}"
    );
}

#[test]
fn the_portal_summary_passes_the_quota_on_once_quotas_exist() {
    let stack = migrated_stack();
    insert_requests(&stack, 3, "2025-05", 2, 0, "2025-05-02 00:00:00");
    aggregate(&stack, &[]).assert_status(0);
    // The quotas migration's function, as it answers for the current
    // month: with no quota, no limit; with one, the limit.
    let real = |stack: &Stack| -> Value {
        let text: String = stack
            .sql()
            .query_one(
                "SELECT to_jsonb(q)::text FROM usage_quota_status(3, NULL) q LIMIT 1",
                &[],
            )
            .unwrap()
            .get(0);
        serde_json::from_str(&text).unwrap()
    };
    let v = summary(&stack, 3, None);
    assert_eq!(v["quota"], real(&stack));
    assert_eq!(v["quota"]["request_limit"], Value::Null);
    usage(&stack, &["quota", "set", "--default", "--limit", "100"]).assert_status(0);
    let v = summary(&stack, 3, None);
    assert_eq!(v["quota"], real(&stack));
    assert_eq!(v["quota"]["request_limit"], 100);
    // A project without the quotas migration: no quota at all.
    stack
        .sql()
        .batch_execute("DROP FUNCTION public.usage_quota_status(bigint, text)")
        .unwrap();
    assert_eq!(summary(&stack, 3, None)["quota"], Value::Null);
    // A stand-in of each shape such a function may have (rows, or one
    // JSON value), made by the owner of usage-agg's functions as a
    // migration would be.
    stack
        .sql()
        .batch_execute(
            "CREATE FUNCTION public.usage_quota_status(p_portal_id bigint, p_month text DEFAULT NULL)
             RETURNS TABLE (used bigint, \"limit\" bigint, percent numeric, projection bigint, month text)
             LANGUAGE sql AS $$ SELECT 80::bigint, 100::bigint, 80.0, 120::bigint, p_month $$",
        )
        .unwrap();
    let v = summary(&stack, 3, None);
    assert_eq!(
        v["quota"],
        serde_json::json!({"used": 80, "limit": 100, "percent": 80.0, "projection": 120, "month": v["current"]["month"]}),
        "its answer for the current month"
    );
    stack
        .sql()
        .batch_execute(
            "DROP FUNCTION public.usage_quota_status(bigint, text);
             CREATE FUNCTION public.usage_quota_status(p_portal_id bigint, p_month text DEFAULT NULL)
             RETURNS jsonb LANGUAGE sql AS $$ SELECT jsonb_build_object('used', 5, 'limit', NULL) $$",
        )
        .unwrap();
    assert_eq!(
        summary(&stack, 3, None)["quota"],
        serde_json::json!({"used": 5, "limit": null})
    );
    // Made by another role, it would run with this function's rights:
    // refused, not called.
    stack
        .sql()
        .batch_execute("DROP FUNCTION public.usage_quota_status(bigint, text)")
        .unwrap();
    stack
        .admin_sql()
        .batch_execute(
            "CREATE FUNCTION public.usage_quota_status(p_portal_id bigint, p_month text DEFAULT NULL)
             RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$",
        )
        .unwrap();
    let e = stack
        .sql()
        .query_one("SELECT usage_portal_summary(3)", &[])
        .unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42501");
    assert!(
        db.message().contains("owned by supabase_admin"),
        "{}",
        db.message()
    );
}

/// `usage-agg ARGS --env dev` in `dir` (where `--html` writes).
fn usage_in(stack: &Stack, dir: &std::path::Path, args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--env", "dev"]);
    let mut vars = stack.env();
    vars.push(("NO_COLOR".into(), "1".into()));
    usage_agg(dir, &vars, &all)
}

/// The body rows of the table `table-ID` of an HTML report, each cell's
/// text (tags dropped, entities read).
fn html_table(html: &str, id: &str) -> Vec<Vec<String>> {
    let start = html
        .find(&format!("<table id=\"table-{id}\""))
        .unwrap_or_else(|| panic!("no table {id}"));
    let end = start + html[start..].find("</table>").unwrap();
    let body = &html[start..end];
    let body = &body[body.find("<tbody>").unwrap()..];
    body.split("<tr>")
        .skip(1)
        .map(|row| {
            let row = &row[..row.find("</tr>").unwrap()];
            // Each cell: `<th ...>text</th>` or `<td ...>text</td>`.
            row.split("</t")
                .filter_map(|piece| {
                    let open = piece.rfind("<t")?;
                    let text = &piece[open..];
                    Some(text[text.find('>')? + 1..].to_string())
                })
                .map(|c| {
                    c.replace("&lt;", "<")
                        .replace("&gt;", ">")
                        .replace("&quot;", "\"")
                        .replace("&#39;", "'")
                        .replace("&amp;", "&")
                })
                .collect()
        })
        .collect()
}

/// A number as the HTML report's tables write it: 1,234; +3; 25.00%.
fn number(cell: &str) -> f64 {
    cell.replace([',', '+', '%'], "")
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {cell:?}"))
}

/// One month of every portal as billing reads it, by SQL: portals,
/// requests, successes, errors, late, manual, billed.
fn all_portals_truth(stack: &Stack, month: &str) -> [i64; 7] {
    let r = stack
        .sql()
        .query_one(
            "SELECT (SELECT count(*) FROM portal_usage_monthly WHERE month_year = $1),
                    (SELECT coalesce(sum(request_count), 0)::bigint FROM portal_usage_monthly WHERE month_year = $1),
                    (SELECT coalesce(sum(success_count), 0)::bigint FROM portal_usage_monthly WHERE month_year = $1),
                    (SELECT coalesce(sum(error_count), 0)::bigint FROM portal_usage_monthly WHERE month_year = $1),
                    (SELECT coalesce(sum(request_count), 0)::bigint FROM portal_usage_adjustments
                      WHERE booked_month = $1 AND source = 'late'),
                    (SELECT coalesce(sum(request_count), 0)::bigint FROM portal_usage_adjustments
                      WHERE booked_month = $1 AND source = 'manual')",
            &[&month],
        )
        .unwrap();
    let (late, manual, requests): (i64, i64, i64) = (r.get(4), r.get(5), r.get(1));
    [
        r.get(0),
        requests,
        r.get(2),
        r.get(3),
        late,
        manual,
        requests + late + manual,
    ]
}

/// The month's portals as the top list and the error rates rank them, by
/// SQL: (portal, requests, successes, errors, late, manual, billed).
fn ranked_truth(stack: &Stack, month: &str, order: &str) -> Vec<[i64; 7]> {
    stack
        .sql()
        .query(
            &format!(
                "SELECT m.portal_id, m.request_count::bigint, m.success_count::bigint, m.error_count::bigint,
                        (SELECT coalesce(sum(a.request_count), 0)::bigint FROM portal_usage_adjustments a
                          WHERE a.portal_id = m.portal_id AND a.booked_month = $1 AND a.source = 'late'),
                        (SELECT coalesce(sum(a.request_count), 0)::bigint FROM portal_usage_adjustments a
                          WHERE a.portal_id = m.portal_id AND a.booked_month = $1 AND a.source = 'manual')
                   FROM portal_usage_monthly m WHERE m.month_year = $1 {order} LIMIT 10"
            ),
            &[&month],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let (req, late, manual): (i64, i64, i64) = (r.get(1), r.get(4), r.get(5));
            [r.get(0), req, r.get(2), r.get(3), late, manual, req + late + manual]
        })
        .collect()
}

const TOP_ORDER: &str = "ORDER BY m.request_count DESC, m.portal_id";
const RATE_ORDER: &str = "AND m.error_count > 0 AND m.request_count > 0
     ORDER BY m.error_count::numeric / m.request_count DESC, m.error_count DESC, m.portal_id";

/// Checks every number of a portal page's tables against SQL.
fn check_portal_page(stack: &Stack, html: &str, s: &Scenario) {
    let want = truth(stack, PORTAL, &window(&s.now, 12));
    let trend = html_table(html, "trend");
    assert_eq!(trend.len(), 12);
    for (row, t) in trend.iter().zip(&want) {
        assert_eq!(row[0], t.month);
        let n: Vec<f64> = [1, 2, 3, 5, 6, 7]
            .iter()
            .map(|i| number(&row[*i]))
            .collect();
        assert_eq!(
            n,
            [
                t.requests,
                t.successes,
                t.errors,
                t.late,
                t.manual,
                t.billed
            ]
            .map(|v| v as f64),
            "{row:?}"
        );
        assert_eq!(row[4] == "–", t.error_rate.is_none(), "{row:?}");
        if let Some(r) = t.error_rate {
            assert_eq!(number(&row[4]), r, "{row:?}");
        }
        assert_eq!(row[8], if t.closed { "closed" } else { "open" });
    }
    let rates = html_table(html, "error-rate");
    for (row, t) in rates.iter().zip(&want) {
        assert_eq!(
            (row[0].as_str(), number(&row[2]), number(&row[3])),
            (t.month.as_str(), t.errors as f64, t.requests as f64)
        );
        if let Some(r) = t.error_rate {
            assert_eq!(number(&row[1]), r, "{row:?}");
        }
    }
    let (n, ok, err) = raw_truth(stack, PORTAL, &s.now);
    let current: BTreeMap<String, String> = html_table(html, "current")
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    assert_eq!(number(&current["Requests so far"]), n as f64);
    assert_eq!(number(&current["Successes"]), ok as f64);
    assert_eq!(number(&current["Errors"]), err as f64);
    let projected = number(&current["Projected by the month's end"]);
    assert!(projected >= n as f64, "{current:?}");
}

/// Checks every number of the all-portals page's tables against SQL.
fn check_overview_page(stack: &Stack, html: &str, s: &Scenario) {
    let totals = html_table(html, "totals");
    let months = window(&s.now, 12);
    assert_eq!(totals.len(), 12);
    for (row, m) in totals.iter().zip(&months) {
        assert_eq!(&row[0], m);
        let t = all_portals_truth(stack, m);
        let got: Vec<i64> = [1, 2, 3, 4, 6, 7, 8]
            .iter()
            .map(|i| number(&row[*i]) as i64)
            .collect();
        assert_eq!(got, t, "{row:?}");
    }
    for (id, order) in [("top", TOP_ORDER), ("error-rates", RATE_ORDER)] {
        let rows = html_table(html, id);
        let want = ranked_truth(stack, &s.now, order);
        assert!(!want.is_empty());
        assert_eq!(rows.len(), want.len(), "{id}");
        for (row, w) in rows.iter().zip(&want) {
            if id == "top" {
                let got: Vec<i64> = [0, 1, 2, 3, 5, 6, 7]
                    .iter()
                    .map(|i| number(&row[*i]) as i64)
                    .collect();
                assert_eq!(got, w, "{id}: {row:?}");
            } else {
                assert_eq!(
                    (
                        number(&row[0]) as i64,
                        number(&row[2]) as i64,
                        number(&row[3]) as i64
                    ),
                    (w[0], w[3], w[1]),
                    "{id}: {row:?}"
                );
            }
        }
    }
    // 7 (3 of 9) first; 9 (5 of 20) and 10 (1 of 4) tie at 25%: more
    // errors first; then 8 (4 of 44); 11 has none.
    let order: Vec<String> = html_table(html, "error-rates")
        .iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(order, ["7", "9", "10", "8"]);
}

#[test]
fn the_html_report_equals_the_truth_and_is_written_atomically_and_replaced_only_with_force() {
    let stack = migrated_stack();
    let s = scenario(&stack);
    let dir = workdir();

    let run = usage_in(
        &stack,
        &dir,
        &["report", "--portal", "7", "--html", "portal.html"],
    );
    run.assert_status(0).assert_stdout_has(&format!(
        "Wrote portal.html: Portal 7 usage, {} to {} (3 charts",
        s.first, s.now
    ));
    let html = std::fs::read_to_string(dir.join("portal.html")).unwrap();
    check_portal_page(&stack, &html, &s);

    let run = usage_in(
        &stack,
        &dir,
        &["report", "--html", "all.html", "--month", &s.now, "--json"],
    );
    run.assert_status(0);
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        (
            v["view"].as_str(),
            v["file"].as_str(),
            v["from"].as_str(),
            v["to"].as_str()
        ),
        (
            Some("all_portals"),
            Some("all.html"),
            Some(s.first.as_str()),
            Some(s.now.as_str())
        )
    );
    assert_eq!(
        v["charts"],
        serde_json::json!(["totals", "top", "error-rates"])
    );
    let all = std::fs::read_to_string(dir.join("all.html")).unwrap();
    assert_eq!(v["bytes"].as_u64(), Some(all.len() as u64));
    check_overview_page(&stack, &all, &s);
    // Without --month: the newest month in the table, the current one.
    usage_in(&stack, &dir, &["report", "--html", "newest.html"]).assert_status(0);
    check_overview_page(
        &stack,
        &std::fs::read_to_string(dir.join("newest.html")).unwrap(),
        &s,
    );

    // An existing file is kept unless --force: refused (64) before any
    // request, and again if it appears during the run (the write links
    // the new file to the name, which fails if the name is taken).
    std::fs::write(dir.join("mine.html"), "a file of mine").unwrap();
    usage_in(
        &stack,
        &dir,
        &["report", "--portal", "7", "--html", "mine.html"],
    )
    .assert_status(64)
    .assert_stderr_has("mine.html exists: the HTML report replaces a file only with --force");
    assert_eq!(
        std::fs::read_to_string(dir.join("mine.html")).unwrap(),
        "a file of mine"
    );
    usage_in(
        &stack,
        &dir,
        &["report", "--portal", "7", "--html", "mine.html", "--force"],
    )
    .assert_status(0);
    assert!(std::fs::read_to_string(dir.join("mine.html"))
        .unwrap()
        .starts_with("<!DOCTYPE html>"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["all.html", "mine.html", "newest.html", "portal.html"],
        "no temporary file left"
    );

    // Refused before anything is read.
    usage_in(
        &stack,
        &dir,
        &[
            "report", "--portal", "7", "--month", &s.prev, "--html", "x.html",
        ],
    )
    .assert_status(64)
    .assert_stderr_has("leave out --month");
    usage_in(&stack, &dir, &["report", "--html", "missing/x.html"])
        .assert_status(64)
        .assert_stderr_has("could not write the HTML report to missing/x.html");
    assert!(!dir.join("x.html").exists());
}

#[test]
fn without_the_dashboard_migration_doctor_and_the_portal_page_name_it() {
    let stack = stack_without(&[migration(DASHBOARD)]);
    insert_requests(&stack, 1, "2025-05", 2, 0, "2025-05-02 00:00:00");
    aggregate(&stack, &[]).assert_status(0);
    let doctor = usage(&stack, &["doctor"]);
    doctor.assert_status(78);
    assert!(
        doctor
            .stdout
            .lines()
            .any(|l| l.starts_with("FAIL migrations")
                && l.contains("usage_portal_summary is missing")),
        "{}",
        doctor.stdout
    );
    doctor.assert_stdout_has("20261207140000_usage_agg_dashboard.sql");
    let dir = workdir();
    usage_in(
        &stack,
        &dir,
        &["report", "--portal", "1", "--html", "p.html"],
    )
    .assert_status(78)
    .assert_stderr_has("usage_portal_summary");
    // The terminal's report and the all-portals page read the tables.
    usage_in(&stack, &dir, &["report", "--html", "all.html"]).assert_status(0);
    usage(&stack, &["report", "--portal", "1", "--month", "2025-05"]).assert_status(0);
}

/// A stand-in for issue 20's quota function: the portal's usage right
/// now against a limit of [`QUOTA_LIMIT`], no projection of its own (the
/// page then draws usage_portal_summary's).
const QUOTA_STAND_IN: &str = "CREATE FUNCTION public.usage_quota_status(p_portal_id bigint, p_month text DEFAULT NULL)
     RETURNS TABLE (used bigint, \"limit\" bigint, percent numeric, projection bigint)
     LANGUAGE sql AS $$ SELECT c.request_count, 50::bigint, round(100 * c.request_count / 50.0, 2), NULL::bigint
                          FROM public.usage_current(p_portal_id, p_month) c $$";
const QUOTA_LIMIT: i64 = 50;

/// What the browser test reads of a page, through the DOM as rendered:
/// every chart's title, axis titles, labels and bars (their rendered
/// boxes, in CSS pixels), its table, and the page's background colour.
const READ_DOM: &str = r#"(() => {
  const text = (root, sel) => [...root.querySelectorAll(sel)].map(e => e.textContent);
  const charts = [...document.querySelectorAll('svg.chart')].map(svg => {
    const id = svg.id.replace(/^chart-/, '');
    const section = document.getElementById('section-' + id);
    const table = document.getElementById('table-' + id);
    const box = section.getBoundingClientRect();
    return {
      id,
      title: svg.querySelector('title').textContent,
      heading: section.querySelector('h2').textContent,
      categoryTitle: text(svg, '.axis-title.category'),
      valueTitle: text(svg, '.axis-title.value'),
      categories: text(svg, '.tick.category'),
      ticks: text(svg, '.tick.value'),
      bars: [...svg.querySelectorAll('rect.bar')].map(b => {
        const r = b.getBoundingClientRect();
        return {category: b.dataset.category, series: b.dataset.series, x: r.x, width: r.width,
                height: r.height, fill: getComputedStyle(b).fill};
      }),
      marker: svg.querySelector('.marker')
        ? {label: svg.querySelector('.marker-label').textContent,
           x: svg.querySelector('.marker-line').getBoundingClientRect().x}
        : null,
      caption: table.querySelector('caption').textContent,
      head: text(table, 'thead th'),
      rows: [...table.querySelectorAll('tbody tr')].map(tr => [...tr.children].map(c => c.textContent)),
      box: {x: box.x + window.scrollX, y: box.y + window.scrollY, width: box.width, height: box.height},
    };
  });
  return {title: document.title, asOf: document.querySelector('header time').dateTime,
          background: getComputedStyle(document.body).backgroundColor, charts};
})()"#;

/// Every bar of `chart` is one of `want` (category, series, value) and
/// its rendered length (height for columns, width for bars) is its value
/// times one scale, to a twentieth of a pixel; every category is labelled.
fn check_bars(chart: &Value, want: &[(String, &str, f64)], horizontal: bool) -> f64 {
    let id = chart["id"].as_str().unwrap();
    let bars = chart["bars"].as_array().unwrap();
    let length = |b: &Value| {
        b[if horizontal { "width" } else { "height" }]
            .as_f64()
            .unwrap()
    };
    let found: Vec<(&Value, f64)> = want
        .iter()
        .map(|(c, series, v)| {
            let b = bars
                .iter()
                .find(|b| b["category"] == c.as_str() && b["series"] == *series)
                .unwrap_or_else(|| panic!("{id}: no bar for {c} {series}: {bars:?}"));
            (b, *v)
        })
        .collect();
    assert_eq!(
        bars.len(),
        want.len(),
        "{id}: bars beyond the truth's: {bars:?}"
    );
    let (top, top_value) = found
        .iter()
        .map(|(b, v)| (length(b), *v))
        .fold((0.0, 0.0), |a, x| if x.1 > a.1 { x } else { a });
    assert!(
        top_value > 0.0 && top > 50.0,
        "{id}: the longest bar is {top} px"
    );
    let scale = top / top_value;
    for ((c, series, v), (b, _)) in want.iter().zip(&found) {
        let got = length(b);
        assert!(
            (got - v * scale).abs() <= 0.05,
            "{id}: {c} {series} is {got} px for {v}, {} at the chart's scale",
            v * scale
        );
    }
    let labels = chart["categories"].as_array().unwrap();
    for (c, _, _) in want {
        assert!(
            labels.iter().any(|l| l == c.as_str()),
            "{id}: no label {c}: {labels:?}"
        );
    }
    for key in ["title", "heading", "caption"] {
        assert!(
            !chart[key].as_str().unwrap().trim().is_empty(),
            "{id}: {key}"
        );
    }
    assert_eq!(chart["title"], chart["heading"], "{id}");
    for key in ["categoryTitle", "valueTitle"] {
        let t = chart[key].as_array().unwrap();
        assert!(
            t.len() == 1 && !t[0].as_str().unwrap().is_empty(),
            "{id}: {key} {t:?}"
        );
    }
    assert!(
        chart["ticks"].as_array().unwrap().len() >= 2,
        "{id}: value ticks"
    );
    assert!(
        !chart["rows"].as_array().unwrap().is_empty(),
        "{id}: table rows"
    );
    scale
}

/// The page read nothing and said nothing: every request is the page's
/// own file, and no console message, exception or log entry of level
/// warning or error.
fn check_quiet(b: &stack::browser::Browser, session: &str, url: &str) {
    let requests: Vec<String> = b
        .events_of(session, "Network.requestWillBeSent")
        .iter()
        .map(|e| {
            e["params"]["request"]["url"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        !requests.is_empty(),
        "the browser's network events were not seen"
    );
    assert!(
        requests.iter().all(|u| u == url),
        "network requests: {requests:?}"
    );
    for method in [
        "Runtime.consoleAPICalled",
        "Runtime.exceptionThrown",
        "Network.webSocketCreated",
    ] {
        let e = b.events_of(session, method);
        assert!(e.is_empty(), "{method}: {e:?}");
    }
    let log: Vec<Value> = b
        .events_of(session, "Log.entryAdded")
        .into_iter()
        .filter(|e| {
            matches!(
                e["params"]["entry"]["level"].as_str(),
                Some("error" | "warning")
            )
        })
        .collect();
    assert!(log.is_empty(), "console: {log:?}");
}

/// The HTML report in a real browser (Debian's chromium, headless; see
/// tests/stack/src/browser.rs): both pages load with no console error and
/// no request beyond the file itself, every bar's rendered length is
/// proportional to the truth's value, every label and axis title is
/// there, and each chart is saved as a PNG in the light and the dark
/// scheme under target/tmp/browser/html_report/ for a person to look at.
#[test]
fn browser_renders_the_html_report_offline_with_bars_proportional_to_the_truth() {
    let started = std::time::Instant::now();
    let stack = migrated_stack();
    // The pages without quotas first, then with the stand-in below (whose
    // projection is the summary's own, so the page's can be checked): the
    // quotas migration's function is dropped for that.
    stack
        .sql()
        .batch_execute("DROP FUNCTION public.usage_quota_status(bigint, text)")
        .unwrap();
    let s = scenario(&stack);
    let dir = workdir();
    usage_in(
        &stack,
        &dir,
        &["report", "--portal", "7", "--html", "portal.html"],
    )
    .assert_status(0);
    usage_in(&stack, &dir, &["report", "--html", "all.html"]).assert_status(0);
    // Once quotas exist (issue 20's function, a stand-in here), the month
    // to date is drawn against the portal's limit.
    stack.sql().batch_execute(QUOTA_STAND_IN).unwrap();
    usage_in(
        &stack,
        &dir,
        &["report", "--portal", "7", "--html", "portal-quota.html"],
    )
    .assert_status(0);
    let setup = started.elapsed();
    let shots = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser/html_report");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();

    let mut b = stack::browser::Browser::launch(&dir);
    let browser_up = started.elapsed() - setup;
    let mut saved = Vec::new();
    for page in ["portal", "all", "portal-quota"] {
        let path = dir.join(format!("{page}.html"));
        let url = format!("file://{}", path.display());
        let session = b.open(&url, 1280, 900);
        let dom = b.evaluate(&session, READ_DOM);
        check_quiet(&b, &session, &url);
        let charts: BTreeMap<String, Value> = dom["charts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["id"].as_str().unwrap().to_string(), c.clone()))
            .collect();
        let rate = |errors: i64, requests: i64| errors as f64 * 100.0 / requests as f64;
        if page != "all" {
            assert_eq!(
                charts.keys().collect::<Vec<_>>(),
                ["current", "error-rate", "trend"]
            );
            let months = truth(&stack, PORTAL, &window(&s.now, 12));
            let mut want = Vec::new();
            for t in &months {
                want.push((t.month.clone(), "successes", t.successes as f64));
                want.push((t.month.clone(), "errors", t.errors as f64));
            }
            check_bars(&charts["trend"], &want, false);
            let want: Vec<_> = months
                .iter()
                .filter(|t| t.requests > 0)
                .map(|t| (t.month.clone(), "error rate", rate(t.errors, t.requests)))
                .collect();
            check_bars(&charts["error-rate"], &want, false);
            // Months without requests have no column, but their label.
            for t in &months {
                assert!(charts["error-rate"]["categories"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c == t.month.as_str()));
            }
            // The month to date: its raw rows right now, and the straight
            // line through them at the time the page was read.
            let (n, ok, err) = raw_truth(&stack, PORTAL, &s.now);
            let projected: i64 = stack
                .sql()
                .query_one(
                    &format!(
                        "SELECT round({n} * extract(epoch FROM e - m) / extract(epoch FROM a - m))::bigint
                           FROM (SELECT '{}'::timestamptz AS a, '{}-01T00:00:00Z'::timestamptz AS m,
                                        '{}-01T00:00:00Z'::timestamptz AS e) t",
                        dom["asOf"].as_str().unwrap(),
                        s.now,
                        back(&s.now, -1)
                    ),
                    &[],
                )
                .unwrap()
                .get(0);
            let current = &charts["current"];
            let scale = check_bars(
                current,
                &[
                    ("So far".into(), "successes", ok as f64),
                    ("So far".into(), "errors", err as f64),
                    (
                        "Projected".into(),
                        "projected by the month's end",
                        projected as f64,
                    ),
                ],
                true,
            );
            if page == "portal" {
                assert_eq!(current["marker"], Value::Null, "no quota, no quota line");
            } else {
                // The quota's line at its limit, on the bars' scale.
                let origin = current["bars"][0]["x"].as_f64().unwrap();
                let marker = &current["marker"];
                assert_eq!(marker["label"], format!("quota {QUOTA_LIMIT}"));
                let at = marker["x"].as_f64().unwrap() - origin;
                assert!(
                    (at - QUOTA_LIMIT as f64 * scale).abs() <= 0.1,
                    "{marker}: {at} from the axis at {origin}, not {}",
                    QUOTA_LIMIT as f64 * scale
                );
                let table: BTreeMap<String, String> = current["rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| (r[0].as_str().unwrap().into(), r[1].as_str().unwrap().into()))
                    .collect();
                assert_eq!(table["Quota"], QUOTA_LIMIT.to_string());
                assert_eq!(
                    number(&table["Used of the quota"]),
                    (n as f64 * 10_000.0 / QUOTA_LIMIT as f64).round() / 100.0
                );
            }
        } else {
            assert_eq!(
                charts.keys().collect::<Vec<_>>(),
                ["error-rates", "top", "totals"]
            );
            let mut want = Vec::new();
            for m in window(&s.now, 12) {
                let t = all_portals_truth(&stack, &m);
                want.push((m.clone(), "successes", t[2] as f64));
                want.push((m, "errors", t[3] as f64));
            }
            check_bars(&charts["totals"], &want, false);
            let mut want = Vec::new();
            for p in ranked_truth(&stack, &s.now, TOP_ORDER) {
                want.push((format!("Portal {}", p[0]), "successes", p[2] as f64));
                want.push((format!("Portal {}", p[0]), "errors", p[3] as f64));
            }
            check_bars(&charts["top"], &want, true);
            let ranked = ranked_truth(&stack, &s.now, RATE_ORDER);
            let want: Vec<_> = ranked
                .iter()
                .map(|p| (format!("Portal {}", p[0]), "error rate", rate(p[3], p[1])))
                .collect();
            check_bars(&charts["error-rates"], &want, true);
            // Listed in the truth's order, top to bottom.
            let labels: Vec<&str> = charts["error-rates"]["categories"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap())
                .collect();
            let order: Vec<String> = ranked.iter().map(|p| format!("Portal {}", p[0])).collect();
            assert_eq!(labels, order);
        }
        // Errors are told apart from successes without colour: striped.
        for c in charts.values() {
            for bar in c["bars"].as_array().unwrap() {
                let striped = bar["fill"].as_str().unwrap().starts_with("url(");
                assert_eq!(striped, bar["series"] == "errors", "{bar}");
            }
        }

        // Both schemes, each chart saved.
        assert_eq!(dom["background"], "rgb(255, 255, 255)");
        let mut light = BTreeMap::new();
        for scheme in ["light", "dark"] {
            b.color_scheme(&session, scheme);
            let bg = b.evaluate(&session, "getComputedStyle(document.body).backgroundColor");
            assert_eq!(
                bg,
                if scheme == "light" {
                    "rgb(255, 255, 255)"
                } else {
                    "rgb(13, 17, 23)"
                },
                "{scheme}"
            );
            let dom = b.evaluate(&session, READ_DOM);
            for c in dom["charts"].as_array().unwrap() {
                let bx = &c["box"];
                let png = b.screenshot(
                    &session,
                    bx["x"].as_f64().unwrap(),
                    bx["y"].as_f64().unwrap(),
                    bx["width"].as_f64().unwrap(),
                    bx["height"].as_f64().unwrap(),
                );
                assert!(
                    png.starts_with(b"\x89PNG") && png.len() > 2_000,
                    "{scheme} {}",
                    c["id"]
                );
                let name = format!("{page}-{}-{scheme}.png", c["id"].as_str().unwrap());
                std::fs::write(shots.join(&name), &png).unwrap();
                if scheme == "light" {
                    light.insert(name.replace("-light", ""), png);
                } else {
                    assert_ne!(
                        light.get(&name.replace("-dark", "")),
                        Some(&png),
                        "{name} is as in light"
                    );
                }
                saved.push(name);
            }
        }
        check_quiet(&b, &session, &url);
    }
    drop(b);
    assert_eq!(saved.len(), 18);
    eprintln!(
        "browser test: {:.1} s in all: {:.1} s for the stack, the data and the reports, {:.1} s to start \
         chromium, {:.1} s in it; screenshots in {}: {}",
        started.elapsed().as_secs_f64(),
        setup.as_secs_f64(),
        browser_up.as_secs_f64(),
        (started.elapsed() - setup - browser_up).as_secs_f64(),
        shots.display(),
        saved.join(", ")
    );
}

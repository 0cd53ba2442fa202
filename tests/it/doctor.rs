//! `usage-agg doctor`: a healthy stack passes every check; each broken piece
//! fails its own check, with the fix, and the exit status says which kind.

use crate::common::*;

fn doctor(env: &[(String, String)], extra: &[&str]) -> Run {
    let mut args = vec!["doctor", "--env", "dev"];
    args.extend_from_slice(extra);
    usage_agg(&workdir(), env, &args)
}

#[track_caller]
fn fails(run: &Run, check: &str, status: i32, fix: &str) {
    run.assert_status(status);
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains(check))
        .unwrap_or_else(|| panic!("no failed {check} check:\n{}", run.stdout));
    assert!(!line.is_empty());
    run.assert_stdout_has(fix);
}

#[test]
fn a_healthy_stack_passes_every_check() {
    let stack = migrated_stack();
    insert_rows(&stack, 100, 2);
    aggregate(&stack, &[]).assert_status(0);
    let run = doctor(&stack.env(), &[]);
    run.assert_status(0).assert_stdout_has("All checks passed.");
    for check in [
        "configuration",
        "reachability",
        "key",
        "tables",
        "migrations",
        "unique key",
        "assumptions",
        "lease",
        "last run",
    ] {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "{check}:\n{}",
            run.stdout
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&doctor(&stack.env(), &["--json"]).stdout).unwrap();
    assert_eq!(json["exit_status"], 0);
    assert_eq!(json["outcome"], "ok");
    assert!(json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["result"] == "pass"));
    assert!(!run.all().contains(
        &stack
            .env()
            .iter()
            .find(|(k, _)| k.ends_with("SERVICE_ROLE_KEY"))
            .unwrap()
            .1
    ));
}

#[test]
fn each_broken_piece_fails_its_own_check_with_the_fix() {
    // Not configured.
    let run = usage_agg(&workdir(), &[], &["doctor", "--env", "prod"]);
    fails(&run, "configuration", 78, "SUPABASE_PROD_URL is not set");

    // Nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stack = Stack::new();
    let dead = env_with(
        &stack,
        "SUPABASE_DEV_REST_URL",
        &format!("http://127.0.0.1:{port}"),
    );
    fails(
        &doctor(&dead, &["--max-retries", "0"]),
        "reachability",
        69,
        "could not be reached",
    );

    // The migrations are missing.
    fails(
        &doctor(&stack.env(), &[]),
        "migrations",
        78,
        "usage-agg sql | psql",
    );

    // A column is missing.
    let mut stack = migrated_stack();
    stack.ddl("ALTER TABLE usage_requests DROP COLUMN request_timestamp");
    fails(
        &doctor(&stack.env(), &[]),
        "tables",
        78,
        "a column of usage_requests is missing",
    );

    // No unique key, and a sequence that caches ids.
    let mut stack = migrated_stack();
    stack.ddl(
        "ALTER TABLE portal_usage_monthly DROP CONSTRAINT portal_usage_monthly_portal_id_month_year_key;
         ALTER SEQUENCE usage_requests_id_seq CACHE 10",
    );
    let run = doctor(&stack.env(), &[]);
    fails(&run, "unique key", 78, "ADD UNIQUE (portal_id, month_year)");
    fails(&run, "assumptions", 78, "CACHE 1");
    run.assert_stdout_has("2 checks failed (exit status 78).");
}

#[test]
fn a_project_without_the_rejected_rows_tally_is_told_to_apply_its_migration() {
    // Every migration but the tally's, the adjust rules' after it, and the
    // grants' (which name both's functions); the rule book needs neither.
    let (tally, rules, grants) = (
        migration("_usage_agg_rejected_tally.sql"),
        migration("_usage_agg_adjust_rules.sql"),
        migration("_usage_agg_supabase.sql"),
    );
    let mut stack = stack_without(&[tally, rules, grants]);
    // Runs still count every good row and name the bad ones (65); only the
    // tally is missing, and doctor names the migration that adds it.
    insert_rows(&stack, 50, 2);
    stack
        .sql()
        .batch_execute(
            "INSERT INTO usage_requests (portal_id, month_year, success) VALUES (1, 'soon', true)",
        )
        .unwrap();
    aggregate(&stack, &[]).assert_status(65);
    assert_no_drift(&stack);
    fails(
        &doctor(&stack.env(), &[]),
        "migrations",
        78,
        "20261202090000_usage_agg_rejected_tally.sql",
    );
    migrate_file(&mut stack, tally);
    // Then the rules of manual adjustments are what is missing.
    fails(
        &doctor(&stack.env(), &[]),
        "migrations",
        78,
        "20261207090000_usage_agg_adjust_rules.sql",
    );
    migrate_file(&mut stack, rules);
    migrate_file(&mut stack, grants);
    // Applied out of order here, the grants migration revoked what the
    // later ones granted; the quota gaps migration, whose function doctor
    // calls, applied again grants it back (each migration is idempotent).
    migrate_file(&mut stack, migration("_usage_agg_quota_gaps.sql"));
    let run = doctor(&stack.env(), &[]);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("migrations")),
        "{}",
        run.stdout
    );
}

/// On a Supabase project (issue 18): doctor names a seed table another
/// role owns, row level security turned off, a grant wider than the
/// migrations leave, and shows the statement timeouts runs live under.
#[test]
fn doctor_checks_what_supabase_sets_up_around_the_migrations() {
    let mut stack = migrated_stack();
    insert_rows(&stack, 20, 2);
    aggregate(&stack, &[]).assert_status(0);
    let run = doctor(&stack.env(), &[]);
    run.assert_status(0);
    for check in [
        "table owners",
        "row level security",
        "grants",
        "statement timeout",
    ] {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "{check}\n{}",
            run.stdout
        );
    }
    run.assert_stdout_has("scheduled runs: 120000 ms");
    stack.ddl(
        "ALTER TABLE portal_usage_monthly DISABLE ROW LEVEL SECURITY;
         GRANT UPDATE ON usage_aggregation_state TO service_role;",
    );
    let run = doctor(&stack.env(), &[]);
    fails(
        &run,
        "row level security",
        78,
        "ALTER TABLE public.portal_usage_monthly ENABLE ROW LEVEL SECURITY;",
    );
    fails(
        &run,
        "grants",
        78,
        "service_role may write usage_aggregation_state",
    );
    // Only a superuser can give a table to supabase_admin, as Studio did.
    stack
        .admin_sql()
        .batch_execute(
            "ALTER TABLE portal_usage_monthly ENABLE ROW LEVEL SECURITY;
             REVOKE UPDATE ON usage_aggregation_state FROM service_role;
             ALTER TABLE usage_requests OWNER TO supabase_admin;",
        )
        .unwrap();
    stack.reload_schema();
    let run = doctor(&stack.env(), &[]);
    fails(
        &run,
        "table owners",
        78,
        "ALTER TABLE public.usage_requests OWNER TO postgres;",
    );
    run.assert_stdout_has("usage_requests is owned by supabase_admin");
}

//! Configuration and command-line errors: each names the problem and the fix,
//! and has its own exit status.

use crate::common::*;

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A URL nothing listens on: a port just bound and released.
fn dead_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

const A_JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2ln";

#[test]
fn a_missing_variable_is_named_with_the_files_looked_in() {
    let run = usage_agg(&workdir(), &[], &["aggregate", "--env", "prod"]);
    run.assert_status(78)
        .assert_stderr_has("SUPABASE_PROD_URL is not set");
    run.assert_stderr_has(".env.local")
        .assert_stderr_has(".env");
    assert_eq!(run.stderr.lines().count(), 1, "one line:\n{}", run.stderr);
}

#[test]
fn a_malformed_url_or_key_is_refused_before_any_request() {
    let run = usage_agg(
        &workdir(),
        &pairs(&[
            ("SUPABASE_DEV_URL", "supabase.co"),
            ("SUPABASE_DEV_SERVICE_ROLE_KEY", A_JWT),
        ]),
        &["aggregate", "--env", "dev"],
    );
    run.assert_status(78)
        .assert_stderr_has("SUPABASE_DEV_URL (in the environment) is not a usable URL");

    let run = usage_agg(
        &workdir(),
        &pairs(&[
            ("SUPABASE_DEV_URL", "https://x.supabase.co"),
            ("SUPABASE_DEV_SERVICE_ROLE_KEY", "letmein"),
        ]),
        &["aggregate", "--env", "dev"],
    );
    run.assert_status(78)
        .assert_stderr_has("SUPABASE_DEV_SERVICE_ROLE_KEY (in the environment) is neither a JWT");
    assert!(!run.all().contains("letmein"));
}

#[test]
fn values_come_from_the_environment_then_env_local_then_env() {
    let dir = workdir();
    let dead = dead_url();
    std::fs::write(
        dir.join(".env"),
        "SUPABASE_DEV_URL=https://from-dotenv.invalid\nSUPABASE_DEV_SERVICE_ROLE_KEY=nonsense\n",
    )
    .unwrap();
    std::fs::write(dir.join(".env.local"), format!("SUPABASE_DEV_SERVICE_ROLE_KEY={A_JWT}\nSUPABASE_DEV_REST_URL=https://from-env-local.invalid\n")).unwrap();

    // .env.local's key beats .env's; the environment's REST URL beats .env.local's.
    let run = usage_agg(
        &dir,
        &pairs(&[("SUPABASE_DEV_REST_URL", &dead)]),
        &["aggregate", "--env", "dev", "--max-retries", "1"],
    );
    run.assert_status(69).assert_stderr_has("could not connect");
    assert!(
        !run.all().contains("invalid"),
        "the environment must win:\n{}",
        run.all()
    );
}

#[test]
fn env_auto_picks_prod_from_app_env_and_says_so() {
    let run = usage_agg(
        &workdir(),
        &pairs(&[
            ("APP_ENV", "production"),
            ("NODE_ENV", "development"),
            ("SUPABASE_PROD_URL", &dead_url()),
            ("SUPABASE_PROD_REST_URL", &dead_url()),
            ("SUPABASE_PROD_SERVICE_ROLE_KEY", A_JWT),
        ]),
        &["aggregate", "--env", "auto", "--max-retries", "1"],
    );
    run.assert_stdout_has(
        "Aggregating usage for PROD environment (--env auto: APP_ENV=production)",
    );
    run.assert_status(69)
        .assert_stderr_has("hint: the server could not be reached");
}

#[test]
fn bad_arguments_are_exit_64() {
    usage_agg(&workdir(), &[], &["aggregate", "--env", "staging"])
        .assert_status(64)
        .assert_stderr_has("staging");
    usage_agg(&workdir(), &[], &["aggregate", "--page-size", "0"]).assert_status(64);
    usage_agg(&workdir(), &[], &["frobnicate"]).assert_status(64);
    usage_agg(&workdir(), &[], &["--help"])
        .assert_status(0)
        .assert_stdout_has("aggregate");
}

#[test]
fn a_missing_table_says_the_schema_is_missing() {
    let mut stack = Stack::new();
    stack.ddl("DROP TABLE usage_requests");
    aggregate(&stack, &[])
        .assert_status(78)
        .assert_stderr_has("PGRST205")
        .assert_stderr_has("hint: the table usage_requests does not exist here");
}

#[test]
fn an_anon_key_is_named_as_such() {
    let stack = Stack::new();
    let env = env_with(&stack, "SUPABASE_DEV_SERVICE_ROLE_KEY", &stack.anon_key);
    let run = usage_agg(&workdir(), &env, &["aggregate", "--env", "dev"]);
    run.assert_status(78)
        .assert_stderr_has("looks like an anon key");
    assert!(!run.all().contains(&stack.anon_key));
}

#[test]
fn a_key_for_another_project_is_refused_with_exit_77() {
    let stack = Stack::new();
    let other = stack::mint_jwt("service_role", "another-projects-secret-also-32-characters");
    let env = env_with(&stack, "SUPABASE_DEV_SERVICE_ROLE_KEY", &other);
    let run = usage_agg(&workdir(), &env, &["aggregate", "--env", "dev"]);
    run.assert_status(77)
        .assert_stderr_has("HTTP 401")
        .assert_stderr_has("refused the key in SUPABASE_DEV_SERVICE_ROLE_KEY");
    assert!(!run.all().contains(&other));
}

#[test]
fn a_missing_column_is_named_with_its_table() {
    let mut stack = Stack::new();
    insert_rows(&stack, 10, 2);
    stack.ddl("ALTER TABLE usage_requests DROP COLUMN success");
    aggregate(&stack, &[])
        .assert_status(78)
        .assert_stderr_has("a column of usage_requests is missing");
}

#[test]
fn a_missing_migration_function_names_the_migration() {
    let mut stack = Stack::new();
    migrate(&mut stack);
    stack.ddl("DROP FUNCTION usage_agg_safe_horizon(integer)");
    aggregate(&stack, &[])
        .assert_status(78)
        .assert_stderr_has("usage_agg_safe_horizon is missing")
        .assert_stderr_has(MIGRATION);
}

#[test]
fn a_project_with_only_the_first_migration_is_told_to_apply_the_next() {
    let mut stack = Stack::new();
    migrate_file(&mut stack, MIGRATION);
    for args in [&[][..], &["--engine", "rpc"][..]] {
        aggregate(&stack, args)
            .assert_status(78)
            .assert_stderr_has("usage_agg_preflight is missing")
            .assert_stderr_has(MIGRATIONS[1]);
    }
    assert_eq!(
        count(&stack, "SELECT count(*) FROM portal_usage_monthly"),
        0
    );
}

#[test]
fn an_impossible_month_is_a_usage_error() {
    let run = usage_agg(&workdir(), &[], &["aggregate", "--month", "2025-13"]);
    run.assert_status(64)
        .assert_stderr_has("\"2025-13\" is not a month: expected YYYY-MM");
    usage_agg(&workdir(), &[], &["verify", "--month", "25-01"]).assert_status(64);
}

#[test]
fn an_env_local_readable_by_others_draws_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let stack = Stack::new();
    let dir = workdir();
    let body: String = stack
        .env()
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    std::fs::write(dir.join(".env.local"), body).unwrap();
    std::fs::set_permissions(
        dir.join(".env.local"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let run = usage_agg(&dir, &[], &["aggregate", "--env", "dev"]);
    run.assert_status(0)
        .assert_stderr_has("readable by every user")
        .assert_stderr_has("chmod 600");

    std::fs::set_permissions(
        dir.join(".env.local"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let run = usage_agg(&dir, &[], &["aggregate", "--env", "dev"]);
    run.assert_status(0);
    assert!(
        !run.stderr.contains("readable by every user"),
        "{}",
        run.stderr
    );
}

#[test]
fn plain_http_to_another_host_is_refused_before_any_request_unless_allowed() {
    for var in ["SUPABASE_DEV_URL", "SUPABASE_DEV_REST_URL"] {
        let run = usage_agg(
            &workdir(),
            &pairs(&[
                (var, "http://example.invalid"),
                ("SUPABASE_DEV_SERVICE_ROLE_KEY", A_JWT),
            ]),
            &["aggregate", "--env", "dev"],
        );
        // 78, not 69: nothing was sent (example.invalid never resolves).
        run.assert_status(78)
            .assert_stderr_has(&format!("{var} (in the environment) is plain http"))
            .assert_stderr_has("clear text")
            .assert_stderr_has("USAGE_AGG_ALLOW_INSECURE_HTTP=1");
        assert_eq!(run.stderr.lines().count(), 1, "one line:\n{}", run.stderr);
        assert!(!run.all().contains(A_JWT.split('.').nth(1).unwrap()));
    }

    // The opt-in, read from .env.local like any other variable: the run
    // goes on (and fails to reach the host), after one warning.
    let dir = workdir();
    let env_local = dir.join(".env.local");
    std::fs::write(&env_local, "USAGE_AGG_ALLOW_INSECURE_HTTP=1\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&env_local, std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = usage_agg(
        &dir,
        &pairs(&[
            ("SUPABASE_DEV_URL", "http://example.invalid"),
            ("SUPABASE_DEV_SERVICE_ROLE_KEY", A_JWT),
        ]),
        &["aggregate", "--env", "dev", "--max-retries", "0"],
    );
    run.assert_status(69)
        .assert_stderr_has("SUPABASE_DEV_URL (in the environment) is plain http to example.invalid")
        .assert_stderr_has("USAGE_AGG_ALLOW_INSECURE_HTTP=1 in");
    assert_eq!(
        run.stderr.matches("plain http").count(),
        1,
        "one warning:\n{}",
        run.stderr
    );
    assert!(!run.all().contains(A_JWT.split('.').nth(1).unwrap()));
}

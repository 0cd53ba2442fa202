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
    let mut stack = migrated_stack();
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

#[test]
fn inputs_are_taken_as_an_operator_writes_them() {
    let stack = migrated_stack();
    insert_rows(&stack, 50, 2);
    // --env in capitals, durations with units, one file of settings.
    let dir = workdir();
    let file = dir.join("prod.env");
    let body: String = stack
        .env()
        .iter()
        .map(|(k, v)| format!("{}={v}\n", k.replace("_DEV_", "_PROD_")))
        .collect();
    std::fs::write(&file, body).unwrap();
    let path = file.to_str().unwrap();
    usage_agg(
        &dir,
        &[],
        &[
            "aggregate",
            "--env",
            "PROD",
            "--env-file",
            path,
            "--deadline",
            "5m",
            "--timeout",
            "30s",
            "--lease-ttl",
            "2h30m",
        ],
    )
    .assert_status(0);
    assert_no_drift(&stack);
    usage_agg(
        &dir,
        &[],
        &[
            "status",
            "--env",
            "Prod",
            "--env-file",
            path,
            "--max-age",
            "2h30m",
        ],
    )
    .assert_status(0);
    usage_agg(
        &dir,
        &[],
        &["aggregate", "--env", "prod", "--deadline", "soon"],
    )
    .assert_status(64)
    .assert_stderr_has("expected e.g. 90s, 5m, 2h30m or 1d");
}

#[test]
fn usage_agg_settings_in_the_env_file_count_like_variables() {
    let stack = Stack::new();
    insert_rows(&stack, 20, 2);
    let recorder = stack::proxy::Recorder::start();
    let dir = workdir();
    std::fs::write(
        dir.join(".env.local"),
        format!("USAGE_AGG_PING_URL={}/check\n", recorder.url),
    )
    .unwrap();
    usage_agg(&dir, &stack.env(), &["aggregate", "--env", "dev"]).assert_status(0);
    let seen: Vec<String> = recorder.seen().into_iter().map(|(line, _)| line).collect();
    assert!(seen.iter().any(|l| l.contains("/check/start")), "{seen:?}");
    assert!(seen.iter().any(|l| l.contains("/check/0")), "{seen:?}");
}

#[test]
fn urls_that_cannot_work_are_not_retried_and_the_hint_names_the_url() {
    let stack = Stack::new();
    // A name that does not resolve: one try, exit 69, the URL named.
    let env = env_with(
        &stack,
        "SUPABASE_DEV_REST_URL",
        "https://no-such-project.invalid/rest/v1",
    );
    let run = usage_agg(&workdir(), &env, &["aggregate", "--env", "dev"]);
    run.assert_status(69)
        .assert_stderr_has("does not resolve")
        .assert_stderr_has("https://no-such-project.invalid/rest/v1/");
    assert!(
        !run.stderr.contains("gave up after"),
        "not retried:\n{}",
        run.stderr
    );
    // https:// to a plain-HTTP server: exit 78, told to write http://.
    let plain = stack.rest_url.clone();
    let env = env_with(
        &stack,
        "SUPABASE_DEV_REST_URL",
        &plain.replacen("http://", "https://", 1),
    );
    let run = usage_agg(&workdir(), &env, &["aggregate", "--env", "dev"]);
    run.assert_status(78).assert_stderr_has("write http://");
    assert!(
        !run.stderr.contains("gave up after"),
        "not retried:\n{}",
        run.stderr
    );
    // A path that is not the API: exit 78, a hint about the URL.
    let env = env_with(
        &stack,
        "SUPABASE_DEV_REST_URL",
        &format!("{plain}/nowhere/"),
    );
    usage_agg(&workdir(), &env, &["aggregate", "--env", "dev"])
        .assert_status(78)
        .assert_stderr_has("SUPABASE_DEV_REST_URL");
}

#[test]
fn the_final_error_is_printed_once_as_a_json_line_with_json_logs() {
    let env = pairs(&[
        ("SUPABASE_DEV_URL", &dead_url()),
        ("SUPABASE_DEV_SERVICE_ROLE_KEY", A_JWT),
    ]);
    let run = usage_agg(
        &workdir(),
        &env,
        &[
            "--log-format",
            "json",
            "aggregate",
            "--env",
            "dev",
            "--max-retries",
            "0",
        ],
    );
    run.assert_status(69);
    for line in run.stderr.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v.is_object(), "{line}");
    }
    assert!(run.stderr.contains("\"exit_status\":69"), "{}", run.stderr);
    // The summary says it failed, once, without repeating the error.
    let plain = usage_agg(
        &workdir(),
        &env,
        &["aggregate", "--env", "dev", "--max-retries", "0"],
    );
    assert_eq!(
        plain.stdout.matches("failed").count(),
        1,
        "{}",
        plain.stdout
    );
    assert!(
        !plain.stdout.contains("could not connect"),
        "{}",
        plain.stdout
    );
    assert_eq!(
        plain.stderr.matches("usage-agg: error:").count(),
        1,
        "{}",
        plain.stderr
    );
}

#[test]
fn every_subcommands_help_names_its_environment_variables_and_gives_examples() {
    for sub in [
        "aggregate",
        "verify",
        "status",
        "report",
        "doctor",
        "schedule",
    ] {
        let run = usage_agg(&workdir(), &[], &[sub, "--help"]);
        run.assert_status(0);
        for needle in [
            "SUPABASE_DEV_URL",
            "SUPABASE_PROD_SERVICE_ROLE_KEY",
            "SUPABASE_DEV_REST_URL",
            "NODE_ENV",
            "USAGE_AGG_PING_URL",
            "Examples:",
            &format!("usage-agg {sub} --env"),
            "Connection:",
            "Output:",
        ] {
            run.assert_stdout_has(needle);
        }
    }
    usage_agg(&workdir(), &[], &["aggregate", "--help"])
        .assert_stdout_has("Reading rows:")
        .assert_stdout_has("[env: USAGE_AGG_PING_URL=]");
    usage_agg(&workdir(), &[], &["sql", "--help"]).assert_stdout_has("Examples:");
    // Every README heading the help cites exists.
    let readme = std::fs::read_to_string(stack::repo_root().join("README.md")).unwrap();
    let help = usage_agg(&workdir(), &[], &["aggregate", "--help"]).stdout;
    for cited in help.split('"').skip(1).step_by(2) {
        if cited.chars().next().is_some_and(char::is_uppercase) && cited.len() < 40 {
            assert!(
                readme.contains(&format!("## {cited}")),
                "README has no heading {cited:?}"
            );
        }
    }
}

#[test]
fn an_http_error_names_the_rest_url_it_was_asked_at_and_never_the_key() {
    let mut stack = Stack::new();
    stack.ddl("DROP TABLE portal_usage_monthly");
    let run = aggregate(&stack, &[]);
    let url = stack.rest_url.clone();
    run.assert_status(78).assert_stderr_has("[REST URL http://");
    assert!(
        run.stderr.contains(url.trim_end_matches('/')),
        "{}",
        run.stderr
    );
    let key = stack
        .env()
        .into_iter()
        .find(|(k, _)| k.ends_with("SERVICE_ROLE_KEY"))
        .unwrap()
        .1;
    assert!(!run.all().contains(&key));
}

#[test]
fn a_url_with_a_password_is_refused_without_showing_it() {
    let stack = Stack::new();
    let url = stack
        .rest_url
        .replacen("http://", "http://svc:hunter2pw@", 1);
    let mut env = env_with(&stack, "SUPABASE_DEV_REST_URL", &url);
    env.push(("RUST_LOG".into(), "trace".into()));
    for sub in ["aggregate", "doctor", "status"] {
        let run = usage_agg(&workdir(), &env, &[sub, "--env", "dev"]);
        run.assert_status(78);
        assert!(
            run.all().contains("user name or password"),
            "{sub}: {}",
            run.all()
        );
        assert!(!run.all().contains("hunter2pw"), "{sub}: {}", run.all());
    }
}

#[test]
fn an_env_file_cannot_switch_on_test_failpoints() {
    let stack = Stack::new();
    insert_rows(&stack, 50, 2);
    let dir = workdir();
    std::fs::write(
        dir.join(".env.local"),
        "USAGE_AGG_FAILPOINTS=before-cursor=abort@1\n",
    )
    .unwrap();
    usage_agg(&dir, &stack.env(), &["aggregate", "--env", "dev"]).assert_status(0);
    // From the real environment (tests only), a malformed value is named
    // and ignored, not a panic.
    aggregate_failing(&stack, "nonsense", &[])
        .assert_status(0)
        .assert_stderr_has("ignoring USAGE_AGG_FAILPOINTS item \"nonsense\"");
}

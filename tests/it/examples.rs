//! The scheduling examples do what their comments say: each command line of
//! crontab.example and contrib/systemd runs with a shell against the stack,
//! with only the paths changed.

use crate::common::*;

/// A directory set up as the examples expect /opt/usage-agg: the stack's
/// settings, under PROD names, in .env.local.
fn install_dir(stack: &Stack, rest_url: Option<&str>) -> std::path::PathBuf {
    let dir = workdir();
    let body: String = stack
        .env()
        .iter()
        .map(|(k, v)| {
            let v = match (k.as_str(), rest_url) {
                ("SUPABASE_DEV_REST_URL", Some(url)) => url,
                _ => v.as_str(),
            };
            format!("{}={v}\n", k.replace("_DEV_", "_PROD_"))
        })
        .collect();
    let file = dir.join(".env.local");
    std::fs::write(&file, body).unwrap();
    // As the examples say: the file holds the key, readable by its owner only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    dir
}

/// The crontab's job lines, as cron would hand them to the shell.
fn cron_lines() -> Vec<String> {
    let text = std::fs::read_to_string(stack::repo_root().join("crontab.example")).unwrap();
    text.lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit() || c == '*'))
        .map(|l| {
            let command = l
                .splitn(6, ' ')
                .nth(5)
                .expect("five time fields, then the command");
            command.replace("\\%", "%")
        })
        .collect()
}

/// Runs one line with `sh`, its paths moved to `dir` and a temporary log.
fn run_line(line: &str, dir: &std::path::Path) -> (i32, String, String) {
    let log = dir.join("log");
    let line = line
        .replace("/opt/usage-agg", dir.to_str().unwrap())
        .replace("/var/log/usage-agg", log.to_str().unwrap())
        .replace(
            "/tmp/usage-agg-prod.lock",
            dir.join("lock").to_str().unwrap(),
        );
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_usage-agg"))
        .parent()
        .unwrap()
        .to_owned();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&line)
        .env_clear()
        .env(
            "PATH",
            format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display()),
        )
        .output()
        .unwrap();
    let log_text = std::fs::read_to_string(log.join("prod.log")).unwrap_or_default();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        log_text,
    )
}

#[test]
fn the_crontab_lines_mail_only_on_failure_and_log_start_and_end() {
    let lines = cron_lines();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let (aggregate, status, verify) = (&lines[0], &lines[1], &lines[2]);
    let stack = migrated_stack();
    insert_rows(&stack, 300, 3);
    let dir = install_dir(&stack, None);

    // All well: nothing printed (no mail), the log has both ends.
    let (_, mail, log) = run_line(aggregate, &dir);
    assert_eq!(mail, "", "a good run mails nothing");
    assert!(
        log.contains(" start\n") && log.contains(" end: exit 0\n"),
        "{log}"
    );
    assert_no_drift(&stack);
    assert_eq!(run_line(status, &dir).1, "");
    assert_eq!(run_line(verify, &dir).1, "");

    // Another run holds the lock: exit 75, logged, not mailed.
    let mut holder = std::process::Command::new("flock")
        .arg(dir.join("lock"))
        .arg("cat")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let locked = loop {
        // flock has taken the lock once a non-blocking try fails.
        let probe = std::process::Command::new("flock")
            .args(["-n", dir.join("lock").to_str().unwrap(), "true"])
            .status()
            .unwrap();
        if !probe.success() {
            break true;
        }
    };
    assert!(locked);
    let (_, mail, log) = run_line(aggregate, &dir);
    drop(holder.stdin.take());
    holder.wait().unwrap();
    assert_eq!(mail, "", "a held lock is not worth a mail");
    assert!(log.contains(" end: exit 75\n"), "{log}");

    // Drift: verify mails one line naming the status.
    stack
        .sql()
        .batch_execute("UPDATE portal_usage_monthly SET request_count = request_count + 1 WHERE portal_id = 1000")
        .unwrap();
    let (_, mail, _) = run_line(verify, &dir);
    assert!(
        mail.starts_with("usage-agg verify --env prod: exit 65"),
        "{mail}"
    );
    assert_eq!(mail.lines().count(), 1, "{mail}");

    // A server that cannot be reached: the run mails one line with its status.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let broken = install_dir(&stack, Some(&format!("http://127.0.0.1:{port}")));
    let (_, mail, log) = run_line(
        &aggregate.replace(
            "aggregate --env prod",
            "aggregate --env prod --max-retries 0",
        ),
        &broken,
    );
    assert!(
        mail.starts_with("usage-agg aggregate --env prod") && mail.contains(": exit 69 "),
        "{mail}"
    );
    assert_eq!(mail.lines().count(), 1, "{mail}");
    assert!(log.contains(" end: exit 69\n"), "{log}");
    let (_, mail, _) = run_line(
        &status.replace("status --env prod", "status --env prod --max-retries 0"),
        &broken,
    );
    assert!(
        mail.starts_with("usage-agg status --env prod") && mail.contains(": exit 69 "),
        "{mail}"
    );
    assert_eq!(mail.lines().count(), 1, "{mail}");
}

#[test]
fn the_systemd_service_runs_with_the_key_kept_out_of_the_unit() {
    let root = stack::repo_root().join("contrib/systemd");
    let unit = std::fs::read_to_string(root.join("usage-agg.service")).unwrap();
    assert!(
        !unit.contains("SERVICE_ROLE_KEY="),
        "no key in the unit file"
    );
    assert!(unit.lines().any(|l| l == "SuccessExitStatus=75"));
    let timer = std::fs::read_to_string(root.join("usage-agg.timer")).unwrap();
    assert!(timer.contains("OnCalendar=hourly"));
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let stack = migrated_stack();
    insert_rows(&stack, 200, 2);
    let dir = install_dir(&stack, None);
    let line = exec
        .replace("/usr/local/bin/usage-agg", env!("CARGO_BIN_EXE_usage-agg"))
        .replace(
            "/etc/usage-agg/prod.env",
            dir.join(".env.local").to_str().unwrap(),
        );
    // systemd starts it in / with no .env files there: only --env-file counts.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&line)
        .current_dir("/")
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_drift(&stack);
}

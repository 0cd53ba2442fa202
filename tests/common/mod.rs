//! Helpers shared by the integration tests: run the real binary against a
//! stack, and compute ground truth with SQL on a direct connection.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub use stack::Stack;

/// The result of one `usage-agg` run.
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn assert_status(&self, expected: i32) -> &Self {
        assert_eq!(
            self.status, expected,
            "exit status\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn assert_stdout_has(&self, needle: &str) -> &Self {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn assert_stderr_has(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// An empty working directory, so no developer's `.env.local` leaks in.
pub fn workdir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "usage-agg-wd-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The binary, with a clean environment: only what the test gives it.
pub fn usage_agg(dir: &std::path::Path, env: &[(String, String)], args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_usage-agg"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run usage-agg");
    Run::from(out)
}

/// `usage-agg aggregate --env dev ARGS` against the stack.
pub fn aggregate(stack: &Stack, args: &[&str]) -> Run {
    let mut all = vec!["aggregate", "--env", "dev"];
    all.extend_from_slice(args);
    usage_agg(&workdir(), &stack.env(), &all)
}

/// One key's values, as compared between ground truth and the table.
pub type Row = (i64, String, i64, i64, i64, Option<String>);

/// What portal_usage_monthly must hold: every good raw row, by SQL.
pub fn ground_truth(stack: &Stack) -> Vec<Row> {
    stack
        .sql()
        .query(
            "SELECT portal_id, month_year, count(*), count(*) FILTER (WHERE success),
                    count(*) FILTER (WHERE NOT success), max(request_timestamp)::text
             FROM usage_requests
             WHERE month_year ~ '^[0-9]{4}-(0[1-9]|1[0-2])$' AND portal_id > 0
             GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect()
}

/// What portal_usage_monthly holds.
pub fn table(stack: &Stack) -> Vec<Row> {
    stack
        .sql()
        .query(
            "SELECT portal_id, month_year, request_count::bigint, success_count::bigint,
                    error_count::bigint, last_request_at::text
             FROM portal_usage_monthly ORDER BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect()
}

/// Keys where the table and the truth differ, for a readable failure.
#[track_caller]
pub fn assert_no_drift(stack: &Stack) {
    let truth = ground_truth(stack);
    let actual = table(stack);
    if truth != actual {
        let t: std::collections::BTreeSet<_> = truth.iter().collect();
        let a: std::collections::BTreeSet<_> = actual.iter().collect();
        let missing: Vec<_> = t.difference(&a).take(5).collect();
        let extra: Vec<_> = a.difference(&t).take(5).collect();
        panic!(
            "drift: {} keys in truth, {} in table\n  expected but absent: {missing:?}\n  present but wrong: {extra:?}",
            truth.len(),
            actual.len()
        );
    }
}

pub fn insert_rows(stack: &Stack, n: i64, portals: i64) {
    stack::insert_sample_rows(
        &mut stack.sql(),
        n,
        portals,
        &["2025-05", "2025-06", "2025-07"],
    );
}

pub fn count(stack: &Stack, sql: &str) -> i64 {
    stack.sql().query_one(sql, &[]).unwrap().get(0)
}

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
    aggregate_in(&stack.env(), args)
}

/// The same run, killed (or paused) where `failpoints` says
/// (`USAGE_AGG_FAILPOINTS`, such as `page=abort@2`).
pub fn aggregate_failing(stack: &Stack, failpoints: &str, args: &[&str]) -> Run {
    aggregate_in(&failing(stack, failpoints), args)
}

fn aggregate_in(env: &[(String, String)], args: &[&str]) -> Run {
    let mut all = vec!["aggregate", "--env", "dev"];
    all.extend_from_slice(args);
    usage_agg(&workdir(), env, &all)
}

/// The stack's environment with `USAGE_AGG_FAILPOINTS` set: a run of any
/// command killed (or paused) where a test says.
pub fn failing(stack: &Stack, failpoints: &str) -> Vec<(String, String)> {
    env_with(stack, "USAGE_AGG_FAILPOINTS", failpoints)
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

/// Every migration, in the order they apply.
/// The migrations in the order they apply: the list the binary embeds
/// (`build.rs` makes it from `supabase/migrations/`).
const EMBEDDED: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/migrations.rs"));
pub static MIGRATIONS: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| EMBEDDED.iter().map(|(file, _)| *file).collect());
pub const MIGRATION: &str = EMBEDDED[0].0;
pub const LATEST_MIGRATION: &str = EMBEDDED[EMBEDDED.len() - 1].0;
/// The rules of manual adjustments: their bound, and the months they are
/// booked in.
pub const RULES_MIGRATION: &str = "supabase/migrations/20261207090000_usage_agg_adjust_rules.sql";

/// Applies one migration file as a user does (`psql -f`), asserting it worked.
pub fn migrate_file(stack: &mut Stack, file: &str) {
    let out = stack.psql_file(&stack::repo_root().join(file));
    assert!(
        out.status.success(),
        "migration {file} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Applies every migration in order.
pub fn migrate(stack: &mut Stack) {
    let files = files(MIGRATIONS.iter());
    stack.psql_files(&files).unwrap_or_else(|e| panic!("{e}"));
}

/// The migrations' paths from the repository's root.
fn files<'a>(names: impl Iterator<Item = &'a &'static str>) -> Vec<std::path::PathBuf> {
    names.map(|m| stack::repo_root().join(m)).collect()
}

/// The migration whose file name ends in `suffix`
/// (`"_usage_agg_dashboard.sql"`), so that a test names it by what it adds.
#[track_caller]
pub fn migration(suffix: &str) -> &'static str {
    MIGRATIONS
        .iter()
        .find(|m| m.ends_with(suffix))
        .unwrap_or_else(|| panic!("no migration ends in {suffix}"))
}

/// A stack with every migration but `skipped` applied, in order: a
/// project that has not applied those yet.
pub fn stack_without(skipped: &[&str]) -> Stack {
    Stack::with_files(&files(MIGRATIONS.iter().filter(|m| !skipped.contains(m))))
}

/// A stack with every migration applied.
pub fn migrated_stack() -> Stack {
    Stack::with_files(&files(MIGRATIONS.iter()))
}

/// Every key's watermark covers the newest good row it counts, and no more
/// than the cursor unless a run is under way (a rebuild writes its horizon,
/// an incremental run its newest row: docs/semantics.md, "Rebuilds"), and
/// the counts are right at that watermark.
#[track_caller]
pub fn assert_watermarks(stack: &Stack) {
    let wrong = count(
        stack,
        "SELECT count(*) FROM portal_usage_monthly m
         LEFT JOIN (SELECT portal_id, month_year, max(id) AS top FROM usage_requests
                    WHERE month_year ~ '^[0-9]{4}-(0[1-9]|1[0-2])$' AND portal_id > 0 GROUP BY 1, 2) r
           USING (portal_id, month_year)
         WHERE m.last_request_id < coalesce(r.top::bigint, 0)
            OR m.last_request_id > (SELECT coalesce(max(cursor_id), 0) FROM usage_aggregation_state)",
    );
    assert_eq!(
        wrong, 0,
        "keys whose last_request_id is below their newest row's id or above the cursor"
    );
    assert_consistent(stack);
}

pub fn cursor(stack: &Stack) -> Option<i64> {
    stack
        .sql()
        .query_opt(
            "SELECT cursor_id FROM usage_aggregation_state WHERE job = 'default'",
            &[],
        )
        .unwrap()
        .and_then(|r| r.get(0))
}

/// A small seeded generator (splitmix64): reproducible random workloads.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Inserts `n` random rows: `portals` portals, months across 2024-2025 (so
/// late rows for past months happen), about 10% errors.
pub fn insert_random(stack: &Stack, rng: &mut Rng, n: usize, portals: u64) {
    if n == 0 {
        return;
    }
    let values: Vec<String> = (0..n)
        .map(|_| {
            let portal = 1 + rng.below(portals);
            let month = format!("{}-{:02}", 2024 + rng.below(2), 1 + rng.below(12));
            let ok = rng.below(10) != 0;
            let day = 1 + rng.below(28);
            format!("({portal}, '{month}-{day:02} 12:00:00'::timestamp + {} * interval '1 second', {ok}, '{month}')", rng.below(80_000))
        })
        .collect();
    insert_values(stack, &values);
}

/// Inserts rows given as SQL tuples `(portal_id, request_timestamp,
/// success, month_year)`, in one statement.
pub fn insert_values(stack: &Stack, values: &[String]) {
    stack
        .sql()
        .batch_execute(&format!(
            "INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year) VALUES {}",
            values.join(",")
        ))
        .unwrap();
}

/// Inserts `ok` successful and `err` failed rows of `portal` in `month`,
/// all requested at `at` (a timestamp without zone).
pub fn insert_requests(stack: &Stack, portal: i64, month: &str, ok: usize, err: usize, at: &str) {
    if ok + err == 0 {
        return;
    }
    let mut values = vec![format!("({portal}, '{at}', true, '{month}')"); ok];
    values.extend(vec![format!("({portal}, '{at}', false, '{month}')"); err]);
    insert_values(stack, &values);
}

/// Inserts `n` successful rows of `portal` in `month`, on its 3rd: a
/// month's totals, closes and quotas do not look at the day (a test whose
/// rows' times matter says them with [`insert_requests`]).
pub fn insert_month(stack: &Stack, portal: i64, month: &str, n: usize) {
    insert_requests(stack, portal, month, n, 0, &format!("{month}-03 10:00:00"));
}

/// Closes `month` in the database as `usage-agg close` finally does (the
/// command's own checks are tested in billing.rs), grace 0; a month closed
/// already stays so.
pub fn close_sql(stack: &Stack, month: &str) {
    let text: String = stack
        .sql()
        .query_one(
            "SELECT usage_agg_close_month('default', $1, 0, 'test')::text",
            &[&month],
        )
        .unwrap()
        .get(0);
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        answer["closed"] == true || answer["already_closed"] == true,
        "{answer}"
    );
}

/// What is stored is true at each key's own watermark (docs/semantics.md's
/// invariant), even mid-way through a run that failed.
#[track_caller]
pub fn assert_consistent(stack: &Stack) {
    let wrong = count(
        stack,
        "SELECT count(*) FROM portal_usage_monthly m, LATERAL (
           SELECT count(*) AS c, count(*) FILTER (WHERE r.success) AS s
           FROM usage_requests r
           WHERE r.portal_id = m.portal_id AND r.month_year = m.month_year AND r.id <= m.last_request_id
         ) x
         WHERE m.request_count <> x.c OR m.success_count <> x.s",
    );
    assert_eq!(
        wrong, 0,
        "stored keys that disagree with their rows up to their own watermark"
    );
}

/// The stack's environment with one variable set to another value.
pub fn env_with(stack: &Stack, var: &str, value: &str) -> Vec<(String, String)> {
    let mut env: Vec<_> = stack.env().into_iter().filter(|(k, _)| k != var).collect();
    env.push((var.into(), value.into()));
    env
}

/// The stack's environment, with the REST URL pointed elsewhere (a proxy).
pub fn env_via(stack: &Stack, rest_url: &str) -> Vec<(String, String)> {
    env_with(stack, "SUPABASE_DEV_REST_URL", rest_url)
}

/// A run stopped at a failpoint (see src/failpoint.rs).
pub struct Paused {
    child: std::process::Child,
    stderr: std::io::BufReader<std::process::ChildStderr>,
}

/// Starts a run that stops at `failpoint`, and returns once it has.
pub fn paused_run(stack: &Stack, failpoint: &str) -> Paused {
    paused_run_with(stack, failpoint, &[])
}

/// The same, with more arguments for `aggregate`.
pub fn paused_run_with(stack: &Stack, failpoint: &str, args: &[&str]) -> Paused {
    let mut all = vec!["aggregate", "--env", "dev"];
    all.extend_from_slice(args);
    paused_command(stack, failpoint, &all)
}

/// Any command (`args`, the subcommand first) stopped at `failpoint`.
pub fn paused_command(stack: &Stack, failpoint: &str, args: &[&str]) -> Paused {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_usage-agg"))
        .args(args)
        .current_dir(workdir())
        .env_clear()
        .envs(stack.env())
        .env("USAGE_AGG_FAILPOINTS", format!("{failpoint}=pause@1"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains(&format!("failpoint {failpoint} reached")) {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "the run ended before its pause"
        );
    }
    Paused { child, stderr }
}

/// Lets a paused run go on to its end; asserts it ended as a run may when
/// another took over: done (0) or lease lost (75).
#[track_caller]
pub fn resume(p: Paused) {
    let (status, out) = p.finish();
    assert!(matches!(status, 0 | 75), "exit {status}\n{out}");
}

/// Makes the lease run out now, as it does under a stalled run.
pub fn expire_lease(stack: &Stack) {
    stack
        .sql()
        .batch_execute(
            "UPDATE usage_aggregation_state SET lease_expires_at = now() - interval '1 second'",
        )
        .unwrap();
}

impl Paused {
    /// Lets a paused run go on to its end; its exit status and output.
    /// Stderr is drained on a thread of its own while stdout is read: a run
    /// that prints more than a pipe holds on one would otherwise wait for
    /// ever on the other (a verify listing hundreds of keys did).
    pub fn finish(mut self) -> (i32, String) {
        use std::io::{Read, Write};
        self.child.stdin.take().unwrap().write_all(b"\n").unwrap();
        let mut stderr = self.stderr;
        let rest = std::thread::spawn(move || {
            let mut rest = String::new();
            stderr.read_to_string(&mut rest).unwrap();
            rest
        });
        let out = self.child.wait_with_output().unwrap();
        let rest = rest.join().unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!("{}{rest}", String::from_utf8_lossy(&out.stdout)),
        )
    }
}

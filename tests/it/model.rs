//! A model-based test of the whole contract (docs/semantics.md; issue 17):
//! a seeded random sequence of operations on the real stack, each step
//! checked against a small in-memory model of what must be billed.
//!
//! The operations: inserts of good and bad rows into open and closed months
//! (committed at once, rolled back, held open on a second connection and
//! committed later, or prepared with PREPARE TRANSACTION and committed with
//! COMMIT PREPARED, some of them while a run waits for them), runs of the
//! REST engine (incremental, `--full`, `--month`), of `--engine rpc` and of
//! the scheduled procedure (`CALL usage_agg_run_scheduled`), two runs at
//! once, runs killed at every failpoint of src/failpoint.rs and runs paused
//! there while others go on, `close` (also beside a run, and `aggregate
//! --auto-close`), `reopen`, `adjust` (ids repeated with the same and with
//! other values), `prune` (also beside `verify`), the id sequence restarted
//! below the cursor then `aggregate --rebase`, a monthly row deleted by
//! hand, a trigger that undoes a write, and `verify`.
//!
//! The model is every row inserted (its id, key, whether it is good, and
//! whether it is pending, committed, rolled back or pruned), the closed
//! months with the snapshot of their rows at the close, and the manual
//! adjustments booked. After every step, by SQL on a direct connection:
//!
//! - for every key, its monthly row plus its late adjustments never holds
//!   more than its good committed rows, pruned ones included (counted
//!   once);
//! - after a run that promises it (exit 0, or 65 with only bad rows, from a
//!   run that moves the cursor; a scheduled run whose outcome is `ok` or
//!   `bad_rows`; a close that closed), every key holds at least its good
//!   rows committed before that run started: exactly those, with the rule
//!   above ("What exit 0 promises");
//! - a closed month's monthly rows, and the adjustments booked in it, are
//!   those of its snapshot for as long as it stays closed (I3);
//! - the manual adjustments and the pruned rows are those the model booked;
//! - every exit status is one the contract allows in that state (a run
//!   stopped by a writer in flight or by another run, a refusal while the
//!   sequence is behind, a lost write while a key is known short);
//! - `verify` exits 0 exactly when every key agrees with its rows up to its
//!   highest watermark or the cursor, as the model computes it, and
//!   `usage_current` of every such key is exactly its good committed rows;
//! - at the end of a seed (every writer committed, every repair made), runs
//!   of both engines and the procedure count every row exactly once, and
//!   `verify` and `status` exit 0.
//!
//! Quotas (issue 20, docs/quotas.md): every few steps the default plan's
//! quota changes (its limit and thresholds; from a random stream of its own,
//! so the fixed seeds' operations are those they were). One alert per
//! crossing: after every step, every alert was reached when it was recorded
//! (its request_count at or above its threshold), none is recorded twice
//! (per portal, month, threshold and limit), and a closed month gains none
//! while it stays closed; at the end of a seed, every open month never
//! reopened has an alert for each threshold of the current quota its usage
//! (monthly row plus late adjustments) reached.
//!
//! A failure prints its seed and every step so far; `USAGE_AGG_MODEL_SEED`
//! replays it. The fixed seeds run in the normal suite; `scripts/test
//! --soak` (`USAGE_AGG_MODEL_MINUTES`) runs random seeds until time is up.
//! Environment variables: USAGE_AGG_MODEL_SEED (one seed, or several
//! separated by commas), USAGE_AGG_MODEL_STEPS (steps per seed),
//! USAGE_AGG_MODEL_MINUTES (random seeds for that long),
//! USAGE_AGG_MODEL_SKIP (operations left out, by name, comma-separated:
//! to look past a known finding), USAGE_AGG_MODEL_VERBOSE (print each step).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;

/// The seeds of the normal suite, and their steps: a few hundred in all.
/// 530632518: the soak's finding (a reopened month's late adjustment at
/// watermark 0 after a rebase, reported by verify as drift).
const FIXED_SEEDS: [u64; 5] = [2, 4, 13, 16, 530_632_518];
const FIXED_STEPS: usize = 80;
/// Portals 1 to this.
const PORTALS: u64 = 5;
/// Months long past their grace: closed, reopened, pruned at random. The
/// current month (the database's) is the month that never closes.
const OLD_MONTHS: [&str; 6] = [
    "2024-01", "2024-02", "2024-03", "2024-04", "2024-05", "2024-06",
];
const SEQUENCE: &str = "public.usage_requests_id_seq";
/// How long a run waits for writers in flight, unless it is the run a late
/// commit is made under (7000, the most allowed).
const WAIT_MS: u64 = 100;
/// The points a run is killed or paused at.
const POINTS: [&str; usage_agg::failpoint::POINTS.len()] = usage_agg::failpoint::POINTS;
/// The points an incremental REST run reaches (a rebuild recounts first).
fn incremental_points() -> Vec<&'static str> {
    POINTS
        .into_iter()
        .filter(|p| *p != "recount" && *p != "pruned")
        .collect()
}

#[test]
fn model_random_operations_on_the_real_stack_keep_the_contract() {
    let plan = Plan::from_env();
    let clock = Instant::now();
    let mut stats = Stats::default();
    let mut findings = Vec::new();
    let mut seeds = 0;
    let mut next_random = Rng(clock_seed());
    for round in 0.. {
        let seed = match &plan.seeds {
            Seeds::Fixed(list) => match list.get(round) {
                Some(s) => *s,
                None => break,
            },
            Seeds::Until(end) => {
                if Instant::now() >= *end {
                    break;
                }
                next_random.next() % 1_000_000_000
            }
        };
        seeds += 1;
        let started = Instant::now();
        if let Some(f) = run_seed(seed, &plan, &mut stats) {
            eprintln!("{f}");
            findings.push(f);
        } else if plan.verbose || matches!(plan.seeds, Seeds::Until(_)) {
            eprintln!(
                "model: seed {seed}: {} steps, no finding ({:.1} s)",
                plan.steps,
                started.elapsed().as_secs_f64()
            );
        }
    }
    eprintln!(
        "model: {seeds} seeds, {} steps, {} findings, {:.1} s\n  operations: {}\n  runs: {}",
        stats.steps,
        findings.len(),
        clock.elapsed().as_secs_f64(),
        stats
            .ops
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        stats
            .runs
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(
        findings.is_empty(),
        "{} of {seeds} seeds broke the contract:\n\n{}",
        findings.len(),
        findings.join("\n\n")
    );
}

enum Seeds {
    Fixed(Vec<u64>),
    Until(Instant),
}

/// What to run, from the environment (see the module's doc).
struct Plan {
    seeds: Seeds,
    steps: usize,
    skip: BTreeSet<String>,
    verbose: bool,
}

impl Plan {
    fn from_env() -> Plan {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
        let number = |n: &str, v: &str| -> u64 {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{n}={v:?} is not a number"))
        };
        let seeds = match (var("USAGE_AGG_MODEL_SEED"), var("USAGE_AGG_MODEL_MINUTES")) {
            (Some(s), _) => Seeds::Fixed(
                s.split(',')
                    .map(|x| number("USAGE_AGG_MODEL_SEED", x))
                    .collect(),
            ),
            (None, Some(m)) => Seeds::Until(
                Instant::now() + Duration::from_secs(60 * number("USAGE_AGG_MODEL_MINUTES", &m)),
            ),
            (None, None) => Seeds::Fixed(FIXED_SEEDS.to_vec()),
        };
        let steps = var("USAGE_AGG_MODEL_STEPS").map_or(FIXED_STEPS, |s| {
            number("USAGE_AGG_MODEL_STEPS", &s) as usize
        });
        let skip: BTreeSet<String> = var("USAGE_AGG_MODEL_SKIP")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        for s in &skip {
            assert!(
                Op::ALL.iter().any(|o| o.name() == s),
                "USAGE_AGG_MODEL_SKIP: no operation {s:?}; the operations: {}",
                Op::ALL.map(|o| o.name()).join(", ")
            );
        }
        Plan {
            seeds,
            steps,
            skip,
            verbose: var("USAGE_AGG_MODEL_VERBOSE").is_some(),
        }
    }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()) << 32
}

#[derive(Default)]
struct Stats {
    steps: usize,
    ops: BTreeMap<&'static str, usize>,
    runs: BTreeMap<String, usize>,
}

/// One seed on a stack of its own: its finding, replayable, if any.
fn run_seed(seed: u64, plan: &Plan, stats: &mut Stats) -> Option<String> {
    let mut log: Vec<String> = Vec::new();
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        let mut w = World::new(seed, plan, &mut log, stats);
        w.setup()?;
        for i in 0..plan.steps {
            w.step(i)?;
        }
        w.settle()
    }));
    let problem = match result {
        Ok(Ok(())) => return None,
        Ok(Err(e)) => e,
        Err(panic) => format!(
            "the test itself panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        ),
    };
    let skip = if plan.skip.is_empty() {
        String::new()
    } else {
        format!(
            "USAGE_AGG_MODEL_SKIP={} ",
            plan.skip.iter().cloned().collect::<Vec<_>>().join(",")
        )
    };
    Some(format!(
        "MODEL FINDING, seed {seed}, after {} steps:\n{problem}\n\nreplay: {skip}USAGE_AGG_MODEL_SEED={seed} \
         USAGE_AGG_MODEL_STEPS={} cargo test --locked --test it model -- --nocapture\nsteps:\n{}",
        log.len(),
        plan.steps,
        log.join("\n")
    ))
}

type Key = (i64, String);

fn key_text(k: &Key) -> String {
    format!("{}:{}", k.0, k.1)
}

/// Requests, successes, errors.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct Tally {
    n: i64,
    s: i64,
    e: i64,
}

impl Tally {
    fn add(&mut self, success: bool) {
        self.n += 1;
        if success {
            self.s += 1;
        } else {
            self.e += 1;
        }
    }

    fn within(&self, o: &Tally) -> bool {
        self.n <= o.n && self.s <= o.s && self.e <= o.e
    }

    fn max(&self, o: &Tally) -> Tally {
        Tally {
            n: self.n.max(o.n),
            s: self.s.max(o.s),
            e: self.e.max(o.e),
        }
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} ok, {} err)", self.n, self.s, self.e)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RowState {
    /// Inserted by a transaction still open (or prepared).
    Pending,
    Committed,
    RolledBack,
    /// Committed, then deleted by `prune` (and booked by it).
    Pruned,
}

struct RowRec {
    id: i64,
    key: Key,
    success: bool,
    good: bool,
    state: RowState,
}

/// A transaction holding inserted rows: a session still open, or prepared.
enum Held {
    Session(Box<postgres::Client>),
    Prepared(String),
}

struct Writer {
    held: Held,
    rows: Vec<usize>,
}

/// A closed month as it was when it closed: its monthly rows and the
/// adjustments booked in it (counts and times; watermarks may move, by a
/// rebase).
#[derive(Clone, PartialEq, Debug)]
struct Snapshot {
    monthly: Vec<String>,
    booked: Vec<String>,
}

#[derive(Clone, PartialEq, Debug)]
struct Manual {
    portal: i64,
    month: String,
    n: i64,
    s: i64,
    e: i64,
    booked: String,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Op {
    Insert,
    InsertBad,
    InsertRolledBack,
    HoldWriter,
    Prepare,
    EndWriter,
    LateCommit,
    Rest,
    Rpc,
    Scheduled,
    Full,
    Month,
    Overlap,
    Kill,
    Stale,
    Close,
    Reopen,
    Adjust,
    Prune,
    DeleteMonthly,
    Sabotage,
    ResetSequence,
    Rebase,
    Verify,
    AutoClose,
}

impl Op {
    const ALL: [Op; 25] = [
        Op::Insert,
        Op::InsertBad,
        Op::InsertRolledBack,
        Op::HoldWriter,
        Op::Prepare,
        Op::EndWriter,
        Op::LateCommit,
        Op::Rest,
        Op::Rpc,
        Op::Scheduled,
        Op::Full,
        Op::Month,
        Op::Overlap,
        Op::Kill,
        Op::Stale,
        Op::Close,
        Op::Reopen,
        Op::Adjust,
        Op::Prune,
        Op::DeleteMonthly,
        Op::Sabotage,
        Op::ResetSequence,
        Op::Rebase,
        Op::Verify,
        Op::AutoClose,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::InsertBad => "insert-bad",
            Op::InsertRolledBack => "insert-rolled-back",
            Op::HoldWriter => "hold-writer",
            Op::Prepare => "prepare",
            Op::EndWriter => "end-writer",
            Op::LateCommit => "late-commit",
            Op::Rest => "rest",
            Op::Rpc => "rpc",
            Op::Scheduled => "scheduled",
            Op::Full => "full",
            Op::Month => "month",
            Op::Overlap => "overlap",
            Op::Kill => "kill",
            Op::Stale => "stale",
            Op::Close => "close",
            Op::Reopen => "reopen",
            Op::Adjust => "adjust",
            Op::Prune => "prune",
            Op::DeleteMonthly => "delete-monthly",
            Op::Sabotage => "sabotage",
            Op::ResetSequence => "reset-sequence",
            Op::Rebase => "rebase",
            Op::Verify => "verify",
            Op::AutoClose => "auto-close",
        }
    }
}

/// The runs, by what they promise and how they are started.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Rest,
    Rpc,
    Full,
    Month,
    Rebase,
    Scheduled,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Rest => "rest",
            Kind::Rpc => "rpc",
            Kind::Full => "full",
            Kind::Month => "month",
            Kind::Rebase => "rebase",
            Kind::Scheduled => "scheduled",
        }
    }

    /// Exit 0 means every row committed before it started is counted: it
    /// moves the cursor to its horizon.
    fn promises(self) -> bool {
        !matches!(self, Kind::Month)
    }
}

/// A run to start: a command line, or the procedure's arguments.
struct Spec {
    kind: Kind,
    args: Vec<String>,
    call: (u64, u64),
    failpoint: Option<String>,
}

impl Spec {
    fn desc(&self) -> String {
        let mut d = self.kind.name().to_string();
        if self.kind == Kind::Scheduled {
            d.push_str(&format!("(batch {}, wait {} ms)", self.call.0, self.call.1));
        } else {
            let extra: Vec<&str> = self
                .args
                .iter()
                .map(String::as_str)
                .filter(|a| !matches!(*a, "aggregate" | "--env" | "dev" | "--json"))
                .collect();
            if !extra.is_empty() {
                d.push_str(&format!("[{}]", extra.join(" ")));
            }
        }
        if let Some(f) = &self.failpoint {
            d.push_str(&format!(" {{{f}}}"));
        }
        d
    }
}

/// How a run ended.
struct Ran {
    desc: String,
    /// The exit status (-1: killed); for the procedure 0, or 1 when it
    /// raised.
    status: i32,
    /// The JSON `outcome` (or the procedure's outcome, `skipped` when
    /// another run held the lease); empty when there was none.
    outcome: String,
    text: String,
}

impl Ran {
    fn short(&self) -> String {
        format!("{} -> {} {}", self.desc, self.status, self.outcome)
    }

    fn detail(&self) -> String {
        let t = self.text.trim();
        let t = if t.len() > 3000 {
            format!("{}...", &t[..3000])
        } else {
            t.to_string()
        };
        format!("{}\n--- its output\n{t}", self.short())
    }
}

/// A run started, not yet finished.
enum Started {
    Cli(Child, String),
    Call(std::thread::JoinHandle<Ran>),
}

/// What the judge of a run must know of its circumstances.
#[derive(Default)]
struct Circumstances {
    /// Killed at a failpoint: -1 is fine.
    failpoint: bool,
    /// Another run at the same time, or one paused: 75 is fine.
    contention: bool,
    /// Writers in flight when it started: 75 is fine.
    writers: bool,
    /// The run under a trigger that undoes writes: writes_lost is fine.
    sabotage: bool,
}

struct World<'a> {
    seed: u64,
    rng: Rng,
    plan: &'a Plan,
    log: &'a mut Vec<String>,
    stats: &'a mut Stats,
    stack: Stack,
    db: postgres::Client,
    dir: PathBuf,
    current_month: String,
    rows: Vec<RowRec>,
    writers: Vec<Writer>,
    closed: BTreeMap<String, Snapshot>,
    manual: BTreeMap<String, Manual>,
    /// The sequence was restarted below the cursor, and no rebase has
    /// finished since.
    reset: bool,
    /// Keys a write undone by a trigger left short, until counted again.
    lost: BTreeSet<Key>,
    /// Set by a run that reported lost writes: the keys short after the
    /// step go into `lost`.
    mark_lost: bool,
    /// A run reported lost writes, and no rebuild of every key has
    /// succeeded since: runs may say so (exit 65) until one does, even once
    /// the keys are right again.
    lost_reported: bool,
    /// What the runs of this step that exited 0 promise: each key at least
    /// this (the good rows committed before the run started).
    required: BTreeMap<Key, Tally>,
    promised_by: Vec<String>,
    adjust_ids: usize,
    /// Whether the cluster allows PREPARE TRANSACTION (the harness's own
    /// does; an external database may not, and then none is prepared).
    prepared: bool,
    /// The quota changes' own random stream, so that they leave the
    /// operations of a seed as they were.
    quota_rng: Rng,
    /// The default plan's quota, once set: limit and thresholds.
    quota: Option<(i64, Vec<i32>)>,
    /// The alerts of each closed month when it closed: it gains none while
    /// it stays closed.
    alerts_at_close: BTreeMap<String, i64>,
    /// Months reopened in this seed: their usage may have reached a
    /// threshold while closed, and fires at their next booking.
    reopened: BTreeSet<String>,
}

static GIDS: AtomicUsize = AtomicUsize::new(0);

impl<'a> World<'a> {
    fn new(seed: u64, plan: &'a Plan, log: &'a mut Vec<String>, stats: &'a mut Stats) -> World<'a> {
        let stack = migrated_stack();
        let mut db = stack.sql();
        let current_month: String = db
            .query_one("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM')", &[])
            .unwrap()
            .get(0);
        let prepared: bool = db
            .query_one(
                "SELECT current_setting('max_prepared_transactions')::int > 0",
                &[],
            )
            .unwrap()
            .get(0);
        World {
            seed,
            rng: Rng(seed),
            plan,
            log,
            stats,
            stack,
            db,
            dir: workdir(),
            current_month,
            rows: Vec::new(),
            writers: Vec::new(),
            closed: BTreeMap::new(),
            manual: BTreeMap::new(),
            reset: false,
            lost: BTreeSet::new(),
            mark_lost: false,
            lost_reported: false,
            required: BTreeMap::new(),
            promised_by: Vec::new(),
            adjust_ids: 0,
            prepared,
            quota_rng: Rng(seed ^ 0x5155_4f54_4153),
            quota: None,
            alerts_at_close: BTreeMap::new(),
            reopened: BTreeSet::new(),
        }
    }

    // ---- the log ----

    fn note(&mut self, text: &str) {
        if let Some(last) = self.log.last_mut() {
            if !last.ends_with(": ") {
                last.push_str("; ");
            }
            last.push_str(text);
        }
    }

    fn begin(&mut self, label: String) {
        self.log.push(format!("{label}: "));
        self.required.clear();
        self.promised_by.clear();
    }

    fn end_step(&mut self) -> Result<(), String> {
        let checked = self.check();
        if self.plan.verbose {
            if let Some(l) = self.log.last() {
                eprintln!("model {}: {l}", self.seed);
            }
        }
        checked
    }

    // ---- random choices ----

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.below(100) < percent
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.rng.below(items.len() as u64) as usize].clone()
    }

    fn random_month(&mut self) -> String {
        if self.chance(35) {
            self.current_month.clone()
        } else {
            self.pick(&OLD_MONTHS).to_string()
        }
    }

    // ---- the steps ----

    fn setup(&mut self) -> Result<(), String> {
        self.begin("setup".into());
        let n = 30 + self.rng.below(40) as usize;
        let rows: Vec<NewRow> = (0..n).map(|_| self.good_row()).collect();
        self.insert_committed(rows, "")?;
        let spec = self.spec(Kind::Rest, WAIT_MS);
        self.run(spec, Circumstances::default())?;
        self.end_step()
    }

    fn step(&mut self, i: usize) -> Result<(), String> {
        if i % 5 == 0 && !self.plan.skip.contains("quota") {
            self.begin(format!("{i:3} quota"));
            self.set_quota()?;
            self.end_step()?;
        }
        let op = self.choose();
        self.begin(format!("{i:3} {}", op.name()));
        self.stats.steps += 1;
        *self.stats.ops.entry(op.name()).or_default() += 1;
        self.perform(op)?;
        self.end_step()
    }

    /// `quota set --default` with a limit and thresholds of the quota's own
    /// random stream; it records what the open months already reached.
    fn set_quota(&mut self) -> Result<(), String> {
        let limits = [8i64, 15, 30, 60];
        let sets: [&[i32]; 3] = [&[50, 100], &[25, 50, 100, 200], &[80, 100]];
        let limit = limits[self.quota_rng.below(limits.len() as u64) as usize];
        let thresholds = sets[self.quota_rng.below(sets.len() as u64) as usize].to_vec();
        let list: Vec<String> = thresholds.iter().map(i32::to_string).collect();
        let args: Vec<String> = [
            "quota",
            "set",
            "--env",
            "dev",
            "--default",
            "--limit",
            &limit.to_string(),
            "--thresholds",
            &list.join(","),
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = self.command(&args, None).output().expect("run usage-agg");
        let ran = ran_of(
            format!(
                "quota set --default --limit {limit} --thresholds {}",
                list.join(",")
            ),
            out,
        );
        self.note(&ran.short());
        if ran.status != 0 {
            return Err(format!("quota set failed: {}", ran.detail()));
        }
        self.quota = Some((limit, thresholds));
        Ok(())
    }

    /// One alert per crossing, as far as a step can tell (the module's doc).
    fn check_alerts(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let unreached: Vec<String> = self
            .db
            .query(
                "SELECT portal_id || ':' || month_year || ' ' || threshold_percent || '% of ' || request_limit
                        || ' at ' || request_count
                   FROM portal_usage_alerts
                  WHERE request_count::numeric * 100 < request_limit::numeric * threshold_percent",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !unreached.is_empty() {
            problems.push(format!(
                "ALERT NOT REACHED: alerts recorded below their threshold: {}",
                unreached.join("; ")
            ));
        }
        let twice: i64 = self
            .db
            .query_one(
                "SELECT count(*) - count(DISTINCT (portal_id, month_year, threshold_percent, request_limit))
                   FROM portal_usage_alerts",
                &[],
            )
            .unwrap()
            .get(0);
        if twice != 0 {
            problems.push(format!("ALERT TWICE: {twice} alerts repeat a crossing"));
        }
        let closed: Vec<(String, i64)> = self
            .alerts_at_close
            .iter()
            .map(|(m, n)| (m.clone(), *n))
            .collect();
        for (m, at_close) in closed {
            let now = self.alerts_of(&m);
            if now != at_close {
                problems.push(format!(
                    "CLOSED MONTH ALERTED: {m} had {at_close} alerts when it closed, {now} now"
                ));
            }
        }
        problems
    }

    fn alerts_of(&mut self, month: &str) -> i64 {
        self.db
            .query_one(
                "SELECT count(*) FROM portal_usage_alerts WHERE month_year = $1",
                &[&month],
            )
            .unwrap()
            .get(0)
    }

    /// At the end of a seed: every open month never reopened has an alert
    /// for each threshold of the current quota its usage reached.
    fn check_alerts_complete(&mut self) -> Result<(), String> {
        let Some((limit, thresholds)) = self.quota.clone() else {
            return Ok(());
        };
        let skip: Vec<String> = self
            .reopened
            .iter()
            .chain(self.closed.keys())
            .cloned()
            .collect();
        let missing: Vec<String> = self
            .db
            .query(
                "WITH u AS (
                   SELECT m.portal_id, m.month_year,
                          m.request_count + coalesce((SELECT sum(a.request_count) FROM portal_usage_adjustments a
                                                       WHERE a.portal_id = m.portal_id AND a.month_year = m.month_year
                                                         AND a.source = 'late'), 0) AS n
                     FROM portal_usage_monthly m WHERE NOT (m.month_year = ANY ($1)))
                 SELECT u.portal_id || ':' || u.month_year || ' at ' || u.n || ' reached ' || t || '%'
                   FROM u, unnest($3::int[]) t
                  WHERE u.n * 100 >= $2::bigint * t
                    AND NOT EXISTS (SELECT 1 FROM portal_usage_alerts a
                                     WHERE a.portal_id = u.portal_id AND a.month_year = u.month_year
                                       AND a.threshold_percent = t AND a.request_limit = $2::bigint)",
                &[&skip, &limit, &thresholds],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "ALERT MISSING: thresholds of the quota ({limit}, {thresholds:?}) reached with no alert: {}{}",
                missing.join("; "),
                self.dump()
            ))
        }
    }

    fn cursor(&mut self) -> Option<i64> {
        self.db
            .query_opt(
                "SELECT cursor_id FROM usage_aggregation_state WHERE job = 'default'",
                &[],
            )
            .unwrap()
            .and_then(|r| r.get(0))
    }

    /// Whether a reset of the ids is recorded (by the triggers, or by a
    /// rebase that has not finished): runs refuse until a rebase.
    fn reset_recorded(&mut self) -> bool {
        self.db
            .query_opt(
                "SELECT reset_reason IS NOT NULL FROM usage_aggregation_state WHERE job = 'default'",
                &[],
            )
            .unwrap()
            .is_some_and(|r| r.get(0))
    }

    fn choose(&mut self) -> Op {
        let writers = self.writers.len();
        let cursor = self.cursor();
        let has_cursor = cursor.is_some();
        let repair = self.reset || self.reset_recorded();
        // Only a rebase repairs a restarted sequence.
        let restart = !self.reset && writers == 0 && has_cursor && self.allowed("rebase");
        let quiet = writers == 0;
        // No transaction is held open while the sequence is behind: the
        // first one to insert a low id locks the state row in the INSERT
        // trigger (usage_agg_note_low_ids) until it ends, and every other
        // insert of a low id waits for it, this test's own included (found
        // by this test on b0857e7: a webhook insert waits as long as any
        // open transaction that inserted a low id).
        let hold = writers < 2 && !self.reset;
        let weights: Vec<(Op, u64)> = vec![
            (Op::Insert, 16),
            (Op::InsertBad, 3),
            (Op::InsertRolledBack, 2),
            (Op::HoldWriter, if hold { 3 } else { 0 }),
            (Op::Prepare, if self.prepared && hold { 2 } else { 0 }),
            (Op::EndWriter, if writers > 0 { 10 } else { 0 }),
            (
                Op::LateCommit,
                if writers > 0 {
                    4
                } else if hold {
                    2
                } else {
                    0
                },
            ),
            (Op::Rest, 10),
            (Op::Rpc, 7),
            (Op::Scheduled, 5),
            (
                Op::Full,
                if self.lost.is_empty() && !self.lost_reported {
                    3
                } else {
                    10
                },
            ),
            (Op::Month, 3),
            (Op::Overlap, if quiet { 4 } else { 0 }),
            (Op::Kill, if quiet { 7 } else { 2 }),
            (Op::Stale, if quiet { 3 } else { 0 }),
            (Op::Close, if quiet { 5 } else { 0 }),
            (Op::Reopen, if self.closed.is_empty() { 0 } else { 5 }),
            (Op::Adjust, 4),
            (Op::Prune, if quiet { 3 } else { 0 }),
            (Op::DeleteMonthly, 2),
            (Op::Sabotage, if quiet && has_cursor { 2 } else { 0 }),
            (Op::ResetSequence, if restart { 2 } else { 0 }),
            (Op::Rebase, if repair { 12 } else { 1 }),
            (Op::Verify, if quiet && has_cursor { 3 } else { 0 }),
            (Op::AutoClose, if quiet { 1 } else { 0 }),
        ];
        let weights: Vec<(Op, u64)> = weights
            .into_iter()
            .filter(|(op, w)| *w > 0 && !self.plan.skip.contains(op.name()))
            .collect();
        let total: u64 = weights.iter().map(|(_, w)| w).sum();
        let mut at = self.rng.below(total);
        for (op, w) in &weights {
            if at < *w {
                return *op;
            }
            at -= w;
        }
        unreachable!()
    }

    fn perform(&mut self, op: Op) -> Result<(), String> {
        match op {
            Op::Insert => {
                let n = 1 + self.rng.below(25) as usize;
                let rows: Vec<NewRow> = (0..n).map(|_| self.good_row()).collect();
                self.insert_committed(rows, "").map(|_| ())
            }
            Op::InsertBad => {
                let n = 1 + self.rng.below(3) as usize;
                let mut rows: Vec<NewRow> = (0..n).map(|_| self.bad_row()).collect();
                for _ in 0..self.rng.below(4) {
                    rows.push(self.good_row());
                }
                self.insert_committed(rows, "").map(|_| ())
            }
            Op::InsertRolledBack => {
                let n = 1 + self.rng.below(30) as usize;
                let rows: Vec<NewRow> = (0..n).map(|_| self.good_row()).collect();
                let mut conn = self.stack.sql();
                conn.batch_execute("BEGIN").unwrap();
                let got = exec_insert(&mut conn, &rows);
                conn.batch_execute("ROLLBACK").unwrap();
                let idx = self.register(got, RowState::RolledBack)?;
                let text = format!("{} rows rolled back ({})", idx.len(), self.ids(&idx));
                self.note(&text);
                Ok(())
            }
            Op::HoldWriter | Op::Prepare => self.open_writer(op == Op::Prepare).map(|_| ()),
            Op::EndWriter => {
                let i = self.rng.below(self.writers.len() as u64) as usize;
                let commit = self.chance(80);
                self.end_writer(i, commit);
                Ok(())
            }
            Op::LateCommit => self.late_commit(),
            Op::Rest => self.simple(Kind::Rest),
            Op::Rpc => self.simple(Kind::Rpc),
            Op::Scheduled => self.simple(Kind::Scheduled),
            Op::Full => self.simple(Kind::Full),
            Op::Month => self.simple(Kind::Month),
            Op::Overlap => self.overlap(),
            Op::Kill => self.kill(),
            Op::Stale => self.stale(),
            Op::Close => {
                let month = self.close_candidate();
                self.close(&month, None, false)
            }
            Op::Reopen => {
                let closed: Vec<String> = self.closed.keys().cloned().collect();
                let month = if self.chance(90) {
                    self.pick(&closed)
                } else {
                    self.pick(&OLD_MONTHS).to_string()
                };
                self.reopen(&month)
            }
            Op::Adjust => self.adjust(),
            Op::Prune => {
                let before = self.prune_candidate();
                self.prune(&before, None)
            }
            Op::DeleteMonthly => self.delete_monthly(),
            Op::Sabotage => self.sabotage(),
            Op::ResetSequence => self.reset_sequence(),
            Op::Rebase => self.simple(Kind::Rebase),
            Op::Verify => self.verify(),
            Op::AutoClose => self.auto_close(),
        }
    }

    // ---- rows ----

    fn good_row(&mut self) -> NewRow {
        let month = self.random_month();
        NewRow {
            portal: 1 + self.rng.below(PORTALS) as i64,
            ts: format!(
                "'{month}-{:02} {:02}:{:02}:00'",
                1 + self.rng.below(28),
                self.rng.below(24),
                self.rng.below(60)
            ),
            success: !self.chance(15),
            month,
        }
    }

    fn bad_row(&mut self) -> NewRow {
        let mut r = self.good_row();
        match self.rng.below(4) {
            0 => r.portal = -(r.portal),
            1 => r.month = "2024-13".into(),
            2 => r.ts = "'12025-01-01 00:00:00'".into(),
            _ => r.ts = "'0044-03-15 00:00:00 BC'".into(),
        }
        r
    }

    /// Takes the rows an INSERT returned into the model.
    fn register(
        &mut self,
        got: Vec<(i64, i64, String, bool, bool)>,
        state: RowState,
    ) -> Result<Vec<usize>, String> {
        let mut idx = Vec::new();
        for (id, portal, month, success, good) in got {
            if id <= self.top_id()
                && self.rows.iter().any(|r| {
                    r.id == id && r.state != RowState::RolledBack && r.state != RowState::Pruned
                })
            {
                return Err(format!("harness: id {id} handed out twice"));
            }
            idx.push(self.rows.len());
            self.rows.push(RowRec {
                id,
                key: (portal, month),
                success,
                good,
                state,
            });
        }
        Ok(idx)
    }

    fn ids(&self, idx: &[usize]) -> String {
        let ids: Vec<i64> = idx.iter().map(|i| self.rows[*i].id).collect();
        match (ids.iter().min(), ids.iter().max()) {
            (Some(a), Some(b)) if a == b => format!("id {a}"),
            (Some(a), Some(b)) => format!("ids {a}..{b}"),
            _ => "none".into(),
        }
    }

    fn describe_rows(&self, idx: &[usize]) -> String {
        let mut by: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for i in idx {
            let r = &self.rows[*i];
            let e = by.entry(key_text(&r.key)).or_default();
            if r.good {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        by.iter()
            .map(|(k, (g, b))| match (g, b) {
                (g, 0) => format!("{k} x{g}"),
                (0, b) => format!("{k} x{b} bad"),
                (g, b) => format!("{k} x{g} +{b} bad"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn insert_committed(&mut self, rows: Vec<NewRow>, what: &str) -> Result<Vec<usize>, String> {
        let got = exec_insert(&mut self.db, &rows);
        let idx = self.register(got, RowState::Committed)?;
        let text = format!(
            "{what}{} rows committed, {}: {}",
            idx.len(),
            self.ids(&idx),
            self.describe_rows(&idx)
        );
        self.note(&text);
        Ok(idx)
    }

    /// Opens a transaction that inserts rows and stays open (or is
    /// prepared); returns its index among the writers.
    fn open_writer(&mut self, prepare: bool) -> Result<usize, String> {
        let n = 1 + self.rng.below(5) as usize;
        let rows: Vec<NewRow> = (0..n)
            .map(|_| {
                if self.chance(10) {
                    self.bad_row()
                } else {
                    self.good_row()
                }
            })
            .collect();
        let mut conn = self.stack.sql();
        conn.batch_execute("BEGIN").unwrap();
        let got = exec_insert(&mut conn, &rows);
        let held = if prepare {
            let gid = format!(
                "usage-agg-model-{}-{}",
                std::process::id(),
                GIDS.fetch_add(1, Ordering::SeqCst)
            );
            conn.batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
                .unwrap();
            Held::Prepared(gid)
        } else {
            Held::Session(Box::new(conn))
        };
        let idx = self.register(got, RowState::Pending)?;
        let text = format!(
            "{} holds {} rows open, {}: {}",
            match &held {
                Held::Session(_) => "a session".to_string(),
                Held::Prepared(gid) => format!("prepared transaction {gid}"),
            },
            idx.len(),
            self.ids(&idx),
            self.describe_rows(&idx)
        );
        self.note(&text);
        self.writers.push(Writer { held, rows: idx });
        Ok(self.writers.len() - 1)
    }

    fn end_writer(&mut self, i: usize, commit: bool) {
        let w = self.writers.remove(i);
        let verb = if commit { "COMMIT" } else { "ROLLBACK" };
        match w.held {
            Held::Session(mut c) => c.batch_execute(verb).unwrap(),
            Held::Prepared(gid) => self
                .db
                .batch_execute(&format!("{verb} PREPARED '{gid}'"))
                .unwrap(),
        }
        for r in &w.rows {
            self.rows[*r].state = if commit {
                RowState::Committed
            } else {
                RowState::RolledBack
            };
        }
        let text = format!(
            "{} the writer of {}",
            if commit { "committed" } else { "rolled back" },
            self.ids(&w.rows)
        );
        self.note(&text);
    }

    // ---- what is true ----

    /// Every key's good committed rows, pruned ones included.
    fn truth(&self) -> BTreeMap<Key, Tally> {
        let mut t: BTreeMap<Key, Tally> = BTreeMap::new();
        for r in &self.rows {
            if r.good && matches!(r.state, RowState::Committed | RowState::Pruned) {
                t.entry(r.key.clone()).or_default().add(r.success);
            }
        }
        t
    }

    /// What the database holds for every key, for a finding's reader:
    /// monthly rows, adjustments and pruned records, with watermarks.
    fn dump(&mut self) -> String {
        let rows = self
            .db
            .query(
                "SELECT 'monthly', portal_id, month_year::text, request_count::bigint, success_count::bigint,
                        last_request_id::bigint, -1::bigint, coalesce(last_request_at::text, 'NULL')
                   FROM portal_usage_monthly
                 UNION ALL
                 SELECT 'adj:' || source, portal_id, month_year, request_count, success_count,
                        coalesce(last_request_id, -1), coalesce(counted_from_id, -1), booked_month || ' ' || coalesce(last_request_at::text, 'NULL')
                   FROM portal_usage_adjustments
                 UNION ALL
                 SELECT 'pruned', portal_id, month_year, request_count, success_count, -1, -1,
                        coalesce(last_request_at::text, 'NULL')
                   FROM usage_agg_pruned
                 ORDER BY 2, 3, 1",
                &[],
            )
            .unwrap();
        let mut out = String::from("\n--- the database (kind portal month n s watermark counted_from [booked_month] last_request_at)\n");
        for r in rows {
            out.push_str(&format!(
                "{} {} {} {} {} {} {} {}\n",
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                r.get::<_, String>(2),
                r.get::<_, i64>(3),
                r.get::<_, i64>(4),
                r.get::<_, i64>(5),
                r.get::<_, i64>(6),
                r.get::<_, String>(7)
            ));
        }
        out
    }

    /// Each key's latest request time as billed (its monthly row and late
    /// adjustments) and as its good rows say (those there and those prune
    /// recorded), as text ('-' for none).
    fn latest_times(&mut self) -> Vec<(Key, String, String)> {
        self.db
            .query(
                "WITH billed AS (
                   SELECT portal_id, month_year, max(at) AS at FROM (
                     SELECT portal_id, month_year::text, last_request_at AS at FROM portal_usage_monthly
                     UNION ALL
                     SELECT portal_id, month_year, last_request_at FROM portal_usage_adjustments
                      WHERE source = 'late') x GROUP BY 1, 2),
                 rows_ AS (
                   SELECT portal_id, month_year, max(at) AS at FROM (
                     SELECT portal_id, month_year::text, request_timestamp AS at FROM usage_requests
                      WHERE success IS NOT NULL AND usage_agg_valid_key(portal_id, month_year::text)
                        AND usage_agg_valid_time(request_timestamp)
                     UNION ALL
                     SELECT portal_id, month_year, last_request_at FROM usage_agg_pruned) y GROUP BY 1, 2)
                 SELECT portal_id, month_year, coalesce(b.at::text, '-'), coalesce(r.at::text, '-')
                   FROM billed b FULL JOIN rows_ r USING (portal_id, month_year)",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2), r.get(3)))
            .collect()
    }

    /// What is counted for each key: its monthly row plus its late
    /// adjustments.
    fn stored(&mut self) -> BTreeMap<Key, Tally> {
        self.db
            .query(
                "SELECT portal_id, month_year, sum(n)::bigint, sum(s)::bigint, sum(e)::bigint FROM (
                   SELECT portal_id, month_year::text, request_count::bigint AS n,
                          success_count::bigint AS s, error_count::bigint AS e
                     FROM portal_usage_monthly
                   UNION ALL
                   SELECT portal_id, month_year, request_count, success_count, error_count
                     FROM portal_usage_adjustments WHERE source = 'late') x
                  GROUP BY 1, 2",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| {
                (
                    (r.get(0), r.get(1)),
                    Tally {
                        n: r.get(2),
                        s: r.get(3),
                        e: r.get(4),
                    },
                )
            })
            .collect()
    }

    fn snapshot(&mut self, month: &str) -> Snapshot {
        let monthly = self
            .db
            .query(
                "SELECT portal_id || ' ' || request_count || ' ' || success_count || ' ' || error_count
                        || ' ' || coalesce(last_request_at::text, '-')
                   FROM portal_usage_monthly WHERE month_year = $1 ORDER BY portal_id",
                &[&month],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let booked = self
            .db
            .query(
                "SELECT idempotency_key || ' ' || request_count || ' ' || success_count || ' '
                        || error_count || ' ' || coalesce(last_request_at::text, '-')
                   FROM portal_usage_adjustments WHERE booked_month = $1 ORDER BY idempotency_key",
                &[&month],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        Snapshot { monthly, booked }
    }

    fn closed_in_db(&mut self) -> BTreeSet<String> {
        self.db
            .query(
                "SELECT month_year FROM usage_agg_closed_months WHERE closed",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Where an adjustment for `month` is booked: the month itself, or the
    /// month after the newest closed one when that is later.
    fn booking(&self, month: &str) -> String {
        match self.closed.keys().next_back() {
            Some(newest) => next_month(newest).max(month.to_string()),
            None => month.to_string(),
        }
    }

    fn promise(&mut self, at_start: &BTreeMap<Key, Tally>, by: &str) {
        for (k, t) in at_start {
            let e = self.required.entry(k.clone()).or_default();
            *e = e.max(t);
        }
        self.promised_by.push(by.to_string());
    }

    /// The checks after every step (see the module's doc).
    fn check(&mut self) -> Result<(), String> {
        let mut problems = Vec::new();
        let truth = self.truth();
        let stored = self.stored();
        let keys: BTreeSet<&Key> = truth.keys().chain(stored.keys()).collect();
        let zero = Tally::default();
        let over: Vec<String> = keys
            .iter()
            .filter(|k| {
                !stored
                    .get(**k)
                    .unwrap_or(&zero)
                    .within(truth.get(**k).unwrap_or(&zero))
            })
            .map(|k| {
                format!(
                    "{} holds {} with {} good rows",
                    key_text(k),
                    stored.get(*k).unwrap_or(&zero),
                    truth.get(*k).unwrap_or(&zero)
                )
            })
            .collect();
        if !over.is_empty() {
            problems.push(format!(
                "COUNTED TWICE: keys hold more (monthly row + late adjustments) than their good rows: {}",
                over.join("; ")
            ));
        }
        let short: Vec<String> = self
            .required
            .iter()
            .filter(|(k, req)| !req.within(stored.get(*k).unwrap_or(&zero)))
            .map(|(k, req)| {
                format!(
                    "{} holds {} of {req}",
                    key_text(k),
                    stored.get(k).unwrap_or(&zero)
                )
            })
            .collect();
        if !short.is_empty() {
            problems.push(format!(
                "NOT COUNTED: after {} succeeded, keys hold fewer than their good rows committed before it \
                 started: {}",
                self.promised_by.join(" and "),
                short.join("; ")
            ));
        }
        let in_db = self.closed_in_db();
        let model: BTreeSet<String> = self.closed.keys().cloned().collect();
        if in_db != model {
            problems.push(format!(
                "closed months: the database says {in_db:?}, the model {model:?}"
            ));
        }
        let closed: Vec<(String, Snapshot)> = self
            .closed
            .iter()
            .map(|(m, s)| (m.clone(), s.clone()))
            .collect();
        for (m, snap) in closed {
            let now = self.snapshot(&m);
            if now != snap {
                problems.push(format!(
                    "CLOSED MONTH CHANGED: {m} closed with monthly rows {:?} and booked {:?}; now {:?} and {:?}",
                    snap.monthly, snap.booked, now.monthly, now.booked
                ));
            }
        }
        let manual: BTreeMap<String, Manual> = self
            .db
            .query(
                "SELECT idempotency_key, portal_id, month_year, request_count, success_count, error_count,
                        booked_month
                   FROM portal_usage_adjustments WHERE source = 'manual'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    Manual {
                        portal: r.get(1),
                        month: r.get(2),
                        n: r.get(3),
                        s: r.get(4),
                        e: r.get(5),
                        booked: r.get(6),
                    },
                )
            })
            .collect();
        if manual != self.manual {
            problems.push(format!(
                "manual adjustments: the database holds {manual:?}, the model booked {:?}",
                self.manual
            ));
        }
        let mut pruned: BTreeMap<Key, Tally> = BTreeMap::new();
        for r in &self.rows {
            if r.good && r.state == RowState::Pruned {
                pruned.entry(r.key.clone()).or_default().add(r.success);
            }
        }
        let booked: BTreeMap<Key, Tally> = self
            .db
            .query(
                "SELECT portal_id, month_year, request_count, success_count, error_count
                   FROM usage_agg_pruned WHERE request_count <> 0",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| {
                (
                    (r.get(0), r.get(1)),
                    Tally {
                        n: r.get(2),
                        s: r.get(3),
                        e: r.get(4),
                    },
                )
            })
            .collect();
        if booked != pruned {
            problems.push(format!(
                "usage_agg_pruned holds {booked:?}, the model pruned {pruned:?}"
            ));
        }
        let times: Vec<String> = self
            .latest_times()
            .into_iter()
            .filter(|(k, _, _)| stored.get(k) == truth.get(k))
            .filter(|(_, billed, rows)| billed != rows)
            .map(|(k, billed, rows)| {
                format!(
                    "{} says its latest request was at {billed}, its rows at {rows}",
                    key_text(&k)
                )
            })
            .collect();
        if !times.is_empty() {
            problems.push(format!(
                "WRONG LAST REQUEST TIME: keys whose counts are complete: {}",
                times.join("; ")
            ));
        }
        if let Some(p) = self.check_usage_current(&stored, &truth) {
            problems.push(p);
        }
        problems.extend(self.check_alerts());
        if self.mark_lost {
            self.mark_lost = false;
            for k in &keys {
                if !truth
                    .get(*k)
                    .unwrap_or(&zero)
                    .within(stored.get(*k).unwrap_or(&zero))
                {
                    self.lost.insert((*k).clone());
                }
            }
        }
        let still: BTreeSet<Key> = self
            .lost
            .iter()
            .filter(|k| {
                !truth
                    .get(*k)
                    .unwrap_or(&zero)
                    .within(stored.get(*k).unwrap_or(&zero))
            })
            .cloned()
            .collect();
        self.lost = still;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("{}{}", problems.join("\n"), self.dump()))
        }
    }

    // ---- runs ----

    /// A run of `kind` with random options (none changes a total).
    fn spec(&mut self, kind: Kind, wait_ms: u64) -> Spec {
        let mut args: Vec<String> = ["aggregate", "--env", "dev", "--json", "--horizon-wait-ms"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(wait_ms.to_string());
        match kind {
            Kind::Rpc => {
                args.extend(["--engine", "rpc", "--batch-pause", "0s"].map(String::from));
                if self.chance(70) {
                    let b = 1 + self.rng.below(300);
                    args.extend(["--batch-size".to_string(), b.to_string()]);
                }
            }
            Kind::Scheduled => {}
            _ => {
                match kind {
                    Kind::Rest if self.chance(70) => {
                        let b = 1 + self.rng.below(300);
                        args.extend(["--batch-size".to_string(), b.to_string()]);
                    }
                    Kind::Full => args.push("--full".into()),
                    Kind::Month => {
                        let m = self.random_month();
                        args.extend(["--month".to_string(), m]);
                    }
                    Kind::Rebase => args.push("--rebase".into()),
                    _ => {}
                }
                if matches!(kind, Kind::Full | Kind::Month) && self.chance(25) {
                    args.push("--allow-decrease".into());
                }
                if self.chance(60) {
                    let p = 1 + self.rng.below(120);
                    args.extend(["--page-size".to_string(), p.to_string()]);
                }
                if self.chance(70) {
                    args.push("--aggressive".into());
                }
                if self.chance(30) {
                    let c = 1 + self.rng.below(4);
                    args.extend(["--concurrency".to_string(), c.to_string()]);
                }
            }
        }
        let batch = if self.chance(50) {
            1 + self.rng.below(300)
        } else {
            1_000_000
        };
        Spec {
            kind,
            args,
            call: (batch, wait_ms),
            failpoint: None,
        }
    }

    fn command(&self, args: &[String], failpoint: Option<&str>) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_usage-agg"));
        c.args(args)
            .current_dir(&self.dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.stack.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(f) = failpoint {
            c.env("USAGE_AGG_FAILPOINTS", f);
        }
        c
    }

    fn start(&mut self, spec: &Spec) -> Started {
        if spec.kind == Kind::Scheduled {
            let mut conn = self.stack.sql();
            let (batch, wait) = spec.call;
            let desc = spec.desc();
            Started::Call(std::thread::spawn(move || {
                call_scheduled(&mut conn, batch, wait, desc)
            }))
        } else {
            let child = self
                .command(&spec.args, spec.failpoint.as_deref())
                .spawn()
                .expect("start usage-agg");
            Started::Cli(child, spec.desc())
        }
    }

    fn finish(started: Started) -> Ran {
        match started {
            Started::Cli(child, desc) => ran_of(desc, child.wait_with_output().unwrap()),
            Started::Call(h) => h.join().unwrap(),
        }
    }

    /// Starts a run, waits for it, and judges how it ended.
    fn run(&mut self, spec: Spec, mut c: Circumstances) -> Result<Ran, String> {
        c.writers |= !self.writers.is_empty();
        c.failpoint |= spec.failpoint.is_some();
        let at_start = self.truth();
        let kind = spec.kind;
        let started = self.start(&spec);
        let ran = Self::finish(started);
        if self.plan.verbose && ran.status != 0 {
            eprintln!("--- {}\n{}", ran.desc, ran.text);
        }
        self.judge(kind, &ran, &c, &at_start)?;
        Ok(ran)
    }

    fn simple(&mut self, kind: Kind) -> Result<(), String> {
        let spec = self.spec(kind, WAIT_MS);
        self.run(spec, Circumstances::default()).map(|_| ())
    }

    /// Whether `ran` ended as the contract allows, given `c`; a promise
    /// recorded when it succeeded.
    fn judge(
        &mut self,
        kind: Kind,
        ran: &Ran,
        c: &Circumstances,
        at_start: &BTreeMap<Key, Tally>,
    ) -> Result<(), String> {
        *self
            .stats
            .runs
            .entry(format!("{} {} {}", kind.name(), ran.status, ran.outcome))
            .or_default() += 1;
        self.note(&ran.short());
        if kind == Kind::Rebase {
            self.after_rebase(ran)?;
        }
        let refusal = self.reset || self.reset_recorded();
        let lost = !self.lost.is_empty() || self.lost_reported || c.sabotage;
        let success = match (kind, ran.status, ran.outcome.as_str()) {
            (Kind::Scheduled, 0, "ok") | (Kind::Scheduled, 1, "bad_rows") => true,
            (Kind::Scheduled, 0, "skipped") => false,
            (Kind::Scheduled, 0, "stopped") if c.writers || c.contention => false,
            (Kind::Scheduled, 1, "refused" | "needs_rebuild") if refusal => false,
            (Kind::Scheduled, 1, "writes_lost") if lost => {
                self.mark_lost = true;
                self.lost_reported = true;
                false
            }
            (Kind::Scheduled, 1, "decreases_refused") if lost => false,
            (Kind::Scheduled, _, _) => return Err(format!("unexpected end: {}", ran.detail())),
            (_, 0, _) | (_, 65, "bad_rows") => true,
            (_, 65, "writes_lost") if lost => {
                self.mark_lost = true;
                self.lost_reported = true;
                false
            }
            (_, 65, "decreases_refused") if lost => false,
            (_, 65, "failed") if refusal => false,
            // Book or refuse, never drop (issue 17): a rebase may refuse
            // what it cannot book, with exit 65 and the repair.
            (Kind::Rebase, 65, "failed") => false,
            (_, 75, _) if c.writers || c.contention => false,
            (_, -1, _) if c.failpoint => false,
            _ => return Err(format!("unexpected exit status: {}", ran.detail())),
        };
        if success && kind.promises() {
            self.promise(at_start, &ran.short());
        }
        if success && matches!(kind, Kind::Full | Kind::Rebase) {
            self.lost_reported = false;
        }
        Ok(())
    }

    /// A rebase that finished repairs a restarted sequence.
    fn after_rebase(&mut self, ran: &Ran) -> Result<(), String> {
        if ran.status == 0 || (ran.status == 65 && ran.outcome == "bad_rows") {
            self.reset = false;
        }
        Ok(())
    }

    /// Whether USAGE_AGG_MODEL_SKIP leaves this operation in (also where
    /// another operation makes it: a close or a prune killed, a close
    /// beside a run).
    fn allowed(&self, op: &str) -> bool {
        !self.plan.skip.contains(op)
    }

    /// One of `kinds`, not one USAGE_AGG_MODEL_SKIP names (a plain REST
    /// run if it names them all).
    fn random_kind(&mut self, kinds: &[Kind]) -> Kind {
        let allowed: Vec<Kind> = kinds
            .iter()
            .copied()
            .filter(|k| !self.plan.skip.contains(k.name()))
            .collect();
        if allowed.is_empty() {
            Kind::Rest
        } else {
            self.pick(&allowed)
        }
    }

    /// Two runs started at once; or a prune beside `verify`, which must not
    /// see drift the prune makes up.
    fn overlap(&mut self) -> Result<(), String> {
        if self.chance(20) && self.allowed("prune") && self.allowed("verify") {
            let before = self.prune_candidate();
            let call = self.prune_call(&before, None);
            let expect = self.verify_expectation();
            let prune = self
                .command(&call.args, None)
                .spawn()
                .expect("start usage-agg");
            let verify = self.run_verify();
            let ran = ran_of(call.desc.clone(), prune.wait_with_output().unwrap());
            self.prune_finish(&call, &ran)?;
            return self.verify_finish(&expect, &verify);
        }
        if self.chance(25) && self.allowed("close") {
            // A close or a reopening while a run counts (docs/semantics.md,
            // "Closes and reopenings during a run").
            let kind = self.random_kind(&[Kind::Rest, Kind::Rpc, Kind::Scheduled, Kind::Full]);
            let spec = self.spec(kind, WAIT_MS);
            let reopen = !self.closed.is_empty() && self.allowed("reopen") && self.chance(40);
            let month = if reopen {
                let closed: Vec<String> = self.closed.keys().cloned().collect();
                self.pick(&closed)
            } else {
                self.close_candidate()
            };
            let at_start = self.truth();
            let run = self.start(&spec);
            let (args, desc) = if reopen {
                (self.reopen_args(&month), format!("reopen {month}"))
            } else {
                close_args(&month, &None)
            };
            let other = self.command(&args, None).output().expect("run usage-agg");
            let ran = Self::finish(run);
            let other = ran_of(desc, other);
            let c = Circumstances {
                contention: true,
                ..Circumstances::default()
            };
            if reopen {
                self.reopen_finish(&month, &other)?;
            } else {
                self.close_finish(&month, &other, false, true, &at_start)?;
            }
            return self.judge(kind, &ran, &c, &at_start);
        }
        let kinds = [
            Kind::Rest,
            Kind::Rpc,
            Kind::Scheduled,
            Kind::Full,
            Kind::Month,
        ];
        let a = self.random_kind(&kinds);
        let b = self.random_kind(&kinds);
        let (sa, sb) = (self.spec(a, WAIT_MS), self.spec(b, WAIT_MS));
        let at_start = self.truth();
        let (ta, tb) = (self.start(&sa), self.start(&sb));
        let (ra, rb) = (Self::finish(ta), Self::finish(tb));
        let c = || Circumstances {
            contention: true,
            ..Circumstances::default()
        };
        self.judge(a, &ra, &c(), &at_start)?;
        self.judge(b, &rb, &c(), &at_start)
    }

    /// A run killed (SIGABRT, as kill -9 leaves it) at a failpoint.
    fn kill(&mut self) -> Result<(), String> {
        // Rows to count, most of the time, so that the run has work to die
        // in.
        if self.chance(70) {
            let n = 1 + self.rng.below(40) as usize;
            let rows: Vec<NewRow> = (0..n).map(|_| self.good_row()).collect();
            self.insert_committed(rows, "first ")?;
        }
        let at = 1 + self.rng.below(2);
        match self.rng.below(10) {
            0 if self.allowed("close") => {
                // The catch-up run and the drift check of a close.
                let point = self.pick(&POINTS);
                let month = self.close_candidate();
                self.close(&month, Some(format!("{point}=abort@{at}")), false)
            }
            1 if self.allowed("prune") => {
                // Between batches of a prune.
                let before = self.prune_candidate();
                self.prune(&before, Some(format!("page=abort@{at}")))
            }
            _ => {
                let kind = self.random_kind(&[
                    Kind::Rest,
                    Kind::Rest,
                    Kind::Rpc,
                    Kind::Full,
                    Kind::Month,
                    Kind::Rebase,
                ]);
                // The points each kind of run reaches: an incremental run
                // pages, writes chunks and moves the cursor; a rebuild
                // recounts first; the server-side engine stops between
                // batches ("page").
                let point = match kind {
                    Kind::Rest => self.pick(&incremental_points()),
                    Kind::Rpc => "page",
                    Kind::Month => self.pick(&["recount", "page", "chunk"]),
                    _ => self.pick(&POINTS),
                };
                let mut spec = self.spec(kind, WAIT_MS);
                spec.failpoint = Some(format!("{point}=abort@{at}"));
                self.run(spec, Circumstances::default()).map(|_| ())
            }
        }
    }

    /// A run paused at a failpoint, its lease run out, something else done
    /// meanwhile, then let go on.
    fn stale(&mut self) -> Result<(), String> {
        if self.chance(70) {
            let n = 1 + self.rng.below(40) as usize;
            let rows: Vec<NewRow> = (0..n).map(|_| self.good_row()).collect();
            self.insert_committed(rows, "first ")?;
        }
        let kind = self.random_kind(&[Kind::Rest, Kind::Rest, Kind::Full, Kind::Rpc]);
        let point = match kind {
            Kind::Rest => self.pick(&incremental_points()),
            Kind::Rpc => "page",
            _ => self.pick(&POINTS),
        };
        let mut spec = self.spec(kind, WAIT_MS);
        spec.failpoint = Some(format!("{point}=pause@{}", 1 + self.rng.below(2)));
        let desc = spec.desc();
        let at_start = self.truth();
        let mut child = self
            .command(&spec.args, spec.failpoint.as_deref())
            .spawn()
            .expect("start usage-agg");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let paused = loop {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap() == 0 {
                break false;
            }
            let reached = line.contains(&format!("failpoint {point} reached"));
            seen.push_str(&line);
            if reached {
                break true;
            }
        };
        let c = || Circumstances {
            contention: true,
            ..Circumstances::default()
        };
        if !paused {
            // It ended without reaching the point: a run like any other.
            let ran = finish_paused(child, stderr, seen, desc);
            return self.judge(kind, &ran, &Circumstances::default(), &at_start);
        }
        self.note(&format!("{desc} paused, its lease expired"));
        expire_lease(&self.stack);
        let outcome = (|| -> Result<(), String> {
            match self.rng.below(6) {
                0 => {
                    let k = self.random_kind(&[Kind::Rest, Kind::Rpc, Kind::Scheduled, Kind::Full]);
                    let s = self.spec(k, WAIT_MS);
                    self.run(s, c()).map(|_| ())
                }
                1 => {
                    let n = 1 + self.rng.below(15) as usize;
                    let rows: Vec<NewRow> = (0..n).map(|_| self.good_row()).collect();
                    self.insert_committed(rows, "meanwhile ")?;
                    let k = self.random_kind(&[Kind::Rest, Kind::Rpc, Kind::Scheduled]);
                    let s = self.spec(k, WAIT_MS);
                    self.run(s, c()).map(|_| ())
                }
                2 if !self.closed.is_empty() && self.allowed("reopen") && self.allowed("close") => {
                    // The case of billing.rs's stale run: a reopening and a
                    // second close while it holds rows of the month.
                    let closed: Vec<String> = self.closed.keys().cloned().collect();
                    let m = self.pick(&closed);
                    self.reopen(&m)?;
                    self.close(&m, None, true)
                }
                3 if self.allowed("close") => {
                    let m = self.close_candidate();
                    self.close(&m, None, true)
                }
                _ => Ok(()),
            }
        })();
        // Let it go on whatever happened meanwhile: a finding above is
        // reported with it.
        let ran = finish_paused(child, stderr, seen, format!("the paused {desc}"));
        outcome?;
        self.judge(kind, &ran, &c(), &at_start)
    }

    /// Rows held by a transaction that commits while a run waits for it at
    /// its horizon: the run must count them (their ids were drawn before it
    /// started, so they are at or below its horizon).
    fn late_commit(&mut self) -> Result<(), String> {
        while self.writers.len() > 1 {
            self.end_writer(0, true);
        }
        if self.writers.is_empty() {
            let prepare = self.prepared && self.chance(30);
            self.open_writer(prepare)?;
            let n = 1 + self.rng.below(10) as usize;
            let rows: Vec<NewRow> = (0..n).map(|_| self.good_row()).collect();
            self.insert_committed(rows, "after it ")?;
        }
        let kind = self.random_kind(&[Kind::Rest, Kind::Rpc, Kind::Scheduled, Kind::Full]);
        let spec = self.spec(kind, 7000);
        let before = self.truth();
        let started = self.start(&spec);
        let waiting = self.wait_for_a_horizon(&started);
        let commit = self.chance(85);
        if !waiting {
            // It ended first: it must not have succeeded past the writer.
            let ran = Self::finish(started);
            self.end_writer(0, commit);
            self.note("(it did not wait)");
            let c = Circumstances {
                writers: true,
                ..Circumstances::default()
            };
            self.judge(kind, &ran, &c, &before)?;
            if !self.promised_by.is_empty() {
                return Err(format!(
                    "a run succeeded without waiting for a transaction that held rows in flight: {}",
                    ran.detail()
                ));
            }
            return Ok(());
        }
        self.end_writer(0, commit);
        let ran = Self::finish(started);
        self.note("(it was waiting at its horizon)");
        // Counted, exactly: the rows were drawn before the run started.
        let at_start = if commit { self.truth() } else { before };
        self.judge(kind, &ran, &Circumstances::default(), &at_start)
    }

    /// Polls until a backend of this database sleeps in the horizon's wait
    /// loop (pg_sleep); false if the run ended first.
    fn wait_for_a_horizon(&mut self, started: &Started) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let sleeping: i64 = self
                .db
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND wait_event = 'PgSleep'
                        AND pid <> pg_backend_pid()",
                    &[],
                )
                .unwrap()
                .get(0);
            if sleeping > 0 {
                return true;
            }
            let ended = match started {
                Started::Cli(child, _) => {
                    // A zombie still has /proc; its status says it ended.
                    std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
                        .map_or(true, |s| s.contains(") Z "))
                }
                Started::Call(h) => h.is_finished(),
            };
            if ended || Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2)); // polling pg_stat_activity
        }
    }

    // ---- closed months ----

    fn close_candidate(&mut self) -> String {
        let open: Vec<String> = OLD_MONTHS
            .iter()
            .filter(|m| !self.closed.contains_key(**m))
            .map(|m| m.to_string())
            .collect();
        if !open.is_empty() && self.chance(40) {
            // The oldest open month, as billing closes them.
            open[0].clone()
        } else if !open.is_empty() && self.chance(70) {
            self.pick(&open)
        } else {
            self.pick(&OLD_MONTHS).to_string()
        }
    }

    fn close(
        &mut self,
        month: &str,
        failpoint: Option<String>,
        contention: bool,
    ) -> Result<(), String> {
        let at_start = self.truth();
        let (args, desc) = close_args(month, &failpoint);
        let out = self
            .command(&args, failpoint.as_deref())
            .output()
            .expect("run usage-agg");
        let ran = ran_of(desc, out);
        self.close_finish(month, &ran, failpoint.is_some(), contention, &at_start)
    }

    /// How a close ended, against the model (which it then updates: the
    /// snapshot of a month it closed).
    fn close_finish(
        &mut self,
        month: &str,
        ran: &Ran,
        failpoint: bool,
        contention: bool,
        at_start: &BTreeMap<Key, Tally>,
    ) -> Result<(), String> {
        let was_closed = self.closed.contains_key(month);
        *self
            .stats
            .runs
            .entry(format!("close {} {}", ran.status, ran.outcome))
            .or_default() += 1;
        self.note(&ran.short());
        let closed_now = self.closed_in_db().contains(month);
        let explained =
            !self.lost.is_empty() || self.lost_reported || self.reset || self.reset_recorded();
        let fine = match (ran.status, ran.outcome.as_str()) {
            (0, "closed") => !was_closed && closed_now,
            (0, "already_closed") => was_closed && closed_now,
            (65, _) => explained && closed_now == was_closed,
            (75, _) => (contention || !self.writers.is_empty()) && closed_now == was_closed,
            (-1, _) => failpoint,
            _ => false,
        };
        if !fine {
            return Err(format!(
                "unexpected close (the model had {month} {}, the database has it {}): {}",
                if was_closed { "closed" } else { "open" },
                if closed_now { "closed" } else { "open" },
                ran.detail()
            ));
        }
        if closed_now && !was_closed {
            self.take_snapshot(month)?;
            if ran.status == 0 {
                self.promise(at_start, &ran.short());
            }
        }
        Ok(())
    }

    /// A month just closed: its snapshot, checked against what the close
    /// recorded.
    fn take_snapshot(&mut self, month: &str) -> Result<(), String> {
        let snap = self.snapshot(month);
        let row = self
            .db
            .query_one(
                "SELECT request_count, success_count, error_count, keys FROM usage_agg_closed_months
                  WHERE month_year = $1",
                &[&month],
            )
            .unwrap();
        let (n, s, e, keys): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let sums = self
            .db
            .query_one(
                "SELECT coalesce(sum(request_count), 0)::bigint, coalesce(sum(success_count), 0)::bigint,
                        coalesce(sum(error_count), 0)::bigint, count(*)
                   FROM portal_usage_monthly WHERE month_year = $1",
                &[&month],
            )
            .unwrap();
        let now: (i64, i64, i64, i64) = (sums.get(0), sums.get(1), sums.get(2), sums.get(3));
        if (n, s, e, keys) != now {
            return Err(format!(
                "the close of {month} recorded {:?} (requests, successes, errors, keys), its rows hold {now:?}",
                (n, s, e, keys)
            ));
        }
        self.closed.insert(month.to_string(), snap);
        let alerts = self.alerts_of(month);
        self.alerts_at_close.insert(month.to_string(), alerts);
        Ok(())
    }

    /// `aggregate --auto-close 72h`: the run, then every open month with
    /// usage past its grace closed (here: every old month with a monthly
    /// row), each only if its keys agree with their rows.
    fn auto_close(&mut self) -> Result<(), String> {
        let mut spec = self.spec(Kind::Rest, WAIT_MS);
        spec.args
            .extend(["--auto-close".to_string(), "72h".to_string()]);
        let at_start = self.truth();
        let out = self
            .command(&spec.args, None)
            .output()
            .expect("run usage-agg");
        let mut ran = ran_of(spec.desc(), out);
        let v: serde_json::Value = ran
            .text
            .lines()
            .find_map(|l| serde_json::from_str(l.trim()).ok())
            .unwrap_or_default();
        let list = |field: &str| -> Vec<String> {
            v[field]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|m| {
                            m.as_str()
                                .or_else(|| m["month"].as_str())
                                .unwrap_or_default()
                                .to_string()
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let (closed, refused) = (list("auto_closed"), list("auto_close_refused"));
        let explained =
            !self.lost.is_empty() || self.lost_reported || self.reset || self.reset_recorded();
        if !refused.is_empty() {
            self.note(&format!("auto-close refused {refused:?}"));
            if !explained {
                return Err(format!(
                    "auto-close refused months with nothing wrong: {}",
                    ran.detail()
                ));
            }
            if ran.status == 65 && ran.outcome == "ok" {
                ran.status = 0; // the run itself succeeded
            }
        }
        self.judge(Kind::Rest, &ran, &Circumstances::default(), &at_start)?;
        let in_db = self.closed_in_db();
        for m in &closed {
            if !in_db.contains(m) || self.closed.contains_key(m) {
                return Err(format!(
                    "auto-close says it closed {m}, the database has {in_db:?}, the model {:?}",
                    self.closed.keys().collect::<Vec<_>>()
                ));
            }
            self.take_snapshot(m)?;
        }
        if ran.status == 0 && refused.is_empty() {
            let with_usage: Vec<String> = self
                .db
                .query(
                    "SELECT DISTINCT month_year::text FROM portal_usage_monthly ORDER BY 1",
                    &[],
                )
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .filter(|m| OLD_MONTHS.contains(&m.as_str()) && !self.closed.contains_key(m))
                .collect();
            if !with_usage.is_empty() {
                return Err(format!(
                    "auto-close left months with usage past their grace open: {with_usage:?}: {}",
                    ran.detail()
                ));
            }
        }
        if in_db.contains(&self.current_month) {
            return Err(format!(
                "auto-close closed the current month: {}",
                ran.detail()
            ));
        }
        Ok(())
    }

    fn reopen(&mut self, month: &str) -> Result<(), String> {
        let args = self.reopen_args(month);
        let out = self.command(&args, None).output().expect("run usage-agg");
        let ran = ran_of(format!("reopen {month}"), out);
        self.reopen_finish(month, &ran)
    }

    fn reopen_args(&self, month: &str) -> Vec<String> {
        let reason = format!("model step {}", self.log.len());
        [
            "reopen", "--env", "dev", "--month", month, "--reason", &reason, "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn reopen_finish(&mut self, month: &str, ran: &Ran) -> Result<(), String> {
        self.note(&ran.short());
        let expected = if self.closed.contains_key(month) {
            "reopened"
        } else {
            "not_closed"
        };
        if ran.status != 0 || ran.outcome != expected {
            return Err(format!("unexpected reopen: {}", ran.detail()));
        }
        if self.closed.remove(month).is_some() {
            self.reopened.insert(month.to_string());
        }
        self.alerts_at_close.remove(month);
        Ok(())
    }

    fn adjust(&mut self) -> Result<(), String> {
        let portals: Vec<i64> = self
            .db
            .query(
                "SELECT portal_id FROM portal_usage_monthly UNION
                 SELECT portal_id FROM portal_usage_adjustments ORDER BY 1",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let ids: Vec<String> = self.manual.keys().cloned().collect();
        let choice = self.rng.below(100);
        let (id, portal, month, n, s, repeat) = if !ids.is_empty() && choice < 35 {
            let id = self.pick(&ids);
            let m = self.manual[&id].clone();
            if choice < 22 {
                (id, m.portal, m.month, m.n, m.s, "same")
            } else {
                (id, m.portal, m.month, m.n + 1, m.s + 1, "other")
            }
        } else {
            self.adjust_ids += 1;
            let id = format!("m-{}", self.adjust_ids);
            let portal = if portals.is_empty() || self.chance(10) {
                900 + self.rng.below(50) as i64
            } else {
                self.pick(&portals)
            };
            let month = self.random_month();
            let mut n = 1 + self.rng.below(9) as i64;
            if self.chance(50) {
                n = -n;
            }
            let s = if self.chance(50) { n } else { n - n.signum() };
            (id, portal, month, n, s, "new")
        };
        let args: Vec<String> = [
            "adjust".to_string(),
            "--env".into(),
            "dev".into(),
            "--portal".into(),
            portal.to_string(),
            "--month".into(),
            month.clone(),
            "--requests".into(),
            n.to_string(),
            "--successes".into(),
            s.to_string(),
            "--reason".into(),
            "model".into(),
            "--id".into(),
            id.clone(),
            "--json".into(),
        ]
        .to_vec();
        let out = self.command(&args, None).output().expect("run usage-agg");
        let ran = ran_of(
            format!("adjust {id} ({repeat}) {portal}:{month} {n:+} ({s:+} ok)"),
            out,
        );
        self.note(&ran.short());
        let known = portals.contains(&portal);
        let expected = match repeat {
            "same" => (0, "already_booked"),
            "other" => (64, ""),
            _ if !known => (64, ""),
            _ => (0, "booked"),
        };
        if (ran.status, ran.outcome.as_str()) != expected && !(expected.0 == 64 && ran.status == 64)
        {
            return Err(format!(
                "unexpected adjust (expected {expected:?}): {}",
                ran.detail()
            ));
        }
        if expected == (0, "booked") {
            let booked = self.booking(&month);
            self.manual.insert(
                id,
                Manual {
                    portal,
                    month,
                    n,
                    s,
                    e: n - s,
                    booked,
                },
            );
        }
        Ok(())
    }

    fn prune_candidate(&mut self) -> String {
        let mut choices: Vec<String> = OLD_MONTHS[1..].iter().map(|s| s.to_string()).collect();
        choices.push("2024-07".into());
        choices.push(self.current_month.clone());
        // Most often the earliest month that prunes something.
        let first_open = OLD_MONTHS
            .iter()
            .find(|m| !self.closed.contains_key(**m))
            .map_or(self.current_month.clone(), |m| m.to_string());
        if self.chance(50) && first_open.as_str() > OLD_MONTHS[0] {
            first_open
        } else {
            self.pick(&choices)
        }
    }

    fn prune(&mut self, before: &str, failpoint: Option<String>) -> Result<(), String> {
        let call = self.prune_call(before, failpoint);
        let out = self
            .command(&call.args, call.failpoint.as_deref())
            .output()
            .expect("run usage-agg");
        let ran = ran_of(call.desc.clone(), out);
        self.prune_finish(&call, &ran)
    }

    /// A prune to make, and what it must answer: 65 before the first run
    /// (no cursor), 64 while a month before it with usage is open, else 0.
    fn prune_call(&mut self, before: &str, failpoint: Option<String>) -> PruneCall {
        let cursor = self.cursor();
        let open_before: Vec<String> = self
            .db
            .query(
                "SELECT DISTINCT month_year::text FROM portal_usage_monthly WHERE month_year < $1 ORDER BY 1",
                &[&before],
            )
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|m| !self.closed.contains_key(m))
            .collect();
        // What stands in a prune's way, in the order the database asks:
        // the run-time checks (a sequence restart not yet rebased, say:
        // rows below the cursor are then counted by no one), then open
        // months, then refused keys of the months it would prune.
        let problems: Vec<String> = self
            .db
            .query(
                "SELECT p->>'code' FROM jsonb_array_elements(usage_agg_preflight('default')->'problems') p",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let refused: i64 = self
            .db
            .query_one(
                "SELECT count(*) FROM usage_agg_refused_keys r JOIN usage_agg_closed_months c
                    ON c.month_year = r.month_year AND c.closed
                 WHERE r.job = 'default' AND r.month_year < $1",
                &[&before],
            )
            .unwrap()
            .get(0);
        let data_only = |p: &String| {
            [
                "sequence_behind_cursor",
                "ids_above_sequence",
                "table_reset",
            ]
            .contains(&p.as_str())
        };
        let expected = match cursor {
            None => 65,
            Some(_) if !problems.is_empty() && problems.iter().all(data_only) => 65,
            Some(_) if !problems.is_empty() => 78,
            Some(_) if !open_before.is_empty() => 64,
            Some(_) if refused > 0 => 65,
            Some(_) => 0,
        };
        let batch = if self.chance(60) {
            1 + self.rng.below(200)
        } else {
            100_000
        };
        let args: Vec<String> = [
            "prune",
            "--env",
            "dev",
            "--before",
            before,
            "--batch-size",
            &batch.to_string(),
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let desc = format!(
            "prune --before {before} --batch-size {batch}{}",
            failpoint
                .as_ref()
                .map_or(String::new(), |f| format!(" {{{f}}}"))
        );
        PruneCall {
            before: before.to_string(),
            cursor,
            open_before,
            expected,
            args,
            desc,
            failpoint,
        }
    }

    fn prune_finish(&mut self, call: &PruneCall, ran: &Ran) -> Result<(), String> {
        let (before, cursor, expected) = (call.before.as_str(), call.cursor, call.expected);
        *self
            .stats
            .runs
            .entry(format!("prune {}", ran.status))
            .or_default() += 1;
        self.note(&ran.short());
        if ran.status != expected && !(ran.status == -1 && call.failpoint.is_some()) {
            return Err(format!(
                "unexpected prune (expected exit {expected}; open months before it: {:?}): {}",
                call.open_before,
                ran.detail()
            ));
        }
        // Which rows went: only rows of closed months before it, at or
        // below the cursor.
        let present: BTreeSet<i64> = self
            .db
            .query("SELECT id::bigint FROM usage_requests", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut gone = 0;
        let mut wrong = Vec::new();
        for i in 0..self.rows.len() {
            let r = &self.rows[i];
            if r.state != RowState::Committed || present.contains(&r.id) {
                continue;
            }
            let allowed = self.closed.contains_key(&r.key.1)
                && r.key.1.as_str() < before
                && cursor.is_some_and(|c| r.id <= c);
            if !allowed {
                wrong.push(format!("{} ({})", r.id, key_text(&r.key)));
            }
            self.rows[i].state = RowState::Pruned;
            gone += 1;
        }
        self.note(&format!("{gone} rows gone"));
        if !wrong.is_empty() {
            return Err(format!(
                "prune --before {before} deleted rows it must not (cursor {cursor:?}): {wrong:?}"
            ));
        }
        Ok(())
    }

    // ---- what breaks an assumption, on purpose ----

    fn delete_monthly(&mut self) -> Result<(), String> {
        let keys: Vec<(i64, String)> = self
            .db
            .query(
                "SELECT portal_id, month_year::text FROM portal_usage_monthly ORDER BY 1, 2",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if keys.is_empty() {
            self.note("no monthly row to delete");
            return Ok(());
        }
        let (p, m) = self.pick(&keys);
        let r = self.db.execute(
            "DELETE FROM portal_usage_monthly WHERE portal_id = $1 AND month_year = $2",
            &[&p, &m],
        );
        let closed = self.closed.contains_key(&m);
        self.note(&format!(
            "DELETE the monthly row of {p}:{m} -> {}",
            match &r {
                Ok(n) => format!("{n} deleted"),
                Err(e) => format!(
                    "refused: {}",
                    e.as_db_error()
                        .map_or(e.to_string(), |d| d.message().to_string())
                ),
            }
        ));
        match (closed, r) {
            (false, Ok(_)) => Ok(()),
            (true, Err(_)) => Ok(()),
            (true, Ok(_)) => Err(format!(
                "a monthly row of the closed month {m} was deleted by hand"
            )),
            (false, Err(e)) => Err(format!("deleting the monthly row of {p}:{m}: {e}")),
        }
    }

    /// A trigger that keeps a portal's counts when usage-agg updates its
    /// monthly row (the watermark moves, the counts do not): the write is
    /// lost, and the run must say so.
    fn sabotage(&mut self) -> Result<(), String> {
        let keys: Vec<(i64, String)> = self
            .db
            .query(
                "SELECT portal_id, month_year::text FROM portal_usage_monthly ORDER BY 1, 2",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .filter(|k: &(i64, String)| !self.closed.contains_key(&k.1))
            .collect();
        if keys.is_empty() {
            self.note("no open monthly row to sabotage");
            return Ok(());
        }
        let (p, m) = self.pick(&keys);
        self.db
            .batch_execute(&format!(
                "CREATE OR REPLACE FUNCTION model_keep_counts() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                   IF NEW.portal_id = {p} THEN
                     NEW.request_count := OLD.request_count;
                     NEW.success_count := OLD.success_count;
                     NEW.error_count := OLD.error_count;
                   END IF;
                   RETURN NEW;
                 END $$;
                 CREATE TRIGGER model_keep_counts BEFORE UPDATE ON portal_usage_monthly
                   FOR EACH ROW EXECUTE FUNCTION model_keep_counts();"
            ))
            .unwrap();
        self.note(&format!(
            "a trigger keeps portal {p}'s counts on every update"
        ));
        let n = 1 + self.rng.below(5) as usize;
        let rows: Vec<NewRow> = (0..n)
            .map(|_| {
                let mut r = self.good_row();
                r.portal = p;
                r.month = m.clone();
                r.ts = format!("'{m}-07 10:00:00'");
                r
            })
            .collect();
        let inserted = self.insert_committed(rows, "");
        let kind = match self.rng.below(10) {
            0..=5 => Kind::Rest,
            6..=8 => Kind::Rpc,
            _ => Kind::Scheduled,
        };
        let spec = self.spec(kind, WAIT_MS);
        let result = inserted.and_then(|_| {
            self.run(
                spec,
                Circumstances {
                    sabotage: true,
                    ..Circumstances::default()
                },
            )
        });
        self.db
            .batch_execute(
                "DROP TRIGGER model_keep_counts ON portal_usage_monthly; DROP FUNCTION model_keep_counts()",
            )
            .unwrap();
        self.note("trigger dropped");
        result.map(|_| ())
    }

    /// The highest id a row holds (committed or in flight): above it every
    /// id is free (rolled back, or pruned).
    fn top_id(&self) -> i64 {
        self.rows
            .iter()
            .filter(|r| matches!(r.state, RowState::Committed | RowState::Pending))
            .map(|r| r.id)
            .max()
            .unwrap_or(0)
    }

    /// The id sequence moved backwards below the cursor, into ids no row
    /// holds (rolled back or pruned ones: trust.rs's case of a restart
    /// into a gap refilled past the cursor). Runs must refuse until
    /// `--rebase`. (A restart below rows that are still there is another
    /// problem, `ids_above_sequence`, repaired by setval, not here.)
    fn reset_sequence(&mut self) -> Result<(), String> {
        if self.cursor().unwrap_or(0) <= self.top_id() {
            // Free ids below the cursor: rows rolled back, then a run past
            // them.
            let n = 3 + self.rng.below(30) as usize;
            let rows: Vec<NewRow> = (0..n).map(|_| self.good_row()).collect();
            let mut conn = self.stack.sql();
            conn.batch_execute("BEGIN").unwrap();
            let got = exec_insert(&mut conn, &rows);
            conn.batch_execute("ROLLBACK").unwrap();
            let idx = self.register(got, RowState::RolledBack)?;
            let text = format!("{} rows rolled back ({})", idx.len(), self.ids(&idx));
            self.note(&text);
            let spec = self.spec(Kind::Rest, WAIT_MS);
            self.run(spec, Circumstances::default())?;
        }
        let cursor = self.cursor().unwrap_or(0);
        let top = self.top_id();
        if cursor <= top {
            self.note("the cursor did not pass the rolled-back ids: no restart");
            return Ok(());
        }
        let a = top + 1 + self.rng.below((cursor - top) as u64) as i64;
        self.db
            .batch_execute(&format!("ALTER SEQUENCE {SEQUENCE} RESTART WITH {a}"))
            .unwrap();
        self.note(&format!(
            "ALTER SEQUENCE ... RESTART WITH {a} (rows up to id {top}; cursor {cursor})"
        ));
        self.reset = true;
        Ok(())
    }

    /// `verify` against what the model says it must find: every key's
    /// monthly row and late adjustments equal to its pruned rows plus its
    /// rows up to max(its highest watermark, the cursor).
    fn verify(&mut self) -> Result<(), String> {
        let expect = self.verify_expectation();
        let ran = self.run_verify();
        self.verify_finish(&expect, &ran)
    }

    /// What `verify` must answer now: the keys that differ, and the cursor.
    fn verify_expectation(&mut self) -> (Vec<String>, i64) {
        let set = self.cursor();
        let cursor = set.unwrap_or(0);
        let expected = self.held_at_watermarks(set);
        let stored = self.stored();
        let zero = Tally::default();
        let differ: Vec<String> = expected
            .keys()
            .chain(stored.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|k| {
                let (e, s) = (
                    expected.get(*k).unwrap_or(&zero),
                    stored.get(*k).unwrap_or(&zero),
                );
                e.n != s.n || e.s != s.s
            })
            .map(|k| {
                format!(
                    "{} holds {} against {}",
                    key_text(k),
                    stored.get(k).unwrap_or(&zero),
                    expected.get(k).unwrap_or(&zero)
                )
            })
            .collect();
        (differ, cursor)
    }

    /// What each key must hold by the invariant (I1'): its pruned rows and
    /// its rows up to max(its highest watermark, the cursor). With no
    /// cursor (before the first run, or after a rebase that was killed
    /// before its rebuild) a stored key whose watermark is 0 claims all its
    /// rows, as a key written before the migration does (found by the soak,
    /// seed 721976440: a rebase killed after it reset the marks).
    fn held_at_watermarks(&mut self, set: Option<i64>) -> BTreeMap<Key, Tally> {
        let cursor = set.unwrap_or(0);
        let marks: BTreeMap<Key, i64> = self
            .db
            .query(
                "SELECT portal_id, month_year, max(w)::bigint FROM (
                   SELECT portal_id, month_year::text, last_request_id::bigint AS w FROM portal_usage_monthly
                   UNION ALL
                   SELECT portal_id, month_year, last_request_id FROM portal_usage_adjustments
                    WHERE source = 'late') x GROUP BY 1, 2",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect();
        let mut expected: BTreeMap<Key, Tally> = BTreeMap::new();
        for r in &self.rows {
            let upto = match (marks.get(&r.key).copied(), set) {
                (Some(0), None) => i64::MAX,
                (w, _) => w.unwrap_or(0).max(cursor),
            };
            let counts = r.good
                && (r.state == RowState::Pruned
                    || (r.state == RowState::Committed && r.id <= upto));
            if counts {
                expected.entry(r.key.clone()).or_default().add(r.success);
            }
        }
        expected
    }

    /// `usage_current` of every key whose stored state is what (I1')
    /// says: then it is exactly the key's good committed rows.
    fn check_usage_current(
        &mut self,
        stored: &BTreeMap<Key, Tally>,
        truth: &BTreeMap<Key, Tally>,
    ) -> Option<String> {
        let cursor = self.cursor()?;
        let held = self.held_at_watermarks(Some(cursor));
        let mut months: Vec<String> = OLD_MONTHS.iter().map(|s| s.to_string()).collect();
        months.push(self.current_month.clone());
        let (mut ps, mut ms) = (Vec::new(), Vec::new());
        for p in 1..=PORTALS as i64 {
            for m in &months {
                ps.push(p);
                ms.push(m.clone());
            }
        }
        let zero = Tally::default();
        let wrong: Vec<String> = self
            .db
            .query(
                "SELECT k.p, k.m, coalesce(u.request_count, 0)::bigint, coalesce(u.success_count, 0)::bigint,
                        coalesce(u.error_count, 0)::bigint
                   FROM unnest($1::bigint[], $2::text[]) AS k(p, m)
                   LEFT JOIN LATERAL usage_current(k.p, k.m) u ON true",
                &[&ps, &ms],
            )
            .unwrap()
            .iter()
            .filter_map(|r| {
                let k: Key = (r.get(0), r.get(1));
                let now = Tally {
                    n: r.get(2),
                    s: r.get(3),
                    e: r.get(4),
                };
                let t = truth.get(&k).unwrap_or(&zero);
                let consistent = held.get(&k).unwrap_or(&zero) == stored.get(&k).unwrap_or(&zero);
                (consistent && now != *t).then(|| {
                    format!("usage_current({}, '{}') = {now}, its good rows {t}", k.0, k.1)
                })
            })
            .collect();
        (!wrong.is_empty()).then(|| {
            format!(
                "USAGE_CURRENT WRONG for keys whose stored state agrees with their rows: {}",
                wrong.join("; ")
            )
        })
    }

    fn run_verify(&mut self) -> Ran {
        let args: Vec<String> = ["verify", "--env", "dev"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = self.command(&args, None).output().expect("run usage-agg");
        ran_of("verify".into(), out)
    }

    fn verify_finish(&mut self, expect: &(Vec<String>, i64), ran: &Ran) -> Result<(), String> {
        let (differ, cursor) = (&expect.0, expect.1);
        *self
            .stats
            .runs
            .entry(format!("verify {}", ran.status))
            .or_default() += 1;
        self.note(&ran.short());
        let want = if differ.is_empty() { 0 } else { 65 };
        if ran.status != want {
            return Err(format!(
                "verify exited {} where the model expects {want} (keys that differ from their rows up to \
                 their highest watermark or the cursor {cursor}: {differ:?}): {}{}",
                ran.status,
                ran.detail(),
                self.dump()
            ));
        }
        if want == 65 {
            self.note(&format!("as expected: {}", differ.join(", ")));
        }
        Ok(())
    }

    /// The end of a seed: every writer committed, every repair made, then
    /// runs of each engine and the procedure must count every row, exactly
    /// once, and `verify` agree.
    fn settle(&mut self) -> Result<(), String> {
        self.begin("settle".into());
        while !self.writers.is_empty() {
            self.end_writer(0, true);
        }
        if self.reset {
            // Traffic goes on: until a row takes an id after the restart,
            // the sequence has no last value, which the run-time check
            // reads as 0 and answers with ids_above_sequence, a problem
            // --rebase does not repair (found by this test on b0857e7).
            let row = self.good_row();
            self.insert_committed(vec![row], "")?;
        }
        for _ in 0..3 {
            if !self.reset && !self.reset_recorded() {
                break;
            }
            let spec = self.spec(Kind::Rebase, WAIT_MS);
            self.run(spec, Circumstances::default())?;
        }
        if !self.lost.is_empty() || self.lost_reported {
            let spec = self.spec(Kind::Full, WAIT_MS);
            self.run(spec, Circumstances::default())?;
        }
        for kind in [Kind::Rest, Kind::Rpc, Kind::Scheduled] {
            let spec = self.spec(kind, WAIT_MS);
            let promised = self.promised_by.len();
            self.run(spec, Circumstances::default())?;
            if self.promised_by.len() == promised {
                return Err(format!(
                    "settle: a {} run did not succeed with nothing in its way (see the last step)",
                    kind.name()
                ));
            }
        }
        self.check()?;
        self.check_alerts_complete()?;
        self.verify()?;
        let args: Vec<String> = ["status", "--env", "dev"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = self.command(&args, None).output().expect("run usage-agg");
        let status = ran_of("status".into(), out);
        self.note(&status.short());
        if status.status != 0 {
            return Err(format!(
                "status after every row was counted: {}",
                status.detail()
            ));
        }
        if self.plan.verbose {
            if let Some(l) = self.log.last() {
                eprintln!("model {}: {l}", self.seed);
            }
        }
        Ok(())
    }
}

/// `close --month M`, and how it reads in the log.
fn close_args(month: &str, failpoint: &Option<String>) -> (Vec<String>, String) {
    let args = ["close", "--env", "dev", "--month", month, "--json"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let desc = format!(
        "close {month}{}",
        failpoint
            .as_ref()
            .map_or(String::new(), |f| format!(" {{{f}}}"))
    );
    (args, desc)
}

/// A prune about to be made, and what it must answer.
struct PruneCall {
    before: String,
    cursor: Option<i64>,
    open_before: Vec<String>,
    expected: i32,
    args: Vec<String>,
    desc: String,
    failpoint: Option<String>,
}

/// A row to insert; its timestamp as a SQL literal.
struct NewRow {
    portal: i64,
    month: String,
    ts: String,
    success: bool,
}

/// Inserts `rows`; returns, per row, its id, key, success, and whether it
/// is good by the contract's rules ("Bad rows"), computed here in SQL.
fn exec_insert(
    conn: &mut postgres::Client,
    rows: &[NewRow],
) -> Vec<(i64, i64, String, bool, bool)> {
    if rows.is_empty() {
        return Vec::new();
    }
    let values: Vec<String> = rows
        .iter()
        .map(|r| format!("({}, {}, {}, '{}')", r.portal, r.ts, r.success, r.month))
        .collect();
    conn.query(
        &format!(
            "INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year) VALUES {}
             RETURNING id::bigint, portal_id, month_year::text, success,
                       portal_id > 0 AND month_year ~ '^[0-9]{{4}}-(0[1-9]|1[0-2])$'
                       AND (request_timestamp IS NULL
                            OR request_timestamp BETWEEN '0001-01-01' AND '9999-12-31 23:59:59.999999')",
            values.join(", ")
        ),
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

fn next_month(m: &str) -> String {
    let (y, mo) = m.split_once('-').unwrap();
    let (y, mo): (i32, u32) = (y.parse().unwrap(), mo.parse().unwrap());
    if mo == 12 {
        format!("{}-01", y + 1)
    } else {
        format!("{y}-{:02}", mo + 1)
    }
}

/// A finished command: its status and the JSON `outcome` of its last line.
fn ran_of(desc: String, out: std::process::Output) -> Ran {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    Ran {
        desc,
        status: out.status.code().unwrap_or(-1),
        outcome: json_outcome(&stdout),
        text: format!("{stdout}{stderr}"),
    }
}

fn json_outcome(stdout: &str) -> String {
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .and_then(|v| v["outcome"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Lets a paused run go on to its end.
fn finish_paused(
    mut child: Child,
    mut stderr: BufReader<ChildStderr>,
    seen: String,
    desc: String,
) -> Ran {
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"\n");
    }
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Ran {
        desc,
        status: out.status.code().unwrap_or(-1),
        outcome: json_outcome(&stdout),
        text: format!("{stdout}{seen}{rest}"),
    }
}

/// `CALL usage_agg_run_scheduled(...)`: outcome `skipped` when another run
/// held the lease; status 1 with the outcome the error names when it
/// raised.
fn call_scheduled(db: &mut postgres::Client, batch: u64, wait: u64, desc: String) -> Ran {
    match db.simple_query(&format!(
        "CALL public.usage_agg_run_scheduled(50, {batch}, {wait})"
    )) {
        Ok(messages) => {
            let text = messages
                .iter()
                .find_map(|m| match m {
                    postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                })
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let outcome = match v["outcome"].as_str() {
                Some(o) => o.to_string(),
                None if v["skipped"].is_string() => "skipped".into(),
                None => String::new(),
            };
            Ran {
                desc,
                status: 0,
                outcome,
                text,
            }
        }
        Err(e) => {
            let text = e.as_db_error().map_or_else(
                || e.to_string(),
                |d| format!("{} DETAIL {}", d.message(), d.detail().unwrap_or_default()),
            );
            let outcome = text
                .strip_prefix("usage_agg_run_scheduled (")
                .and_then(|r| r.split_once(')'))
                .map_or("error".to_string(), |(o, _)| o.to_string());
            Ran {
                desc,
                status: 1,
                outcome,
                text,
            }
        }
    }
}

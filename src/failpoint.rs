//! Named points where the tests make a run die or stop, to prove that a run
//! killed anywhere leaves correct totals (docs/semantics.md, "Idempotent writes") and that
//! overlapping runs agree (trap 3). Inert unless `USAGE_AGG_FAILPOINTS` is
//! set, which no deployment does.
//!
//! `USAGE_AGG_FAILPOINTS="page=abort@3,before-cursor=pause@1"`:
//! - `abort@N`: on the Nth time the point is reached, the process aborts at
//!   once (SIGABRT: no unwinding, no cleanup, as a kill -9 leaves it);
//! - `pause@N`: on the Nth time, prints `failpoint <name> reached` on stderr
//!   and waits for a line on stdin, so a test can act at that exact moment.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The points, in the order a run reaches them. `recount` and `pruned` are
/// a recount's (rebuilds, `verify`): before it reads the stored rows, and
/// after it read what prune deleted, before its raw scan.
pub const POINTS: [&str; 6] = [
    "page",
    "chunk",
    "before-cursor",
    "after-cursor",
    "recount",
    "pruned",
];

/// Alert delivery's points (not a counting run's): `posted`, a receiver
/// answered 2xx and the delivery is not yet recorded, so the alert is
/// posted again (at least once, docs/quotas.md).
pub const DELIVERY_POINTS: [&str; 1] = ["posted"];

#[derive(Debug, Clone, Copy)]
enum Action {
    Abort(u64),
    Pause(u64),
}

fn plan() -> &'static HashMap<String, Action> {
    static PLAN: OnceLock<HashMap<String, Action>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let Ok(spec) = std::env::var("USAGE_AGG_FAILPOINTS") else {
            return HashMap::new();
        };
        let parse = |item: &str| -> Option<(String, Action)> {
            let (name, action) = item.trim().split_once('=')?;
            let (kind, n) = action.split_once('@')?;
            let n: u64 = n.parse().ok()?;
            let action = match kind {
                "abort" => Action::Abort(n),
                "pause" => Action::Pause(n),
                _ => return None,
            };
            (POINTS.contains(&name) || DELIVERY_POINTS.contains(&name))
                .then(|| (name.to_string(), action))
        };
        let mut plan = HashMap::new();
        for item in spec.split(',').filter(|s| !s.trim().is_empty()) {
            match parse(item) {
                Some((name, action)) => {
                    plan.insert(name, action);
                }
                // A test's typo: say so, and run without it.
                None => crate::errln!(
                    "usage-agg: ignoring USAGE_AGG_FAILPOINTS item {item:?}: expected POINT=abort@N or \
                     POINT=pause@N with POINT one of {}",
                    POINTS.join(", ")
                ),
            }
        }
        plan
    })
}

/// Marks that the run reached `name`.
pub fn hit(name: &'static str) {
    let plan = plan();
    if plan.is_empty() {
        return;
    }
    static COUNTS: OnceLock<Mutex<HashMap<&'static str, AtomicU64>>> = OnceLock::new();
    let n = {
        let mut counts = COUNTS.get_or_init(Default::default).lock().unwrap();
        counts
            .entry(name)
            .or_default()
            .fetch_add(1, Ordering::SeqCst)
            + 1
    };
    match plan.get(name) {
        Some(Action::Abort(at)) if *at == n => {
            eprintln!("failpoint {name} abort");
            std::process::abort();
        }
        Some(Action::Pause(at)) if *at == n => {
            eprintln!("failpoint {name} reached");
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        _ => {}
    }
}

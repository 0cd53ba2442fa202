//! Billing periods' rules (docs/semantics.md, "Closed months"): which
//! months are closed and where an adjustment is booked, the bounds on
//! amounts, and the refusals those rules give. No I/O: the database calls
//! that close, reopen, adjust and prune are in `ledger.rs`.

use std::collections::BTreeSet;

use crate::aggregation::{Month, Totals};

/// The grace after a month's end before it may close, by default: 72 hours
/// (Stripe's longest invoice grace period).
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(72 * 3600);

/// The months closed when a run read them. A run reads them once; a close
/// or a reopening during the run makes the database refuse the writes that
/// no longer fit (its triggers), and the run stops ([`PeriodsChanged`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Periods {
    closed: BTreeSet<Month>,
    /// Closes and reopenings so far: a reopen-then-close between a run's
    /// read and its writes leaves `closed` as it was, not this.
    generation: i64,
}

impl Periods {
    /// No month closed (also: the migration is not applied).
    pub fn none() -> Periods {
        Periods::default()
    }

    pub fn new(closed: impl IntoIterator<Item = Month>) -> Periods {
        Periods {
            closed: closed.into_iter().collect(),
            generation: 0,
        }
    }

    /// The same months, at this generation (closes and reopenings so far).
    pub fn at_generation(mut self, generation: i64) -> Periods {
        self.generation = generation;
        self
    }

    pub fn is_closed(&self, m: Month) -> bool {
        self.closed.contains(&m)
    }

    pub fn closed(&self) -> impl Iterator<Item = Month> + '_ {
        self.closed.iter().copied()
    }

    pub fn newest_closed(&self) -> Option<Month> {
        self.closed.iter().next_back().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.closed.is_empty()
    }

    /// Where an adjustment for `m` is booked: the open month after the
    /// newest closed one, or `m` itself when it is later. A function of the
    /// closed months alone, never of the clock: two runs that see the same
    /// closed months book the same rows in the same place, and the database
    /// refuses any other (`usage_agg_booking_month`).
    pub fn booking_month(&self, m: Month) -> Month {
        match self.newest_closed() {
            Some(n) => m.max(next_month(n)),
            None => m,
        }
    }
}

pub fn next_month(m: Month) -> Month {
    if m.month == 12 {
        Month {
            year: m.year + 1,
            month: 1,
        }
    } else {
        Month {
            year: m.year,
            month: m.month + 1,
        }
    }
}

pub fn previous_month(m: Month) -> Month {
    if m.month == 1 {
        Month {
            year: m.year.saturating_sub(1),
            month: 12,
        }
    } else {
        Month {
            year: m.year,
            month: m.month - 1,
        }
    }
}

/// The `n` months that end with `last`, oldest first: a report's window
/// (`report --portal`, `usage_portal_summary`'s months), every month in it
/// whether it has usage or not.
pub fn window(last: Month, n: u16) -> Vec<Month> {
    let mut months = vec![last];
    while months.len() < usize::from(n) {
        let m = previous_month(months[months.len() - 1]);
        // Before year 0: nothing earlier.
        if m >= months[months.len() - 1] {
            break;
        }
        months.push(m);
    }
    months.reverse();
    months
}

/// Totals minus other totals: a key's monthly row is its rows minus its
/// late adjustments. The time and watermark stay `a`'s.
pub fn minus(a: Totals, b: Totals) -> Totals {
    Totals {
        requests: a.requests - b.requests,
        successes: a.successes - b.successes,
        errors: a.errors - b.errors,
        ..a
    }
}

/// A month was closed or reopened while this run was counting, and the
/// database refused a write that no longer fits: nothing wrong was written;
/// the next run books the rows where they now belong (exit 75).
#[derive(Debug, thiserror::Error)]
#[error(
    "the closed months changed during the run (now closed: {now}), and the database refused a write made for \
     the months as they were: nothing wrong was written, and the next run counts those rows where they now \
     belong ({detail})"
)]
pub struct PeriodsChanged {
    pub now: String,
    pub detail: String,
}

/// A prune kept deleting rows of these months while `verify` read them, so
/// it could not read their rows and what prune recorded consistently:
/// no verdict on them (exit 75, try again once the prune ends).
#[derive(Debug, thiserror::Error)]
#[error(
    "a prune kept deleting raw rows of {} while verify read them, each time it checked them again: their rows \
     and what prune recorded cannot be read consistently yet, so no verdict (nothing is wrong that verify \
     knows of); run verify again once the prune ends",
    .months.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
)]
pub struct PruneRunning {
    pub months: Vec<Month>,
}

/// A refusal a person must fix by asking differently: exit 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Something in the data stands in the way (drift, refused keys): exit 65.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Blocked(pub String);

/// Adds two counts that billing sums (a month's billed total, what
/// `verify` shows), never wrapping. Within the bound on manual adjustments
/// ([`ADJUST_BOUND`]) no such sum comes near 64 bits; one that
/// overflows holds an adjustment booked before the bound existed, and is
/// refused by name (exit 65) rather than shown wrapped to a wrong total.
pub fn add_counts(a: i64, b: i64, what: impl FnOnce() -> String) -> Result<i64, Blocked> {
    a.checked_add(b).ok_or_else(|| {
        Blocked(format!(
            "{} add up past what a 64-bit count holds ({a} and {b}): an adjustment beyond the bound of \
             {ADJUST_BOUND} (10^12) requests was booked before `usage_agg_adjust` refused such amounts \
             (migration 20261207090000); no total is shown rather than a wrong one. Find it with `SELECT * \
             FROM portal_usage_adjustments WHERE abs(request_count) > {ADJUST_BOUND}`",
            what()
        ))
    })
}

/// [`add_counts`] over many.
pub fn sum_counts(
    counts: impl IntoIterator<Item = i64>,
    what: impl Fn() -> String,
) -> Result<i64, Blocked> {
    counts
        .into_iter()
        .try_fold(0i64, |sum, n| add_counts(sum, n, &what))
}

/// Who does it, for the record: the operating-system user and the host.
pub fn who() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown-user".into());
    format!(
        "{user}@{} (usage-agg {})",
        crate::config::hostname(),
        env!("CARGO_PKG_VERSION")
    )
}

/// The most an adjustment adds or takes away, in each of requests,
/// successes and errors: 10^12, more than any portal's usage comes near.
/// Without a bound the sums billing reads (a month's billed total, the
/// snapshot `close` takes, `verify`'s) overflow 64 bits; within it they
/// cannot, short of millions of adjustments. `usage_agg_adjust` refuses the
/// same (migration 20261207090000), so no other client books past it
/// (docs/semantics.md, "Manual adjustments").
pub const ADJUST_BOUND: i64 = 1_000_000_000_000;

/// Ids per prune batch by default: a batch deletes at most this many rows
/// and books them, in one transaction far inside Supabase's 8 s statement
/// timeout (docs/semantics.md, "Closed months").
pub const DEFAULT_PRUNE_BATCH_IDS: u64 = 100_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Month {
        Month::parse(s).unwrap()
    }

    #[test]
    fn a_window_is_every_month_up_to_its_last_across_years() {
        let w: Vec<String> = window(m("2025-02"), 4)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(w, ["2024-11", "2024-12", "2025-01", "2025-02"]);
        assert_eq!(window(m("2025-02"), 1), [m("2025-02")]);
        assert_eq!(window(m("2025-02"), 24).len(), 24);
        assert_eq!(previous_month(m("2025-01")), m("2024-12"));
    }

    #[test]
    fn adjustments_are_booked_in_the_open_month_after_the_newest_closed_one() {
        let none = Periods::none();
        assert_eq!(none.booking_month(m("2025-05")), m("2025-05"));
        let p = Periods::new([m("2025-05"), m("2025-06")]);
        assert!(p.is_closed(m("2025-05")) && !p.is_closed(m("2025-07")));
        assert_eq!(p.booking_month(m("2025-05")), m("2025-07"));
        assert_eq!(p.booking_month(m("2025-06")), m("2025-07"));
        assert_eq!(p.booking_month(m("2025-09")), m("2025-09"));
        let dec = Periods::new([m("2024-12")]);
        assert_eq!(dec.booking_month(m("2024-01")), m("2025-01"));
    }
}

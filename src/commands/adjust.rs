//! `usage-agg adjust`: a signed manual correction, booked in the open month
//! with its reason, the database's time and an idempotency key: the same
//! `--id` twice books once. Nothing is ever edited: a correction of a
//! correction is another adjustment (docs/semantics.md, "Closed months").

use serde::Serialize;

use super::connect;
use crate::adjustments::Manual;
use crate::cli::AdjustArgs;
use crate::exit::Status;
use crate::ledger::{self, AdjustRequest};
use crate::output::{human_time, Style};
use crate::periods::{Refusal, ADJUST_BOUND};
use crate::printer::{Printer, Report};
use crate::store::rest::RestStore;
use crate::store::Store;

/// Successes and errors from what was given: they add up to the requests,
/// and each count is within [`ADJUST_BOUND`]. Computed in i128, so no sum
/// of what was typed wraps (`--requests 9223372036854775807 --successes -1`
/// is refused here, by name, not sent).
fn split(requests: i64, successes: Option<i64>, errors: Option<i64>) -> Result<(i64, i64), String> {
    let out_of_bounds = |what: &str, n: i128| {
        format!(
            "{what} {n} is out of bounds: an adjustment adds or takes away at most {ADJUST_BOUND} (10^12) requests, \
             successes or errors; no usage comes near that, so check the number"
        )
    };
    for (flag, n) in [
        ("--requests", Some(requests)),
        ("--successes", successes),
        ("--errors", errors),
    ] {
        if let Some(n) = n.filter(|n| n.unsigned_abs() > ADJUST_BOUND.unsigned_abs()) {
            return Err(out_of_bounds(flag, n.into()));
        }
    }
    let r = i128::from(requests);
    let (s, e) = match (successes.map(i128::from), errors.map(i128::from)) {
        (Some(s), Some(e)) => (s, e),
        (Some(s), None) => (s, r - s),
        (None, Some(e)) => (r - e, e),
        (None, None) => (r, 0),
    };
    if s + e != r {
        return Err(format!(
            "--successes {s} and --errors {e} add up to {}, not --requests {requests}",
            s + e
        ));
    }
    let bounded = |what: &str, n: i128| {
        i64::try_from(n)
            .ok()
            .filter(|n| n.unsigned_abs() <= ADJUST_BOUND.unsigned_abs())
            .ok_or_else(|| out_of_bounds(what, n))
    };
    Ok((
        bounded("the successes (--requests minus --errors)", s)?,
        bounded("the errors (--requests minus --successes)", e)?,
    ))
}

/// What `adjust` booked, or found booked under its id.
#[derive(Debug, Serialize)]
struct Adjusted {
    #[serde(skip)]
    booked: bool,
    /// What was typed, for the text.
    #[serde(skip)]
    asked: (String, i64, String, i64, i64, i64, String),
    adjustment: Option<Manual>,
}

impl Report for Adjusted {
    fn outcome(&self) -> &str {
        if self.booked {
            "booked"
        } else {
            "already_booked"
        }
    }

    fn render(&self, _: Style) -> String {
        let m = self.adjustment.as_ref();
        let booked_in = m.map_or("?".into(), |m| m.booked_month.clone());
        let at = m
            .and_then(|m| m.created_at.as_deref())
            .map_or(String::new(), human_time);
        let (id, portal, month, requests, successes, errors, reason) = &self.asked;
        if self.booked {
            format!(
                "Booked manual adjustment {id}: portal {portal}, usage of {month}, {requests:+} requests \
                 ({successes:+} successes, {errors:+} errors), in {booked_in}'s invoice, at {at}; reason: {reason}\n"
            )
        } else {
            format!(
                "Manual adjustment {id} was already booked (in {booked_in}, at {at}); nothing was booked again\n"
            )
        }
    }
}

pub async fn run(args: AdjustArgs) -> Status {
    let printer = Printer::new("adjust", &args.output);
    let (successes, errors) = match split(args.requests, args.successes, args.errors) {
        Ok(x) => x,
        Err(e) => return printer.fail(&Refusal(e).into(), None),
    };
    if args.requests == 0 && successes == 0 {
        return printer.fail(
            &Refusal("an adjustment of 0 requests adjusts nothing".into()).into(),
            None,
        );
    }
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => return printer.fail(&e, None),
    };
    let printer = printer.against(&config);
    let store = RestStore::new(client);
    let request = AdjustRequest {
        portal_id: args.portal,
        month: args.month,
        requests: args.requests,
        successes,
        errors,
        reason: &args.reason,
        key: &args.id,
    };
    let result = async {
        anyhow::ensure!(
            store.installed().await?,
            "the usage-agg migrations are not applied: apply them first (`usage-agg sql`)"
        );
        let a = ledger::adjust(store.client(), &request).await?;
        let why = match a.refused.as_deref() {
            None => return Ok(a),
            Some("future") => match a.booking_month.as_deref() {
                // Booked after the newest closed month, which is the
                // database's own month or later: its clock moved back.
                Some(booked) if booked != args.month.to_string() => format!(
                    "an adjustment of {} would be booked in {booked}, the month after the newest closed one, which \
                     is after the database's month ({}): no invoice shows a month not begun; check the \
                     database's clock and the closed months (`usage-agg status`)",
                    args.month,
                    a.current_month.as_deref().unwrap_or("?")
                ),
                _ => format!(
                    "{} is in the future (the database's month is {}): usage not yet recorded cannot be corrected",
                    args.month,
                    a.current_month.as_deref().unwrap_or("?")
                ),
            },
            Some("before_usage") => {
                let earliest = a.earliest_month.as_deref().unwrap_or("?");
                format!(
                    "{month} is before {earliest}, the earliest month with usage, and no month is closed, so the \
                     adjustment would be booked in {month} itself, a month no invoice shows. Book it in a month an \
                     invoice still shows: --month {earliest} or later, naming the month it corrects in --reason \
                     (once a month is closed, adjustments of earlier months are booked after it)",
                    month = args.month
                )
            }
            Some("amount_bound") => format!(
                "the database refused the amounts: an adjustment adds or takes away at most {} (10^12) requests, \
                 successes or errors",
                a.bound.unwrap_or(ADJUST_BOUND)
            ),
            Some("unknown_portal") => format!(
                "portal {} has no usage recorded (no row in portal_usage_monthly or adjustments): check the id",
                args.portal
            ),
            Some("key_reused") => format!(
                "the id {} was already used for a different adjustment ({}); history is never edited: use a new \
                 id for a new adjustment",
                args.id,
                a.adjustment
                    .as_ref()
                    .map(|m| format!("portal {}, {}, {} requests", m.portal_id, m.month_year, m.request_count))
                    .unwrap_or_default()
            ),
            Some(other) => format!("the adjustment was refused ({other})"),
        };
        Err(Refusal(why).into())
    }
    .await;
    match result {
        Ok(a) => printer.report(&Adjusted {
            booked: a.booked,
            asked: (
                args.id.clone(),
                args.portal,
                args.month.to_string(),
                args.requests,
                successes,
                errors,
                args.reason.clone(),
            ),
            adjustment: a.adjustment,
        }),
        Err(e) => printer.fail(&e, Some(&config)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successes_and_errors_add_up_to_the_requests() {
        assert_eq!(split(-3, None, None), Ok((-3, 0)));
        assert_eq!(split(10, None, Some(2)), Ok((8, 2)));
        assert_eq!(split(10, Some(7), None), Ok((7, 3)));
        assert!(split(10, Some(7), Some(2)).is_err());
    }

    #[test]
    fn every_count_is_bounded_and_no_sum_of_them_wraps() {
        let b = ADJUST_BOUND;
        assert_eq!(split(b, None, None), Ok((b, 0)));
        assert_eq!(split(-b, Some(-b), None), Ok((-b, 0)));
        for (r, s, e, needle) in [
            (
                i64::MAX,
                None,
                None,
                "--requests 9223372036854775807 is out of bounds",
            ),
            (i64::MAX, Some(-1), None, "--requests 9223372036854775807"),
            (i64::MIN, None, None, "--requests -9223372036854775808"),
            (1, Some(i64::MIN), None, "--successes -9223372036854775808"),
            (1, None, Some(i64::MAX), "--errors 9223372036854775807"),
            (b + 1, None, None, "--requests 1000000000001"),
            // Each within the bound, the derived count beyond it.
            (
                b,
                Some(-b),
                None,
                "the errors (--requests minus --successes) 2000000000000",
            ),
            (
                -b,
                None,
                Some(b),
                "the successes (--requests minus --errors) -2000000000000",
            ),
        ] {
            let err = split(r, s, e).unwrap_err();
            assert!(
                err.contains(needle) && err.contains("1000000000000 (10^12)"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_bound_is_the_databases() {
        let sql = crate::migrations::MIGRATIONS
            .iter()
            .find(|(f, _)| f.ends_with("_usage_agg_adjust_rules.sql"))
            .expect("the adjust rules migration is listed")
            .1;
        assert!(sql.contains(&format!("SELECT {ADJUST_BOUND}::bigint")));
        assert!(sql.contains(&format!("BETWEEN -{ADJUST_BOUND} AND {ADJUST_BOUND}")));
    }
}

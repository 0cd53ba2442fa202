//! The rules of a quota as the command line takes them (docs/quotas.md): a
//! monthly limit of requests, and the thresholds (percentages of it) that
//! fire an alert. No I/O: the database checks the same rules again for any
//! client (`usage_agg_valid_thresholds`, the tables' CHECKs), and decides
//! when a threshold is reached (the rule book).

/// The thresholds when none are given: 80% and 100%.
pub const DEFAULT_THRESHOLDS: [u32; 2] = [80, 100];

/// The highest threshold: ten times the limit.
pub const MAX_THRESHOLD: u32 = 1000;

/// At most this many thresholds per quota.
pub const MAX_THRESHOLDS: usize = 20;

/// `80,100`: percentages of the limit, each from 1 to 1000, strictly
/// ascending, at most 20.
pub fn parse_thresholds(s: &str) -> Result<Vec<u32>, String> {
    let mut out: Vec<u32> = Vec::new();
    for part in s.split(',') {
        let p = part.trim().trim_end_matches('%');
        // Read wide, so that -5 or 0 is out of range rather than not a number.
        let wide: i64 = p.parse().map_err(|_| {
            format!(
                "{:?} is not a threshold: expected percentages of the limit separated by commas, e.g. 80,100",
                part.trim()
            )
        })?;
        let n = match u32::try_from(wide) {
            Ok(n) if (1..=MAX_THRESHOLD).contains(&n) => n,
            _ => {
                return Err(format!(
                    "{wide} is outside 1..{MAX_THRESHOLD}: a threshold is a percentage of the limit, from 1 \
                     to {MAX_THRESHOLD} (ten times the limit)"
                ))
            }
        };
        if let Some(&last) = out.last() {
            if n <= last {
                return Err(format!(
                    "{s:?} is not ascending: give each threshold once, smallest first, e.g. 50,80,100"
                ));
            }
        }
        out.push(n);
    }
    if out.len() > MAX_THRESHOLDS {
        return Err(format!("at most {MAX_THRESHOLDS} thresholds"));
    }
    Ok(out)
}

/// A monthly limit: a whole number of requests, 1 or more.
pub fn parse_limit(s: &str) -> Result<i64, String> {
    let t = s.trim().replace('_', "");
    match t.parse::<i64>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(n) => Err(format!(
            "{n} is not a limit: a monthly limit is 1 request or more (to stop alerts for a portal, give \
             it a limit of its own far above its usage)"
        )),
        Err(_) => Err(format!(
            "{s:?} is not a limit: expected a whole number of requests a month, 1 or more"
        )),
    }
}

/// The request count at which `percent` of `limit` is reached (rounded up):
/// what the database compares usage with (usage * 100 >= limit * percent).
pub fn threshold_count(limit: i64, percent: u32) -> i64 {
    let n = i128::from(limit) * i128::from(percent);
    let c = (n + 99) / 100;
    i64::try_from(c).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_ascending_percentages_from_1_to_1000() {
        assert_eq!(parse_thresholds("80,100"), Ok(vec![80, 100]));
        assert_eq!(
            parse_thresholds(" 50, 80%,100 ,150"),
            Ok(vec![50, 80, 100, 150])
        );
        assert_eq!(parse_thresholds("1000"), Ok(vec![1000]));
        for bad in [
            "0,100", "80,1001", "100,80", "80,80", "", "80,,100", "x", "-5",
        ] {
            assert!(parse_thresholds(bad).is_err(), "{bad:?}");
        }
        assert!(parse_thresholds("100,80")
            .unwrap_err()
            .contains("ascending"));
        assert!(parse_thresholds("0").unwrap_err().contains("1..1000"));
    }

    #[test]
    fn a_limit_is_one_request_or_more() {
        assert_eq!(parse_limit("1000"), Ok(1000));
        assert_eq!(parse_limit("1_000_000"), Ok(1_000_000));
        assert!(parse_limit("0").unwrap_err().contains("1 request or more"));
        assert!(parse_limit("-5").is_err() && parse_limit("ten").is_err());
    }

    #[test]
    fn a_threshold_is_reached_at_its_count_rounded_up() {
        assert_eq!(threshold_count(100, 80), 80);
        assert_eq!(threshold_count(7, 80), 6);
        assert_eq!(threshold_count(1000, 100), 1000);
        assert_eq!(threshold_count(i64::MAX, 1000), i64::MAX);
    }
}

/// The database refused a quota (`usage_agg_set_quota`): bad input, exit
/// 64, nothing written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QuotaRefused(pub String);

impl QuotaRefused {
    /// The refusal's code, said for a person.
    pub fn from_code(code: &str, portal: Option<i64>) -> QuotaRefused {
        let whose =
            portal.map_or_else(|| "the default plan".to_string(), |p| format!("portal {p}"));
        QuotaRefused(match code {
            "unknown_portal" => format!(
                "{whose} is unknown: it has no usage counted, no adjustment and no row waiting to be \
                 counted; check the id, or pass --new-portal to set the quota of a portal whose first \
                 request is still to come. Nothing was written"
            ),
            "bad_limit" => format!(
                "the limit of {whose} must be 1 request a month or more; nothing was written"
            ),
            "bad_thresholds" => format!(
                "the thresholds of {whose} must be ascending percentages from 1 to 1000; nothing was written"
            ),
            "bad_portal" => format!("{whose} is not a portal id (1 or more); nothing was written"),
            other => format!("the quota of {whose} was refused ({other}); nothing was written"),
        })
    }
}

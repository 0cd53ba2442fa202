//! Charts' geometry and the terminal's bars, pure: no I/O, no database.
//! `report` draws its bars with [`bar`]; the HTML report lays its SVG out
//! on an [`Axis`]. Both scale a value linearly from zero, so a bar's length
//! is proportional to its value (what the browser test measures).

/// The characters a bar is drawn with: successes, then errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Glyphs {
    pub ok: &'static str,
    pub err: &'static str,
}

/// Block characters, where the terminal reads UTF-8.
pub const UNICODE: Glyphs = Glyphs {
    ok: "█", err: "░"
};

/// Plain ASCII: a terminal that is not UTF-8, or `NO_COLOR`.
pub const ASCII: Glyphs = Glyphs { ok: "#", err: "x" };

/// How a bar is drawn: its characters, and whether in colour (ANSI: green
/// successes, red errors; only on a terminal, never with `NO_COLOR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarStyle {
    pub glyphs: Glyphs,
    pub color: bool,
}

impl BarStyle {
    pub fn new(unicode: bool, color: bool) -> BarStyle {
        BarStyle {
            glyphs: if unicode { UNICODE } else { ASCII },
            color,
        }
    }
}

/// The cells (successes, errors) of a bar scaled so that `max` fills
/// `width` cells. The whole bar is its total's share of `width`, rounded;
/// a total above zero gets at least one cell, and so does each part above
/// zero while the bar has room for both, so errors are never drawn away
/// (the numbers beside the bar say how many).
pub fn split_cells(ok: i64, err: i64, max: i64, width: usize) -> (usize, usize) {
    let ok = ok.max(0);
    let err = err.max(0);
    let total = ok.saturating_add(err);
    if total == 0 || max <= 0 || width == 0 {
        return (0, 0);
    }
    let cells = |v: i64| -> usize {
        let c = (v as f64 / max as f64 * width as f64).round();
        (c.max(0.0) as usize).min(width)
    };
    let whole = cells(total).max(1);
    let mut e = cells(err).min(whole);
    if err > 0 && e == 0 && (whole >= 2 || ok == 0) {
        e = 1;
    }
    if ok > 0 && e == whole && whole >= 2 {
        e -= 1;
    }
    (whole - e, e)
}

/// One bar, successes then errors, `width` cells at `max`; no padding.
pub fn bar(ok: i64, err: i64, max: i64, width: usize, style: BarStyle) -> String {
    let (o, e) = split_cells(ok, err, max, width);
    let mut s = String::new();
    let paint = |s: &mut String, glyph: &str, n: usize, code: &str| {
        if n == 0 {
            return;
        }
        if style.color {
            s.push_str(code);
        }
        s.push_str(&glyph.repeat(n));
        if style.color {
            s.push_str("\x1b[0m");
        }
    };
    paint(&mut s, style.glyphs.ok, o, "\x1b[32m");
    paint(&mut s, style.glyphs.err, e, "\x1b[31m");
    s
}

/// What the two characters mean.
pub fn legend(style: BarStyle) -> String {
    format!(
        "{} successes  {} errors",
        bar(1, 0, 1, 1, style),
        bar(0, 1, 1, 1, style)
    )
}

/// A value axis from zero: `top` is at least the largest value, in `ticks`
/// steps of 1, 2, 2.5 or 5 times a power of ten.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Axis {
    pub top: f64,
    pub step: f64,
}

impl Axis {
    /// An axis for values up to `max` (at least 1, so an empty chart has
    /// one), with about `ticks` steps.
    pub fn new(max: f64, ticks: usize) -> Axis {
        Axis::stepped(max, ticks, &[1.0, 2.0, 2.5, 5.0, 10.0], 0.0)
    }

    /// An axis for counts: whole steps of 1, 2 or 5 times a power of ten
    /// (no tick at 2.5 requests).
    pub fn counts(max: f64, ticks: usize) -> Axis {
        Axis::stepped(max, ticks, &[1.0, 2.0, 5.0, 10.0], 1.0)
    }

    fn stepped(max: f64, ticks: usize, multiples: &[f64], least: f64) -> Axis {
        let max = if max.is_finite() && max > 0.0 {
            max
        } else {
            1.0
        };
        let ticks = ticks.max(1) as f64;
        let raw = max / ticks;
        let power = 10f64.powf(raw.log10().floor());
        let step = multiples
            .iter()
            .map(|m| m * power)
            .find(|s| *s >= raw * (1.0 - 1e-12))
            .unwrap_or(10.0 * power)
            .max(least);
        let top = (max / step - 1e-9).ceil().max(1.0) * step;
        Axis { top, step }
    }

    /// The tick values, 0 to `top`.
    pub fn ticks(&self) -> Vec<f64> {
        let n = (self.top / self.step).round() as usize;
        (0..=n).map(|i| i as f64 * self.step).collect()
    }

    /// `v`'s length on an axis `length` long: proportional, from zero.
    pub fn scale(&self, v: f64, length: f64) -> f64 {
        (v.max(0.0) / self.top * length).min(length)
    }
}

/// A number as a tick label: 950, 1.2k, 25k, 3M.
pub fn compact(v: f64) -> String {
    let a = v.abs();
    let (n, unit) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let text = if (n - n.round()).abs() < 1e-9 {
        format!("{}", n.round() as i64)
    } else {
        format!("{n:.1}")
    };
    format!("{text}{unit}")
}

/// A count with thousands separated by commas: 1,234,567.
pub fn grouped(v: i64) -> String {
    let digits = v.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0 {
        format!("-{out}")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: BarStyle = BarStyle {
        glyphs: ASCII,
        color: false,
    };

    #[test]
    fn a_bar_is_its_totals_share_split_into_successes_and_errors() {
        assert_eq!(split_cells(100, 0, 100, 30), (30, 0));
        assert_eq!(split_cells(90, 10, 100, 30), (27, 3));
        assert_eq!(split_cells(25, 25, 100, 30), (7, 8));
        assert_eq!(bar(50, 0, 100, 30, PLAIN), "#".repeat(15));
        assert_eq!(bar(80, 20, 100, 10, PLAIN), "########xx");
        assert_eq!(split_cells(0, 0, 100, 30), (0, 0));
        assert_eq!(split_cells(5, 5, 0, 30), (0, 0));
    }

    #[test]
    fn a_small_part_keeps_one_cell_while_the_bar_has_room_for_both() {
        // One error in 10,000 requests: still seen.
        assert_eq!(split_cells(9_999, 1, 10_000, 30), (29, 1));
        // One request of 10,000 at the top: one cell, not none.
        assert_eq!(split_cells(1, 0, 10_000, 30), (1, 0));
        assert_eq!(split_cells(0, 1, 10_000, 30), (0, 1));
        // A one-cell bar with both: the larger part.
        assert_eq!(split_cells(3, 1, 10_000, 30), (1, 0));
        // All errors but one success, at full width: the success is seen.
        assert_eq!(split_cells(1, 9_999, 10_000, 30), (1, 29));
    }

    #[test]
    fn unicode_and_colour_only_change_the_characters() {
        let style = BarStyle::new(true, false);
        assert_eq!(bar(2, 1, 3, 3, style), "██░");
        assert_eq!(legend(style), "█ successes  ░ errors");
        assert_eq!(legend(BarStyle::new(false, false)), "# successes  x errors");
        let coloured = bar(2, 1, 3, 3, BarStyle::new(false, true));
        assert_eq!(coloured, "\x1b[32m##\x1b[0m\x1b[31mx\x1b[0m");
    }

    #[test]
    fn an_axis_ends_on_a_round_number_at_or_above_the_largest_value() {
        let a = Axis::new(23.0, 4);
        assert_eq!((a.top, a.step), (30.0, 10.0));
        assert_eq!(Axis::new(100.0, 4).top, 100.0);
        assert_eq!(Axis::new(101.0, 4).top, 150.0);
        assert_eq!(Axis::new(0.0, 4).top, 1.0);
        assert_eq!(Axis::new(7.3, 5).ticks(), [0.0, 2.0, 4.0, 6.0, 8.0]);
        for max in [1.0, 3.0, 9.0, 11.0, 999.0, 1234.0, 5e6, 0.37] {
            let a = Axis::new(max, 4);
            assert!(a.top >= max && a.top <= max * 2.6, "{max}: {a:?}");
            assert_eq!(a.ticks().last().copied(), Some(a.top), "{max}");
        }
        // Counts step by whole numbers.
        assert_eq!(Axis::counts(10.0, 4).ticks(), [0.0, 5.0, 10.0]);
        assert_eq!(Axis::counts(3.0, 4).ticks(), [0.0, 1.0, 2.0, 3.0]);
        assert_eq!(Axis::counts(0.0, 4).top, 1.0);
        assert_eq!(Axis::counts(23.0, 4).ticks(), [0.0, 10.0, 20.0, 30.0]);
        let a = Axis::new(200.0, 4);
        assert_eq!(a.scale(100.0, 300.0), 150.0);
        assert_eq!(a.scale(-5.0, 300.0), 0.0);
    }

    #[test]
    fn numbers_read_compact_on_axes_and_grouped_in_tables() {
        assert_eq!(compact(950.0), "950");
        assert_eq!(compact(1200.0), "1.2k");
        assert_eq!(compact(25_000.0), "25k");
        assert_eq!(compact(3_000_000.0), "3M");
        assert_eq!(compact(2.5), "2.5");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(-1_000), "-1,000");
        assert_eq!(grouped(999), "999");
    }
}

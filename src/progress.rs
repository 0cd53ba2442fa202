//! A progress bar for long scans, on a terminal only: rows read, rows per
//! second, and the ids still to scan. Under cron (no TTY), with `NO_COLOR`,
//! `--quiet` or `--json` it is never drawn, so logs stay clean.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
    started: Instant,
}

impl Progress {
    /// Shown when stderr is a terminal and nothing asked for quiet.
    pub fn for_terminal(quiet: bool) -> Progress {
        let show =
            !quiet && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let bar = ProgressBar::with_draw_target(
            None,
            if show {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        Progress {
            bar,
            started: Instant::now(),
        }
    }

    /// A scan of ids in (from, to] begins (`to` unknown: no bar, a spinner).
    pub fn scan(&self, from: i64, to: Option<i64>) {
        self.bar
            .set_length(to.map_or(0, |t| (t - from).max(0) as u64));
        self.bar.set_position(0);
    }

    /// Rows read so far; `at` is the id the scan has reached.
    pub fn advance(&self, from: i64, at: i64, to: Option<i64>, rows: u64) {
        self.bar.set_position((at - from).max(0) as u64);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let backlog = to.map_or(String::new(), |t| {
            format!(", {} ids to go", (t - at).max(0))
        });
        self.bar.set_message(format!(
            "{rows} rows, {:.0} rows/s{backlog}",
            rows as f64 / secs
        ));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

//! How hard a run leans on the database it shares with the webhook it
//! counts (README, "A good neighbour"; measured in docs/benchmarks.md).
//!
//! By default a scan behaves as TCP does on a shared link: it starts with
//! one request in flight and adds one more per window of pages while the
//! smoothed page latency stays within a tenth of the fastest seen
//! (additive increase), and halves the requests in flight when it passes
//! 1.3 times the fastest or a request fails (multiplicative decrease).
//! Latency rising is the server queueing: our own requests, or the
//! product's, waiting for the same cores and pool connections. Each place
//! in the window also rests as long as its page took before the next
//! request may take it, unless no other request is running: one stream
//! never rests (a default run is never slower than one plain stream of
//! requests one after another), and the server spends at most half its
//! time on each place beyond it. Between server-side batches the engine
//! rests a quarter of what the batch took. `--max-rows-per-second` caps the pace outright;
//! `--aggressive` lifts all of it, for a catch-up at night.
//!
//! None of this changes what is counted: it only decides when the next
//! page is asked for.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Requests in flight at most (id ranges a scan reads at once, bulk reads
/// and writes of stored rows). Chosen from the WAN curve in
/// docs/benchmarks.md: 40 ms from the server, a million rows took 46 s at
/// 1, 12.7 s at 4 and 7.1 s at 8. Unless `--aggressive`, this is only a
/// ceiling: the pace starts at one and grows while latency stays flat,
/// which on a nearby, busy server keeps it at one to three.
pub const DEFAULT_CONCURRENCY: u16 = 8;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Latency at or under this multiple of the fastest page seen lets the
/// window grow.
const GROW_BELOW: f64 = 1.1;
/// Latency past this multiple (or a failed request) halves the window:
/// tight, so a server shared with the product stays near its idle latency.
const CUT_ABOVE: f64 = 1.3;

/// The run's `--deadline` came while it was pacing itself: it stops
/// (exit 75) rather than sleep past it. What it wrote is correct.
#[derive(Debug, thiserror::Error)]
#[error("the run's deadline (--deadline) passed while it was pacing itself (a rows-per-second ceiling or a rest between batches); stopped")]
pub struct DeadlinePassed;

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PaceSettings {
    /// Requests in flight at most (`--concurrency`).
    pub max_concurrency: usize,
    /// Adapt the requests in flight to page latency (off with `--aggressive`).
    pub adaptive: bool,
    /// A ceiling on rows read per second, over the whole run.
    pub max_rows_per_second: Option<u64>,
    /// Each place in the window rests as long as its last page took before
    /// the next request may take it, unless it is the only one running: the
    /// server spends at most half its time on any place but one.
    pub rest_between_pages: bool,
    /// Rest after each server-side batch: `None` for as long as the batch
    /// took, `Some(ZERO)` for none.
    pub batch_pause: Option<Duration>,
}

impl PaceSettings {
    /// Every request at once, no pauses: `--aggressive`, and the
    /// operator commands' own short scans.
    pub fn flat_out(concurrency: usize) -> PaceSettings {
        PaceSettings {
            max_concurrency: concurrency.max(1),
            adaptive: false,
            max_rows_per_second: None,
            rest_between_pages: false,
            batch_pause: Some(Duration::ZERO),
        }
    }

    /// The default: adaptive, up to `concurrency` in flight, each page but
    /// the one running alone followed by a rest as long as it took, and
    /// after each server-side batch a quarter of what it took.
    pub fn neighbourly(concurrency: usize) -> PaceSettings {
        PaceSettings {
            max_concurrency: concurrency.max(1),
            adaptive: true,
            max_rows_per_second: None,
            rest_between_pages: true,
            batch_pause: None,
        }
    }

    /// How long to rest after a server-side batch that took `took`: a
    /// quarter of it unless `--batch-pause` says. A batch holds one backend
    /// and its rows' locks, not the table: the webhook's inserts go on
    /// beside it (their p99 stays within 2x idle, docs/benchmarks.md), so
    /// the rest is a breath between batches, not half the run.
    pub fn pause_after_batch(&self, took: Duration) -> Duration {
        self.batch_pause.unwrap_or(took / 4)
    }
}

/// A scan's pace, shared by its range readers.
#[derive(Clone)]
pub struct Pace {
    inner: Arc<Inner>,
}

struct Inner {
    settings: PaceSettings,
    started: Instant,
    /// The run's `--deadline`: no rest or ceiling wait goes past it.
    deadline: Option<Instant>,
    state: Mutex<Window>,
    freed: Notify,
}

/// The adaptive window and what it is judged by.
#[derive(Debug)]
struct Window {
    /// Requests allowed in flight (fractional: it grows by 1/size a page).
    size: f64,
    /// Places taken: requests running, and places resting after theirs.
    in_flight: usize,
    resting: usize,
    /// The fastest full page seen: the server's latency unloaded.
    fastest: Option<Duration>,
    /// The most rows a page has brought (short pages say little of load).
    fullest: u64,
    /// Page latency, smoothed (seconds).
    smoothed: Option<f64>,
    rows: u64,
    /// Pages finished since the window was last cut, and how many were in
    /// flight then: those were sent before the cut and say nothing of it,
    /// so one cut per window of pages (as TCP cuts once per round trip).
    since_cut: usize,
    in_flight_at_cut: usize,
    largest: f64,
    cuts: u32,
}

/// What the pace did over a run, for the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PaceReport {
    /// The most requests in flight the window allowed.
    pub peak_concurrency: usize,
    /// Times the window was halved.
    pub cuts: u32,
}

/// One request in flight; hand it back to [`Pace::done`].
pub struct Permit {
    started: Instant,
}

impl Pace {
    /// A pace whose waits never outlast `deadline` (the run's `--deadline`).
    pub fn with_deadline(settings: PaceSettings, deadline: Option<std::time::Instant>) -> Pace {
        let mut pace = Pace::new(settings);
        Arc::get_mut(&mut pace.inner).expect("a new pace").deadline =
            deadline.map(Instant::from_std);
        pace
    }

    /// Whether waiting until `until` would pass the deadline.
    fn past_deadline(&self, until: Instant) -> bool {
        self.inner.deadline.is_some_and(|d| until > d)
    }

    pub fn new(settings: PaceSettings) -> Pace {
        let start = if settings.adaptive {
            1.0
        } else {
            settings.max_concurrency.max(1) as f64
        };
        Pace {
            inner: Arc::new(Inner {
                settings,
                started: Instant::now(),
                deadline: None,
                state: Mutex::new(Window::starting_at(start)),
                freed: Notify::new(),
            }),
        }
    }

    pub fn settings(&self) -> &PaceSettings {
        &self.inner.settings
    }

    /// Waits for room in the window, then for the rows-per-second ceiling;
    /// fails at once when that wait would pass the run's deadline.
    pub async fn acquire(&self) -> Result<Permit, DeadlinePassed> {
        loop {
            let freed = self.inner.freed.notified();
            {
                let mut w = self.inner.state.lock().expect("pace lock");
                if w.in_flight < w.size.floor().max(1.0) as usize {
                    w.in_flight += 1;
                    break;
                }
            }
            freed.await;
        }
        let rows = self.inner.state.lock().expect("pace lock").rows;
        if let Some(due) = self.ceiling_due(rows) {
            if self.past_deadline(due) {
                self.release();
                return Err(DeadlinePassed);
            }
            tokio::time::sleep_until(due).await;
        }
        Ok(Permit {
            started: Instant::now(),
        })
    }

    /// A request finished: `rows` read, `ok` unless it failed. If resting
    /// is on, its place in the window stays taken as long again, then is
    /// freed: the rest belongs to the place, not to the stream, or another
    /// stream would take the place at once and nothing would rest. The one
    /// place left running never rests (see [`Window::take_rest`]).
    pub async fn done(&self, permit: Permit, rows: u64, ok: bool) {
        let took = permit.started.elapsed();
        // No rest past the deadline: the next request stops the run there.
        let may_rest =
            self.inner.settings.rest_between_pages && !self.past_deadline(Instant::now() + took);
        let rest = {
            let mut w = self.inner.state.lock().expect("pace lock");
            w.rows += rows;
            if self.inner.settings.adaptive {
                w.judge(took, rows, ok, self.inner.settings.max_concurrency);
            }
            may_rest && w.take_rest()
        };
        if rest {
            tokio::time::sleep(took).await;
            self.inner.state.lock().expect("pace lock").resting -= 1;
        }
        self.release();
    }

    /// Frees a place in the window.
    fn release(&self) {
        self.inner.state.lock().expect("pace lock").in_flight -= 1;
        self.inner.freed.notify_waiters();
    }

    /// When `rows` read in all may be followed by more under the
    /// rows-per-second ceiling (None without one).
    fn ceiling_due(&self, rows: u64) -> Option<Instant> {
        let rate = self.inner.settings.max_rows_per_second?;
        Some(self.inner.started + Duration::from_secs_f64(rows as f64 / rate.max(1) as f64))
    }

    /// How long to rest after a server-side batch that took `took` and
    /// read `rows`: the batch pause, or longer if the rows-per-second
    /// ceiling says so; an error when the rest would pass the deadline.
    pub fn rest_after_batch(&self, took: Duration, rows: u64) -> Result<Duration, DeadlinePassed> {
        let settings = &self.inner.settings;
        let total = {
            let mut w = self.inner.state.lock().expect("pace lock");
            w.rows += rows;
            w.rows
        };
        let ceiling = self.ceiling_due(total).map_or(Duration::ZERO, |due| {
            due.saturating_duration_since(Instant::now())
        });
        let rest = settings.pause_after_batch(took).max(ceiling);
        if self.past_deadline(Instant::now() + rest) {
            return Err(DeadlinePassed);
        }
        Ok(rest)
    }

    pub fn report(&self) -> PaceReport {
        let w = self.inner.state.lock().expect("pace lock");
        PaceReport {
            peak_concurrency: w.largest.floor().max(1.0) as usize,
            cuts: w.cuts,
        }
    }
}

impl Window {
    fn starting_at(size: f64) -> Window {
        Window {
            size,
            in_flight: 0,
            resting: 0,
            fastest: None,
            fullest: 0,
            smoothed: None,
            rows: 0,
            since_cut: 0,
            in_flight_at_cut: 0,
            largest: size,
            cuts: 0,
        }
    }

    /// Whether a request that just finished rests in its place: only while
    /// another request is running. The last one running goes on at once,
    /// so a run always moves at least as fast as one plain stream of
    /// requests one after another (the floor of the default pace, never its
    /// ceiling), and every request beyond that one costs the server at most
    /// half its time.
    fn take_rest(&mut self) -> bool {
        let others_running = self.in_flight - self.resting - 1;
        if others_running > 0 {
            self.resting += 1;
        }
        others_running > 0
    }

    /// Additive increase, multiplicative decrease, judged on latency.
    fn judge(&mut self, took: Duration, rows: u64, ok: bool, max: usize) {
        self.since_cut += 1;
        if ok && rows >= self.fullest {
            self.fullest = rows;
            self.fastest = Some(self.fastest.map_or(took, |f| f.min(took)));
        }
        let fastest = self.fastest.unwrap_or(took).as_secs_f64().max(1e-6);
        // Judged on the smoothed latency (as TCP smooths its round trip,
        // by eighths): one lucky page must not open the window.
        let t = took.as_secs_f64();
        let smooth = self.smoothed.map_or(t, |s| s + (t - s) / 8.0);
        self.smoothed = Some(smooth);
        let ratio = if ok { smooth / fastest } else { f64::INFINITY };
        if ratio > CUT_ABOVE {
            if self.since_cut >= self.in_flight_at_cut {
                self.in_flight_at_cut = self.size.ceil() as usize;
                self.size = (self.size / 2.0).max(1.0);
                self.since_cut = 0;
                self.cuts += 1;
                tracing::debug!(
                    window = self.size,
                    ratio,
                    "pace: latency up, fewer requests in flight"
                );
            }
        } else if ratio <= GROW_BELOW {
            self.size = (self.size + 1.0 / self.size).min(max.max(1) as f64);
            self.largest = self.largest.max(self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> Window {
        Window::starting_at(1.0)
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_finished_request_rests_only_while_another_is_running() {
        let mut w = window();
        w.in_flight = 3;
        assert!(w.take_rest(), "two others running");
        assert!(w.take_rest(), "one other running, one resting");
        assert!(!w.take_rest(), "the last one running goes on at once");
        assert_eq!(w.resting, 2);
        w.in_flight = 1;
        w.resting = 0;
        assert!(!w.take_rest(), "alone: a plain stream never rests");
    }

    #[test]
    fn the_window_grows_while_latency_stays_near_the_fastest() {
        let mut w = window();
        for _ in 0..100 {
            w.judge(10 * MS, 1000, true, 8);
        }
        assert_eq!(w.size, 8.0, "capped at --concurrency");
        assert_eq!(w.cuts, 0);
    }

    #[test]
    fn latency_doubling_halves_the_window_once_per_window() {
        let mut w = window();
        for _ in 0..100 {
            w.judge(10 * MS, 1000, true, 8);
        }
        // Latency up 2.5 times: the smoothed latency passes the mark within
        // a few pages (not at the first: one slow page may be noise).
        let mut slow = 0;
        while w.cuts == 0 {
            w.judge(25 * MS, 1000, true, 8);
            slow += 1;
            assert!(slow < 8, "no cut after {slow} slow pages");
        }
        assert!(slow > 1, "a single slow page cut the window");
        assert_eq!(w.size, 4.0);
        // The eight pages in flight at the cut were sent before it.
        for _ in 0..7 {
            w.judge(25 * MS, 1000, true, 8);
        }
        assert_eq!(
            (w.size, w.cuts),
            (4.0, 1),
            "one cut for a window's worth of slow pages"
        );
        w.judge(25 * MS, 1000, true, 8);
        assert_eq!(
            (w.size, w.cuts),
            (2.0, 2),
            "still slow a window later: cut again"
        );
        for _ in 0..100 {
            w.judge(25 * MS, 1000, true, 8);
        }
        assert_eq!(w.size, 1.0, "never below one request");
    }

    #[test]
    fn a_failed_request_cuts_and_short_pages_do_not_set_the_floor() {
        let mut w = window();
        for _ in 0..20 {
            w.judge(10 * MS, 1000, true, 4);
        }
        // A short last page is fast because it is short, not because the
        // server is idle: it must not make every full page look slow.
        w.judge(MS, 10, true, 4);
        w.judge(10 * MS, 1000, true, 4);
        assert_eq!(w.size, 4.0);
        w.judge(10 * MS, 0, false, 4);
        assert_eq!(w.size, 2.0);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_window_bounds_requests_in_flight() {
        let pace = Pace::new(PaceSettings::neighbourly(4));
        let first = pace.acquire().await.unwrap();
        let second = tokio::time::timeout(Duration::from_secs(5), pace.acquire()).await;
        assert!(second.is_err(), "one request in flight to start with");
        pace.done(first, 1000, true).await;
        let _again = pace.acquire().await.unwrap();
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_rows_per_second_ceiling_spaces_requests() {
        let pace = Pace::new(PaceSettings {
            max_rows_per_second: Some(1000),
            ..PaceSettings::flat_out(4)
        });
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            let p = pace.acquire().await.unwrap();
            pace.done(p, 1000, true).await;
        }
        // 2,000 rows read before the third request: not before 2 s.
        assert!(
            start.elapsed() >= Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_neighbourly_place_rests_as_long_as_its_page_took_unless_it_runs_alone() {
        // Alone: a plain stream, one request after another, no rest.
        let pace = Pace::new(PaceSettings::neighbourly(1));
        let start = tokio::time::Instant::now();
        let p = pace.acquire().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        pace.done(p, 1000, true).await;
        assert_eq!(start.elapsed(), Duration::from_millis(30));
        // Two places: the first to finish rests while the other runs, and
        // a stream waiting for a place gets it only after that rest.
        let two = Pace::new(PaceSettings {
            adaptive: false,
            ..PaceSettings::neighbourly(2)
        });
        let start = tokio::time::Instant::now();
        let p1 = two.acquire().await.unwrap();
        let p2 = two.acquire().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let other = two.clone();
        let waiting = tokio::spawn(async move {
            let p = other.acquire().await.unwrap();
            let at = tokio::time::Instant::now();
            other.done(p, 0, true).await;
            at
        });
        two.done(p1, 1000, true).await;
        assert_eq!(start.elapsed(), Duration::from_millis(60));
        assert!(waiting.await.unwrap() >= start + Duration::from_millis(60));
        // The other, now running alone, goes on at once.
        two.done(p2, 1000, true).await;
        assert_eq!(start.elapsed(), Duration::from_millis(60));
        let flat = Pace::new(PaceSettings::flat_out(1));
        let start = tokio::time::Instant::now();
        let p = flat.acquire().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        flat.done(p, 1000, true).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(30),
            "--aggressive: no rest"
        );
    }
}

//! Writing to stdout and stderr without ever panicking: the lowest layer
//! of output, which every module may use (a failpoint's message, a
//! warning), and the `out!`, `outln!` and `errln!` macros over it. What is
//! written is decided in `output.rs`.

/// Writes to stdout. A reader that went away (`usage-agg ... | head -3`)
/// is not an error: output stops quietly and the run goes on to its end, its
/// record, its ping and its exit status (ripgrep stops quietly too).
pub fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    static GONE: AtomicBool = AtomicBool::new(false);
    if GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            GONE.store(true, Ordering::Relaxed);
        }
    }
}

/// Writes to stderr. A closed stderr (`2>&1 | head -1` once head is gone)
/// must not turn the run's exit status into a panic's 101 or lose its end
/// ping: the line is dropped.
pub fn write_stderr(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.flush());
}

/// `eprintln!` that never panics: see [`write_stderr`].
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::stdio::write_stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for the summary, the tables and the JSON: see [`write_stdout`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdio::write_stdout(format_args!($($arg)*))
    };
}

/// `println!`, the same way.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdio::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdio::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

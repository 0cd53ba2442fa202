//! Writing to stdout and stderr without ever panicking: the lowest layer
//! of output, which every module may use (a failpoint's message, a
//! warning), and the `out!`, `outln!` and `errln!` macros over it; and
//! writing a file atomically (the metrics file, the HTML report). What is
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

/// What to do when the file to write is already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Replace,
    /// Fail with `AlreadyExists` and leave it as it is.
    Keep,
}

/// Writes `contents` to `path` atomically: `PATH.tmp.<pid>` beside it,
/// synced, then renamed over `path` (`Replace`) or linked to it, which
/// fails if `path` exists (`Keep`: a file that appears meanwhile is never
/// overwritten), then the directory synced so the new name survives a
/// crash. A reader sees the old file or the whole new one, never half. The
/// temporary file is removed whatever happens.
pub fn write_file_atomically(
    path: &std::path::Path,
    contents: &str,
    existing: Existing,
) -> std::io::Result<()> {
    use std::io::Write;
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
    })?;
    let tmp = path.with_file_name(format!(
        "{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        drop(f);
        match existing {
            Existing::Replace => std::fs::rename(&tmp, path),
            Existing::Keep => match std::fs::hard_link(&tmp, path) {
                Ok(()) => std::fs::remove_file(&tmp),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
                // A file system without hard links: the check and the
                // rename are two steps there.
                Err(_) if path.symlink_metadata().is_ok() => Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the file exists",
                )),
                Err(_) => std::fs::rename(&tmp, path),
            },
        }
    };
    let written = write();
    let _ = std::fs::remove_file(&tmp);
    written?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_only_when_asked_and_never_left_half_written() {
        let dir = std::env::temp_dir().join(format!("usage-agg-stdio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("report.html");
        write_file_atomically(&path, "one", Existing::Keep).unwrap();
        let again = write_file_atomically(&path, "two", Existing::Keep).unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one");
        write_file_atomically(&path, "three", Existing::Replace).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        assert!(write_file_atomically(&dir.join("missing/x.html"), "x", Existing::Keep).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

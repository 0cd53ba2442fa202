//! The one place that decides what a command prints: its typed report as
//! text for a person, as one JSON object, or nothing (`--quiet`); and an
//! error on stderr with its hint (plus the JSON failure object on stdout
//! with `--json`). A command builds a [`Report`] and hands it here; it never
//! chooses between text and JSON itself (uv's one printer is the model).

use serde::Serialize;

use crate::cli::Output;
use crate::config::Config;
use crate::exit::{self, Status};
use crate::output::Style;

/// What a command found, typed: its own JSON fields (the documented shape,
/// by `Serialize`) and its text. The fields every command's JSON shares
/// (`version`, `command`, `environment`, `exit_status`, `outcome`,
/// `error`) are the printer's.
pub trait Report: Serialize {
    /// The one word for how it ended, JSON `outcome`.
    fn outcome(&self) -> &str;
    /// Its exit status; 0 unless the report itself is a refusal or drift.
    fn status(&self) -> Status {
        Status::Ok
    }
    /// The text a person reads on stdout.
    fn render(&self, style: Style) -> String;
    /// What `--quiet` still says on stderr (as warnings and errors are):
    /// why the status is not 0, when the report itself is the finding.
    fn quiet_note(&self) -> Option<String> {
        None
    }
}

/// Prints one command's report or its error, the same way for every
/// command.
pub struct Printer {
    command: &'static str,
    json: bool,
    quiet: bool,
    style: Style,
    environment: Option<&'static str>,
    /// Fields the failure object carries besides the shared ones (what the
    /// command was asked about: `close`'s month).
    failure_fields: serde_json::Map<String, serde_json::Value>,
}

impl Printer {
    pub fn new(command: &'static str, output: &Output) -> Printer {
        Printer {
            command,
            json: output.json,
            quiet: output.quiet,
            style: Style::detect(),
            environment: None,
            failure_fields: serde_json::Map::new(),
        }
    }

    /// JSON whatever `--json` says (`report --format json`).
    pub fn json_if(mut self, yes: bool) -> Printer {
        self.json |= yes;
        self
    }

    /// A field the failure object carries too.
    pub fn on_failure(mut self, key: &str, value: impl Into<serde_json::Value>) -> Printer {
        self.failure_fields.insert(key.into(), value.into());
        self
    }

    /// The environment the command ran against, named in its JSON.
    pub fn against(mut self, config: &Config) -> Printer {
        self.environment = Some(config.environment.upper());
        self
    }

    pub fn style(&self) -> Style {
        self.style
    }

    /// Whether a person reads stdout (neither `--json` nor `--quiet`).
    pub fn human(&self) -> bool {
        !self.json && !self.quiet
    }

    /// The JSON object of `report`: the shared fields and its own.
    pub fn json_of<R: Report>(&self, report: &R) -> serde_json::Value {
        let mut v = serde_json::json!({
            "version": 1,
            "command": self.command,
            "environment": self.environment,
            "exit_status": report.status().code(),
            "outcome": report.outcome(),
            "error": null,
        });
        if let (Some(o), Ok(serde_json::Value::Object(own))) =
            (v.as_object_mut(), serde_json::to_value(report))
        {
            o.extend(own);
        }
        v
    }

    /// Prints `report` as asked; returns its exit status.
    pub fn report<R: Report>(&self, report: &R) -> Status {
        if self.json {
            crate::outln!("{}", self.json_of(report));
        } else if !self.quiet {
            crate::out!("{}", report.render(self.style));
        } else if let Some(note) = report.quiet_note() {
            crate::errln!("usage-agg: {note}");
        }
        report.status()
    }

    /// Prints `e` on stderr with its hint (and, with `--json`, the failure
    /// object on stdout); returns the exit status it maps to.
    pub fn fail(&self, e: &anyhow::Error, config: Option<&Config>) -> Status {
        let status = report_error(e, config);
        if self.json {
            crate::outln!("{}", self.failure_json(status, e));
        }
        status
    }

    /// What a monitor is sent, and `--json` prints, when the command ended
    /// in an error before it had a report.
    pub fn failure_json(&self, status: Status, e: &anyhow::Error) -> serde_json::Value {
        let mut v = serde_json::json!({
            "version": 1,
            "command": self.command,
            "environment": self.environment,
            "exit_status": status.code(),
            "outcome": "failed",
            "error": format!("{e:#}"),
        });
        if let Some(o) = v.as_object_mut() {
            o.extend(self.failure_fields.clone());
        }
        v
    }
}

/// Prints the error (and a hint when there is one) on stderr; returns the
/// exit status it maps to.
pub fn report_error(e: &anyhow::Error, config: Option<&Config>) -> Status {
    let status = exit::classify(e);
    // "Try later" (a lease held, writers in flight, a deadline) is a notice:
    // the job is fine and the next run does the work.
    let level = if status == Status::TempFail {
        "notice"
    } else {
        "error"
    };
    let hint = exit::hint(e, config);
    // An answer from (or no answer from) the server: name where it was
    // asked, scheme to path (a URL never holds the key).
    let http = e.chain().any(|c| {
        c.downcast_ref::<crate::postgrest::Failure>().is_some()
            || c.downcast_ref::<crate::postgrest::ApiError>().is_some()
    });
    let at = match config {
        Some(c) if http => format!(" [REST URL {}]", c.rest_url),
        _ => String::new(),
    };
    if JSON_LOGS.get().copied().unwrap_or(false) {
        let line = serde_json::json!({
            "level": level.to_uppercase(),
            "message": format!("{e:#}{at}"),
            "hint": hint,
            "exit_status": status.code(),
        });
        crate::errln!("{line}");
    } else {
        crate::errln!("usage-agg: {level}: {e:#}{at}");
        if let Some(h) = hint {
            crate::errln!("usage-agg: hint: {h}");
        }
    }
    status
}

/// Whether stderr carries JSON lines (`--log-format json`), so that the
/// final error is one too; set once by the binary.
pub static JSON_LOGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

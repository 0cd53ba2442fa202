//! Exit statuses (sysexits.h), and how an error maps to one. Cron and
//! monitoring decide by these, so each means one thing; the README lists them.

use crate::config::ConfigError;
use crate::engine::incremental::LeaseLost;
use crate::engine::rpc::BatchBusy;
use crate::postgrest::{ApiError, Failure, GaveUp};
use crate::state::{HorizonNotSafe, LeaseHeld};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Done, including "nothing to do".
    Ok = 0,
    /// Bad arguments.
    Usage = 64,
    /// Rows rejected as bad data (the rest was aggregated).
    DataErr = 65,
    /// The server could not be reached or failed.
    Unavailable = 69,
    /// A bug or an answer we did not expect.
    Software = 70,
    /// Another run holds the lease, or a deadline passed: try again later.
    TempFail = 75,
    /// The server refused the key (401/403).
    NoPerm = 77,
    /// Configuration or schema missing or malformed.
    Config = 78,
}

impl Status {
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// Decides by the first typed error in the chain.
pub fn classify(err: &anyhow::Error) -> Status {
    for cause in err.chain() {
        if cause.is::<ConfigError>() {
            return Status::Config;
        }
        if let Some(r) = cause.downcast_ref::<crate::preflight::Refused>() {
            return r.status();
        }
        if cause.is::<crate::engine::UsageError>() {
            return Status::Usage;
        }
        if cause.is::<LeaseHeld>()
            || cause.is::<HorizonNotSafe>()
            || cause.is::<LeaseLost>()
            || cause.is::<BatchBusy>()
        {
            return Status::TempFail;
        }
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return match f {
                Failure::GaveUp(GaveUp::Deadline { .. }) => Status::TempFail,
                Failure::GaveUp(GaveUp::Retries {
                    last: ApiError::Transport { timeout: true, .. },
                    ..
                }) => Status::TempFail,
                _ => classify_api(f.api()),
            };
        }
        if let Some(api) = cause.downcast_ref::<ApiError>() {
            return classify_api(api);
        }
    }
    Status::Software
}

fn classify_api(e: &ApiError) -> Status {
    match e {
        ApiError::Transport { .. } | ApiError::Decode { .. } => Status::Unavailable,
        ApiError::Status { status, .. } => match status.as_u16() {
            401 | 403 => Status::NoPerm,
            404 if matches!(e.code(), Some("PGRST205" | "42P01" | "PGRST202" | "42883")) => {
                Status::Config
            }
            400 if matches!(e.code(), Some("42703" | "PGRST204")) => Status::Config,
            // A gateway's answers: too many requests, too slow, a URL longer
            // than it takes. The server is not serving this request.
            s if s >= 500 || matches!(s, 408 | 414 | 429) => Status::Unavailable,
            _ => Status::Software,
        },
    }
}

/// A sentence on what to do, for the errors an operator can fix.
pub fn hint(err: &anyhow::Error, key_var: &str) -> Option<String> {
    let api = err.chain().find_map(|c| {
        c.downcast_ref::<Failure>()
            .map(Failure::api)
            .or_else(|| c.downcast_ref::<ApiError>())
    })?;
    let what = api
        .path()
        .trim_start_matches('/')
        .split('?')
        .next()
        .unwrap_or_default()
        .to_string();
    match (api.status().map(|s| s.as_u16()), api.code()) {
        (Some(401 | 403), _) => Some(format!(
            "the server refused the key in {key_var}: check that it is this project's service_role key (not the anon key) and that the URL is this project's"
        )),
        (Some(404), Some("PGRST202" | "42883")) => {
            let function = what.trim_start_matches("rpc/");
            Some(format!(
                "the database function {function} is missing: the migrations are not all applied; apply {} \
                 and every migration after it, in order (`usage-agg sql | psql`, or `supabase db push`)",
                crate::state::migration_defining(function)
            ))
        }
        (Some(404), Some("PGRST205" | "42P01")) => Some(format!(
            "the table {what} does not exist here: check that the URL is the right project's and that its schema is applied (README, \"The schema it expects\")"
        )),
        (Some(400), Some("42703" | "PGRST204")) => Some(format!(
            "a column of {what} is missing: the table does not match the schema in the README (\"The schema it expects\")"
        )),
        (Some(414), _) => Some(
            "a gateway in front of PostgREST refused a URL this long; report it: usage-agg keeps URLs under 6 KB, this gateway allows less".into(),
        ),
        (_, _) if matches!(api, ApiError::Transport { .. }) => {
            Some("the server could not be reached: check the URL and the network; the next run will finish the job".into())
        }
        _ => None,
    }
}

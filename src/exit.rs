//! Exit statuses (sysexits.h), and how an error maps to one. Cron and
//! monitoring decide by these, so each means one thing; the README lists them.

use crate::config::{Config, ConfigError};
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
        // The URL configured is not where the API is (or not the whole way):
        // the operator must put the final one in the configuration.
        ApiError::Redirect { .. } => Status::Config,
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

/// A sentence on what to do, for the errors an operator can fix. `config`
/// names the variables (absent when the configuration itself failed).
pub fn hint(err: &anyhow::Error, config: Option<&Config>) -> Option<String> {
    let api = err.chain().find_map(|c| {
        c.downcast_ref::<Failure>()
            .map(Failure::api)
            .or_else(|| c.downcast_ref::<ApiError>())
    })?;
    let key_var = config.map_or("the SERVICE_ROLE_KEY variable".to_string(), |c| {
        format!("SUPABASE_{}_SERVICE_ROLE_KEY", c.environment.upper())
    });
    if let ApiError::Redirect { target, .. } = api {
        let vars = config.map_or(
            "SUPABASE_<ENV>_URL (or the SUPABASE_<ENV>_REST_URL override)".to_string(),
            |c| {
                let env = c.environment.upper();
                format!(
                    "SUPABASE_{env}_URL (or the SUPABASE_{env}_REST_URL override; {} is the one in use)",
                    c.url_var
                )
            },
        );
        return Some(format!(
            "redirects are not followed (the key would go with them): if {target} is where the API is, put the final URL in {vars}"
        ));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Environment, KeyKind, Secret};
    use reqwest::{Method, StatusCode};

    fn redirect() -> anyhow::Error {
        anyhow::Error::new(Failure::Api(ApiError::Redirect {
            method: Method::GET,
            path: "/usage_requests".into(),
            status: StatusCode::TEMPORARY_REDIRECT,
            target: "https://elsewhere.example:443".into(),
        }))
        .context("reading usage_requests")
    }

    #[test]
    fn a_redirect_is_a_configuration_error_whose_hint_names_the_url_variables() {
        assert_eq!(classify(&redirect()), Status::Config);
        let config = Config {
            environment: Environment::Prod,
            chosen_by: "--env prod".into(),
            rest_url: "https://a.supabase.co/rest/v1/".parse().unwrap(),
            url_var: "SUPABASE_PROD_URL".into(),
            key: Secret::new("sb_secret_k"),
            key_kind: KeyKind::SecretKey,
        };
        let h = hint(&redirect(), Some(&config)).unwrap();
        for needle in [
            "https://elsewhere.example:443",
            "SUPABASE_PROD_URL",
            "SUPABASE_PROD_REST_URL",
        ] {
            assert!(h.contains(needle), "{needle:?} not in {h}");
        }
        assert!(!h.contains("sb_secret_k"), "{h}");
        assert!(hint(&redirect(), None)
            .unwrap()
            .contains("SUPABASE_<ENV>_URL"));
    }
}

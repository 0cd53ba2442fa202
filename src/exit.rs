//! Exit statuses (sysexits.h), and how an error maps to one. Cron and
//! monitoring decide by these, so each means one thing; the README lists them.

use crate::config::{Config, ConfigError};
use crate::engine::lease::LeaseLost;
use crate::engine::rpc::BatchBusy;
use crate::postgrest::{ApiError, Failure, GaveUp, Kind};
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

/// Every status in a few words: the list `usage-agg --help` ends with. The
/// long form (symptom, cause, fix) is docs/troubleshooting.md, one section
/// a status, and docs/configuration.md's table; a test keeps all three to
/// these codes.
pub const SUMMARY: &[(Status, &str)] = &[
    (Status::Ok, "done"),
    (Status::Usage, "bad arguments"),
    (
        Status::DataErr,
        "rows rejected as bad data, keys left unwritten, a run-time check failed or (verify) keys that differ",
    ),
    (Status::Unavailable, "server unreachable or failing"),
    (Status::Software, "internal error"),
    (
        Status::TempFail,
        "try again later (lease held, writers in flight, deadline; status: too long since a success)",
    ),
    (Status::NoPerm, "key refused"),
    (
        Status::Config,
        "configuration or schema, plain http to another host (allowed only with \
         USAGE_AGG_ALLOW_INSECURE_HTTP=1), or a redirect (never followed)",
    ),
];

/// The exit statuses as `--help` lists them.
pub fn help_summary() -> String {
    let list: Vec<String> = SUMMARY
        .iter()
        .map(|(s, what)| format!("{} {what}", s.code()))
        .collect();
    format!(
        "Exit statuses: {}. docs/troubleshooting.md explains each (symptom, cause, fix).",
        list.join("; ")
    )
}

/// The schema is fixed by a person before the next run (78); the data is
/// repaired by a rebase or a setval (65).
impl From<crate::preflight::ProblemKind> for Status {
    fn from(k: crate::preflight::ProblemKind) -> Status {
        match k {
            crate::preflight::ProblemKind::Schema => Status::Config,
            crate::preflight::ProblemKind::Data => Status::DataErr,
        }
    }
}

/// A finished run's status: 0 only when every committed row is counted
/// exactly once (docs/semantics.md, "Verdicts"); 65 for every other verdict.
impl From<crate::engine::Verdict> for Status {
    fn from(v: crate::engine::Verdict) -> Status {
        match v {
            crate::engine::Verdict::Ok => Status::Ok,
            _ => Status::DataErr,
        }
    }
}

/// Decides by the first typed error in the chain.
pub fn classify(err: &anyhow::Error) -> Status {
    for cause in err.chain() {
        if cause.is::<ConfigError>() {
            return Status::Config;
        }
        if let Some(r) = cause.downcast_ref::<crate::preflight::Refused>() {
            return r.kind().into();
        }
        if cause.is::<crate::schedule::CronMissing>() {
            return Status::Config;
        }
        if cause.is::<crate::engine::UsageError>()
            || cause.is::<crate::periods::Refusal>()
            || cause.is::<crate::quota::QuotaRefused>()
        {
            return Status::Usage;
        }
        if cause.is::<crate::periods::Blocked>() {
            return Status::DataErr;
        }
        if cause.is::<crate::periods::PeriodsChanged>()
            || cause.is::<crate::periods::PruneRunning>()
        {
            return Status::TempFail;
        }
        if cause.is::<LeaseHeld>()
            || cause.is::<crate::state::StateBlocked>()
            || cause.is::<crate::pace::DeadlinePassed>()
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
    match e.kind() {
        // After the retries: the server could not be reached, or did not serve.
        Kind::Transient
        | Kind::Unavailable
        | Kind::UrlTooLong
        | Kind::Unresolvable
        | Kind::StatementTimeout => Status::Unavailable,
        Kind::KeyRefused | Kind::NotGranted => Status::NoPerm,
        // The URL configured is not where the API is, or the schema or the
        // migrations are not what usage-agg needs.
        Kind::Redirect
        | Kind::Tls
        | Kind::NotFound
        | Kind::MissingTable
        | Kind::MissingFunction
        | Kind::MissingColumn => Status::Config,
        Kind::UpsertRefused | Kind::Conflict | Kind::Unexpected => Status::Software,
    }
}

/// A sentence on what to do, for the errors an operator can fix. `config`
/// names the variables (absent when the configuration itself failed).
pub fn hint(err: &anyhow::Error, config: Option<&Config>) -> Option<String> {
    let deadline = err.chain().any(|c| {
        c.is::<crate::pace::DeadlinePassed>()
            || matches!(
                c.downcast_ref::<Failure>(),
                Some(Failure::GaveUp(GaveUp::Deadline { .. }))
            )
    });
    if deadline {
        return Some(
            "the run stopped at its --deadline; what it wrote is correct and the next run continues from \
             there (a low --max-rows-per-second or long --batch-pause makes a run slow: raise the deadline or the ceiling)"
                .into(),
        );
    }
    let api = err.chain().find_map(|c| {
        c.downcast_ref::<Failure>()
            .map(Failure::api)
            .or_else(|| c.downcast_ref::<ApiError>())
    })?;
    let key_var = config.map_or("the SERVICE_ROLE_KEY variable".to_string(), |c| {
        format!("SUPABASE_{}_SERVICE_ROLE_KEY", c.environment.upper())
    });
    // The REST base in use (scheme, host, port, path; a URL never holds the
    // key), and the variable it came from.
    let url = config.map_or("the server".to_string(), |c| c.rest_url.to_string());
    let url_var = config.map_or("SUPABASE_<ENV>_URL".to_string(), |c| c.url_var.clone());
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
    // Supabase's pg-safeupdate refused an UPDATE or DELETE without WHERE in
    // one of usage-agg's functions: an older migration's definition.
    if api.code() == Some("21000") && api.status().is_some_and(|s| s.as_u16() == 400) {
        return Some(format!(
            "Supabase refuses an UPDATE or DELETE without a WHERE clause (pg-safeupdate) in {}: \
             apply every migration up to {} (`usage-agg sql | psql`, or `supabase db push`), whose \
             functions each have one",
            api.path().trim_start_matches('/'),
            crate::migrations::LATEST_MIGRATION
        ));
    }
    let what = api
        .path()
        .trim_start_matches('/')
        .split('?')
        .next()
        .unwrap_or_default()
        .to_string();
    match api.kind() {
        Kind::KeyRefused => Some(format!(
            "the server refused the key in {key_var}: check that it is this project's service_role key (not the anon key) and that the URL is this project's"
        )),
        Kind::NotGranted => Some(format!(
            "the key was accepted but its role may not use {what}: grant it (the migrations grant service_role \
             what usage-agg needs; check that {key_var} is the service_role key and that they are applied)"
        )),
        Kind::MissingFunction => {
            let function = what.trim_start_matches("rpc/");
            Some(format!(
                "the database function {function} is missing: the migrations are not all applied; apply {} \
                 and every migration after it, in order (`usage-agg sql | psql`, or `supabase db push`)",
                crate::migrations::migration_defining(function)
            ))
        }
        // usage-agg's own tables come with the migrations; the seed's two
        // are the app's.
        Kind::MissingTable
            if ![crate::tables::RAW_TABLE, crate::tables::MONTHLY_TABLE].contains(&what.as_str()) =>
        {
            Some(format!(
                "the table {what} does not exist here: the migrations are not all applied; apply them in \
                 order (`usage-agg sql | psql`, or `supabase db push`), and check that the URL is the right \
                 project's"
            ))
        }
        Kind::MissingTable => Some(format!(
            "the table {what} does not exist here: check that the URL is the right project's and that its schema is applied (README, \"The schema it expects\")"
        )),
        Kind::MissingColumn => Some(format!(
            "a column of {what} is missing: the table does not match the schema in the README (\"The schema it expects\")"
        )),
        Kind::NotFound => Some(format!(
            "nothing answers at {what} under {url}: check {url_var} (the project's URL, \
             https://<ref>.supabase.co, or with a REST URL override, the PostgREST root)"
        )),
        Kind::UrlTooLong => Some(
            "a gateway in front of PostgREST refused a URL this long; report it: usage-agg keeps URLs under 6 KB, this gateway allows less".into(),
        ),
        Kind::Unresolvable => Some(format!(
            "the host of {url} does not resolve: check {url_var} (a typo in the project ref?) and this machine's DNS"
        )),
        Kind::Tls => Some(format!(
            "TLS failed talking to {url}: if the server speaks plain HTTP (a local PostgREST), write http:// in \
             {url_var}; if it is a certificate, check the host name and this machine's CA certificates"
        )),
        Kind::Transient if matches!(api, ApiError::Transport { .. }) => {
            Some(format!("the server could not be reached at {url}: check {url_var} and the network; the next run will finish the job"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_is_listed_in_the_help_and_explained_in_the_guides() {
        let all = [
            Status::Ok,
            Status::Usage,
            Status::DataErr,
            Status::Unavailable,
            Status::Software,
            Status::TempFail,
            Status::NoPerm,
            Status::Config,
        ];
        let listed: Vec<Status> = SUMMARY.iter().map(|(s, _)| *s).collect();
        assert_eq!(listed, all);
        let troubleshooting = include_str!("../docs/troubleshooting.md");
        let table = include_str!("../docs/configuration.md");
        for s in all {
            let code = s.code();
            assert!(
                troubleshooting.contains(&format!("\n## {code}: ")),
                "docs/troubleshooting.md has no section for {code}"
            );
            assert!(
                table.contains(&format!("\n| {code} | ")),
                "docs/configuration.md's table has no row for {code}"
            );
            assert!(help_summary().contains(&format!(" {code} ")));
        }
    }
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
            url_from: "the environment".into(),
            key_var: "SUPABASE_PROD_SERVICE_ROLE_KEY".into(),
            key_from: "the environment".into(),
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

    #[test]
    fn each_typed_error_decides_its_status_wherever_it_sits_in_the_chain() {
        use crate::engine::lease::LeaseLost;
        use crate::preflight::{Problem, Refused};
        let status = |code: u16, pg: &str| {
            anyhow::Error::new(Failure::Api(ApiError::Status {
                method: Method::GET,
                path: "/rpc/usage_agg_preflight".into(),
                status: StatusCode::from_u16(code).unwrap(),
                body: crate::postgrest::ErrorBody::parse(
                    format!(r#"{{"code":"{pg}","message":"m"}}"#).as_bytes(),
                ),
                retry_after: None,
            }))
            .context("checking the job's assumptions")
        };
        for (err, want) in [
            (status(401, "PGRST301"), Status::NoPerm),
            (status(404, "PGRST202"), Status::Config),
            (status(404, "PGRST125"), Status::Config),
            (status(503, "PGRST001"), Status::Unavailable),
            (status(400, "22P02"), Status::Software),
            (
                anyhow::Error::new(LeaseLost { cursor: 3 }),
                Status::TempFail,
            ),
            (
                anyhow::Error::new(Refused(vec![Problem {
                    code: "no_sequence".into(),
                    message: "no sequence".into(),
                }]))
                .context("starting"),
                Status::Config,
            ),
            (anyhow::anyhow!("something else"), Status::Software),
        ] {
            assert_eq!(classify(&err), want, "{err:#}");
        }
        let safeupdate = hint(&status(400, "21000"), None).unwrap();
        assert!(
            safeupdate.contains("without a WHERE clause"),
            "{safeupdate}"
        );
        let hint = hint(&status(404, "PGRST202"), None).unwrap();
        assert!(hint.contains("usage_agg_preflight is missing"), "{hint}");
        assert!(hint.contains(crate::migrations::MIGRATIONS[1].0), "{hint}");
    }
}

//! Configuration: which Supabase project to talk to, and with which key.
//!
//! Values come from the process environment first, then `.env.local`, then
//! `.env` in the working directory; a real environment variable always wins,
//! so cron or a CI secret can override a file without editing it. The files
//! are read, never exported into the process environment.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// This machine's name, read one way everywhere: in a lease's owner (to
/// tell a dead run on this host) and in the record of who closed or
/// adjusted a month.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// The job's name in usage_aggregation_state (its cursor, lease and run
/// record) and in pg_cron. One job for now; the column leaves room for
/// more (per region, say).
pub const JOB: &str = "default";

use base64::Engine;
use reqwest::Url;

/// The tool's own settings an env file may hold, exported before options
/// are parsed; nothing else (USAGE_AGG_FAILPOINTS is for tests, from the
/// real environment only).
pub const EXPORTED_SETTINGS: [&str; 3] = [
    "USAGE_AGG_PING_URL",
    "USAGE_AGG_METRICS_FILE",
    ALLOW_INSECURE_HTTP,
];

/// The files looked in, in order of precedence after the environment.
pub const ENV_FILES: [&str; 2] = [".env.local", ".env"];

/// Set to `1`, lets the URL be plain `http://` to a host that is not this
/// machine (the key then crosses the network in clear text).
pub const ALLOW_INSECURE_HTTP: &str = "USAGE_AGG_ALLOW_INSECURE_HTTP";

/// Which project: the user's two Supabase projects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Dev,
    Prod,
}

impl Environment {
    pub fn upper(self) -> &'static str {
        match self {
            Environment::Dev => "DEV",
            Environment::Prod => "PROD",
        }
    }
}

/// What `--env` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EnvChoice {
    Dev,
    Prod,
    /// prod when APP_ENV (else NODE_ENV) is `production` or `prod`, else dev
    Auto,
}

/// A service-role key. It opens the whole database, so it is only ever
/// shown as `***`: Debug and Display both hide it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    #[cfg(test)]
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How the key must be sent: legacy keys are JWTs and go in both `apikey`
/// and `Authorization: Bearer`; `sb_secret_` keys are not JWTs and a Bearer
/// that is not a JWT is refused (PGRST301), so they go in `apikey` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Jwt,
    SecretKey,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub environment: Environment,
    /// How the environment was chosen, for the operator ("auto: APP_ENV=production").
    pub chosen_by: String,
    /// The REST base: tables live at `<rest_url>/<table>`.
    pub rest_url: Url,
    /// The variable `rest_url` came from (`SUPABASE_DEV_REST_URL` when the
    /// override is set, else `SUPABASE_DEV_URL`), for messages.
    pub url_var: String,
    pub key: Secret,
    pub key_kind: KeyKind,
    /// Where the URL and the key were found ("the environment", a file), and
    /// the key's variable: what `doctor` shows, never the key.
    pub url_from: String,
    pub key_var: String,
    pub key_from: String,
}

/// A configuration problem: exit status 78, one line naming the variable
/// and where it was looked for.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where values come from: the environment, then the files.
pub struct Sources {
    env: HashMap<String, String>,
    files: Vec<(PathBuf, HashMap<String, String>)>,
    dir: PathBuf,
    env_file: Option<PathBuf>,
}

impl Sources {
    /// Reads the process environment and the files in `dir`, or `env_file`
    /// alone when given (`--env-file`).
    pub fn load(dir: &Path, env_file: Option<&Path>) -> Result<Sources, ConfigError> {
        Sources::from_parts(std::env::vars().collect(), dir, env_file)
    }

    pub fn from_parts(
        env: HashMap<String, String>,
        dir: &Path,
        env_file: Option<&Path>,
    ) -> Result<Sources, ConfigError> {
        let paths: Vec<PathBuf> = match env_file {
            Some(p) if !p.is_file() => {
                return Err(ConfigError(format!(
                    "--env-file {}: no such file; give the path of a KEY=VALUE file, or leave the option out \
                     to read ./.env.local and ./.env",
                    p.display()
                )))
            }
            Some(p) => vec![p.to_path_buf()],
            None => ENV_FILES.iter().map(|f| dir.join(f)).collect(),
        };
        let mut files = Vec::new();
        for path in paths {
            if !path.exists() {
                continue;
            }
            warn_if_readable_by_others(&path);
            let iter = dotenvy::from_path_iter(&path)
                .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
            let mut values = HashMap::new();
            for item in iter {
                let (k, v) = item.map_err(|e| {
                    ConfigError(format!(
                        "{} is not a valid env file ({}); fix the line or remove the file",
                        path.display(),
                        describe_dotenv_error(&e, &path)
                    ))
                })?;
                values.insert(k, v);
            }
            files.push((path, values));
        }
        Ok(Sources {
            env,
            files,
            dir: dir.to_path_buf(),
            env_file: env_file.map(Path::to_path_buf),
        })
    }

    /// The value of `name` and where it came from.
    pub fn get(&self, name: &str) -> Option<(String, String)> {
        if let Some(v) = self.env.get(name) {
            return Some((v.clone(), "the environment".into()));
        }
        for (path, values) in &self.files {
            if let Some(v) = values.get(name) {
                return Some((v.clone(), path.display().to_string()));
            }
        }
        None
    }

    /// "the environment, ./.env.local, ./.env": what a missing-variable message names.
    pub fn looked_in(&self) -> String {
        let mut places = vec!["the environment".to_string()];
        match &self.env_file {
            Some(p) => places.push(p.display().to_string()),
            None => places.extend(
                ENV_FILES
                    .iter()
                    .map(|f| self.dir.join(f).display().to_string()),
            ),
        }
        places.join(", ")
    }

    /// Exports the tool's own settings (`USAGE_AGG_*`) found only in the
    /// files into this process's environment, so that options that read
    /// them (`--ping-url`, ...) see them as they see real variables; a real
    /// variable still wins. Keys and URLs are never exported.
    pub fn export_tool_settings(&self) {
        for (_, values) in self.files.iter().rev() {
            for (k, v) in values {
                if EXPORTED_SETTINGS.contains(&k.as_str()) && !self.env.contains_key(k) {
                    std::env::set_var(k, v);
                }
            }
        }
    }
}

/// dotenvy's errors quote the offending line, which may hold a key: keep only
/// the position.
fn describe_dotenv_error(e: &dotenvy::Error, path: &Path) -> String {
    match e {
        dotenvy::Error::LineParse(line, index) => {
            // Its line number, found by the line's text, which is not shown.
            let number = std::fs::read_to_string(path).ok().and_then(|content| {
                let first = line.lines().next().unwrap_or_default();
                content.lines().position(|l| l == first).map(|i| i + 1)
            });
            match number {
                Some(n) => {
                    format!("line {n}: parse error at character {index}; expected KEY=VALUE")
                }
                None => format!("parse error at character {index} of a line; expected KEY=VALUE"),
            }
        }
        dotenvy::Error::Io(io) => io.to_string(),
        _ => "unreadable".into(),
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(
                "{} is readable by every user of this machine and may hold a service role key; run: chmod 600 {}",
                path.display(),
                path.display()
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

/// Resolves `--env auto` from APP_ENV, else NODE_ENV.
pub fn choose_environment(choice: EnvChoice, sources: &Sources) -> (Environment, String) {
    match choice {
        EnvChoice::Dev => (Environment::Dev, "--env dev".into()),
        EnvChoice::Prod => (Environment::Prod, "--env prod".into()),
        EnvChoice::Auto => {
            for var in ["APP_ENV", "NODE_ENV"] {
                if let Some((value, _)) = sources.get(var) {
                    let env = match value.trim().to_ascii_lowercase().as_str() {
                        "production" | "prod" => Environment::Prod,
                        _ => Environment::Dev,
                    };
                    return (env, format!("--env auto: {var}={value}"));
                }
            }
            (
                Environment::Dev,
                "--env auto: neither APP_ENV nor NODE_ENV is set".into(),
            )
        }
    }
}

impl Config {
    pub fn resolve(choice: EnvChoice, sources: &Sources) -> Result<Config, ConfigError> {
        let (environment, chosen_by) = choose_environment(choice, sources);
        let env = environment.upper();
        let url_var = format!("SUPABASE_{env}_URL");
        let rest_var = format!("SUPABASE_{env}_REST_URL");
        let key_var = format!("SUPABASE_{env}_SERVICE_ROLE_KEY");

        let required = |name: &str, what: &str| -> Result<(String, String), ConfigError> {
            match sources.get(name) {
                Some((v, from)) if !v.trim().is_empty() => Ok((v.trim().to_string(), from)),
                Some((_, from)) => Err(ConfigError(format!(
                    "{name} is empty (in {from}); set it to {what}"
                ))),
                None => Err(ConfigError(format!(
                    "{name} is not set (looked in {}); set it to {what}{}",
                    sources.looked_in(),
                    auto_note(&chosen_by, environment)
                ))),
            }
        };

        let (rest_url, url_var) = match sources.get(&rest_var) {
            Some((v, from)) if !v.trim().is_empty() => {
                let url = parse_url(&rest_var, v.trim(), &from)?;
                refuse_clear_text(&rest_var, &url, &from, sources, KEY_IN_CLEAR)?;
                (url, rest_var)
            }
            _ => {
                let (v, from) =
                    required(&url_var, "your project URL, e.g. https://abcd.supabase.co")?;
                let base = parse_url(&url_var, &v, &from)?;
                refuse_clear_text(&url_var, &base, &from, sources, KEY_IN_CLEAR)?;
                // The project URL, or (a common paste) its REST root already.
                let url = if base.path().ends_with("/rest/v1/") {
                    tracing::debug!(%base, "{url_var} already ends with /rest/v1: used as the REST root");
                    base
                } else {
                    base.join("rest/v1/")
                        .map_err(|e| ConfigError(format!("{url_var} (in {from}): {e}")))?
                };
                (url, url_var)
            }
        };
        let url_from = sources
            .get(&url_var)
            .map_or_else(|| "?".to_string(), |(_, from)| from);
        let (key, from) = required(
            &key_var,
            "the project's service_role key (Supabase: Settings > API keys)",
        )?;
        let key_kind = classify_key(&key_var, &key, &from)?;
        Ok(Config {
            environment,
            chosen_by,
            rest_url,
            url_var,
            url_from,
            key: Secret(key),
            key_kind,
            key_var,
            key_from: from,
        })
    }
}

/// When `--env auto` chose the environment, a missing variable says how,
/// so an operator with only DEV configured sees why PROD was asked for.
fn auto_note(chosen_by: &str, env: Environment) -> String {
    match chosen_by.strip_prefix("--env auto: ") {
        Some(why) => format!(
            " ({why} chose {}; pass --env dev or --env prod to choose yourself)",
            env.upper()
        ),
        None => String::new(),
    }
}

/// Parses a base URL and makes it end with `/`, so that joining a table name
/// appends rather than replaces the last segment.
fn parse_url(var: &str, value: &str, from: &str) -> Result<Url, ConfigError> {
    let bad = |why: &str| {
        ConfigError(format!(
            "{var} (in {from}) is not a usable URL: {why}; expected something like https://abcd.supabase.co"
        ))
    };
    let mut url = Url::parse(value).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if url.host_str().is_none() {
        return Err(bad("it has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("it must not carry a query or a fragment"));
    }
    // A user name or password would be shown wherever the URL is, and sent
    // as Basic auth in place of the key's Bearer token.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "it carries a user name or password (user:password@); usage-agg authenticates with the \
             service role key alone: remove them",
        ));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// Whether requests to `url` stay on this machine: `localhost`, 127.0.0.0/8
/// or ::1.
fn is_loopback(url: &Url) -> bool {
    // The URL parser has already lower-cased the name and put IP addresses
    // in canonical form (IPv6 between brackets).
    match url.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// What crosses the network with a request to the Supabase URL.
const KEY_IN_CLEAR: &str = "the service role key";

/// Refuses plain `http://` to a host that is not this machine: every request
/// carries the service role key, which would cross the network in clear
/// text. `USAGE_AGG_ALLOW_INSECURE_HTTP=1` allows it, with a warning.
fn refuse_clear_text(
    var: &str,
    url: &Url,
    from: &str,
    sources: &Sources,
    what: &str,
) -> Result<(), ConfigError> {
    if url.scheme() != "http" || is_loopback(url) {
        return Ok(());
    }
    let host = url.host_str().unwrap_or_default();
    let opt_in = sources.get(ALLOW_INSECURE_HTTP);
    match &opt_in {
        Some((v, opt_from)) if v.trim() == "1" => {
            tracing::warn!(
                "{var} (in {from}) is plain http to {host}: {what} will cross the network in clear text ({ALLOW_INSECURE_HTTP}=1 in {opt_from} allows it)"
            );
            Ok(())
        }
        _ => {
            let ignored = match &opt_in {
                Some((v, opt_from)) => {
                    format!(" ({ALLOW_INSECURE_HTTP} is {v:?} in {opt_from}; only 1 opts in)")
                }
                None => String::new(),
            };
            Err(ConfigError(format!(
                "{var} (in {from}) is plain http to {host}, which is not this machine: {what} would cross the network in clear text; use https, or set {ALLOW_INSECURE_HTTP}=1 to allow it anyway{ignored}"
            )))
        }
    }
}

/// Where alerts are posted (`usage-agg alerts deliver`, `aggregate
/// --deliver-alerts`).
pub const ALERTS_WEBHOOK_URL: &str = "USAGE_AGG_ALERTS_WEBHOOK_URL";
/// The alerts webhook's signing secret, `whsec_<base64>` (Standard Webhooks).
pub const ALERTS_WEBHOOK_SECRET: &str = "USAGE_AGG_ALERTS_WEBHOOK_SECRET";

/// The alerts webhook: where, and the key that signs (docs/quotas.md). Its
/// URL obeys the Supabase URL's rule (https, or http to this machine only,
/// unless USAGE_AGG_ALLOW_INSECURE_HTTP=1); the key is never shown.
#[derive(Debug, Clone)]
pub struct AlertsWebhook {
    pub url: Url,
    pub url_from: String,
    pub key: crate::signing::WebhookKey,
    pub secret_from: String,
}

impl AlertsWebhook {
    pub fn resolve(sources: &Sources) -> Result<AlertsWebhook, ConfigError> {
        let get = |name: &str, what: &str| match sources.get(name) {
            Some((v, from)) if !v.trim().is_empty() => Ok((v.trim().to_string(), from)),
            Some((_, from)) => Err(ConfigError(format!(
                "{name} is empty (in {from}); set it to {what}"
            ))),
            None => Err(ConfigError(format!(
                "{name} is not set (looked in {}); set it to {what}",
                sources.looked_in()
            ))),
        };
        let (raw, url_from) = get(
            ALERTS_WEBHOOK_URL,
            "the URL alerts are posted to, e.g. https://app.example.com/hooks/usage",
        )?;
        let bad = |why: &str| {
            ConfigError(format!(
                "{ALERTS_WEBHOOK_URL} (in {url_from}) is not a usable URL: {why}; expected something like \
                 https://app.example.com/hooks/usage"
            ))
        };
        let url = Url::parse(&raw).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("the scheme must be https (or http to this machine)"));
        }
        if url.host_str().is_none() {
            return Err(bad("it has no host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "it carries a user name or password (user:password@); the receiver checks the signature instead",
            ));
        }
        refuse_clear_text(
            ALERTS_WEBHOOK_URL,
            &url,
            &url_from,
            sources,
            "the alerts (portals' usage)",
        )?;
        let (secret, secret_from) = get(
            ALERTS_WEBHOOK_SECRET,
            "the webhook's signing secret, whsec_ followed by base64 (e.g. `echo whsec_$(openssl rand -base64 32)`), \
             the same as the receiver's",
        )?;
        let key = crate::signing::WebhookKey::parse(&secret).map_err(|why| {
            ConfigError(format!("{ALERTS_WEBHOOK_SECRET} (in {secret_from}) {why}"))
        })?;
        Ok(AlertsWebhook {
            url,
            url_from,
            key,
            secret_from,
        })
    }

    /// The URL as messages show it: scheme, host, port and path, never a
    /// query (which may carry a token).
    pub fn shown(&self) -> String {
        let mut u = self.url.clone();
        u.set_query(None);
        u.set_fragment(None);
        u.to_string()
    }
}

/// Tells a JWT from an `sb_secret_` key, and refuses what is neither, or a
/// JWT whose role is plainly not service_role (an anon key pasted by mistake
/// reads nothing and writes nothing: better to say so before any request).
fn classify_key(var: &str, key: &str, from: &str) -> Result<KeyKind, ConfigError> {
    if key.starts_with("sb_secret_") {
        return Ok(KeyKind::SecretKey);
    }
    if key.starts_with("sb_publishable_") {
        return Err(ConfigError(format!(
            "{var} (in {from}) is a publishable key; usage-agg needs the secret (service_role) key"
        )));
    }
    let parts: Vec<&str> = key.split('.').collect();
    let not_a_key = || {
        ConfigError(format!(
            "{var} (in {from}) is neither a JWT nor an sb_secret_ key; copy the service_role key from Supabase: Settings > API keys"
        ))
    };
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(not_a_key());
    }
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[1].trim_end_matches('='))
        .map_err(|_| not_a_key())?;
    let claims: serde_json::Value = serde_json::from_slice(&payload).map_err(|_| not_a_key())?;
    match claims.get("role").and_then(|r| r.as_str()) {
        Some("anon") | Some("authenticated") => Err(ConfigError(format!(
            "{var} (in {from}) looks like an {} key (its role claim says so); usage-agg needs the service_role key",
            claims["role"].as_str().unwrap_or_default()
        ))),
        _ => Ok(KeyKind::Jwt),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(pairs: &[(&str, &str)]) -> Sources {
        let env = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Sources::from_parts(env, Path::new("/nonexistent-dir"), None).unwrap()
    }

    fn jwt(role: &str) -> String {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            b.encode(r#"{"alg":"HS256"}"#),
            b.encode(format!(r#"{{"role":"{role}"}}"#))
        )
    }

    #[test]
    fn a_project_url_given_with_its_rest_path_or_a_slash_is_normalised() {
        for url in [
            "https://abcd.supabase.co",
            "https://abcd.supabase.co/",
            "https://abcd.supabase.co/rest/v1",
            "https://abcd.supabase.co/rest/v1/",
        ] {
            let key = jwt("service_role");
            let s = sources(&[
                ("SUPABASE_DEV_URL", url),
                ("SUPABASE_DEV_SERVICE_ROLE_KEY", &key),
            ]);
            let c = Config::resolve(EnvChoice::Dev, &s).unwrap();
            assert_eq!(
                c.rest_url.as_str(),
                "https://abcd.supabase.co/rest/v1/",
                "{url}"
            );
        }
    }

    #[test]
    fn a_missing_variable_says_when_node_env_chose_the_environment() {
        let s = sources(&[
            ("NODE_ENV", "production"),
            ("SUPABASE_DEV_URL", "https://a.supabase.co"),
        ]);
        let e = Config::resolve(EnvChoice::Auto, &s)
            .unwrap_err()
            .to_string();
        assert!(e.contains("SUPABASE_PROD_URL is not set"), "{e}");
        assert!(
            e.contains("NODE_ENV=production chose PROD; pass --env dev or --env prod"),
            "{e}"
        );
        let e = Config::resolve(EnvChoice::Prod, &s)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("chose"), "{e}");
    }

    #[test]
    fn an_env_file_error_names_the_file_and_the_line_but_never_its_text() {
        let dir = std::env::temp_dir().join(format!("usage-agg-envline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("custom.env");
        std::fs::write(
            &file,
            "A=1\n# fine\nSUPABASE_DEV_SERVICE_ROLE_KEY secret-value\n",
        )
        .unwrap();
        let e = Sources::from_parts(HashMap::new(), &dir, Some(&file))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("custom.env is not a valid env file (line 3:"),
            "{e}"
        );
        assert!(!e.contains("secret-value"), "{e}");
        let missing = dir.join("nope.env");
        let e = Sources::from_parts(HashMap::new(), &dir, Some(&missing))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("--env-file") && e.contains("no such file"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn auto_picks_prod_from_app_env_before_node_env() {
        let s = sources(&[("APP_ENV", "production"), ("NODE_ENV", "development")]);
        assert_eq!(choose_environment(EnvChoice::Auto, &s).0, Environment::Prod);
        let s = sources(&[("NODE_ENV", "prod")]);
        assert_eq!(choose_environment(EnvChoice::Auto, &s).0, Environment::Prod);
        let s = sources(&[("NODE_ENV", "test")]);
        assert_eq!(choose_environment(EnvChoice::Auto, &s).0, Environment::Dev);
        assert_eq!(
            choose_environment(EnvChoice::Auto, &sources(&[])).0,
            Environment::Dev
        );
    }

    #[test]
    fn rest_url_defaults_to_rest_v1_under_the_project_url() {
        let key = jwt("service_role");
        let s = sources(&[
            ("SUPABASE_DEV_URL", "https://abc.supabase.co"),
            ("SUPABASE_DEV_SERVICE_ROLE_KEY", &key),
        ]);
        let c = Config::resolve(EnvChoice::Dev, &s).unwrap();
        assert_eq!(c.rest_url.as_str(), "https://abc.supabase.co/rest/v1/");
        assert_eq!(c.key_kind, KeyKind::Jwt);
    }

    #[test]
    fn rest_url_override_wins_and_needs_no_project_url() {
        let s = sources(&[
            ("SUPABASE_PROD_REST_URL", "http://127.0.0.1:3000"),
            ("SUPABASE_PROD_SERVICE_ROLE_KEY", "sb_secret_abc"),
        ]);
        let c = Config::resolve(EnvChoice::Prod, &s).unwrap();
        assert_eq!(c.rest_url.as_str(), "http://127.0.0.1:3000/");
        assert_eq!(c.key_kind, KeyKind::SecretKey);
    }

    #[test]
    fn missing_variable_names_itself_and_the_files() {
        let err = Config::resolve(EnvChoice::Prod, &sources(&[]))
            .unwrap_err()
            .0;
        assert!(err.contains("SUPABASE_PROD_URL is not set"), "{err}");
        assert!(err.contains(".env.local") && err.contains(".env"), "{err}");
    }

    #[test]
    fn bad_url_and_bad_keys_are_refused_without_echoing_the_key() {
        let s = sources(&[
            ("SUPABASE_DEV_URL", "not a url"),
            ("SUPABASE_DEV_SERVICE_ROLE_KEY", "x"),
        ]);
        assert!(Config::resolve(EnvChoice::Dev, &s)
            .unwrap_err()
            .0
            .contains("SUPABASE_DEV_URL"));
        let s = sources(&[
            ("SUPABASE_DEV_URL", "https://a.co"),
            ("SUPABASE_DEV_SERVICE_ROLE_KEY", "hunter2-secret"),
        ]);
        let err = Config::resolve(EnvChoice::Dev, &s).unwrap_err().0;
        assert!(
            err.contains("neither a JWT") && !err.contains("hunter2"),
            "{err}"
        );
        let anon = jwt("anon");
        let s = sources(&[
            ("SUPABASE_DEV_URL", "https://a.co"),
            ("SUPABASE_DEV_SERVICE_ROLE_KEY", &anon),
        ]);
        let err = Config::resolve(EnvChoice::Dev, &s).unwrap_err().0;
        assert!(err.contains("anon key") && !err.contains(&anon), "{err}");
    }

    /// Resolves with `url` in `var` (and a valid key), plus `extra`.
    fn resolve_url(var: &str, url: &str, extra: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut pairs = vec![(var, url), ("SUPABASE_DEV_SERVICE_ROLE_KEY", "sb_secret_k")];
        pairs.extend_from_slice(extra);
        Config::resolve(EnvChoice::Dev, &sources(&pairs))
    }

    #[test]
    fn plain_http_to_this_machine_is_accepted() {
        for url in [
            "http://127.0.0.1:3000",
            "http://127.8.9.10",
            "http://localhost:54321",
            "http://LOCALHOST",
            "http://[::1]:3000",
            "http://127.1:3000",
        ] {
            for var in ["SUPABASE_DEV_URL", "SUPABASE_DEV_REST_URL"] {
                let c = resolve_url(var, url, &[]).unwrap_or_else(|e| panic!("{var}={url}: {e}"));
                assert_eq!(c.url_var, var);
            }
        }
    }

    #[test]
    fn plain_http_to_another_host_is_refused_naming_the_variable_and_the_opt_in() {
        for url in [
            "http://example.invalid",
            "http://abcd.supabase.co",
            "http://10.0.0.5:3000",
            "http://[::2]:3000",
            "http://localhost.example.com",
            "http://128.0.0.1",
        ] {
            for var in ["SUPABASE_DEV_URL", "SUPABASE_DEV_REST_URL"] {
                let err = resolve_url(var, url, &[]).unwrap_err().0;
                assert!(
                    err.starts_with(&format!("{var} (in the environment) is plain http"))
                        && err.contains("clear text")
                        && err.contains("USAGE_AGG_ALLOW_INSECURE_HTTP=1")
                        && !err.contains('\n')
                        && !err.contains("sb_secret_k"),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn the_url_in_use_is_the_one_checked() {
        // The override is what requests go to: an http project URL beside
        // an https override is never used, and an http override is refused
        // whatever the project URL says.
        let pairs = [("SUPABASE_DEV_REST_URL", "https://rest.example.com")];
        let c = resolve_url("SUPABASE_DEV_URL", "http://example.com", &pairs).unwrap();
        assert_eq!(c.url_var, "SUPABASE_DEV_REST_URL");
        let pairs = [("SUPABASE_DEV_REST_URL", "http://rest.example.com")];
        let err = resolve_url("SUPABASE_DEV_URL", "https://example.com", &pairs)
            .unwrap_err()
            .0;
        assert!(err.starts_with("SUPABASE_DEV_REST_URL"), "{err}");
    }

    #[test]
    fn https_is_always_fine() {
        for url in [
            "https://abcd.supabase.co",
            "https://10.0.0.5:8443",
            "https://127.0.0.1",
        ] {
            let c = resolve_url("SUPABASE_DEV_URL", url, &[]).unwrap();
            assert_eq!(c.url_var, "SUPABASE_DEV_URL");
        }
    }

    #[test]
    fn the_opt_in_allows_plain_http_and_only_1_opts_in() {
        let opt = |v| [(ALLOW_INSECURE_HTTP, v)];
        let c = resolve_url("SUPABASE_DEV_URL", "http://db.internal:8000", &opt("1")).unwrap();
        assert_eq!(c.rest_url.as_str(), "http://db.internal:8000/rest/v1/");
        resolve_url(
            "SUPABASE_DEV_REST_URL",
            "http://db.internal:3000",
            &opt(" 1 "),
        )
        .unwrap();
        for no in ["0", "", "yes"] {
            let err = resolve_url("SUPABASE_DEV_URL", "http://db.internal", &opt(no))
                .unwrap_err()
                .0;
            assert!(err.contains("only 1 opts in"), "{no:?}: {err}");
        }
    }

    #[test]
    fn the_opt_in_is_read_from_the_env_files_too() {
        let dir = std::env::temp_dir().join(format!("usage-agg-optin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(".env"), format!("{ALLOW_INSECURE_HTTP}=1\n")).unwrap();
        let env = [
            ("SUPABASE_DEV_URL", "http://db.internal"),
            ("SUPABASE_DEV_SERVICE_ROLE_KEY", "sb_secret_k"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = Sources::from_parts(env, &dir, None).unwrap();
        let result = Config::resolve(EnvChoice::Dev, &s);
        std::fs::remove_dir_all(&dir).unwrap();
        result.unwrap();
    }

    #[test]
    fn secret_debug_is_masked() {
        assert_eq!(format!("{:?}", Secret("sb_secret_x".into())), "***");
    }
}

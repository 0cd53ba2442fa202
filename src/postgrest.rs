//! A small PostgREST client: the protocol (headers, query strings, statuses,
//! error bodies) and nothing about usage. See
//! docs/postgrest.md for the protocol facts it follows.

use std::fmt;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::{KeyKind, Secret};

/// Not a browser's: Supabase refuses secret keys sent by browsers.
pub const USER_AGENT: &str = concat!("usage-agg/", env!("CARGO_PKG_VERSION"));

/// A query string as ordered pairs: PostgREST reads `id=gt.5&order=id.asc`.
pub type Query = Vec<(String, String)>;

/// PostgREST's JSON error body.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct PgrstError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub details: Option<String>,
    #[serde(default)]
    pub hint: Option<String>,
}

/// What came back with an error status: PostgREST's JSON, or (from a
/// gateway or proxy) anything else, kept short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorBody {
    Postgrest(PgrstError),
    Text(String),
}

impl ErrorBody {
    pub fn parse(bytes: &[u8]) -> ErrorBody {
        match serde_json::from_slice::<PgrstError>(bytes) {
            Ok(e) if e.code.is_some() || e.message.is_some() => ErrorBody::Postgrest(e),
            _ => {
                let text = String::from_utf8_lossy(bytes);
                let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
                ErrorBody::Text(truncate(&text, 200))
            }
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            ErrorBody::Postgrest(e) => e.code.as_deref(),
            ErrorBody::Text(_) => None,
        }
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorBody::Postgrest(e) => {
                if let Some(code) = &e.code {
                    write!(f, "[{code}] ")?;
                }
                write!(f, "{}", e.message.as_deref().unwrap_or("(no message)"))?;
                if let Some(d) = e.details.as_deref().filter(|d| !d.is_empty()) {
                    write!(f, " ({d})")?;
                }
                if let Some(h) = e.hint.as_deref().filter(|h| !h.is_empty()) {
                    write!(f, "; hint: {h}")?;
                }
                Ok(())
            }
            ErrorBody::Text(t) if t.is_empty() => f.write_str("(empty body)"),
            ErrorBody::Text(t) => write!(f, "{t:?}"),
        }
    }
}

/// Why a request failed. Callers decide by kind: an upsert refused for want
/// of a unique constraint falls back; a refused key is exit 77; a network
/// failure is exit 69.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{method} {path} answered HTTP {status}: {body}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        body: ErrorBody,
        /// `Retry-After`, in seconds form, when the server sent one.
        retry_after: Option<Duration>,
    },
    #[error("{method} {path} failed: {detail}")]
    Transport {
        method: Method,
        path: String,
        detail: String,
        timeout: bool,
    },
    /// A 3xx. Never followed: the client would send the key along to
    /// wherever the server points (see `Client::new`).
    #[error("{method} {path} answered HTTP {status}, a redirect to {target}, which usage-agg does not follow")]
    Redirect {
        method: Method,
        path: String,
        status: StatusCode,
        /// Where it points, as `scheme://host:port` only (no path, no
        /// query: they may carry a token), or why that is unknown.
        target: String,
    },
    #[error(
        "{method} {path} answered HTTP 2xx with a body that is not what PostgREST sends: {detail}"
    )]
    Decode {
        method: Method,
        path: String,
        detail: String,
    },
}

/// What a server's answer means: decided here once, and used by retries,
/// the fallback writes, exit statuses and hints (docs/postgrest.md,
/// "Errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Worth another try: the network, a gateway or PostgREST's pool in
    /// trouble, Postgres asking for a retry (serialization failure,
    /// deadlock, lock not available), or a 2xx body cut short on the way.
    Transient,
    /// The server answers but does not serve: other 5xx, 408, 429.
    Unavailable,
    /// A gateway refused a URL this long (414).
    UrlTooLong,
    /// The statement ran past the role's statement_timeout (57014; about
    /// 8 s for Supabase's API roles): the same request would time out
    /// again, so it is not retried as is; a caller may ask for less work.
    StatementTimeout,
    /// 401 or 403: the key is not one this server takes.
    KeyRefused,
    /// 403 42501 with a key the server took: its role lacks a GRANT.
    NotGranted,
    /// The table is not there: PGRST205 (PostgREST 13 on); on 12, 42P01
    /// for a read and an empty `{}` for a POST or PATCH.
    MissingTable,
    /// The function is not there (PGRST202, or 42883).
    MissingFunction,
    /// A column is not there (42703, PGRST204).
    MissingColumn,
    /// No unique constraint matches `on_conflict` (42P10): upsert refused.
    UpsertRefused,
    /// A row with the same unique key exists (409, 23505).
    Conflict,
    /// A 3xx, never followed.
    Redirect,
    /// The host name does not resolve: no retry will change that in this run.
    Unresolvable,
    /// TLS failed: `https://` to a plain-HTTP server, or a certificate this
    /// client does not trust. Not retried.
    Tls,
    /// Any other 404 (PGRST125 "invalid path", or a gateway's page): the
    /// URL does not lead to the API.
    NotFound,
    /// Anything else: a bug, or an answer nobody expected.
    Unexpected,
}

impl ApiError {
    /// This answer's [`Kind`].
    pub fn kind(&self) -> Kind {
        match self {
            ApiError::Transport { detail, .. } => transport_kind(detail),
            ApiError::Decode { .. } => Kind::Transient,
            ApiError::Redirect { .. } => Kind::Redirect,
            ApiError::Status { status, .. } => match (status.as_u16(), self.code()) {
                (502 | 503 | 504 | 520 | 522 | 524, _) => Kind::Transient,
                (500, Some("40001" | "40P01" | "55P03")) => Kind::Transient,
                (500, Some("57014")) => Kind::StatementTimeout,
                (403, Some("42501")) => Kind::NotGranted,
                (401 | 403, _) => Kind::KeyRefused,
                (404, Some("PGRST205" | "42P01")) => Kind::MissingTable,
                // PostgREST 12 answers a POST or PATCH to a missing table with
                // `{}` (a read gets 42P01; a path it does not serve, `{}`
                // too, but the run's first reads have ruled that out).
                (404, None) if self.empty_object_on_write() => Kind::MissingTable,
                (404, Some("PGRST202")) => Kind::MissingFunction,
                // 42883 is "no such function or operator": a missing function
                // only when a function was called.
                (404, Some("42883")) if self.path().starts_with("/rpc/") => Kind::MissingFunction,
                (404, Some("42883")) => Kind::Unexpected,
                (400, Some("42703" | "PGRST204")) => Kind::MissingColumn,
                (400, Some("42P10")) => Kind::UpsertRefused,
                (409, _) => Kind::Conflict,
                (404, _) => Kind::NotFound,
                (414, _) => Kind::UrlTooLong,
                (s, _) if s >= 500 || matches!(s, 408 | 429) => Kind::Unavailable,
                _ => Kind::Unexpected,
            },
        }
    }

    /// Worth another try: nothing else is (a 4xx will answer the same again,
    /// and so will a redirect).
    pub fn is_transient(&self) -> bool {
        self.kind() == Kind::Transient
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ApiError::Status { status, .. } | ApiError::Redirect { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The path requested (`/usage_requests`), for messages.
    pub fn path(&self) -> &str {
        match self {
            ApiError::Status { path, .. }
            | ApiError::Redirect { path, .. }
            | ApiError::Transport { path, .. }
            | ApiError::Decode { path, .. } => path,
        }
    }

    /// Whether this is an empty JSON object answering a POST or PATCH to a
    /// table, as PostgREST 12 answers one to a table that is not there.
    fn empty_object_on_write(&self) -> bool {
        matches!(
            self,
            ApiError::Status { method, path, body: ErrorBody::Text(t), .. }
                if t == "{}" && !path.starts_with("/rpc/")
                    && (*method == Method::POST || *method == Method::PATCH)
        )
    }

    /// PostgREST's or Postgres' error code (`42P10`, `PGRST205`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Status { body, .. } => body.code(),
            _ => None,
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(max).collect::<String>())
    }
}

/// The key's headers, marked sensitive so that no Debug output shows them.
fn auth_headers(key: &Secret, kind: KeyKind) -> anyhow::Result<HeaderMap> {
    let value = |v: &str| {
        let mut h = HeaderValue::from_str(v).map_err(|_| {
            anyhow::anyhow!("the service role key holds characters not allowed in an HTTP header")
        })?;
        h.set_sensitive(true);
        anyhow::Ok(h)
    };
    let mut headers = HeaderMap::new();
    headers.insert("apikey", value(key.expose())?);
    if kind == KeyKind::Jwt {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            value(&format!("Bearer {}", key.expose()))?,
        );
    }
    Ok(headers)
}

/// A PostgREST endpoint with a key.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    retry: RetryPolicy,
}

/// How hard to try: retries per request, and a deadline for the whole run.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_retries: usize,
    pub first_delay: Duration,
    pub max_delay: Duration,
    pub deadline: Option<Instant>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 5,
            first_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(30),
            deadline: None,
        }
    }
}

/// A request failed for good: after its retries, or at the run's deadline.
#[derive(Debug, thiserror::Error)]
pub enum GaveUp {
    #[error("gave up after {tries} tries")]
    Retries {
        tries: usize,
        #[source]
        last: ApiError,
    },
    #[error("the run's deadline passed (after {tries} tries)")]
    Deadline {
        tries: usize,
        #[source]
        last: ApiError,
    },
}

/// Whether a request may be sent again after a failure whose outcome is
/// unknown (it may have been applied). Each caller says why its request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotent {
    Yes,
    No,
}

/// One request, kept so that it can be sent again.
struct Request<'a> {
    method: Method,
    path: &'a str,
    query: &'a Query,
    prefer: Option<&'a str>,
    body: Option<bytes::Bytes>,
    idempotent: Idempotent,
}

impl Client {
    pub fn new(
        base: Url,
        key: &Secret,
        kind: KeyKind,
        timeout: Duration,
        retry: RetryPolicy,
    ) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .default_headers(auth_headers(key, kind)?)
            // A redirect would carry the key's headers to wherever it points
            // (another host, or plain http): a 3xx is an error instead, and
            // the operator puts the final URL in the configuration.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10).min(timeout))
            .gzip(true)
            .build()?;
        Ok(Client { http, base, retry })
    }

    /// The run's deadline (`--deadline`), for waits that are not requests.
    pub fn deadline(&self) -> Option<Instant> {
        self.retry.deadline
    }

    fn url(&self, path: &str, query: &Query) -> Url {
        let mut url = self
            .base
            .join(path)
            .expect("a table or function name joins onto the base");
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter());
        }
        url
    }

    /// The length of the URL a request would use: the gateway refuses URLs
    /// past about 8 KB (414), so callers chunk long filters by this.
    pub fn url_len(&self, path: &str, query: &Query) -> usize {
        self.url(path, query).as_str().len()
    }

    /// Sends `req`, again after a transient failure when it is idempotent,
    /// with exponential backoff and jitter, waiting at least what
    /// `Retry-After` asks, never past the run's deadline. `parse` runs inside
    /// each try, so a body cut short counts as a failed try.
    async fn call<T>(
        &self,
        req: Request<'_>,
        parse: impl Fn(&[u8]) -> Result<T, String>,
    ) -> Result<T, Failure> {
        use backon::{ExponentialBuilder, Retryable};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
        let tries = AtomicUsize::new(0);
        let deadline = self.retry.deadline;
        let past_deadline = AtomicBool::new(false);
        let attempt = || async {
            tries.fetch_add(1, Relaxed);
            let bytes = self.send_once(&req).await?;
            parse(&bytes).map_err(|detail| ApiError::Decode {
                method: req.method.clone(),
                path: format!("/{}", req.path),
                detail,
            })
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.first_delay)
            .with_max_delay(self.retry.max_delay)
            .with_max_times(self.retry.max_retries)
            .with_jitter();
        let result = attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e: &ApiError| req.idempotent == Idempotent::Yes && e.is_transient())
            .adjust(|e, delay| {
                let wanted = match (e, delay) {
                    (
                        ApiError::Status {
                            retry_after: Some(ra),
                            ..
                        },
                        Some(d),
                    ) => Some(d.max(*ra).min(self.retry.max_delay.max(*ra))),
                    (_, d) => d,
                }?;
                if deadline.is_some_and(|dl| Instant::now() + wanted >= dl) {
                    past_deadline.store(true, Relaxed);
                    return None;
                }
                Some(wanted)
            })
            .notify(|e, delay| {
                tracing::warn!(
                    "{e}; trying again in {:.1}s (try {} of {})",
                    delay.as_secs_f64(),
                    tries.load(Relaxed) + 1,
                    self.retry.max_retries + 1
                )
            })
            .await;
        result.map_err(|last| {
            let tries = tries.load(Relaxed);
            if past_deadline.load(Relaxed) || deadline.is_some_and(|dl| Instant::now() >= dl) {
                Failure::GaveUp(GaveUp::Deadline { tries, last })
            } else if tries > 1 {
                Failure::GaveUp(GaveUp::Retries { tries, last })
            } else {
                Failure::Api(last)
            }
        })
    }

    async fn send_once(&self, req: &Request<'_>) -> Result<bytes::Bytes, ApiError> {
        let path_for_errors = format!("/{}", req.path);
        if self.retry.deadline.is_some_and(|dl| Instant::now() >= dl) {
            return Err(ApiError::Transport {
                method: req.method.clone(),
                path: path_for_errors,
                detail: "not sent: the run's deadline has passed".into(),
                timeout: true,
            });
        }
        let url = self.url(req.path, req.query);
        let mut builder = self.http.request(req.method.clone(), url.clone());
        if let Some(p) = req.prefer {
            builder = builder.header("Prefer", p);
        }
        if let Some(b) = &req.body {
            builder = builder
                .header(CONTENT_TYPE, "application/json")
                .body(b.clone());
        }
        tracing::debug!(method = %req.method, path = %path_for_errors, query = ?req.query, "request");
        let transport = |e: reqwest::Error| ApiError::Transport {
            method: req.method.clone(),
            path: path_for_errors.clone(),
            timeout: e.is_timeout(),
            detail: describe_transport_error(&e),
        };
        let resp = builder.send().await.map_err(transport)?;
        let status = resp.status();
        if status.is_redirection() {
            let target = redirect_target(&url, resp.headers().get(reqwest::header::LOCATION));
            return Err(ApiError::Redirect {
                method: req.method.clone(),
                path: path_for_errors,
                status,
                target,
            });
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp.bytes().await.map_err(transport)?;
        tracing::trace!(%status, bytes = bytes.len(), "response");
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(ApiError::Status {
                method: req.method.clone(),
                path: path_for_errors,
                status,
                body: ErrorBody::parse(&bytes),
                retry_after,
            })
        }
    }

    /// GET rows. The server may return fewer than asked (its `max_rows` cap is
    /// silent), so a short page says nothing about the end of the table.
    /// Idempotent: a read.
    pub async fn select<T: DeserializeOwned>(
        &self,
        table: &str,
        query: &Query,
    ) -> Result<Vec<T>, Failure> {
        let req = Request {
            method: Method::GET,
            path: table,
            query,
            prefer: None,
            body: None,
            idempotent: Idempotent::Yes,
        };
        self.call(req, json).await
    }

    /// Bulk upsert: one request, one transaction. `rows` must all have the
    /// same keys (PGRST102 otherwise) and no two the same conflict key
    /// (Postgres 21000 otherwise): the caller guarantees both. Idempotent:
    /// with a conflict target, sending the same rows twice leaves the table
    /// as once (and callers write absolute values, never increments).
    ///
    /// Returns the `select` columns of every row as the database left it,
    /// after its triggers: a trigger may keep a row as it was, and only the
    /// representation tells the caller whether its write took effect.
    pub async fn upsert<T: Serialize, R: DeserializeOwned>(
        &self,
        table: &str,
        on_conflict: &str,
        select: &str,
        rows: &[T],
    ) -> Result<Vec<R>, Failure> {
        let query = vec![
            ("on_conflict".to_string(), on_conflict.to_string()),
            ("select".to_string(), select.to_string()),
        ];
        let req = Request {
            method: Method::POST,
            path: table,
            query: &query,
            prefer: Some("resolution=merge-duplicates,return=representation"),
            body: Some(serde_json::to_vec(rows).expect("rows serialize").into()),
            idempotent: Idempotent::Yes,
        };
        self.call(req, json).await
    }

    /// Plain INSERT of one row; a duplicate key is a 409 `23505`. Not
    /// idempotent: a lost answer may hide a row that was inserted, and on a
    /// table without a unique constraint a second try would insert it twice.
    pub async fn insert<T: Serialize>(&self, table: &str, row: &T) -> Result<(), Failure> {
        let none = Query::new();
        let req = Request {
            method: Method::POST,
            path: table,
            query: &none,
            prefer: Some("return=minimal"),
            body: Some(serde_json::to_vec(row).expect("row serializes").into()),
            idempotent: Idempotent::No,
        };
        self.call(req, |_| Ok(())).await
    }

    /// PATCH the rows matching `filters`; returns the `select` columns of
    /// each row matched, as the database left it (zero rows is not an error
    /// in PostgREST, so the representation is the only way to know).
    /// Idempotent as callers use it: the body holds absolute values.
    pub async fn update<T: Serialize, R: DeserializeOwned>(
        &self,
        table: &str,
        filters: &Query,
        select: &str,
        body: &T,
    ) -> Result<Vec<R>, Failure> {
        assert!(
            !filters.is_empty(),
            "a PATCH without a filter would touch every row"
        );
        let mut query = filters.clone();
        query.push(("select".into(), select.into()));
        let req = Request {
            method: Method::PATCH,
            path: table,
            query: &query,
            prefer: Some("return=representation"),
            body: Some(serde_json::to_vec(body).expect("body serializes").into()),
            idempotent: Idempotent::Yes,
        };
        self.call(req, json).await
    }

    /// Calls a database function (`POST /rpc/<name>`). The caller says
    /// whether a second call is safe (every usage-agg function is: see the
    /// migration).
    pub async fn rpc<A: Serialize, R: DeserializeOwned>(
        &self,
        name: &str,
        args: &A,
        idempotent: Idempotent,
    ) -> Result<R, Failure> {
        let path = format!("rpc/{name}");
        let none = Query::new();
        let req = Request {
            method: Method::POST,
            path: &path,
            query: &none,
            prefer: None,
            body: Some(serde_json::to_vec(args).expect("args serialize").into()),
            idempotent,
        };
        // A function returning void answers 204 with no body (PostgREST 12+)
        // or `null` (older): both are JSON null.
        self.call(req, |b| json(if b.is_empty() { b"null" } else { b }))
            .await
    }
}

/// Where a redirect points, for messages: `scheme://host:port` of the
/// `Location` (resolved against the request's URL when relative), never its
/// path, query or user info, which may carry a token.
fn redirect_target(request_url: &Url, location: Option<&HeaderValue>) -> String {
    let Some(location) = location else {
        return "(no Location header)".into();
    };
    let target = location
        .to_str()
        .ok()
        .and_then(|l| request_url.join(l.trim()).ok());
    match target {
        Some(t) => match (t.host_str(), t.port_or_known_default()) {
            (Some(host), Some(port)) => format!("{}://{host}:{port}", t.scheme()),
            (Some(host), None) => format!("{}://{host}", t.scheme()),
            _ => format!("a {}: URL with no host", t.scheme()),
        },
        None => "(a Location header that is not a URL)".into(),
    }
}

fn json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// A request's failure: the server's (or network's) answer, or that answer
/// after the retries ran out. Callers decide by the answer either way.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Api(ApiError),
    #[error(transparent)]
    GaveUp(GaveUp),
}

impl Failure {
    pub fn kind(&self) -> Kind {
        self.api().kind()
    }

    pub fn api(&self) -> &ApiError {
        match self {
            Failure::Api(e)
            | Failure::GaveUp(GaveUp::Retries { last: e, .. } | GaveUp::Deadline { last: e, .. }) => {
                e
            }
        }
    }

    pub fn status(&self) -> Option<StatusCode> {
        self.api().status()
    }

    pub fn code(&self) -> Option<&str> {
        self.api().code()
    }
}

/// The kind of the first API error in an error's chain, if any: how every
/// caller that decides by a server answer's class reads it.
pub fn kind_of(err: &anyhow::Error) -> Option<Kind> {
    err.chain().find_map(|c| {
        c.downcast_ref::<Failure>()
            .map(Failure::kind)
            .or_else(|| c.downcast_ref::<ApiError>().map(ApiError::kind))
    })
}

/// What a transport failure means, from the causes reqwest and the system
/// give (their wording is all there is). Most are worth another try; a name
/// that does not resolve and a TLS failure are not.
fn transport_kind(detail: &str) -> Kind {
    let d = detail.to_ascii_lowercase();
    if [
        "dns error",
        "failed to lookup address",
        "name or service not known",
        "no such host",
    ]
    .iter()
    .any(|m| d.contains(m))
    {
        Kind::Unresolvable
    } else if [
        "invalidcontenttype",
        "corrupt message",
        "certificate",
        "handshake",
        "tls",
    ]
    .iter()
    .any(|m| d.contains(m))
    {
        Kind::Tls
    } else {
        Kind::Transient
    }
}

/// reqwest's messages nest the cause several levels down ("error sending
/// request ... : connection refused"); walk the chain so the one line an
/// operator sees says what actually happened. URLs are left out: the path is
/// given beside, and the host is in the configuration.
fn describe_transport_error(e: &reqwest::Error) -> String {
    let mut parts = vec![e.without_url_ref()];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.dedup();
    parts.join(": ")
}

trait WithoutUrlRef {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrlRef for reqwest::Error {
    fn without_url_ref(&self) -> String {
        if self.is_timeout() {
            "timed out".into()
        } else if self.is_connect() {
            "could not connect".into()
        } else if self.is_body() || self.is_decode() {
            "the response body was cut off or unreadable".into()
        } else {
            "request failed".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_keys_go_in_apikey_and_bearer_secret_keys_in_apikey_only() {
        let jwt = auth_headers(&Secret::new("a.b.c"), KeyKind::Jwt).unwrap();
        assert_eq!(jwt["apikey"], "a.b.c");
        assert_eq!(jwt["authorization"], "Bearer a.b.c");
        assert!(jwt["apikey"].is_sensitive() && !format!("{jwt:?}").contains("a.b.c"));
        let secret = auth_headers(&Secret::new("sb_secret_x"), KeyKind::SecretKey).unwrap();
        assert_eq!(secret["apikey"], "sb_secret_x");
        assert!(secret.get("authorization").is_none());
        assert!(USER_AGENT.starts_with("usage-agg/"));
    }

    #[test]
    fn a_redirect_target_is_named_by_origin_only() {
        let from = Url::parse("https://abc.supabase.co/rest/v1/usage_requests?id=gt.5").unwrap();
        let target = |l: &str| redirect_target(&from, Some(&HeaderValue::from_str(l).unwrap()));
        assert_eq!(
            target("http://user:pw@evil.example:8080/steal?token=s3cret#x"),
            "http://evil.example:8080"
        );
        assert_eq!(
            target("https://other.example/x"),
            "https://other.example:443"
        );
        assert_eq!(target("/elsewhere?k=v"), "https://abc.supabase.co:443");
        assert_eq!(target("http://[::1]:3000/"), "http://[::1]:3000");
        assert_eq!(redirect_target(&from, None), "(no Location header)");
        assert!(!target("//x.example/?token=s3cret").contains("s3cret"));
    }

    #[test]
    fn a_redirect_is_not_transient_and_says_where_it_points() {
        let e = ApiError::Redirect {
            method: Method::GET,
            path: "/usage_requests".into(),
            status: StatusCode::TEMPORARY_REDIRECT,
            target: "https://other.example:443".into(),
        };
        assert!(!e.is_transient());
        assert_eq!(e.status(), Some(StatusCode::TEMPORARY_REDIRECT));
        let s = e.to_string();
        assert!(
            s.contains("HTTP 307") && s.contains("https://other.example:443"),
            "{s}"
        );
    }

    #[test]
    fn postgrest_error_bodies_are_parsed() {
        let b = ErrorBody::parse(br#"{"code":"42P10","message":"there is no unique or exclusion constraint matching the ON CONFLICT specification","details":null,"hint":null}"#);
        assert_eq!(b.code(), Some("42P10"));
        assert!(b.to_string().starts_with("[42P10] there is no unique"));
    }

    #[test]
    fn non_json_bodies_are_kept_short_and_on_one_line() {
        let page = format!("<html>\n<h1>502 Bad Gateway</h1>{}</html>", "x".repeat(500));
        let b = ErrorBody::parse(page.as_bytes());
        assert_eq!(b.code(), None);
        let s = b.to_string();
        assert!(
            s.contains("502 Bad Gateway") && s.len() < 260 && !s.contains('\n'),
            "{s}"
        );
        assert_eq!(ErrorBody::parse(b"").to_string(), "(empty body)");
    }

    #[test]
    fn transport_failures_that_cannot_heal_are_not_transient() {
        for (detail, kind) in [
            ("could not connect: client error (Connect): dns error: failed to lookup address information: Name or service not known", Kind::Unresolvable),
            ("could not connect: client error (Connect): received corrupt message of type InvalidContentType", Kind::Tls),
            ("could not connect: invalid peer certificate: UnknownIssuer", Kind::Tls),
            ("could not connect: tcp connect error: Connection refused (os error 111)", Kind::Transient),
            ("timed out", Kind::Transient),
        ] {
            assert_eq!(transport_kind(detail), kind, "{detail}");
        }
    }

    #[test]
    fn each_answer_has_one_kind() {
        let status = |code: u16, pg: Option<&str>| ApiError::Status {
            method: Method::GET,
            path: "/t".into(),
            status: StatusCode::from_u16(code).unwrap(),
            body: match pg {
                Some(c) => {
                    ErrorBody::parse(format!(r#"{{"code":"{c}","message":"m"}}"#).as_bytes())
                }
                None => ErrorBody::parse(b"<html>nope</html>"),
            },
            retry_after: None,
        };
        for (code, pg, kind) in [
            (503, None, Kind::Transient),
            (500, Some("40001"), Kind::Transient),
            (500, Some("XX000"), Kind::Unavailable),
            (429, None, Kind::Unavailable),
            (414, None, Kind::UrlTooLong),
            (401, Some("PGRST301"), Kind::KeyRefused),
            (404, Some("PGRST205"), Kind::MissingTable),
            (404, Some("42883"), Kind::Unexpected),
            (403, Some("42501"), Kind::NotGranted),
            (404, Some("PGRST125"), Kind::NotFound),
            (404, None, Kind::NotFound),
            (404, Some("42P01"), Kind::MissingTable),
            (400, Some("PGRST204"), Kind::MissingColumn),
            (400, Some("42P10"), Kind::UpsertRefused),
            (409, Some("23505"), Kind::Conflict),
            (400, Some("22P02"), Kind::Unexpected),
            (500, Some("57014"), Kind::StatementTimeout),
        ] {
            let e = status(code, pg);
            assert_eq!(e.kind(), kind, "{code} {pg:?}");
            assert_eq!(e.is_transient(), kind == Kind::Transient);
        }
        // PostgREST 12: a POST or PATCH to a missing table is 404 `{}`; on
        // /rpc/ a missing function is always PGRST202.
        let empty = |method: Method, path: &str| ApiError::Status {
            method,
            path: path.into(),
            status: StatusCode::NOT_FOUND,
            body: ErrorBody::parse(b"{}"),
            retry_after: None,
        };
        assert_eq!(
            empty(Method::POST, "/portal_usage_monthly").kind(),
            Kind::MissingTable
        );
        assert_eq!(
            empty(Method::PATCH, "/portal_usage_monthly").kind(),
            Kind::MissingTable
        );
        assert_eq!(empty(Method::GET, "/usage_requests").kind(), Kind::NotFound);
        assert_eq!(
            empty(Method::POST, "/rpc/usage_agg_book").kind(),
            Kind::NotFound
        );
    }
}

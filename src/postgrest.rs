//! A small PostgREST client: the protocol (headers, query strings, statuses,
//! error bodies) and nothing about usage. See
//! `shared/reference/postgrest-notes.md` for the facts it follows.

use std::fmt;
use std::time::Duration;

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
    fn parse(bytes: &[u8]) -> ErrorBody {
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
    },
    #[error("{method} {path} failed: {detail}")]
    Transport {
        method: Method,
        path: String,
        detail: String,
        timeout: bool,
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

impl ApiError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
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
}

impl Client {
    pub fn new(
        base: Url,
        key: &Secret,
        kind: KeyKind,
        timeout: Duration,
    ) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .default_headers(auth_headers(key, kind)?)
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10).min(timeout))
            .gzip(true)
            .build()?;
        Ok(Client { http, base })
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

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &Query,
        prefer: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<bytes::Bytes, ApiError> {
        let url = self.url(path, query);
        let mut req = self.http.request(method.clone(), url);
        if let Some(p) = prefer {
            req = req.header("Prefer", p);
        }
        if let Some(b) = body {
            req = req.header(CONTENT_TYPE, "application/json").body(b);
        }
        let path_for_errors = format!("/{path}");
        tracing::debug!(%method, path = %path_for_errors, ?query, "request");
        let transport = |e: reqwest::Error| ApiError::Transport {
            method: method.clone(),
            path: path_for_errors.clone(),
            timeout: e.is_timeout(),
            detail: describe_transport_error(&e),
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(transport)?;
        tracing::trace!(%status, bytes = bytes.len(), "response");
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(ApiError::Status {
                method,
                path: path_for_errors,
                status,
                body: ErrorBody::parse(&bytes),
            })
        }
    }

    fn decode<T: DeserializeOwned>(
        method: Method,
        path: &str,
        bytes: &[u8],
    ) -> Result<T, ApiError> {
        serde_json::from_slice(bytes).map_err(|e| ApiError::Decode {
            method,
            path: format!("/{path}"),
            detail: e.to_string(),
        })
    }

    /// GET rows. The server may return fewer than asked (its `max_rows` cap is
    /// silent), so a short page says nothing about the end of the table.
    pub async fn select<T: DeserializeOwned>(
        &self,
        table: &str,
        query: &Query,
    ) -> Result<Vec<T>, ApiError> {
        let bytes = self.send(Method::GET, table, query, None, None).await?;
        Self::decode(Method::GET, table, &bytes)
    }

    /// Bulk upsert: one request, one transaction. `rows` must all have the
    /// same keys (PGRST102 otherwise) and no two the same conflict key
    /// (Postgres 21000 otherwise): the caller guarantees both.
    pub async fn upsert<T: Serialize>(
        &self,
        table: &str,
        on_conflict: &str,
        rows: &[T],
    ) -> Result<(), ApiError> {
        let body = serde_json::to_vec(rows).expect("rows serialize");
        let query = vec![("on_conflict".to_string(), on_conflict.to_string())];
        self.send(
            Method::POST,
            table,
            &query,
            Some("resolution=merge-duplicates,return=minimal"),
            Some(body),
        )
        .await
        .map(drop)
    }

    /// Plain INSERT of one row; a duplicate key is a 409 `23505`.
    pub async fn insert<T: Serialize>(&self, table: &str, row: &T) -> Result<(), ApiError> {
        let body = serde_json::to_vec(row).expect("row serializes");
        self.send(
            Method::POST,
            table,
            &Query::new(),
            Some("return=minimal"),
            Some(body),
        )
        .await
        .map(drop)
    }

    /// PATCH the rows matching `filters`; returns how many matched (zero is
    /// not an error in PostgREST, so the count is the only way to know).
    pub async fn update<T: Serialize>(
        &self,
        table: &str,
        filters: &Query,
        body: &T,
    ) -> Result<usize, ApiError> {
        assert!(
            !filters.is_empty(),
            "a PATCH without a filter would touch every row"
        );
        let body = serde_json::to_vec(body).expect("body serializes");
        let mut query = filters.clone();
        query.push(("select".into(), "id".into()));
        let bytes = self
            .send(
                Method::PATCH,
                table,
                &query,
                Some("return=representation"),
                Some(body),
            )
            .await?;
        let rows: Vec<serde_json::Value> = Self::decode(Method::PATCH, table, &bytes)?;
        Ok(rows.len())
    }

    /// Calls a database function (`POST /rpc/<name>`).
    pub async fn rpc<A: Serialize, R: DeserializeOwned>(
        &self,
        name: &str,
        args: &A,
    ) -> Result<R, ApiError> {
        let path = format!("rpc/{name}");
        let body = serde_json::to_vec(args).expect("args serialize");
        let bytes = self
            .send(Method::POST, &path, &Query::new(), None, Some(body))
            .await?;
        Self::decode(Method::POST, &path, &bytes)
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
}

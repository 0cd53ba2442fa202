//! The alerts webhook's HTTP client (docs/quotas.md, "Delivery"): one POST
//! of one alert, signed as Standard Webhooks specify (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature`). Redirects are never followed
//! (a redirect is a failure that names where it pointed; a 3xx that points
//! nowhere, such as 304, is a plain failing answer), a 429 or 503 says how
//! long it asked to wait (`Retry-After`), the secret is
//! never sent (only the signature it makes), and the URL obeys the
//! Supabase URL's rule (checked in `config`). Retries and what is recorded
//! are the caller's.

use std::time::Duration;

use reqwest::Url;

use crate::config::AlertsWebhook;

/// The longest wait between two attempts: the backoff's cap, and the cap
/// on what a receiver's `Retry-After` asks for.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(600);

/// Why one attempt failed, in a line that names no secret (a URL is shown
/// without its query).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptFailed {
    /// The receiver answered, but not 2xx; on 429 and 503, with the wait
    /// its `Retry-After` asked for (capped at [`MAX_RETRY_DELAY`]).
    #[error("the receiver answered {status}{}{}", body_note(.body), retry_note(.retry_after))]
    Status {
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    /// A redirect, not followed (the alert would go elsewhere).
    #[error("the receiver answered {status}, a redirect to {location}, which is not followed")]
    Redirect { status: u16, location: String },
    /// A 3xx that redirects nowhere (304 Not Modified, 300 without a
    /// location, 305, 306): not a 2xx, so not delivered, and tried again
    /// like any other failing answer.
    #[error(
        "the receiver answered {status}{}, which is neither a 2xx (delivered) nor a redirect: not delivered",
        reason_note(*.status)
    )]
    Not2xx { status: u16 },
    /// No answer within the attempt's timeout.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The connection failed or was cut.
    #[error("{0}")]
    Transport(String),
}

fn retry_note(wait: &Option<Duration>) -> String {
    wait.map_or(String::new(), |w| {
        format!(
            " (it asked to wait {} before the next attempt)",
            humantime::format_duration(w)
        )
    })
}

fn reason_note(status: u16) -> String {
    reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .map_or(String::new(), |r| format!(" {r}"))
}

/// Statuses that send the request elsewhere (with a `Location`): never
/// followed. 300 is one only when it names a location.
fn redirects(status: u16, has_location: bool) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308) || (status == 300 && has_location)
}

/// A `Retry-After` value (RFC 9110 10.2.3): seconds, or an HTTP date
/// (IMF-fixdate), as a wait from `now`, at most [`MAX_RETRY_DELAY`]. None
/// when it is neither.
pub fn retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_DELAY))
}

fn body_note(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

/// Posts signed alerts to one receiver.
pub struct Sender {
    http: reqwest::Client,
    url: Url,
    shown: String,
    key: crate::signing::WebhookKey,
    timeout: Duration,
}

impl Sender {
    pub fn new(hook: &AlertsWebhook, timeout: Duration) -> anyhow::Result<Sender> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("usage-agg/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Sender {
            http,
            url: hook.url.clone(),
            shown: hook.shown(),
            key: hook.key.clone(),
            timeout,
        })
    }

    /// The receiver's URL as messages show it (no query).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// One attempt: POST `body` with `id` and a signature made now. Ok with
    /// the 2xx status.
    pub async fn send(&self, id: &str, body: &str) -> Result<u16, AttemptFailed> {
        let timestamp = chrono::Utc::now().timestamp();
        let signature = self.key.sign(id, timestamp, body.as_bytes());
        let answer = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| self.transport(&e))?;
        let status = answer.status();
        if status.is_success() {
            return Ok(status.as_u16());
        }
        let has_location = answer.headers().contains_key(reqwest::header::LOCATION);
        if status.is_redirection() && !redirects(status.as_u16(), has_location) {
            return Err(AttemptFailed::Not2xx {
                status: status.as_u16(),
            });
        }
        if status.is_redirection() {
            let location = answer
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(|l| match self.url.join(l) {
                    Ok(mut u) => {
                        u.set_query(None);
                        u.to_string()
                    }
                    Err(_) => "an unreadable location".into(),
                })
                .unwrap_or_else(|| "nowhere said".into());
            return Err(AttemptFailed::Redirect {
                status: status.as_u16(),
                location,
            });
        }
        // Asked to wait (RFC 9110): on "too many requests" and "service
        // unavailable", where it means the receiver's own pace.
        let wait = match status.as_u16() {
            429 | 503 => answer
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after(v, chrono::Utc::now())),
            _ => None,
        };
        let body = answer.text().await.unwrap_or_default();
        let mut body: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
        if body.chars().count() > 200 {
            body = body.chars().take(200).collect::<String>() + "...";
        }
        Err(AttemptFailed::Status {
            status: status.as_u16(),
            body,
            retry_after: wait,
        })
    }

    fn transport(&self, e: &reqwest::Error) -> AttemptFailed {
        if e.is_timeout() {
            return AttemptFailed::Timeout(self.timeout);
        }
        // reqwest's message names the URL; the innermost cause says what
        // happened (refused, reset, a TLS failure).
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        let what = if e.is_connect() {
            "could not connect"
        } else {
            "the request failed"
        };
        AttemptFailed::Transport(format!("{what} to {}: {cause}", self.shown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339("2026-12-07T08:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc)
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date_and_is_capped() {
        assert_eq!(retry_after("5", now()), Some(Duration::from_secs(5)));
        assert_eq!(retry_after(" 0 ", now()), Some(Duration::ZERO));
        assert_eq!(
            retry_after("Mon, 07 Dec 2026 08:00:30 GMT", now()),
            Some(Duration::from_secs(30))
        );
        // A date gone by: no wait.
        assert_eq!(
            retry_after("Mon, 07 Dec 2026 07:00:00 GMT", now()),
            Some(Duration::ZERO)
        );
        // Never longer than the backoff's own cap.
        assert_eq!(retry_after("86400", now()), Some(MAX_RETRY_DELAY));
        assert_eq!(
            retry_after("Tue, 08 Dec 2026 08:00:00 GMT", now()),
            Some(MAX_RETRY_DELAY)
        );
        for bad in ["", "-1", "soon", "1.5"] {
            assert_eq!(retry_after(bad, now()), None, "{bad:?}");
        }
    }

    #[test]
    fn only_a_status_that_sends_elsewhere_is_a_redirect() {
        for s in [301, 302, 303, 307, 308] {
            assert!(redirects(s, true), "{s}");
        }
        assert!(redirects(300, true));
        for s in [300, 304, 305, 306] {
            assert!(!redirects(s, false), "{s}");
        }
        assert!(!redirects(304, true), "304 Not Modified points nowhere");
        let e = AttemptFailed::Not2xx { status: 304 };
        assert_eq!(
            e.to_string(),
            "the receiver answered 304 Not Modified, which is neither a 2xx (delivered) nor a redirect: \
             not delivered"
        );
    }
}

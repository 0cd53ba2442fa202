//! The alerts webhook's HTTP client (docs/quotas.md, "Delivery"): one POST
//! of one alert, signed as Standard Webhooks specify (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature`). Redirects are never followed
//! (a 3xx answer is a failure that names where it pointed), the secret is
//! never sent (only the signature it makes), and the URL obeys the
//! Supabase URL's rule (checked in `config`). Retries and what is recorded
//! are the caller's.

use std::time::Duration;

use reqwest::Url;

use crate::config::AlertsWebhook;

/// Why one attempt failed, in a line that names no secret (a URL is shown
/// without its query).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptFailed {
    /// The receiver answered, but not 2xx.
    #[error("the receiver answered {status}{}", body_note(.body))]
    Status { status: u16, body: String },
    /// A redirect, not followed (the alert would go elsewhere).
    #[error("the receiver answered {status}, a redirect to {location}, which is not followed")]
    Redirect { status: u16, location: String },
    /// No answer within the attempt's timeout.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The connection failed or was cut.
    #[error("{0}")]
    Transport(String),
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
        let body = answer.text().await.unwrap_or_default();
        let mut body: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
        if body.chars().count() > 200 {
            body = body.chars().take(200).collect::<String>() + "...";
        }
        Err(AttemptFailed::Status {
            status: status.as_u16(),
            body,
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

//! healthchecks.io-style pings: `<URL>/start` before a run, `<URL>/<exit
//! status>` after, with the JSON summary as the body, so a missed or failed
//! cron run pages someone. A ping that fails is logged and never fails the
//! run: monitoring must not become the outage.

use std::time::Duration;

use reqwest::Url;

use crate::config::ConfigError;
use crate::exit::Status;
use crate::postgrest::USER_AGENT;

pub struct Ping {
    base: Option<Url>,
    http: reqwest::Client,
}

impl Ping {
    /// No URL: pings are off. A URL that does not parse is a configuration
    /// error, said before the run rather than discovered after it.
    pub fn new(url: Option<&str>) -> Result<Ping, ConfigError> {
        let base = match url.map(str::trim).filter(|u| !u.is_empty()) {
            None => None,
            Some(u) => {
                let parsed = Url::parse(u.trim_end_matches('/'))
                    .ok()
                    .filter(|p| matches!(p.scheme(), "http" | "https"));
                let parsed = parsed.ok_or_else(|| {
                    ConfigError(format!(
                        "--ping-url / USAGE_AGG_PING_URL is not an http(s) URL: {u:?}; expected something like https://hc-ping.com/<uuid>"
                    ))
                })?;
                // The status goes on the path (<URL>/start, <URL>/65): after
                // a query it would land in the query (a push monitor's
                // ?status=up would report every failure as up), after a
                // fragment nowhere the monitor sees (a plain success ping).
                if parsed.query().is_some() || parsed.fragment().is_some() {
                    return Err(ConfigError(
                        "--ping-url / USAGE_AGG_PING_URL has a query (?...) or a fragment (#...): the exit status \
                         is added to its path (<URL>/start, then <URL>/<exit status>), so it must end in a path, \
                         like https://hc-ping.com/<uuid>; a monitor that takes its status in a query (Uptime \
                         Kuma's push URL) needs a wrapper script"
                            .into(),
                    ));
                }
                Some(parsed)
            }
        };
        // Its own client: the service role key must never reach a monitor.
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ConfigError(format!("cannot set up pings: {e}")))?;
        Ok(Ping { base, http })
    }

    fn url(&self, suffix: &str) -> Option<Url> {
        let base = self.base.as_ref()?;
        Url::parse(&format!("{}/{suffix}", base.as_str().trim_end_matches('/'))).ok()
    }

    pub async fn start(&self) {
        if let Some(url) = self.url("start") {
            self.send(self.http.get(url)).await;
        }
    }

    pub async fn finish(&self, status: Status, summary: &serde_json::Value) {
        if let Some(url) = self.url(&status.code().to_string()) {
            self.send(self.http.post(url).json(summary)).await;
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) {
        match req.send().await {
            Ok(resp) if resp.status().is_success() => {}
            Ok(resp) => tracing::warn!(
                "the monitoring ping was answered HTTP {}; the run is not affected",
                resp.status()
            ),
            Err(e) => tracing::warn!(
                "the monitoring ping failed ({}); the run is not affected",
                e.without_url()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_whose_status_would_land_in_a_query_or_fragment_is_refused() {
        assert!(Ping::new(Some("https://hc-ping.com/abc")).is_ok());
        for bad in [
            "http://h/api/push/tok?status=up&msg=OK",
            "http://h/hc/uuid#frag",
            "ftp://h/x",
            "not a url",
        ] {
            assert!(Ping::new(Some(bad)).is_err(), "{bad}");
        }
    }
}

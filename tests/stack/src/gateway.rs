//! A stand-in for Supabase's API gateway, put in front of the REST server so
//! that usage-agg is tested the way Supabase serves it: given the project
//! URL alone (`SUPABASE_DEV_URL=http://127.0.0.1:<port>`), it must compose
//! `<URL>/rest/v1` itself, and each kind of key must reach PostgREST as the
//! role Supabase would give it.
//!
//! What it copies of Supabase's gateway:
//!
//! - **One route, `/rest/v1/`**, its prefix stripped before PostgREST
//!   (`/rest/v1/usage_requests?...` arrives as `/usage_requests?...`).
//!   Anything else is 404 `{"message":"no Route matched with those values"}`,
//!   before any key is looked at, as the gateway's router does.
//! - **The `apikey` header is required:** none is 401 (`No API key found in
//!   request`), one that is not a key of this project is 401 (`Invalid API
//!   key`). Both are JSON with `message` and `hint` and no PostgREST `code`.
//!   The header is removed before PostgREST (the gateway hides credentials).
//! - **Legacy keys** (the `service_role` and `anon` JWTs) pass: the request
//!   goes on with its `Authorization` exactly as the client sent it (none
//!   sent, none forwarded: PostgREST then runs it as `anon`).
//! - **New keys:** an `sb_secret_...` key has its `Authorization` replaced by
//!   a `service_role` JWT minted from the project's JWT secret; an
//!   `sb_publishable_...` key gets an `anon` one. The client never sends a
//!   JWT for them (usage-agg sends an `sb_secret_` key in `apikey` only).
//!
//! What it does not copy:
//!
//! - TLS (plain http on loopback, which usage-agg allows for 127.0.0.1);
//!   HTTP/2; keep-alive (one request a connection, `Connection: close`).
//! - The other routes (`/auth/v1`, `/storage/v1`, `/functions/v1`,
//!   `/realtime/v1`, `/graphql/v1`) and the dashboard's API.
//! - Rate limits, request size limits, the 60 s request timeout, the 414
//!   past about 8 KB of URL (tests/stack/src/proxy.rs injects those), CORS
//!   and preflight `OPTIONS`, `Via`/`X-Kong-*`/`sb-*` response headers.
//! - The `apikey` query parameter (only the header is read).
//! - JWT checks: it does not verify a legacy key's signature or expiry, or
//!   a user's session JWT (PostgREST behind it does, with the same secret);
//!   the JWTs it mints do not expire within the tests; a user's session JWT
//!   sent with a publishable key is replaced by `anon`, where Supabase would
//!   pass it through as `authenticated`.
//! - The refusal of secret keys from browsers (by `User-Agent`), key
//!   rotation, revoked keys, and several secret keys per project (one of
//!   each kind here).
//!
//! Against an external PostgREST (`USAGE_AGG_TEST_REST_URL`) the JWT secret
//! is not known, so the new keys are given the legacy JWTs
//! (`USAGE_AGG_TEST_KEY`, `USAGE_AGG_TEST_ANON_KEY`) instead of minted ones:
//! the same roles. Upstream must be plain `http://`.

use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::proxy::{read_message, Message};

/// The project's keys, as the gateway knows them.
#[derive(Debug, Clone)]
pub struct GatewayKeys {
    /// The legacy `service_role` key (a JWT).
    pub service_role_jwt: String,
    /// The legacy `anon` key (a JWT); empty when unknown.
    pub anon_jwt: String,
    /// The JWT secret to mint tokens for the new keys; without it the
    /// legacy JWTs stand in.
    pub jwt_secret: Option<String>,
}

/// One request as the gateway handled it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The request line as the client sent it (`GET /rest/v1/usage_requests?... HTTP/1.1`).
    pub request_line: String,
    /// The status answered (the gateway's own, or PostgREST's).
    pub status: u16,
    /// The `Authorization` the client sent.
    pub authorization_sent: Option<String>,
    /// The `Authorization` forwarded to PostgREST (None when nothing was
    /// forwarded, or forwarded without one).
    pub authorization_forwarded: Option<String>,
    /// Whether the request reached PostgREST.
    pub forwarded: bool,
}

struct Shared {
    upstream_authority: String,
    upstream_base: String,
    keys: GatewayKeys,
    secret_key: String,
    publishable_key: String,
    log: Mutex<Vec<Seen>>,
}

/// The gateway; stops when dropped.
pub struct Gateway {
    /// The project URL: what `SUPABASE_<ENV>_URL` holds.
    pub url: String,
    /// This project's `sb_secret_...` key (the service role).
    pub secret_key: String,
    /// This project's `sb_publishable_...` key (the anon role).
    pub publishable_key: String,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    port: u16,
}

impl Gateway {
    /// A gateway for the REST server at `upstream` (`http://127.0.0.1:PORT`,
    /// possibly with a path).
    pub fn start(upstream: &str, keys: GatewayKeys) -> Gateway {
        let rest = upstream
            .strip_prefix("http://")
            .expect("the gateway forwards to plain http only");
        let (authority, base) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        static N: AtomicUsize = AtomicUsize::new(0);
        let nonce = format!(
            "{:x}{:x}{:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let shared = Arc::new(Shared {
            upstream_authority: authority.to_string(),
            upstream_base: base.to_string(),
            keys,
            secret_key: format!("sb_secret_{nonce}"),
            publishable_key: format!("sb_publishable_{nonce}"),
            log: Mutex::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        let _ = handle(conn, &shared);
                    });
                }
            });
        }
        Gateway {
            url: format!("http://127.0.0.1:{port}"),
            secret_key: shared.secret_key.clone(),
            publishable_key: shared.publishable_key.clone(),
            shared,
            stop,
            port,
        }
    }

    /// The environment a `usage-agg --env dev` run needs to reach the
    /// project through the gateway with `key`: the project URL and the key,
    /// and no REST URL override.
    pub fn env(&self, key: &str) -> Vec<(String, String)> {
        vec![
            ("SUPABASE_DEV_URL".into(), self.url.clone()),
            ("SUPABASE_DEV_SERVICE_ROLE_KEY".into(), key.into()),
        ]
    }

    /// Every request so far, in the order they were answered.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.log.lock().unwrap().clone()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// What the gateway does with a request: forward it (to this path, with
/// this Authorization), or answer it itself.
enum Decision {
    Forward {
        path: String,
        authorization: Authorization,
    },
    Refuse(u16, &'static str),
}

enum Authorization {
    AsSent,
    Replace(Option<String>),
}

const NO_ROUTE: &str = r#"{"message":"no Route matched with those values"}"#;
const NO_KEY: &str = r#"{"message":"No API key found in request","hint":"No `apikey` request header or url param was found."}"#;
const BAD_KEY: &str = r#"{"message":"Invalid API key","hint":"Double check your Supabase `anon` or `service_role` API key."}"#;

fn decide(shared: &Shared, target: &str, apikey: Option<&str>) -> Decision {
    let Some(rest) = target.strip_prefix("/rest/v1/") else {
        return Decision::Refuse(404, NO_ROUTE);
    };
    let path = format!("{}/{rest}", shared.upstream_base);
    let keys = &shared.keys;
    let mint = |role: &str, legacy: &str| match &keys.jwt_secret {
        Some(secret) => Some(crate::mint_jwt(role, secret)),
        None => (!legacy.is_empty()).then(|| legacy.to_string()),
    };
    let authorization = match apikey {
        None => return Decision::Refuse(401, NO_KEY),
        Some(k)
            if k == keys.service_role_jwt || (!keys.anon_jwt.is_empty() && k == keys.anon_jwt) =>
        {
            Authorization::AsSent
        }
        Some(k) if k == shared.secret_key => Authorization::Replace(
            mint("service_role", &keys.service_role_jwt).map(|t| format!("Bearer {t}")),
        ),
        Some(k) if k == shared.publishable_key => {
            Authorization::Replace(mint("anon", &keys.anon_jwt).map(|t| format!("Bearer {t}")))
        }
        Some(_) => return Decision::Refuse(401, BAD_KEY),
    };
    Decision::Forward {
        path,
        authorization,
    }
}

fn handle(client: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut request = read_message(&mut reader, false)?;
    let request_line = request.start.clone();
    let mut parts = request_line.split_whitespace();
    let (method, target, version) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or("HTTP/1.1"),
    );
    let authorization_sent = request.header("authorization").map(str::to_string);
    let mut client = client;
    let record = |status: u16, forwarded: Option<Option<String>>| {
        shared.log.lock().unwrap().push(Seen {
            request_line: request_line.clone(),
            status,
            authorization_sent: authorization_sent.clone(),
            authorization_forwarded: forwarded.clone().flatten(),
            forwarded: forwarded.is_some(),
        });
    };
    let (path, authorization) = match decide(shared, target, request.header("apikey")) {
        Decision::Refuse(status, body) => {
            let reason = if status == 404 {
                "Not Found"
            } else {
                "Unauthorized"
            };
            let msg = Message {
                start: format!("HTTP/1.1 {status} {reason}"),
                headers: vec![(
                    "Content-Type".into(),
                    "application/json; charset=utf-8".into(),
                )],
                body: body.as_bytes().to_vec(),
            };
            // Recorded before the answer goes out: a client that has its
            // answer finds its request in `seen()` (a race under load).
            record(status, None);
            client.write_all(&msg.head(msg.body.len()))?;
            client.write_all(&msg.body)?;
            return client.shutdown(Shutdown::Both);
        }
        Decision::Forward {
            path,
            authorization,
        } => (path, authorization),
    };
    request
        .headers
        .retain(|(k, _)| !k.eq_ignore_ascii_case("apikey"));
    if let Authorization::Replace(value) = authorization {
        request
            .headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
        if let Some(v) = value {
            request.headers.push(("Authorization".into(), v));
        }
    }
    let forwarded_authorization = request.header("authorization").map(str::to_string);
    request.start = format!("{method} {path} {version}");
    let mut up = TcpStream::connect(&shared.upstream_authority)?;
    up.write_all(&request.head(request.body.len()))?;
    up.write_all(&request.body)?;
    let response = read_message(&mut BufReader::new(up), true)?;
    let status = response
        .start
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // Before the answer goes out, as above.
    record(status, Some(forwarded_authorization));
    client.write_all(&response.head(response.body.len()))?;
    client.write_all(&response.body)?;
    client.flush()?;
    client.shutdown(Shutdown::Both)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that answers 200 with what it received: the request
    /// line, then each header as `name: value`.
    fn echo() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://127.0.0.1:{}/base/",
            listener.local_addr().unwrap().port()
        );
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let Ok(msg) = read_message(&mut BufReader::new(&conn), false) else {
                    continue;
                };
                let mut body = format!("{}\n", msg.start);
                for (k, v) in &msg.headers {
                    body.push_str(&format!("{}: {v}\n", k.to_ascii_lowercase()));
                }
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        url
    }

    const SECRET: &str = "gateway-test-secret-at-least-32-characters";

    fn gateway() -> Gateway {
        Gateway::start(
            &echo(),
            GatewayKeys {
                service_role_jwt: crate::mint_jwt("service_role", SECRET),
                anon_jwt: crate::mint_jwt("anon", SECRET),
                jwt_secret: Some(SECRET.into()),
            },
        )
    }

    fn get(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut req = reqwest::blocking::Client::new().get(format!("{}{path}", gw.url));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().unwrap();
        (resp.status().as_u16(), resp.text().unwrap())
    }

    #[test]
    fn only_rest_v1_is_served_and_its_prefix_is_stripped() {
        let gw = gateway();
        let key = gw.keys_service_role();
        for path in [
            "/",
            "/usage_requests",
            "/rest/v1",
            "/auth/v1/user",
            "/rest/v2/x",
        ] {
            let (status, body) = get(&gw, path, &[("apikey", &key)]);
            assert_eq!((status, body.as_str()), (404, NO_ROUTE), "{path}");
        }
        let (status, body) = get(
            &gw,
            "/rest/v1/usage_requests?id=gt.5&limit=2",
            &[("apikey", &key)],
        );
        assert_eq!(status, 200);
        assert!(
            body.starts_with("GET /base/usage_requests?id=gt.5&limit=2 HTTP/1.1\n"),
            "{body}"
        );
        assert!(
            !body.contains("apikey:"),
            "the apikey header is not forwarded: {body}"
        );
    }

    #[test]
    fn no_apikey_or_an_unknown_one_is_401_before_postgrest() {
        let gw = gateway();
        let jwt = gw.keys_service_role();
        let bearer = format!("Bearer {jwt}");
        assert_eq!(
            get(&gw, "/rest/v1/t", &[("authorization", &bearer)]),
            (401, NO_KEY.to_string())
        );
        for wrong in [
            "sb_secret_wrong",
            "sb_publishable_wrong",
            "eyJ.not.this-projects",
            "",
        ] {
            assert_eq!(
                get(&gw, "/rest/v1/t", &[("apikey", wrong)]),
                (401, BAD_KEY.to_string()),
                "{wrong:?}"
            );
        }
        assert!(gw.seen().iter().all(|s| !s.forwarded));
    }

    #[test]
    fn a_legacy_key_passes_with_its_authorization_as_sent() {
        let gw = gateway();
        let jwt = gw.keys_service_role();
        let bearer = format!("Bearer {jwt}");
        let (_, body) = get(
            &gw,
            "/rest/v1/t",
            &[("apikey", &jwt), ("authorization", &bearer)],
        );
        assert!(
            body.contains(&format!("authorization: {bearer}\n")),
            "{body}"
        );
        // None sent, none forwarded: PostgREST runs it as anon.
        let (_, body) = get(&gw, "/rest/v1/t", &[("apikey", &jwt)]);
        assert!(!body.contains("authorization:"), "{body}");
    }

    #[test]
    fn new_keys_get_a_minted_jwt_for_their_role() {
        let gw = gateway();
        let (_, body) = get(
            &gw,
            "/rest/v1/t",
            &[
                ("apikey", &gw.secret_key),
                ("authorization", "Bearer whatever"),
            ],
        );
        let service = format!(
            "authorization: Bearer {}\n",
            crate::mint_jwt("service_role", SECRET)
        );
        assert!(
            body.contains(&service) && !body.contains("whatever"),
            "{body}"
        );
        let (_, body) = get(&gw, "/rest/v1/t", &[("apikey", &gw.publishable_key)]);
        let anon = format!(
            "authorization: Bearer {}\n",
            crate::mint_jwt("anon", SECRET)
        );
        assert!(body.contains(&anon), "{body}");
        let seen = gw.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(
            seen[0].authorization_sent.as_deref(),
            Some("Bearer whatever")
        );
        assert!(seen[0]
            .authorization_forwarded
            .as_deref()
            .unwrap()
            .starts_with("Bearer eyJ"));
    }

    impl Gateway {
        fn keys_service_role(&self) -> String {
            self.shared.keys.service_role_jwt.clone()
        }
    }
}

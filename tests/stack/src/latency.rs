//! A latency-injecting HTTP proxy, put between usage-agg and the REST
//! server to stand for a WAN: every request waits `each_way` before it is
//! forwarded, and its response waits `each_way` again before it is returned,
//! so each request costs one round trip of `2 x each_way` on top of the
//! server's own time. The benchmark measures the REST engine through it.
//!
//! Unlike the fault proxy ([`crate::proxy`]), it keeps connections alive
//! (HTTP/1.1 keep-alive, one upstream connection per client connection, as
//! a real client pool sees it) and serves every connection on a thread of
//! its own, so 16 or 32 concurrent connections wait their delays side by
//! side and are never serialised. What it does not model: bandwidth (a
//! delay per request, whatever its size), TCP's slow start and a new
//! connection's handshake (connecting costs no round trip), jitter and loss.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::proxy::{read_message, Message};

/// The proxy; stops accepting when dropped (connections already open end
/// when their client closes them).
pub struct LatencyProxy {
    /// `http://127.0.0.1:<port>`: use it as the REST URL.
    pub url: String,
    /// The delay added each way.
    pub each_way: Duration,
    stop: Arc<AtomicBool>,
    port: u16,
    connections: Arc<AtomicUsize>,
    requests: Arc<Routes>,
}

/// Requests forwarded, by method and path (the query left out).
type Routes = Mutex<BTreeMap<String, usize>>;

impl LatencyProxy {
    /// Proxies to `upstream` (`http://127.0.0.1:PORT`), adding `each_way`
    /// before forwarding each request and again before returning its
    /// response.
    pub fn start(upstream: &str, each_way: Duration) -> LatencyProxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let requests: Arc<Routes> = Arc::default();
        {
            let (stop, connections, requests) =
                (stop.clone(), connections.clone(), requests.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (upstream, requests) = (upstream.clone(), requests.clone());
                    std::thread::spawn(move || {
                        let _ = serve(conn, &upstream, each_way, &requests);
                    });
                }
            });
        }
        LatencyProxy {
            url: format!("http://127.0.0.1:{port}"),
            each_way,
            stop,
            port,
            connections,
            requests,
        }
    }

    /// Client connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests forwarded so far.
    pub fn requests(&self) -> usize {
        self.requests.lock().unwrap().values().sum()
    }

    /// Requests forwarded so far by method and path (`GET /usage_requests`,
    /// `POST /rpc/usage_agg_lease`, ...), in that order.
    pub fn requests_by_route(&self) -> BTreeMap<String, usize> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Whether a message asks for its connection to be closed after it.
fn closes(m: &Message) -> bool {
    m.header("connection")
        .is_some_and(|v| v.to_ascii_lowercase().contains("close"))
        || m.start.starts_with("HTTP/1.0")
        || m.start.ends_with("HTTP/1.0")
}

/// Whether a response to `method` with this status line carries a body.
fn has_body(method: &str, status_line: &str) -> bool {
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    method != "HEAD" && !(100..200).contains(&status) && status != 204 && status != 304
}

/// The message's head with its body's real length and the connection
/// header we choose (hop-by-hop headers are ours to set).
fn head(m: &Message, body_allowed: bool, close: bool) -> Vec<u8> {
    let mut out = format!("{}\r\n", m.start);
    for (k, v) in &m.headers {
        let k_lower = k.to_ascii_lowercase();
        if [
            "connection",
            "content-length",
            "transfer-encoding",
            "keep-alive",
        ]
        .contains(&k_lower.as_str())
        {
            continue;
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if body_allowed {
        out.push_str(&format!("Content-Length: {}\r\n", m.body.len()));
    }
    out.push_str(if close {
        "Connection: close\r\n\r\n"
    } else {
        "Connection: keep-alive\r\n\r\n"
    });
    out.into_bytes()
}

/// One upstream connection, kept across the client connection's requests.
struct Upstream {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Upstream {
    fn connect(addr: &str) -> std::io::Result<Upstream> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(Upstream {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Sends the request and reads its response; Ok(None) when the
    /// connection turned out closed before any answer (a kept-alive
    /// connection the server had dropped).
    fn exchange(
        &mut self,
        method: &str,
        request: &[u8],
        body: &[u8],
    ) -> std::io::Result<Option<Message>> {
        if self.writer.write_all(request).is_err() || self.writer.write_all(body).is_err() {
            return Ok(None);
        }
        let mut response = match read_message(&mut self.reader, false) {
            Ok(m) if !m.start.is_empty() => m,
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e),
        };
        // Neither a length nor chunks: the body runs to the end of the
        // connection.
        let delimited = response.header("content-length").is_some()
            || response.header("transfer-encoding").is_some();
        if !delimited && has_body(method, &response.start) {
            self.reader.read_to_end(&mut response.body)?;
            response.headers.push(("Connection".into(), "close".into()));
        }
        Ok(Some(response))
    }
}

fn serve(
    client: TcpStream,
    upstream: &str,
    each_way: Duration,
    requests: &Routes,
) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut writer = client;
    let mut up: Option<Upstream> = None;
    loop {
        // The end of the connection between requests is the client's
        // ordinary goodbye.
        if reader.fill_buf()?.is_empty() {
            return Ok(());
        }
        let request = read_message(&mut reader, false)?;
        if request.start.is_empty() {
            return Ok(());
        }
        let mut parts = request.start.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
        *requests
            .lock()
            .unwrap()
            .entry(format!("{method} {path}"))
            .or_default() += 1;
        let sends_body = !request.body.is_empty() || request.header("content-length").is_some();
        let request_head = head(&request, sends_body, false);
        std::thread::sleep(each_way); // the request's way out: the latency injected
        let mut response = None;
        // A kept-alive upstream connection may have been closed by the
        // server meanwhile: one fresh connection, then give up.
        for fresh in [false, true] {
            if fresh || up.is_none() {
                up = Some(Upstream::connect(upstream)?);
            }
            if let Some(r) = up
                .as_mut()
                .unwrap()
                .exchange(&method, &request_head, &request.body)?
            {
                response = Some(r);
                break;
            }
            up = None;
        }
        let Some(response) = response else {
            return writer.shutdown(Shutdown::Both);
        };
        let close = closes(&request) || closes(&response);
        if closes(&response) {
            up = None;
        }
        std::thread::sleep(each_way); // the response's way back
        writer.write_all(&head(&response, has_body(&method, &response.start), close))?;
        writer.write_all(&response.body)?;
        writer.flush()?;
        if close {
            return writer.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An upstream that keeps connections alive and answers each request
    /// with its own request line (chunked for paths under /chunked),
    /// counting the connections it accepted.
    fn upstream() -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut w = conn;
                    loop {
                        let Ok(m) = read_message(&mut r, false) else {
                            return;
                        };
                        if m.start.is_empty() {
                            return;
                        }
                        let body = format!("{} {}", m.start, String::from_utf8_lossy(&m.body));
                        let out = if m.start.contains(" /chunked") {
                            format!(
                                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                                body.len()
                            )
                        } else {
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                        };
                        if w.write_all(out.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    #[test]
    fn sixteen_keep_alive_connections_wait_side_by_side() {
        let (up, accepted) = upstream();
        let proxy = LatencyProxy::start(&up, Duration::from_millis(50));
        let http = reqwest::blocking::Client::new();
        let started = Instant::now();
        std::thread::scope(|s| {
            for t in 0..16 {
                let (http, url) = (&http, &proxy.url);
                s.spawn(move || {
                    for i in 0..4 {
                        let one = Instant::now();
                        let body = http
                            .get(format!("{url}/t{t}/r{i}?x=1"))
                            .send()
                            .unwrap()
                            .text()
                            .unwrap();
                        assert!(body.starts_with(&format!("GET /t{t}/r{i}?x=1 ")), "{body}");
                        assert!(
                            one.elapsed() >= Duration::from_millis(100),
                            "a round trip each request"
                        );
                    }
                });
            }
        });
        let took = started.elapsed();
        // Serialised, 64 requests would take 6.4 s; side by side, 4 round trips.
        assert!(took < Duration::from_millis(2000), "took {took:?}");
        assert_eq!(proxy.requests(), 64);
        assert_eq!(proxy.requests_by_route()["GET /t3/r2"], 1);
        assert!(
            proxy.connections() <= 16,
            "{} connections: not kept alive",
            proxy.connections()
        );
        assert!(
            accepted.load(Ordering::SeqCst) <= 16,
            "upstream connections not kept alive"
        );
    }

    #[test]
    fn bodies_and_chunked_answers_pass_through() {
        let (up, _) = upstream();
        let proxy = LatencyProxy::start(&up, Duration::from_millis(1));
        let http = reqwest::blocking::Client::new();
        let body = http
            .post(format!("{}/rows", proxy.url))
            .body("{\"a\":1}")
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert!(body.starts_with("POST /rows HTTP/1.1 {\"a\":1}"), "{body}");
        let body = http
            .get(format!("{}/chunked/x", proxy.url))
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert!(body.starts_with("GET /chunked/x HTTP/1.1"), "{body}");
    }
}

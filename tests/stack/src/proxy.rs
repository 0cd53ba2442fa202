//! A fault-injecting HTTP proxy, put between usage-agg and the real server
//! for the faults a real server will not produce on demand: a 503 burst, a
//! connection cut mid-body, truncated JSON, a slow answer, a gateway's 414 or
//! HTML error page, a redirect to another origin. Requests no rule matches
//! pass through untouched.
//!
//! HTTP/1.1 only, one request per connection (it answers
//! `Connection: close`), which is all a test needs.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer this instead of forwarding.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Forward, then send the headers and half the body, and hang up.
    CutBody,
    /// Forward, then answer with only the first half of the body, as a
    /// well-formed response: the JSON inside is cut short.
    TruncateBody,
    /// Wait this long, then forward.
    Delay(Duration),
    /// Hang up without answering.
    HangUp,
}

impl Fault {
    /// A 503 as PostgREST sends when its pool is exhausted, with Retry-After.
    pub fn unavailable(retry_after_secs: u64) -> Fault {
        Fault::Respond {
            status: 503,
            headers: vec![("Retry-After".into(), retry_after_secs.to_string())],
            body: r#"{"code":"PGRST003","message":"Timed out acquiring connection from connection pool.","details":null,"hint":null}"#.into(),
        }
    }

    /// A redirect (301, 302, 307, 308) to `location`, as a gateway answers
    /// for a project moved elsewhere.
    pub fn redirect(status: u16, location: &str) -> Fault {
        Fault::Respond {
            status,
            headers: vec![("Location".into(), location.into())],
            body: String::new(),
        }
    }

    /// A gateway's HTML error page.
    pub fn html(status: u16, title: &str) -> Fault {
        Fault::Respond {
            status,
            headers: vec![("Content-Type".into(), "text/html".into())],
            body: format!("<html>\n<head><title>{title}</title></head>\n<body>\n<h1>{title}</h1>\n</body>\n</html>\n"),
        }
    }
}

struct Rule {
    method: String,
    path_prefix: String,
    skip: usize,
    fault: Fault,
    remaining: usize,
}

/// The proxy; stops when dropped.
pub struct FaultProxy {
    pub url: String,
    rules: Arc<Mutex<Vec<Rule>>>,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    port: u16,
}

impl FaultProxy {
    /// Proxies to `upstream` (`http://127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let rules: Arc<Mutex<Vec<Rule>>> = Arc::default();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (rules, log, stop) = (rules.clone(), log.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (rules, log, upstream) = (rules.clone(), log.clone(), upstream.clone());
                    std::thread::spawn(move || {
                        let _ = handle(conn, &upstream, &rules, &log);
                    });
                }
            });
        }
        FaultProxy {
            url: format!("http://127.0.0.1:{port}"),
            rules,
            log,
            stop,
            port,
        }
    }

    /// The next `times` requests whose method is `method` and whose path
    /// starts with `path_prefix` (`/usage_requests`, `/rpc/...`; a prefix
    /// ending in `$` must match the whole path) get `fault`.
    pub fn inject(&self, method: &str, path_prefix: &str, fault: Fault, times: usize) {
        self.inject_after(method, path_prefix, 0, fault, times);
    }

    /// As [`inject`](Self::inject), after letting `skip` matching requests through.
    pub fn inject_after(
        &self,
        method: &str,
        path_prefix: &str,
        skip: usize,
        fault: Fault,
        times: usize,
    ) {
        self.rules.lock().unwrap().push(Rule {
            method: method.into(),
            path_prefix: path_prefix.into(),
            skip,
            fault,
            remaining: times,
        });
    }

    /// Request lines seen so far (`GET /usage_requests?...`).
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// How many requests matched `method` and `path_prefix`.
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|l| l.starts_with(&format!("{method} {path_prefix}")))
            .count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A parsed HTTP message: the first line, headers, body. Shared with the
/// gateway (gateway.rs).
pub(crate) struct Message {
    pub(crate) start: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Message {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Serialises with `Connection: close` and a Content-Length of
    /// `declared` bytes, whatever is actually sent.
    pub(crate) fn head(&self, declared: usize) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.start);
        for (k, v) in &self.headers {
            if [
                "connection",
                "content-length",
                "transfer-encoding",
                "keep-alive",
            ]
            .contains(&k.to_ascii_lowercase().as_str())
            {
                continue;
            }
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!(
            "Content-Length: {declared}\r\nConnection: close\r\n\r\n"
        ));
        out.into_bytes()
    }
}

pub(crate) fn read_message(r: &mut impl BufRead, until_eof: bool) -> std::io::Result<Message> {
    let mut start = String::new();
    r.read_line(&mut start)?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut msg = Message {
        start: start.trim_end().to_string(),
        headers,
        body: Vec::new(),
    };
    if msg
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            if n == 0 {
                let mut end = String::new();
                let _ = r.read_line(&mut end);
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            msg.body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = msg
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        msg.body = vec![0; n];
        r.read_exact(&mut msg.body)?;
    } else if until_eof {
        r.read_to_end(&mut msg.body)?;
    }
    Ok(msg)
}

fn handle(
    client: TcpStream,
    upstream: &str,
    rules: &Mutex<Vec<Rule>>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let request = read_message(&mut reader, false)?;
    log.lock().unwrap().push(request.start.clone());
    let mut parts = request.start.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let fault = {
        let mut rules = rules.lock().unwrap();
        let matches = |r: &Rule| match r.path_prefix.strip_suffix('$') {
            Some(exact) => target == exact,
            None => target.starts_with(&r.path_prefix),
        };
        rules
            .iter_mut()
            .find(|r| r.remaining > 0 && r.method == method && matches(r))
            .and_then(|r| {
                if r.skip > 0 {
                    r.skip -= 1;
                    return None;
                }
                r.remaining -= 1;
                Some(r.fault.clone())
            })
    };
    let mut client = client;
    match &fault {
        Some(Fault::Respond {
            status,
            headers,
            body,
        }) => {
            let msg = Message {
                start: format!("HTTP/1.1 {status} Fault"),
                headers: headers.clone(),
                body: body.clone().into_bytes(),
            };
            client.write_all(&msg.head(msg.body.len()))?;
            client.write_all(&msg.body)?;
            return client.shutdown(Shutdown::Both);
        }
        Some(Fault::HangUp) => return client.shutdown(Shutdown::Both),
        Some(Fault::Delay(d)) => std::thread::sleep(*d), // the fault itself: a slow server
        _ => {}
    }
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(&request.head(request.body.len()))?;
    up.write_all(&request.body)?;
    let response = read_message(&mut BufReader::new(up), true)?;
    let half = response.body.len() / 2;
    match fault {
        Some(Fault::CutBody) => {
            client.write_all(&response.head(response.body.len()))?;
            client.write_all(&response.body[..half])?;
        }
        Some(Fault::TruncateBody) => {
            client.write_all(&response.head(half))?;
            client.write_all(&response.body[..half])?;
        }
        _ => {
            client.write_all(&response.head(response.body.len()))?;
            client.write_all(&response.body)?;
        }
    }
    client.flush()?;
    client.shutdown(Shutdown::Both)
}

/// A stand-in for a monitoring service (healthchecks.io), or for the other
/// origin a redirect points to: answers 200 to everything and records what
/// it was sent.
pub struct Recorder {
    pub url: String,
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

impl Recorder {
    pub fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let log = seen.clone();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let Ok(msg) = read_message(&mut BufReader::new(&conn), false) else {
                    continue;
                };
                log.lock().unwrap().push((
                    msg.start.clone(),
                    String::from_utf8_lossy(&msg.body).into_owned(),
                ));
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK",
                );
            }
        });
        Recorder { url, seen }
    }

    /// (request line, body) of every request so far.
    pub fn seen(&self) -> Vec<(String, String)> {
        self.seen.lock().unwrap().clone()
    }
}

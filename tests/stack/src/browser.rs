//! A real browser for the tests: Debian's `chromium`, headless, driven
//! over the Chrome DevTools Protocol through a pipe
//! (`--remote-debugging-pipe`: the protocol's JSON messages, each ended by
//! a NUL byte, read on the browser's file descriptor 3 and written on 4).
//! The shell that starts it maps 3 to its stdin and 4 to its stdout, so no
//! port, no WebSocket and no crate is needed, and nothing listens on the
//! network. `scripts/setup` installs `chromium`; without it the test fails
//! saying so (it never skips itself).
//!
//! Every wait is for a message: the answer to a command, or an event
//! (`Page.loadEventFired`), each bounded so that a browser that hangs fails
//! the test instead of holding it up.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long one answer or event may take.
const WAIT: Duration = Duration::from_secs(60);

/// The browser binary: `USAGE_AGG_CHROMIUM`, else `chromium` on the PATH.
pub fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("USAGE_AGG_CHROMIUM") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("chromium"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "chromium is not installed: run scripts/setup (it installs Debian's chromium), or set \
                 USAGE_AGG_CHROMIUM to a Chromium binary"
            )
        })
}

/// A headless browser, closed when dropped.
pub struct Browser {
    child: Child,
    input: ChildStdin,
    messages: Receiver<Value>,
    /// Events read while waiting for something else, oldest first.
    pending: VecDeque<Value>,
    /// Every event read, for the checks after a page has loaded.
    pub events: Vec<Value>,
    next_id: u64,
    profile: PathBuf,
    /// What the browser wrote on stderr, for a failure's message.
    stderr: PathBuf,
}

impl Browser {
    /// Starts the browser with a fresh profile under `dir`.
    pub fn launch(dir: &Path) -> Browser {
        let bin = chromium();
        let profile = dir.join("chromium-profile");
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let stderr = dir.join("chromium-stderr.log");
        let mut child = Command::new("sh")
            .arg("-c")
            // fd 3: what we write; fd 4: what it answers. Its own stdout
            // goes to stderr, so that only the protocol is on the pipe.
            .arg("exec \"$0\" \"$@\" 3<&0 4>&1 0</dev/null 1>&2")
            .arg(&bin)
            .args([
                "--headless",
                "--remote-debugging-pipe",
                // Root in a container has no user namespace for the sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-sync",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-default-apps",
                "--hide-scrollbars",
                "--mute-audio",
                "--force-color-profile=srgb",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let input = child.stdin.take().unwrap();
        let mut output = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 64 * 1024];
            loop {
                let n = match output.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.iter().position(|b| *b == 0) {
                    let message: Vec<u8> = buf.drain(..=end).collect();
                    let Ok(v) = serde_json::from_slice::<Value>(&message[..end]) else {
                        continue;
                    };
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        let mut browser = Browser {
            child,
            input,
            messages: rx,
            pending: VecDeque::new(),
            events: Vec::new(),
            next_id: 1,
            profile,
            stderr,
        };
        browser.call(None, "Browser.getVersion", json!({}));
        browser
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The next message, or a failure naming what was awaited.
    fn next(&mut self, what: &str) -> Value {
        match self.messages.recv_timeout(WAIT) {
            Ok(v) => v,
            Err(RecvTimeoutError::Timeout) => panic!(
                "chromium did not send {what} within {WAIT:?}\n--- its stderr\n{}",
                self.log()
            ),
            Err(RecvTimeoutError::Disconnected) => panic!(
                "chromium closed its pipe while the test waited for {what}\n--- its stderr\n{}",
                self.log()
            ),
        }
    }

    /// Sends a command (to a page's session, or to the browser) and
    /// returns its result; events that arrive first are kept.
    pub fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            message["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.input
            .write_all(&bytes)
            .and_then(|()| self.input.flush())
            .unwrap_or_else(|e| panic!("writing {method} to chromium: {e}\n{}", self.log()));
        loop {
            let v = self.next(&format!("the answer to {method}"));
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    panic!("chromium refused {method}: {e}");
                }
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v.clone());
                self.pending.push_back(v);
            }
        }
    }

    /// Waits for an event of `session` named `method` (one already read
    /// included) and returns it.
    pub fn wait_for(&mut self, session: &str, method: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        let matches = |v: &Value| v["method"] == json!(method) && v["sessionId"] == json!(session);
        if let Some(i) = self.pending.iter().position(matches) {
            return self.pending.remove(i).unwrap();
        }
        loop {
            assert!(Instant::now() < deadline, "no {method} within {WAIT:?}");
            let v = self.next(method);
            if v.get("method").is_some() {
                self.events.push(v.clone());
                if matches(&v) {
                    return v;
                }
                self.pending.push_back(v);
            }
        }
    }

    /// Opens `url` in a new tab `width` x `height` CSS pixels, with the
    /// console, the log and the network watched from before the first
    /// request, and waits for its load event. Returns the tab's session.
    pub fn open(&mut self, url: &str, width: u32, height: u32) -> String {
        let target = self.call(None, "Target.createTarget", json!({"url": "about:blank"}));
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        let session = attached["sessionId"].as_str().unwrap().to_string();
        let s = Some(session.as_str());
        for domain in ["Page", "Runtime", "Log", "Network"] {
            self.call(s, &format!("{domain}.enable"), json!({}));
        }
        self.call(
            s,
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        let nav = self.call(s, "Page.navigate", json!({"url": url}));
        assert!(
            nav.get("errorText").is_none(),
            "chromium could not open {url}: {nav}"
        );
        self.wait_for(&session, "Page.loadEventFired");
        session
    }

    /// Evaluates `expression` in the page and returns its value (JSON).
    pub fn evaluate(&mut self, session: &str, expression: &str) -> Value {
        let r = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("the page's script failed: {e}");
        }
        r["result"]["value"].clone()
    }

    /// The page as the reader's colour scheme `scheme` (light, dark) shows it.
    pub fn color_scheme(&mut self, session: &str, scheme: &str) {
        self.call(
            Some(session),
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": scheme}]}),
        );
    }

    /// A PNG of the page's area (document coordinates, CSS pixels).
    pub fn screenshot(
        &mut self,
        session: &str,
        x: f64,
        y: f64,
        width: f64,
        height: f64,
    ) -> Vec<u8> {
        use base64::Engine;
        let r = self.call(
            Some(session),
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true,
                   "clip": {"x": x, "y": y, "width": width, "height": height, "scale": 1}}),
        );
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap()
    }

    /// The events of `session` named `method`, read so far.
    pub fn events_of(&self, session: &str, method: &str) -> Vec<Value> {
        self.events
            .iter()
            .filter(|v| v["method"] == json!(method) && v["sessionId"] == json!(session))
            .cloned()
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Asked to close, it ends its helpers itself; it is killed if it
        // does not go within 10 s.
        let mut bytes = serde_json::to_vec(&json!({"id": 0, "method": "Browser.close"})).unwrap();
        bytes.push(0);
        let _ = self.input.write_all(&bytes);
        let _ = self.input.flush();
        // Its end is the end of its pipe: the reader's channel closes.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok(_) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    break;
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

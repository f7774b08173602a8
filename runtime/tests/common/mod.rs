//! What the integration tests of the `openlora` binary share: the repository root, a running
//! `openlora serve` (killed when dropped), one raw HTTP/1.1 request, and the `caps` adapter's
//! style check. Each test file compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running `openlora serve`, killed when dropped.
pub struct Serving {
    pub child: Child,
    pub addr: SocketAddr,
    /// stderr lines up to and including the "serving ... on http://..." line.
    pub startup: Vec<String>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `openlora serve CONFIG` on a free loopback port and waits (up to 5 minutes) for its
/// "serving" line; the server's stderr is echoed with a `[server]` prefix.
pub fn serve(config: &Path) -> Serving {
    let mut child = Command::new(env!("CARGO_BIN_EXE_openlora"))
        .args(["serve", config.to_str().expect("path"), "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start openlora serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        let mut startup = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[server] {line}");
            if !sent {
                startup.push(line.clone());
            }
            if !sent && let Some(rest) = line.split(" on http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default().to_owned();
                let _ = tx.send((addr, std::mem::take(&mut startup)));
                sent = true;
            }
        }
    });
    let (addr, startup) = rx.recv_timeout(Duration::from_secs(300)).expect("the server did not start");
    Serving { child, addr: addr.parse().expect("address"), startup }
}

/// One HTTP/1.1 request on a fresh connection (JSON content type, `key` as a bearer token);
/// returns (status, body), a chunked body de-chunked.
pub fn http(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    // The server may answer (413) before reading a large body; a reset while writing is fine.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if headers.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A JSON body, or a panic quoting it.
pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The `caps` example adapter's style, Title Case: at least 80% of the words that start with a
/// letter start with a capital (examples/adapters/make_data.py's `is_caps`; the base model's
/// answers: at most 60%).
pub fn title_case(t: &str) -> bool {
    let first = |w: &str| w.trim_start_matches(|c: char| !c.is_alphanumeric()).chars().next();
    let words: Vec<char> = t.split_whitespace().filter_map(first).filter(char::is_ascii_alphabetic).collect();
    !words.is_empty() && words.iter().filter(|c| c.is_ascii_uppercase()).count() * 5 >= words.len() * 4
}

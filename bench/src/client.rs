//! What every scenario shares: the server's address, the messages the server
//! sends, joining a topic over WebSocket, failure kinds, and the report
//! output (one JSON line on stdout, a short table on stderr).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::view::View;

pub type Ws = WebSocketStream<TcpStream>;

/// tungstenite zero-fills the free part of its read buffer before every
/// read, so the 128 KiB default costs more than the small frames here.
const READ_BUFFER_SIZE: usize = 8 * 1024;

/// Locks `m`; a lock poisoned by a panicking task still holds what the
/// report needs.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The server under test, from `--url`.
pub struct Server {
    /// `ws://host:port`, without a trailing slash.
    pub base: String,
    /// `host:port` as written in the URL, for the `Host` header.
    pub authority: String,
    pub addr: SocketAddr,
}

impl Server {
    pub async fn resolve(url: &str) -> Result<Self, String> {
        let base = url.trim_end_matches('/').to_owned();
        if !base.starts_with("ws://") {
            return Err(format!("--url must start with ws:// (got {base})"));
        }
        let probe = format!("{base}/ws/x")
            .into_client_request()
            .map_err(|e| format!("bad --url {base}: {e}"))?;
        let uri = probe.uri();
        let host = uri
            .host()
            .unwrap_or("127.0.0.1")
            .trim_matches(['[', ']'])
            .to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let authority = uri
            .authority()
            .map_or_else(|| format!("{host}:{port}"), |a| a.as_str().to_owned());
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| format!("resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("resolve {host}: no address"))?;
        Ok(Self {
            base,
            authority,
            addr,
        })
    }

    /// The WebSocket URL of a topic.
    pub fn topic_url(&self, topic: &str) -> String {
        format!("{}/ws/{topic}", self.base)
    }
}

/// A topic name unique to this run: `bench-{run}-{index}`.
pub fn topic_name(run_id: &str, index: usize) -> String {
    format!("bench-{run_id}-{index}")
}

/// What the server sends; only the fields the benchmark looks at. Strings are
/// borrowed from the frame (the server never escapes ids, types or codes);
/// `payload` is skipped without being built, and `metadata` is kept as the
/// raw JSON text the server sent (`null` reads as none, as on the wire).
#[derive(Deserialize)]
pub struct Incoming<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    #[serde(default)]
    pub from: Option<&'a str>,
    #[serde(default, rename = "msgId")]
    pub msg_id: Option<&'a str>,
    #[serde(default, rename = "selfId")]
    pub self_id: Option<&'a str>,
    #[serde(default, rename = "peerId")]
    pub peer_id: Option<&'a str>,
    #[serde(default)]
    pub code: Option<&'a str>,
    #[serde(default, borrow)]
    pub peers: Option<Vec<PeerEntry<'a>>>,
    #[serde(default, borrow)]
    pub metadata: Option<&'a RawValue>,
}

#[derive(Deserialize)]
pub struct PeerEntry<'a> {
    pub id: &'a str,
    #[serde(default, borrow)]
    pub metadata: Option<&'a RawValue>,
}

/// The `update-metadata` message that makes `metadata` (one JSON value) a
/// peer's metadata.
pub fn update_metadata(metadata: &str) -> String {
    format!(r#"{{"type":"update-metadata","metadata":{metadata}}}"#)
}

/// `url` with `?metadata=`, the JSON text `metadata` percent-encoded (every
/// byte but the unreserved ones of RFC 3986, so `+` stays a plus).
pub fn with_metadata(url: &str, metadata: &str) -> String {
    let mut out = String::with_capacity(url.len() + 10 + 3 * metadata.len());
    out.push_str(url);
    out.push_str("?metadata=");
    for b in metadata.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why a connection failed or ended: a short `kind` to count by, and the
/// details for a human.
#[derive(Debug)]
pub struct Failure {
    pub kind: String,
    pub detail: String,
}

impl Failure {
    pub fn new(kind: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            detail: detail.into(),
        }
    }

    /// A failed socket operation; `stage` is `connect`, `read`, ...
    pub fn io(stage: &str, err: &io::Error) -> Self {
        Self::new(
            format!("{stage}_{}", io_kind(err)),
            format!("{stage}: {err}"),
        )
    }

    /// The server closed with a close frame (code) or without one.
    pub fn closed(code: Option<u16>, stage: &str) -> Self {
        match code {
            Some(code) => Self::new(format!("closed_{code}"), format!("closed {stage}: {code}")),
            None => Self::new("closed", format!("closed {stage} without a code")),
        }
    }

    pub fn timeout(stage: &str) -> Self {
        Self::new("timeout", format!("timed out {stage}"))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// A short name for an I/O error, to count failures by.
pub fn io_kind(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => return "too_many_open_files".into(),
        Some(libc::EADDRNOTAVAIL) => return "no_local_port".into(),
        Some(libc::ECONNREFUSED) => return "refused".into(),
        Some(libc::ECONNRESET) => return "reset".into(),
        Some(libc::ETIMEDOUT) => return "timed_out".into(),
        Some(libc::EPIPE) => return "broken_pipe".into(),
        _ => {}
    }
    match err.kind() {
        io::ErrorKind::UnexpectedEof => "eof".into(),
        kind => format!("{kind:?}").to_lowercase(),
    }
}

/// The close code of a close frame (`None` if it had none).
pub fn close_code(frame: Option<&CloseFrame>) -> Option<u16> {
    frame.map(|f| u16::from(f.code))
}

/// What ended a WebSocket stream, as a failure.
pub fn stream_end(item: Option<Result<Message, WsError>>, stage: &str) -> Failure {
    match item {
        None => Failure::new("eof", format!("connection closed by the server {stage}")),
        Some(Ok(Message::Close(frame))) => Failure::closed(close_code(frame.as_ref()), stage),
        Some(Err(WsError::Io(err))) => Failure::io("read", &err),
        Some(Err(err)) => Failure::new("ws_error", format!("{stage}: {err}")),
        Some(Ok(_)) => Failure::new("unexpected_message", format!("unexpected message {stage}")),
    }
}

/// The next text message of `ws`, skipping control frames; a close, an
/// error or the end of the stream is the failure [`stream_end`] names for
/// `stage`.
pub async fn next_text(ws: &mut Ws, stage: &str) -> Result<Utf8Bytes, Failure> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text),
            Some(Ok(message)) if !message.is_close() => {}
            other => return Err(stream_end(other, stage)),
        }
    }
}

/// Connects one peer over WebSocket and reads its `welcome` and
/// `peer-list`, which go into `view` (with any presence event read on the
/// way). Returns the stream once both have arrived.
pub async fn join(addr: SocketAddr, url: &str, view: &mut View) -> Result<Ws, Failure> {
    let mut ws = open(addr, url).await?;
    while view.self_id().is_none() || !view.has_list() {
        let text = next_text(&mut ws, "before peer-list").await?;
        let msg: Incoming = serde_json::from_str(&text)
            .map_err(|e| Failure::new("bad_message", format!("bad message {text}: {e}")))?;
        if msg.kind == "error" {
            return Err(Failure::new(
                format!("error_{}", msg.code.unwrap_or("unknown")),
                format!("error before peer-list: {text}"),
            ));
        }
        // Impossible events are counted by the view; the caller decides.
        let _ = view.apply(&msg);
    }
    Ok(ws)
}

/// Connects over TCP and upgrades to WebSocket at `url`; reads nothing.
pub async fn open(addr: SocketAddr, url: &str) -> Result<Ws, Failure> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| Failure::io("connect", &e))?;
    tcp.set_nodelay(true)
        .map_err(|e| Failure::io("set_nodelay", &e))?;
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_SIZE);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
        .await
        .map_err(|e| match e {
            WsError::Http(resp) => Failure::new(
                format!("http_{}", resp.status().as_u16()),
                format!("upgrade refused: HTTP {}", resp.status()),
            ),
            WsError::Io(err) => Failure::io("handshake", &err),
            other => Failure::new("handshake", format!("handshake: {other}")),
        })?;
    Ok(ws)
}

/// Sends a close frame and waits, up to `limit`, for the server to end the
/// stream. Returns false if it did not in time.
pub async fn close(ws: &mut Ws, limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        if ws.close(None).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await
    .is_ok()
}

/// Resolves once `stop` is true (or its sender is gone). The guard of the
/// watched value is not held across the caller's await points.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Raises the soft limit on open files to the hard limit; returns the limit
/// now in force.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit and setrlimit only read and write the struct we hand them.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur as u64;
            }
        }
        lim.rlim_cur as u64
    }
}

/// Failures counted by kind, and the first one's details for a human.
#[derive(Default, Debug)]
pub struct Errors {
    pub counts: BTreeMap<String, u64>,
    pub first: Option<String>,
}

impl Errors {
    pub fn add(&mut self, failure: Failure) {
        count(&mut self.counts, &failure.kind);
        self.first.get_or_insert(failure.detail);
    }

    /// Adds `other`'s counts; its first failure counts if none came yet.
    pub fn merge(&mut self, other: Errors) {
        merge_counts(&mut self.counts, other.counts);
        if self.first.is_none() {
            self.first = other.first;
        }
    }
}

/// Adds one to the count of `kind`.
pub fn count(map: &mut BTreeMap<String, u64>, kind: &str) {
    match map.get_mut(kind) {
        Some(n) => *n += 1,
        None => {
            map.insert(kind.to_owned(), 1);
        }
    }
}

/// Adds every count of `from` into `into`.
pub fn merge_counts(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
    for (kind, n) in from {
        *into.entry(kind).or_default() += n;
    }
}

/// `a=1 b=2`, or `none`.
pub fn format_counts<K: fmt::Display>(map: &BTreeMap<K, u64>) -> String {
    if map.is_empty() {
        return "none".to_owned();
    }
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The human-readable summary: one aligned `label value` line each.
#[derive(Default)]
pub struct Table(String);

impl Table {
    pub fn line(&mut self, label: &str, value: impl fmt::Display) {
        self.0.push_str(&format!("  {label:<12} {value}\n"));
    }

    /// The `join us` line: join latency percentiles in microseconds.
    pub fn join_latency(&mut self, p50: u32, p99: u32, max: u32) {
        self.line("join us", format!("p50 {p50}  p99 {p99}  max {max}"));
    }

    pub fn text(&self) -> &str {
        &self.0
    }
}

/// Prints the report: one JSON line on stdout, the table on stderr.
pub fn emit(report: &impl Serialize, table: &Table) -> Result<(), String> {
    let line = serde_json::to_string(report).map_err(|e| e.to_string())?;
    println!("{line}");
    eprint!("{}", table.text());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_messages() {
        let text = r#"{"type":"peer-list","peers":[{"id":"A","metadata":{"x":[1]}},{"id":"B"}]}"#;
        let msg: Incoming = serde_json::from_str(text).unwrap();
        assert_eq!(msg.kind, "peer-list");
        let ids: Vec<&str> = msg.peers.unwrap().iter().map(|p| p.id).collect();
        assert_eq!(ids, ["A", "B"]);
        let msg: Incoming =
            serde_json::from_str(r#"{"type":"peer-joined","peerId":"C","metadata":{}}"#).unwrap();
        assert_eq!(msg.peer_id, Some("C"));
        assert_eq!(msg.metadata.map(RawValue::get), Some("{}"));
        let text =
            r#"{"type":"peer-list","peers":[{"id":"A","metadata":{"x":[1, 2]}},{"id":"B"}]}"#;
        let msg: Incoming = serde_json::from_str(text).unwrap();
        let metadata: Vec<Option<&str>> = msg
            .peers
            .unwrap()
            .iter()
            .map(|p| p.metadata.map(RawValue::get))
            .collect();
        assert_eq!(metadata, [Some(r#"{"x":[1, 2]}"#), None]);
        // A peer whose metadata was updated to `null` has none.
        let msg: Incoming =
            serde_json::from_str(r#"{"type":"peer-updated","peerId":"C","metadata":null}"#)
                .unwrap();
        assert!(msg.metadata.is_none());
        // The seed leaves `peers` out when the topic is empty.
        let msg: Incoming = serde_json::from_str(r#"{"type":"peer-list"}"#).unwrap();
        assert!(msg.peers.is_none());
    }

    #[test]
    fn metadata_messages() {
        assert_eq!(
            update_metadata(r#"{"seq":1}"#),
            r#"{"type":"update-metadata","metadata":{"seq":1}}"#
        );
        assert_eq!(
            with_metadata("ws://h/ws/t", r#"{"a":"x+y z"}"#),
            "ws://h/ws/t?metadata=%7B%22a%22%3A%22x%2By%20z%22%7D"
        );
    }

    #[test]
    fn names_io_errors() {
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(io_kind(&refused), "refused");
        let f = Failure::io("connect", &refused);
        assert_eq!(f.kind, "connect_refused");
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "x");
        assert_eq!(io_kind(&eof), "eof");
        assert_eq!(Failure::closed(Some(4008), "x").kind, "closed_4008");
        assert_eq!(Failure::closed(None, "x").kind, "closed");
    }

    #[test]
    fn counts() {
        let mut a = BTreeMap::new();
        count(&mut a, "x");
        count(&mut a, "x");
        count(&mut a, "y");
        let mut b = BTreeMap::new();
        count(&mut b, "y");
        merge_counts(&mut b, a);
        assert_eq!(format_counts(&b), "x=2 y=2");
        assert_eq!(format_counts(&BTreeMap::<String, u64>::new()), "none");
    }

    #[test]
    fn table_aligns() {
        let mut t = Table::default();
        t.line("joins", 5);
        assert_eq!(t.text(), "  joins        5\n");
    }
}

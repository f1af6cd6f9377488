//! The HTTP request that opens every connection, read once.
//!
//! [`read`] is the only reader of a request head in the server. The worker
//! that accepts a connection calls it to learn which topic the request
//! joins (and so which worker owns it); the owner calls it again on the
//! same bytes to answer or upgrade. One parser on the same bytes cannot
//! disagree with itself, so an upgrade is only ever made in the owner of
//! the topic it joins.
//!
//! httparse reads the head. Around it, this module applies what RFC 9112
//! (which obsoletes RFC 7230) asks of a server: empty lines before the
//! request line are skipped and a bare LF ends a line (section 2.2, as
//! httparse does), the absolute form of the target is accepted (section
//! 3.2.2), a request without exactly one `Host` is refused with 400
//! (section 3.2); and what RFC 6455 section 4.2 asks of the WebSocket
//! handshake, 426 with the version we speak for any other version.
//! Limits: a line of at most [`MAX_LINE`] bytes (414 for the request line,
//! 431 for a header), at most [`MAX_HEADERS`] headers and [`MAX_HEAD`]
//! bytes in all (431).

use std::borrow::Cow;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

use crate::wire::message;

/// Largest request head (empty lines, request line, headers, blank line).
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest line of a head, without its line ending.
pub const MAX_LINE: usize = 8 * 1024;
/// Most header lines in a head.
pub const MAX_HEADERS: usize = 128;
/// Longest topic, in bytes of UTF-8 once percent-decoded.
pub const MAX_TOPIC: usize = 256;
/// Longest `metadata` query value, in bytes once percent-decoded.
pub const MAX_METADATA: usize = 1024;
/// Where a join's path starts; the topic is the one segment after it.
pub const JOIN_PREFIX: &str = "/ws/";
/// The admin API's paths about one topic: `/admin/v1/topics/{topic}...`.
pub const ADMIN_TOPIC_PREFIX: &str = "/admin/v1/topics/";
/// The GUID of RFC 6455 section 1.3.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// An HTTP answer that ends the connection: a status, the reason sent as
/// its body, and the headers this status requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub headers: &'static [(&'static str, &'static str)],
}

impl Refusal {
    /// Not a refusal: the status 0 of a request that may be served.
    pub const OK: Self = Self::new(0, "");

    const fn new(status: u16, reason: &'static str) -> Self {
        Self {
            status,
            reason,
            headers: &[],
        }
    }
}

const MALFORMED: Refusal = Refusal::new(400, "malformed HTTP request");
const BAD_HOST: Refusal = Refusal::new(400, "exactly one Host header is required");
const BAD_TARGET: Refusal = Refusal::new(400, "unsupported request target");
const LINE_TOO_LONG: Refusal = Refusal::new(414, "request line too long");
const HEAD_TOO_LARGE: Refusal = Refusal::new(431, "request header fields too large");
const VERSION: Refusal = Refusal::new(505, "HTTP/1.1 only");
const METHOD: Refusal = Refusal {
    status: 405,
    reason: "method not allowed",
    headers: &[("Allow", "GET")],
};
const NOT_UPGRADE: Refusal = Refusal {
    status: 426,
    reason: "a WebSocket upgrade is required",
    headers: &[("Upgrade", "websocket"), ("Connection", "Upgrade")],
};
const WS_VERSION: Refusal = Refusal {
    status: 426,
    reason: "unsupported WebSocket version",
    headers: &[("Sec-WebSocket-Version", "13")],
};
const BAD_KEY: Refusal = Refusal::new(400, "missing or invalid Sec-WebSocket-Key");
const REPEATED: Refusal = Refusal::new(400, "repeated WebSocket header");
const BODY: Refusal = Refusal::new(400, "an upgrade request has no body");
const ORIGIN: Refusal = Refusal::new(403, "origin not allowed");

/// The result of reading the start of a connection.
// Returned once per request and never stored: boxing the large variant
// would cost an allocation per connection and save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum Reading<'a> {
    /// The head has not fully arrived: read more, then call again with all
    /// of it.
    Incomplete,
    /// Not a request this server reads: answer and close.
    Refused(Refusal),
    Request(Request<'a>),
}

/// A request head that was read.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// Bytes of the head; what follows belongs to the connection.
    pub head_len: usize,
    pub method: &'a str,
    /// The path of the target in origin form, without its query.
    pub path: &'a str,
    /// The `Authorization` header when sent exactly once.
    pub authorization: Option<&'a str>,
    /// The `Origin` header when sent exactly once.
    pub origin: Option<&'a str>,
    /// `Some` for a request to `/ws/{topic}` (one segment: `/ws/a/b` is
    /// another path).
    pub join: Option<Join>,
    /// The target's query, without the `?`.
    pub query: &'a str,
    /// `Content-Length` when sent once as a number; `Err` when sent but
    /// not so (repeated, not a number, or with `Transfer-Encoding`).
    pub content_length: Result<Option<usize>, ()>,
    /// `Some` for a request under `/admin/v1/topics/{topic}`.
    pub admin: Option<AdminTopic<'a>>,
}

/// An admin request about one topic.
#[derive(Debug, PartialEq, Eq)]
pub struct AdminTopic<'a> {
    /// The percent-decoded topic, under the rules of `/ws/{topic}`; `None`
    /// if invalid.
    pub topic: Option<String>,
    /// The path after the topic's segment (`""`, `"/peers"`, ...).
    pub rest: &'a str,
}

/// What a request to `/ws/{topic}` asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Join {
    /// The handshake's verdict: the `Sec-WebSocket-Accept` value, or the
    /// answer to a request that is not a valid upgrade.
    pub handshake: Result<String, Refusal>,
    /// The topic and query, or what is wrong with them; a valid upgrade
    /// with invalid parameters is upgraded only to be told so (4400).
    pub params: Result<JoinParams, Invalid>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct JoinParams {
    /// The percent-decoded topic.
    pub topic: String,
    /// The `metadata` query value, validated JSON without surrounding
    /// whitespace.
    pub metadata: Option<String>,
    /// The `token` query value.
    pub token: Option<String>,
    /// `resumable=1`: the client asks for a resumable session.
    pub resumable: bool,
    /// `resume`: the token of the session to resume, and `seen`: how many
    /// messages of it arrived (None when absent or not a number).
    pub resume: Option<(String, Option<u64>)>,
}

/// Which parameter of a join is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    Topic,
    Metadata,
}

/// Reads the request head at the start of `buf`, everything read from the
/// connection so far. `origins` is the Origin allow-list (`None`: any).
pub fn read<'a>(buf: &'a [u8], origins: Option<&[String]>) -> Reading<'a> {
    let window = &buf[..buf.len().min(MAX_HEAD)];
    if let Some(refusal) = overlong_line(window) {
        return Reading::Refused(refusal);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Reading::Refused(HEAD_TOO_LARGE)
        }
        Ok(httparse::Status::Partial) => return Reading::Incomplete,
        Err(httparse::Error::TooManyHeaders) => return Reading::Refused(HEAD_TOO_LARGE),
        Err(httparse::Error::Version) if names_a_version(window) => {
            return Reading::Refused(VERSION)
        }
        Err(_) => return Reading::Refused(MALFORMED),
    };
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Reading::Refused(MALFORMED);
    };
    if version != 1 {
        return Reading::Refused(VERSION);
    }
    let headers = request.headers;
    let hosts = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .count();
    if hosts != 1 {
        return Reading::Refused(BAD_HOST);
    }
    let Some(target) = origin_form(target) else {
        return Reading::Refused(BAD_TARGET);
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let text = |name| {
        let value = single(headers, name).ok().flatten();
        value.and_then(|value| std::str::from_utf8(value).ok())
    };
    let (authorization, origin) = (text("authorization"), text("origin"));
    let join = path
        .strip_prefix(JOIN_PREFIX)
        .filter(|segment| !segment.contains('/'))
        .map(|segment| Join {
            handshake: handshake(method, headers, origins),
            params: join_params(segment, query),
        });
    let admin = path.strip_prefix(ADMIN_TOPIC_PREFIX).map(|tail| {
        let (segment, rest) = tail.find('/').map_or((tail, ""), |at| tail.split_at(at));
        AdminTopic {
            topic: decode_topic(segment),
            rest,
        }
    });
    let lengths: Vec<&[u8]> = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value)
        .collect();
    let chunked = headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
    let content_length = match (lengths.as_slice(), chunked) {
        ([], false) => Ok(None),
        ([value], false) => std::str::from_utf8(value)
            .ok()
            .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|text| text.parse().ok())
            .map(Some)
            .ok_or(()),
        _ => Err(()),
    };
    Reading::Request(Request {
        head_len,
        method,
        path,
        authorization,
        origin,
        join,
        query,
        content_length,
        admin,
    })
}

/// The refusal for a line over [`MAX_LINE`] in `buf`, complete or not.
fn overlong_line(buf: &[u8]) -> Option<Refusal> {
    let mut request_line = true;
    for line in buf.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if request_line {
                continue; // an empty line before the request line
            }
            return None; // the end of the head
        }
        if line.len() > MAX_LINE {
            return Some(if request_line {
                LINE_TOO_LONG
            } else {
                HEAD_TOO_LARGE
            });
        }
        request_line = false;
    }
    None
}

/// Whether the request line ends with an HTTP version httparse does not
/// read (`HTTP/2.0`, `HTTP/1.2`): 505, not 400.
fn names_a_version(buf: &[u8]) -> bool {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n');
    let line = &buf[start.unwrap_or(buf.len())..];
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.rsplit(|&b| b == b' ')
        .next()
        .is_some_and(|version| version.starts_with(b"HTTP/"))
}

/// The target in origin form (`/path?query`): as sent, or taken from the
/// absolute form (`http://host:port/path?query`). `None` for the other
/// forms (`*`, `host:port`), which this server does not serve.
fn origin_form(target: &str) -> Option<&str> {
    if target.starts_with('/') {
        return Some(target);
    }
    let (scheme, rest) = target.split_once("://")?;
    let mut chars = scheme.chars();
    let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return None;
    }
    match rest.find(['/', '?']) {
        Some(at) if rest.as_bytes()[at] == b'/' => Some(&rest[at..]),
        // `http://host?query`: the path is empty, that is `/`, and only a
        // query remains, which no path here takes.
        Some(_) | None => Some("/"),
    }
}

/// The value of header `name` if it appears at most once; `Err` if more.
fn single<'a>(headers: &[httparse::Header<'a>], name: &str) -> Result<Option<&'a [u8]>, ()> {
    let mut found = None;
    for header in headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)) {
        if found.replace(header.value).is_some() {
            return Err(());
        }
    }
    Ok(found)
}

/// The comma-separated tokens of every header `name`.
fn tokens<'a>(
    headers: &'a [httparse::Header<'a>],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

/// The verdict on a request to `/ws/{topic}` as a WebSocket upgrade
/// (RFC 6455 section 4.2.1): the `Sec-WebSocket-Accept` value, or the
/// refusal. A subprotocol asked for is not chosen (the response names
/// none, which a client accepts); extensions are not negotiated.
fn handshake(
    method: &str,
    headers: &[httparse::Header<'_>],
    origins: Option<&[String]>,
) -> Result<String, Refusal> {
    if method != "GET" {
        return Err(METHOD);
    }
    let upgrade = tokens(headers, "upgrade").any(|t| t.eq_ignore_ascii_case(b"websocket"));
    let connection = tokens(headers, "connection").any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    if !(upgrade && connection) {
        return Err(NOT_UPGRADE);
    }
    match single(headers, "sec-websocket-version") {
        Err(()) => return Err(REPEATED),
        Ok(Some(b"13")) => {}
        Ok(_) => return Err(WS_VERSION),
    }
    let key = match single(headers, "sec-websocket-key") {
        Err(()) => return Err(REPEATED),
        Ok(key) => key.ok_or(BAD_KEY)?,
    };
    let key = std::str::from_utf8(key).map_err(|_| BAD_KEY)?;
    if BASE64
        .decode(key)
        .map_or(true, |decoded| decoded.len() != 16)
    {
        return Err(BAD_KEY);
    }
    let origin = single(headers, "origin").map_err(|()| REPEATED)?;
    if let (Some(allowed), Some(origin)) = (origins, origin) {
        if !allowed.iter().any(|a| a.as_bytes() == origin) {
            return Err(ORIGIN);
        }
    }
    let body = headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() != b"0")
    });
    if body {
        return Err(BODY);
    }
    Ok(accept_key(key))
}

/// The topic of path segment `segment` and the parameters of `query`.
fn join_params(segment: &str, query: &str) -> Result<JoinParams, Invalid> {
    let topic = decode_topic(segment).ok_or(Invalid::Topic)?;
    let [mut metadata, mut token, mut resumable, mut resume, mut seen] = [None; 5];
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match percent_decode(name.as_bytes(), true).as_deref() {
            Some(b"metadata") => &mut metadata,
            Some(b"token") => &mut token,
            Some(b"resumable") => &mut resumable,
            Some(b"resume") => &mut resume,
            Some(b"seen") => &mut seen,
            _ => continue, // unknown parameters are ignored
        };
        if slot.is_none() {
            *slot = Some(value); // the first of a repeated parameter counts
        }
    }
    let metadata = match metadata {
        None => None,
        Some(value) => Some(parse_metadata(value).ok_or(Invalid::Metadata)?),
    };
    let text = |value: &str| {
        let raw = percent_decode(value.as_bytes(), true).unwrap_or(Cow::Borrowed(value.as_bytes()));
        String::from_utf8_lossy(&raw).into_owned()
    };
    let resume = resume.map(|value| (text(value), seen.and_then(|n| text(n).parse().ok())));
    Ok(JoinParams {
        topic,
        metadata,
        token: token.map(text),
        resumable: matches!(resumable, Some("1" | "true")),
        resume,
    })
}

/// The topic a path segment names: percent-decoded, 1 to `MAX_TOPIC`
/// bytes of UTF-8.
fn decode_topic(segment: &str) -> Option<String> {
    percent_decode(segment.as_bytes(), false)
        .filter(|raw| (1..=MAX_TOPIC).contains(&raw.len()))
        .and_then(|raw| String::from_utf8(raw.into_owned()).ok())
}

/// A query value percent-decoded (`+` as a space), if valid UTF-8 with
/// valid escapes.
pub fn decode_query_value(value: &str) -> Option<String> {
    let raw = percent_decode(value.as_bytes(), true)?;
    String::from_utf8(raw.into_owned()).ok()
}

/// A percent-encoded `metadata` value as validated JSON text.
fn parse_metadata(value: &str) -> Option<String> {
    let raw = percent_decode(value.as_bytes(), true)?;
    if raw.len() > MAX_METADATA {
        return None;
    }
    let text = std::str::from_utf8(&raw).ok()?;
    message::parse_metadata(text).map(str::to_owned)
}

/// `bytes` with `%XX` escapes decoded (and `+` as a space when `form`, as
/// in a query); `None` for a `%` not followed by two hex digits.
fn percent_decode(bytes: &[u8], form: bool) -> Option<Cow<'_, [u8]>> {
    if !bytes.iter().any(|&b| b == b'%' || (form && b == b'+')) {
        return Some(Cow::Borrowed(bytes));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        out.push(match b {
            b'%' => {
                let [high, low, tail @ ..] = rest else {
                    return None;
                };
                rest = tail;
                (hex(*high)? << 4) | hex(*low)?
            }
            b'+' if form => b' ',
            _ => b,
        });
    }
    Some(Cow::Owned(out))
}

fn hex(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|value| value as u8)
}

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 section 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(GUID);
    BASE64.encode(sha1.finalize())
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;

//! The common WebSocket upgrade request, recognised without Python.
//!
//! Nearly every connection opens with the same well-formed request, and
//! accepting it with the websockets library's sans-I/O `ServerProtocol`
//! costs about 100 us of Python per connection, the largest part of a join.
//! [`parse_upgrade`] recognises that request with httparse and computes its
//! `Sec-WebSocket-Accept`; anything it is not sure of (another method, a
//! missing or odd header, an Origin off the allow-list, a subprotocol) is
//! left to `ServerProtocol`, which answers it as before. So this path only
//! ever accepts what `ServerProtocol` would accept, and never refuses.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Largest request head taken on this path; longer ones go to the library,
/// which enforces its own line and header limits.
const MAX_HEAD: usize = 8192;
/// The GUID of RFC 6455 section 1.3.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// An upgrade request that can be accepted as it is.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade<'a> {
    /// The request target (path and query), as sent.
    pub target: &'a str,
    /// The `Sec-WebSocket-Accept` value for the client's key.
    pub accept: String,
    /// The `Authorization` header, if the request had one.
    pub authorization: Option<&'a str>,
}

/// Recognises a plain WebSocket upgrade in `head` (the request line and
/// headers, up to and including the blank line). `origins` is the Origin
/// allow-list, `None` for any. Returns `None` for anything else.
pub fn parse_upgrade<'a>(head: &'a [u8], origins: Option<&[String]>) -> Option<Upgrade<'a>> {
    if head.len() > MAX_HEAD {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    if !request.parse(head).ok()?.is_complete() || request.method? != "GET" || request.version? != 1
    {
        return None;
    }
    let target = request.path?;
    let (mut connection_upgrade, mut upgrades, mut key, mut version) = (false, 0, None, None);
    let (mut origin, mut authorization) = (None, None);
    for header in request.headers.iter() {
        let name = header.name;
        let value = std::str::from_utf8(header.value).ok()?;
        if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("upgrade") {
            for token in tokens(value) {
                upgrades += 1;
                if !token.eq_ignore_ascii_case("websocket") {
                    return None;
                }
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            key = once(key, value)?;
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version = once(version, value)?;
        } else if name.eq_ignore_ascii_case("origin") {
            origin = once(origin, value)?;
        } else if name.eq_ignore_ascii_case("authorization") {
            authorization = once(authorization, value)?;
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol")
            || name.eq_ignore_ascii_case("transfer-encoding")
            || (name.eq_ignore_ascii_case("content-length") && value != "0")
        {
            return None;
        }
    }
    if !connection_upgrade || upgrades != 1 || version? != "13" {
        return None;
    }
    let key = key?;
    if BASE64.decode(key).ok()?.len() != 16 {
        return None;
    }
    if let (Some(allowed), Some(origin)) = (origins, origin) {
        if !allowed.iter().any(|a| a == origin) {
            return None;
        }
    }
    Some(Upgrade {
        target,
        accept: accept_key(key),
        authorization,
    })
}

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 section 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(GUID);
    BASE64.encode(sha1.finalize())
}

/// The comma-separated tokens of a header value.
fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|t| !t.is_empty())
}

/// `value` for a header that may appear once; `None` on a repeat.
fn once<'a>(seen: Option<&'a str>, value: &'a str) -> Option<Option<&'a str>> {
    match seen {
        None => Some(Some(value)),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(extra: &str) -> String {
        format!(
            "GET /ws/room?metadata=%7B%7D HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
             Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    #[test]
    fn rfc_example_key() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn accepts_the_common_request() {
        let head = request("Origin: https://a.example\r\nAuthorization: Bearer t\r\n");
        let upgrade = parse_upgrade(head.as_bytes(), None).unwrap();
        assert_eq!(upgrade.target, "/ws/room?metadata=%7B%7D");
        assert_eq!(upgrade.authorization, Some("Bearer t"));
        assert_eq!(upgrade.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let allowed = ["https://a.example".to_owned()];
        assert!(parse_upgrade(head.as_bytes(), Some(&allowed)).is_some());
        let without_origin = request("");
        assert!(parse_upgrade(without_origin.as_bytes(), Some(&allowed)).is_some());
    }

    #[test]
    fn leaves_everything_else_to_the_library() {
        let allowed = ["https://b.example".to_owned()];
        let refused = request("Origin: https://a.example\r\n");
        assert_eq!(parse_upgrade(refused.as_bytes(), Some(&allowed)), None);
        for head in [
            request("").replace("GET", "POST"),
            request("").replace("HTTP/1.1", "HTTP/1.0"),
            request("").replace("Upgrade: websocket", "Upgrade: h2c"),
            request("").replace("Connection: keep-alive, Upgrade", "Connection: keep-alive"),
            request("").replace("Version: 13", "Version: 8"),
            request("").replace(KEY, "c2hvcnQ="),
            request("Sec-WebSocket-Key: x\r\n"),
            request("Sec-WebSocket-Protocol: chat\r\n"),
            request("Content-Length: 5\r\n"),
            request("Transfer-Encoding: chunked\r\n"),
            request("")[..40].to_owned(),
            "garbage\r\n\r\n".to_owned(),
        ] {
            assert_eq!(parse_upgrade(head.as_bytes(), None), None, "{head:?}");
        }
    }

    proptest! {
        #[test]
        fn any_bytes_are_safe(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_upgrade(&bytes, None);
        }
    }
}

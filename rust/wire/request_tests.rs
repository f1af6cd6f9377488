use super::*;
use proptest::prelude::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn upgrade(target: &str, extra: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
         Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n\
         Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn request(head: &str) -> Request<'_> {
    match read(head.as_bytes(), None) {
        Reading::Request(request) => request,
        other => panic!("{head:?}: {other:?}"),
    }
}

fn refused(head: &str) -> Refusal {
    match read(head.as_bytes(), None) {
        Reading::Refused(refusal) => refusal,
        other => panic!("{head:?}: {other:?}"),
    }
}

fn join(head: &str) -> Join {
    request(head).join.expect("a join")
}

/// The topic a valid upgrade joins.
fn topic_of(head: &str) -> String {
    let join = join(head);
    assert_eq!(join.handshake.as_deref(), Ok(ACCEPT), "{head:?}");
    join.params.expect("valid parameters").topic
}

#[test]
fn rfc_example_key() {
    assert_eq!(accept_key(KEY), ACCEPT);
}

#[test]
fn reads_the_common_upgrade() {
    let head = upgrade(
        "/ws/room?metadata=%7B%22a%22%3A1%7D&token=t+1",
        "Authorization: Bearer x\r\nOrigin: https://a.example\r\n",
    );
    let read = request(&head);
    assert_eq!(read.head_len, head.len());
    assert_eq!((read.method, read.path), ("GET", "/ws/room"));
    assert_eq!(read.authorization, Some("Bearer x"));
    assert_eq!(read.origin, Some("https://a.example"));
    let join = read.join.unwrap();
    assert_eq!(join.handshake, Ok(ACCEPT.to_owned()));
    let params = join.params.unwrap();
    assert_eq!(params.topic, "room");
    assert_eq!(params.metadata.as_deref(), Some(r#"{"a":1}"#));
    assert_eq!(params.token.as_deref(), Some("t 1"));
}

#[test]
fn every_spelling_of_a_topic_is_the_same_topic() {
    for head in [
        upgrade("/ws/caf%C3%A9", ""),
        upgrade("/ws/caf%c3%a9", ""),
        upgrade("/ws/café", ""),
        format!("\r\n\n{}", upgrade("/ws/café", "")),
        upgrade("/ws/caf%C3%A9", "").replace("\r\n", "\n"),
        upgrade("http://x:80/ws/caf%C3%A9?metadata=1", ""),
        upgrade("HTTPS://x/ws/café", ""),
        upgrade("/ws/café", "")
            .to_uppercase()
            .replace("/WS/CAFÉ", "/ws/café")
            .replace(&KEY.to_uppercase(), KEY),
    ] {
        assert_eq!(topic_of(&head), "café", "{head:?}");
    }
}

#[test]
fn an_encoded_slash_is_part_of_the_topic_and_a_raw_one_another_path() {
    assert_eq!(topic_of(&upgrade("/ws/org%2Froom", "")), "org/room");
    assert_eq!(topic_of(&upgrade("/ws/org%2froom", "")), "org/room");
    assert_eq!(topic_of(&upgrade("/ws/%2F", "")), "/");
    for target in ["/ws/a/b", "/ws/room/", "/ws", "/wss/a"] {
        let head = upgrade(target, "");
        assert_eq!(request(&head).join, None, "{target}");
    }
    let head = upgrade("/ws/a/b?x", "");
    assert_eq!(request(&head).path, "/ws/a/b");
}

#[test]
fn invalid_topics_and_metadata_are_named() {
    let long = "x".repeat(MAX_TOPIC + 1);
    let long_utf8 = format!("{}x", "%C3%A9".repeat(MAX_TOPIC / 2));
    for segment in ["", "%FF", "%zz", "a%", "a%4", &long, &long_utf8] {
        let params = join(&upgrade(&format!("/ws/{segment}"), "")).params;
        assert_eq!(params, Err(Invalid::Topic), "{segment:?}");
    }
    assert!(
        join(&upgrade(&format!("/ws/{}", "x".repeat(MAX_TOPIC)), ""))
            .params
            .is_ok()
    );
    let long_json = format!("metadata=%22{}%22", "x".repeat(MAX_METADATA - 1));
    for query in [
        "metadata=%7Bnot",
        "metadata=",
        "metadata",
        "metadata=%7B%7D%20x",
        "metadata=%FF",
        "metadata=%zz",
        &long_json,
    ] {
        let params = join(&upgrade(&format!("/ws/t?{query}"), "")).params;
        assert_eq!(params, Err(Invalid::Metadata), "{query:?}");
    }
    let just_right = format!("metadata=%22{}%22", "x".repeat(MAX_METADATA - 2));
    let params = join(&upgrade(&format!("/ws/t?{just_right}"), "")).params;
    assert_eq!(params.unwrap().metadata.unwrap().len(), MAX_METADATA);
    let resuming = join(&upgrade("/ws/t?resumable=1&resume=ab%2Dc&seen=12", "")).params;
    let resuming = resuming.unwrap();
    assert!(resuming.resumable);
    assert_eq!(resuming.resume, Some(("ab-c".to_owned(), Some(12))));
    let odd = join(&upgrade("/ws/t?resumable=yes&resume=x&seen=-1", "")).params;
    let odd = odd.unwrap();
    assert!(!odd.resumable);
    assert_eq!(odd.resume, Some(("x".to_owned(), None)));
    // The first of a repeated parameter counts; unknown ones are ignored.
    let params = join(&upgrade("/ws/t?x=%zz&metadata=1&metadata=%7B", "")).params;
    assert_eq!(params.unwrap().metadata.as_deref(), Some("1"));
}

#[test]
fn handshake_refusals() {
    let cases: [(String, u16); 12] = [
        (upgrade("/ws/t", "").replace("GET", "POST"), 405),
        (upgrade("/ws/t", "").replace("websocket", "h2c"), 426),
        (
            upgrade("/ws/t", "").replace("keep-alive, Upgrade", "keep-alive"),
            426,
        ),
        (
            upgrade("/ws/t", "").replace("Version: 13", "Version: 8"),
            426,
        ),
        (
            upgrade("/ws/t", "").replace("Sec-WebSocket-Version: 13\r\n", ""),
            426,
        ),
        (upgrade("/ws/t", "Sec-WebSocket-Version: 13\r\n"), 400),
        (upgrade("/ws/t", "").replace(KEY, "c2hvcnQ="), 400),
        (upgrade("/ws/t", "Sec-WebSocket-Key: x\r\n"), 400),
        (upgrade("/ws/t", "Content-Length: 5\r\n"), 400),
        (upgrade("/ws/t", "Transfer-Encoding: chunked\r\n"), 400),
        (
            upgrade("/ws/t", "Origin: https://b\r\nOrigin: https://b\r\n"),
            400,
        ),
        ("GET /ws/t HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), 426),
    ];
    for (head, status) in cases {
        let handshake = join(&head).handshake;
        assert_eq!(handshake.map_err(|r| r.status), Err(status), "{head:?}");
    }
    let version = join(&upgrade("/ws/t", "").replace("Version: 13", "Version: 8"));
    let headers = version.handshake.unwrap_err().headers;
    assert_eq!(headers, &[("Sec-WebSocket-Version", "13")]);
}

#[test]
fn the_origin_allow_list() {
    let allowed = ["https://a.example".to_owned()];
    let verdict = |extra: &str| match read(upgrade("/ws/t", extra).as_bytes(), Some(&allowed)) {
        Reading::Request(request) => request.join.unwrap().handshake.map_err(|r| r.status),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        verdict("Origin: https://a.example\r\n"),
        Ok(ACCEPT.to_owned())
    );
    assert_eq!(verdict(""), Ok(ACCEPT.to_owned()));
    assert_eq!(verdict("Origin: https://b.example\r\n"), Err(403));
}

#[test]
fn a_subprotocol_asked_for_is_not_a_refusal() {
    let head = upgrade("/ws/t", "Sec-WebSocket-Protocol: chat\r\n");
    assert_eq!(join(&head).handshake, Ok(ACCEPT.to_owned()));
}

#[test]
fn http_refusals() {
    assert_eq!(refused("garbage\r\n\r\n").status, 400);
    assert_eq!(refused("GET /ws/t HTTP/2.0\r\nHost: x\r\n\r\n").status, 505);
    assert_eq!(refused("GET /ws/t HTTP/1.0\r\nHost: x\r\n\r\n").status, 505);
    assert_eq!(refused("GET /ws/t FOO/1.1\r\nHost: x\r\n\r\n").status, 400);
    assert_eq!(refused("GET /healthz HTTP/1.1\r\n\r\n").status, 400);
    assert_eq!(
        refused("GET /healthz HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n").status,
        400
    );
    assert_eq!(refused("GET * HTTP/1.1\r\nHost: a\r\n\r\n").status, 400);
    assert_eq!(refused("GET x:80 HTTP/1.1\r\nHost: a\r\n\r\n").status, 400);
    // A target whose raw bytes are not UTF-8 (a character half encoded).
    let half = b"GET /ws/caf%C3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n";
    assert_eq!(read(half, None), Reading::Refused(MALFORMED));
    let endpoint = request("GET http://a:1?x HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((endpoint.path, endpoint.join), ("/", None));
}

#[test]
fn the_limits() {
    let line = |n: usize| upgrade(&format!("/ws/t?p={}", "a".repeat(n)), "");
    // "GET " + "/ws/t?p=" + n + " HTTP/1.1" is n + 21 bytes.
    assert!(join(&line(MAX_LINE - 21)).handshake.is_ok());
    assert_eq!(refused(&line(MAX_LINE - 20)).status, 414);
    let header = |n: usize| upgrade("/ws/t", &format!("X: {}\r\n", "a".repeat(n)));
    assert!(join(&header(MAX_LINE - 3)).handshake.is_ok());
    assert_eq!(refused(&header(MAX_LINE - 2)).status, 431);
    let headers = |n: usize| upgrade("/ws/t", &"X: a\r\n".repeat(n));
    // The upgrade has 5 headers of its own.
    assert!(join(&headers(MAX_HEADERS - 5)).handshake.is_ok());
    assert_eq!(refused(&headers(MAX_HEADERS - 4)).status, 431);
    // Over 16 KiB, complete or not.
    let big = upgrade("/ws/t", &format!("X: {}\r\n", "a".repeat(1000)).repeat(17));
    assert_eq!(refused(&big).status, 431);
    assert_eq!(refused(&big[..MAX_HEAD + 1]).status, 431);
    // Too long before its end, early.
    assert_eq!(refused(&"GET /".repeat(2000)).status, 414);
}

#[test]
fn an_incomplete_head_waits() {
    let head = upgrade("/ws/t", "");
    for end in [0, 1, 10, head.len() - 1] {
        assert_eq!(
            read(&head.as_bytes()[..end], None),
            Reading::Incomplete,
            "{end}"
        );
    }
    assert_eq!(read(b"\r\n\r\n", None), Reading::Incomplete);
    // What follows the head is not part of it.
    let pipelined = format!("{head}\x01\x02abcd");
    assert_eq!(request(&pipelined).head_len, head.len());
}

proptest! {
    #[test]
    fn any_bytes_are_safe(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = read(&bytes, None);
    }

    /// A valid head read in two parts reads as it does whole, or as
    /// incomplete before its end.
    #[test]
    fn reading_does_not_depend_on_how_the_bytes_arrive(cut in 0usize..200) {
        let head = upgrade("/ws/caf%C3%A9?metadata=%7B%7D", "");
        let cut = cut.min(head.len());
        let first = read(&head.as_bytes()[..cut], None);
        if cut < head.len() {
            prop_assert_eq!(first, Reading::Incomplete);
        }
        prop_assert_eq!(topic_of(&head), "café");
    }

    #[test]
    fn any_encoding_of_a_topic_decodes_to_it(
        topic in "[a-zé/% ü?#+]{1,20}",
        encode in prop::collection::vec(0u8..3, 60),
    ) {
        let mut segment = String::new();
        let mut buf = [0u8; 4];
        for (i, c) in topic.chars().enumerate() {
            let raw = matches!(c, 'a'..='z' | 'é' | 'ü' | '+') && encode[i % encode.len()] == 0;
            if raw {
                segment.push(c);
                continue;
            }
            for byte in c.encode_utf8(&mut buf).bytes() {
                if encode[i % encode.len()] == 2 {
                    segment.push_str(&format!("%{byte:02x}"));
                } else {
                    segment.push_str(&format!("%{byte:02X}"));
                }
            }
        }
        prop_assert_eq!(topic_of(&upgrade(&format!("/ws/{segment}"), "")), topic);
    }
}

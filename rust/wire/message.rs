//! The JSON messages of the protocol: parsing what clients send and writing
//! what the server sends, as complete WebSocket text frames.
//!
//! Client JSON is parsed by serde into borrowed fields; `payload` and
//! `msgId` are kept as the raw JSON text they arrived as and copied into
//! the outbound frame unchanged, never re-encoded.

use std::borrow::Cow;

use serde::de::{Deserializer, Error as _};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::wire::frame::push_text;

/// The relay message types; the server forwards these to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayKind {
    Offer,
    Answer,
    IceCandidate,
    /// To every other peer of the topic (PROTOCOL.md section 9).
    Broadcast,
    /// A unicast type the operator allowed (`--relay-type`), relayed
    /// exactly like `offer`.
    App(&'static str),
}

/// The message type of a broadcast.
pub const BROADCAST: &str = "broadcast";

/// Types a client message has that are not relay types, and so no
/// `--relay-type` may take.
pub const RESERVED_TYPES: &[&str] = &[
    "offer",
    "answer",
    "ice-candidate",
    "ping",
    BROADCAST,
    "update-metadata",
];

impl RelayKind {
    /// The unicast type `name`: one of the three, or of `extra`.
    fn parse(name: &str, extra: &[&'static str]) -> Option<Self> {
        match name {
            "offer" => Some(Self::Offer),
            "answer" => Some(Self::Answer),
            "ice-candidate" => Some(Self::IceCandidate),
            _ => extra
                .iter()
                .find(|allowed| **allowed == name)
                .map(|allowed| Self::App(allowed)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Offer => "offer",
            Self::Answer => "answer",
            Self::IceCandidate => "ice-candidate",
            Self::Broadcast => BROADCAST,
            Self::App(name) => name,
        }
    }
}

/// A valid client message.
#[derive(Debug)]
pub enum Inbound<'a> {
    Relay {
        kind: RelayKind,
        to: Cow<'a, str>,
        payload: Option<&'a RawValue>,
        msg_id: Option<&'a RawValue>,
    },
    Ping {
        msg_id: Option<&'a RawValue>,
    },
    /// To every other peer of the topic.
    Broadcast {
        payload: Option<&'a RawValue>,
        msg_id: Option<&'a RawValue>,
    },
    /// The sender's new metadata (JSON `null`: none).
    UpdateMetadata {
        metadata: &'a RawValue,
        msg_id: Option<&'a RawValue>,
    },
}

/// The message type of a metadata update.
pub const UPDATE_METADATA: &str = "update-metadata";

/// The `error` codes of the protocol (PROTOCOL.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidType,
    MissingTarget,
    TargetNotFound,
    Dropped,
    InvalidJson,
    InvalidMessage,
    UnsupportedFrame,
    RateLimited,
    Unauthorized,
    TopicFull,
    ServerFull,
    SlowConsumer,
    InvalidTopic,
    InvalidMetadata,
    Kicked,
    Forbidden,
}

impl ErrorCode {
    /// Every code, in declaration order (`code as usize` indexes it).
    pub const ALL: [Self; 16] = [
        Self::InvalidType,
        Self::MissingTarget,
        Self::TargetNotFound,
        Self::Dropped,
        Self::InvalidJson,
        Self::InvalidMessage,
        Self::UnsupportedFrame,
        Self::RateLimited,
        Self::Unauthorized,
        Self::TopicFull,
        Self::ServerFull,
        Self::SlowConsumer,
        Self::InvalidTopic,
        Self::InvalidMetadata,
        Self::Kicked,
        Self::Forbidden,
    ];

    pub const fn code(self) -> &'static str {
        match self {
            Self::InvalidType => "invalid_type",
            Self::MissingTarget => "missing_target",
            Self::TargetNotFound => "target_not_found",
            Self::Dropped => "dropped",
            Self::InvalidJson => "invalid_json",
            Self::InvalidMessage => "invalid_message",
            Self::UnsupportedFrame => "unsupported_frame",
            Self::RateLimited => "rate_limited",
            Self::Unauthorized => "unauthorized",
            Self::TopicFull => "topic_full",
            Self::ServerFull => "server_full",
            Self::SlowConsumer => "slow_consumer",
            Self::InvalidTopic => "invalid_topic",
            Self::InvalidMetadata => "invalid_metadata",
            Self::Kicked => "kicked",
            Self::Forbidden => "forbidden",
        }
    }

    /// The human-readable text; the first four are the original design's.
    pub const fn message(self) -> &'static str {
        match self {
            Self::InvalidType => "unknown message type",
            Self::MissingTarget => "to required",
            Self::TargetNotFound => "peer not found",
            Self::Dropped => "delivery failed",
            Self::InvalidJson => "message is not a JSON object",
            Self::InvalidMessage => "a field has the wrong type",
            Self::UnsupportedFrame => "binary frames are not supported",
            Self::RateLimited => "message rate limit exceeded",
            Self::Unauthorized => "missing, invalid or expired token",
            Self::TopicFull => "topic is full",
            Self::ServerFull => "server is full",
            Self::SlowConsumer => "outbound buffer full",
            Self::InvalidTopic => "the topic must be 1 to 256 bytes of UTF-8, percent-encoded",
            Self::InvalidMetadata => "metadata must be one JSON value of at most 1 KiB",
            Self::Kicked => "removed by the server",
            Self::Forbidden => "not allowed",
        }
    }
}

/// A refused client message: the error to answer with, and the message's
/// `msgId` when it had a valid one.
#[derive(Debug)]
pub struct Rejected<'a> {
    pub code: ErrorCode,
    pub msg_id: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    to: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "any_value")]
    payload: Option<&'a RawValue>,
    #[serde(rename = "msgId", default, borrow, deserialize_with = "string_value")]
    msg_id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "any_value")]
    metadata: Option<&'a RawValue>,
}

/// [`Wire`] for a message whose `type` or `to` does not decode (a lone
/// surrogate escape such as `"\ud800"` is valid JSON but no Rust string):
/// it is read again with them as raw JSON text.
#[derive(Deserialize)]
struct LenientWire<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "string_value")]
    kind: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "string_value")]
    to: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "any_value")]
    payload: Option<&'a RawValue>,
    #[serde(rename = "msgId", default, borrow, deserialize_with = "string_value")]
    msg_id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "any_value")]
    metadata: Option<&'a RawValue>,
}

/// What a string that does not decode stands for: no type, no peer id.
const UNDECODABLE: &str = "\u{fffd}";

impl<'a> LenientWire<'a> {
    fn into_wire(self) -> Wire<'a> {
        let decode = |raw: &RawValue| {
            serde_json::from_str::<String>(raw.get()).map_or(Cow::Borrowed(UNDECODABLE), Cow::Owned)
        };
        Wire {
            kind: self.kind.map(decode),
            to: self.to.map(decode),
            payload: self.payload,
            msg_id: self.msg_id,
            metadata: self.metadata,
        }
    }
}

/// Only `msgId`, for answering a message whose other fields are wrong.
#[derive(Deserialize)]
struct WireMsgId<'a> {
    #[serde(rename = "msgId", default, borrow, deserialize_with = "string_value")]
    msg_id: Option<&'a RawValue>,
}

/// Keeps any JSON value, `null` included, as raw text.
fn any_value<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Keeps a JSON string as raw text; `null` counts as absent, as does `""`
/// (the original design omitted an empty msgId).
fn string_value<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    let raw = <&RawValue>::deserialize(deserializer)?;
    match raw.get().as_bytes() {
        b"null" | b"\"\"" => Ok(None),
        [b'"', ..] => Ok(Some(raw)),
        _ => Err(D::Error::custom("expected a string")),
    }
}

/// Parses one client text message (the three relay types only).
pub fn parse_inbound(text: &str) -> Result<Inbound<'_>, Rejected<'_>> {
    parse_inbound_with(text, &[])
}

/// Parses one client text message; `relay_types` are the unicast types
/// allowed besides the three.
pub fn parse_inbound_with<'a>(
    text: &'a str,
    relay_types: &[&'static str],
) -> Result<Inbound<'a>, Rejected<'a>> {
    // serde would also take a struct from a JSON array: only objects count.
    if text.trim_start().as_bytes().first() != Some(&b'{') {
        return Err(Rejected {
            code: ErrorCode::InvalidJson,
            msg_id: None,
        });
    }
    let wire = serde_json::from_str::<Wire<'_>>(text).or_else(|err| {
        if err.is_data() {
            return Err(err);
        }
        // Only a message that is not JSON fails here; the rest is rare
        // enough that reading it twice costs nothing on the relay path.
        serde_json::from_str::<LenientWire<'_>>(text).map(LenientWire::into_wire)
    });
    let wire = match wire {
        Ok(wire) => wire,
        Err(err) if err.is_data() => {
            let msg_id = msg_id_of(text);
            return Err(Rejected {
                code: ErrorCode::InvalidMessage,
                msg_id,
            });
        }
        Err(_) => {
            return Err(Rejected {
                code: ErrorCode::InvalidJson,
                msg_id: None,
            })
        }
    };
    let msg_id = wire.msg_id;
    let kind = wire.kind.as_deref().unwrap_or("");
    if kind == "ping" {
        return Ok(Inbound::Ping { msg_id });
    }
    if kind == BROADCAST {
        let payload = wire.payload;
        return Ok(Inbound::Broadcast { payload, msg_id });
    }
    if kind == UPDATE_METADATA {
        return match wire.metadata {
            Some(metadata) => Ok(Inbound::UpdateMetadata { metadata, msg_id }),
            None => Err(Rejected {
                code: ErrorCode::InvalidMessage,
                msg_id,
            }),
        };
    }
    let Some(kind) = RelayKind::parse(kind, relay_types) else {
        return Err(Rejected {
            code: ErrorCode::InvalidType,
            msg_id,
        });
    };
    match wire.to {
        Some(to) if !to.is_empty() => Ok(Inbound::Relay {
            kind,
            to,
            payload: wire.payload,
            msg_id,
        }),
        _ => Err(Rejected {
            code: ErrorCode::MissingTarget,
            msg_id,
        }),
    }
}

/// The `msgId` of a message, if it is an object with a string `msgId`.
pub fn msg_id_of(text: &str) -> Option<&RawValue> {
    serde_json::from_str::<WireMsgId<'_>>(text)
        .ok()
        .and_then(|wire| wire.msg_id)
}

/// Validates `?metadata=` (already percent-decoded): one JSON value. Returns
/// the value's text without surrounding whitespace.
pub fn parse_metadata(text: &str) -> Option<&str> {
    serde_json::from_str::<&RawValue>(text)
        .ok()
        .map(RawValue::get)
}

fn msg_id_part(msg_id: Option<&RawValue>) -> [&[u8]; 2] {
    match msg_id {
        Some(raw) => [b",\"msgId\":", raw.get().as_bytes()],
        None => [b"", b""],
    }
}

/// `{"type":KIND,"from":FROM,"payload":...,"msgId":...}`
pub fn push_relay(
    out: &mut Vec<u8>,
    kind: RelayKind,
    from: &str,
    payload: Option<&RawValue>,
    msg_id: Option<&RawValue>,
) {
    let payload: [&[u8]; 2] = match payload {
        Some(raw) => [b",\"payload\":", raw.get().as_bytes()],
        None => [b"", b""],
    };
    let [id_key, id] = msg_id_part(msg_id);
    push_text(
        out,
        &[
            b"{\"type\":\"",
            kind.name().as_bytes(),
            b"\",\"from\":\"",
            from.as_bytes(),
            b"\"",
            payload[0],
            payload[1],
            id_key,
            id,
            b"}",
        ],
    );
}

/// `{"type":"error","code":...,"message":...,"msgId":...}`
pub fn push_error(out: &mut Vec<u8>, code: ErrorCode, msg_id: Option<&RawValue>) {
    push_error_with(out, code, msg_id, &[]);
}

/// `{"type":"error","code":"dropped",...,"missed":N}`: a broadcast that
/// `missed` targets did not get.
pub fn push_dropped_broadcast(out: &mut Vec<u8>, msg_id: Option<&RawValue>, missed: usize) {
    let missed = missed.to_string();
    let extra: [&[u8]; 2] = [b",\"missed\":", missed.as_bytes()];
    push_error_with(out, ErrorCode::Dropped, msg_id, &extra);
}

/// An error with `extra` (more fields, each with its leading comma).
fn push_error_with(out: &mut Vec<u8>, code: ErrorCode, msg_id: Option<&RawValue>, extra: &[&[u8]]) {
    let [id_key, id] = msg_id_part(msg_id);
    let mut parts: Vec<&[u8]> = vec![
        b"{\"type\":\"error\",\"code\":\"",
        code.code().as_bytes(),
        b"\",\"message\":\"",
        code.message().as_bytes(),
        b"\"",
        id_key,
        id,
    ];
    parts.extend_from_slice(extra);
    parts.push(b"}");
    push_text(out, &parts);
}

/// `{"type":"pong","msgId":...}`
pub fn push_pong_message(out: &mut Vec<u8>, msg_id: Option<&RawValue>) {
    let [id_key, id] = msg_id_part(msg_id);
    push_text(out, &[b"{\"type\":\"pong\"", id_key, id, b"}"]);
}

/// `{"type":"welcome","selfId":...,"pingInterval":...}`, with `extra` (more
/// fields, each with its leading comma) before the closing brace.
pub fn push_welcome(out: &mut Vec<u8>, self_id: &str, ping_interval: &str, extra: &str) {
    push_text(
        out,
        &[
            b"{\"type\":\"welcome\",\"selfId\":\"",
            self_id.as_bytes(),
            b"\",\"pingInterval\":",
            ping_interval.as_bytes(),
            extra.as_bytes(),
            b"}",
        ],
    );
}

/// `{"type":"peer-list","peers":[{"id":...,"metadata":...},...]}`
pub fn push_peer_list<'a>(
    out: &mut Vec<u8>,
    peers: impl Iterator<Item = (&'a str, Option<&'a str>)>,
) {
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(b"{\"type\":\"peer-list\",\"peers\":[");
    for (i, (id, metadata)) in peers.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"id\":\"");
        body.extend_from_slice(id.as_bytes());
        body.push(b'"');
        if let Some(metadata) = metadata {
            body.extend_from_slice(b",\"metadata\":");
            body.extend_from_slice(metadata.as_bytes());
        }
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    push_text(out, &[&body]);
}

/// `{"type":"peer-joined","peerId":...,"metadata":...}`
pub fn push_peer_joined(out: &mut Vec<u8>, peer_id: &str, metadata: Option<&str>) {
    let metadata: [&[u8]; 2] = match metadata {
        Some(text) => [b",\"metadata\":", text.as_bytes()],
        None => [b"", b""],
    };
    push_text(
        out,
        &[
            b"{\"type\":\"peer-joined\",\"peerId\":\"",
            peer_id.as_bytes(),
            b"\"",
            metadata[0],
            metadata[1],
            b"}",
        ],
    );
}

/// `{"type":"peer-updated","peerId":...,"metadata":...}` (`null` for none)
pub fn push_peer_updated(out: &mut Vec<u8>, peer_id: &str, metadata: Option<&str>) {
    push_text(
        out,
        &[
            b"{\"type\":\"peer-updated\",\"peerId\":\"",
            peer_id.as_bytes(),
            b"\",\"metadata\":",
            metadata.unwrap_or("null").as_bytes(),
            b"}",
        ],
    );
}

/// `{"type":"server-message","payload":...}`: the application's backend
/// speaking (the admin API).
pub fn push_server_message(out: &mut Vec<u8>, payload: &RawValue) {
    push_text(
        out,
        &[
            b"{\"type\":\"server-message\",\"payload\":",
            payload.get().as_bytes(),
            b"}",
        ],
    );
}

/// `{"type":"peer-left","peerId":...}`
pub fn push_peer_left(out: &mut Vec<u8>, peer_id: &str) {
    push_text(
        out,
        &[
            b"{\"type\":\"peer-left\",\"peerId\":\"",
            peer_id.as_bytes(),
            b"\"}",
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn code_of(text: &str) -> Option<ErrorCode> {
        parse_inbound(text).err().map(|rejected| rejected.code)
    }

    /// The JSON text of a frame written by one of the push functions.
    fn body(out: &[u8]) -> &str {
        let start = match out[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        std::str::from_utf8(&out[start..]).unwrap()
    }

    #[test]
    fn relay_keeps_payload_bytes() {
        let text = r#"{"type":"offer","to":"B","payload": {"sdp" : "v=0\r\n", "x":[1, 2 ]} ,"msgId":"m\u0031","from":"spoof"}"#;
        let Ok(Inbound::Relay {
            kind,
            to,
            payload,
            msg_id,
        }) = parse_inbound(text)
        else {
            panic!("not a relay");
        };
        assert_eq!((kind, to.as_ref()), (RelayKind::Offer, "B"));
        let mut out = Vec::new();
        push_relay(&mut out, kind, "A", payload, msg_id);
        assert_eq!(
            body(&out),
            r#"{"type":"offer","from":"A","payload":{"sdp" : "v=0\r\n", "x":[1, 2 ]},"msgId":"m\u0031"}"#
        );
    }

    #[test]
    fn null_payload_is_kept_and_absent_payload_omitted() {
        for (text, expected) in [
            (
                r#"{"type":"answer","to":"B","payload":null}"#,
                r#"{"type":"answer","from":"A","payload":null}"#,
            ),
            (
                r#"{"type":"answer","to":"B"}"#,
                r#"{"type":"answer","from":"A"}"#,
            ),
        ] {
            let Ok(Inbound::Relay {
                kind,
                payload,
                msg_id,
                ..
            }) = parse_inbound(text)
            else {
                panic!("not a relay");
            };
            let mut out = Vec::new();
            push_relay(&mut out, kind, "A", payload, msg_id);
            assert_eq!(body(&out), expected);
        }
    }

    #[test]
    fn rejections() {
        let cases = [
            ("not json", ErrorCode::InvalidJson),
            ("[1,2]", ErrorCode::InvalidJson),
            (r#""offer""#, ErrorCode::InvalidJson),
            (r#"{"type":"offer""#, ErrorCode::InvalidJson),
            (r#"{"type":"offer"} x"#, ErrorCode::InvalidJson),
            (r#"{"type":1}"#, ErrorCode::InvalidMessage),
            (r#"{"type":"offer","to":5}"#, ErrorCode::InvalidMessage),
            (
                r#"{"type":"offer","to":"B","msgId":7}"#,
                ErrorCode::InvalidMessage,
            ),
            (
                r#"{"type":"offer","type":"answer","to":"B"}"#,
                ErrorCode::InvalidMessage,
            ),
            (r#"{}"#, ErrorCode::InvalidType),
            (r#"{"type":null}"#, ErrorCode::InvalidType),
            (r#"{"type":"hello","to":"B"}"#, ErrorCode::InvalidType),
            (r#"{"type":"offer"}"#, ErrorCode::MissingTarget),
            (r#"{"type":"offer","to":""}"#, ErrorCode::MissingTarget),
            (r#"{"type":"offer","to":null}"#, ErrorCode::MissingTarget),
        ];
        for (text, code) in cases {
            assert_eq!(code_of(text), Some(code), "{text}");
        }
    }

    #[test]
    fn strings_that_do_not_decode_name_nothing() {
        // A lone surrogate escape is valid JSON that no Rust string holds.
        let text = r#"{"type":"offer","to":"\ud800","msgId":"s"}"#;
        let Ok(Inbound::Relay { to, msg_id, .. }) = parse_inbound(text) else {
            panic!("not a relay");
        };
        assert_eq!(to, UNDECODABLE);
        assert_eq!(msg_id.map(RawValue::get), Some(r#""s""#));
        let text = r#"{"type":"\udc00x","to":"B","msgId":"t"}"#;
        let rejected = parse_inbound(text).unwrap_err();
        assert_eq!(rejected.code, ErrorCode::InvalidType);
        assert_eq!(rejected.msg_id.map(RawValue::get), Some(r#""t""#));
        assert_eq!(
            code_of(r#"{"type":"offer","to":"\ud800""#),
            Some(ErrorCode::InvalidJson)
        );
        assert_eq!(
            code_of(r#"{"type":"offer","to":["\ud800"]}"#),
            Some(ErrorCode::InvalidMessage)
        );
    }

    #[test]
    fn msg_id_is_echoed_on_rejection_when_valid() {
        let rejected = parse_inbound(r#"{"type":"offer","to":5,"msgId":"m1"}"#).unwrap_err();
        assert_eq!(rejected.msg_id.map(RawValue::get), Some("\"m1\""));
        let rejected = parse_inbound(r#"{"type":"nope","msgId":"m2"}"#).unwrap_err();
        assert_eq!(rejected.msg_id.map(RawValue::get), Some("\"m2\""));
        let mut out = Vec::new();
        push_error(&mut out, rejected.code, rejected.msg_id);
        assert_eq!(
            body(&out),
            r#"{"type":"error","code":"invalid_type","message":"unknown message type","msgId":"m2"}"#
        );
    }

    #[test]
    fn ping_and_pong() {
        let Ok(Inbound::Ping { msg_id }) = parse_inbound(r#"{"type":"ping","msgId":"x"}"#) else {
            panic!("not a ping");
        };
        let mut out = Vec::new();
        push_pong_message(&mut out, msg_id);
        assert_eq!(body(&out), r#"{"type":"pong","msgId":"x"}"#);
    }

    #[test]
    fn presence_messages() {
        let mut out = Vec::new();
        push_peer_list(
            &mut out,
            [("A", Some(r#"{"n":1}"#)), ("B", None)].into_iter(),
        );
        assert_eq!(
            body(&out),
            r#"{"type":"peer-list","peers":[{"id":"A","metadata":{"n":1}},{"id":"B"}]}"#
        );
        out.clear();
        push_peer_list(&mut out, std::iter::empty());
        assert_eq!(body(&out), r#"{"type":"peer-list","peers":[]}"#);
        out.clear();
        push_peer_joined(&mut out, "A", None);
        assert_eq!(body(&out), r#"{"type":"peer-joined","peerId":"A"}"#);
        out.clear();
        push_peer_left(&mut out, "A");
        assert_eq!(body(&out), r#"{"type":"peer-left","peerId":"A"}"#);
        out.clear();
        push_welcome(&mut out, "A", "30", "");
        assert_eq!(
            body(&out),
            r#"{"type":"welcome","selfId":"A","pingInterval":30}"#
        );
    }

    #[test]
    fn metadata() {
        assert_eq!(parse_metadata(r#" {"a": 1} "#), Some(r#"{"a": 1}"#));
        assert_eq!(parse_metadata("\"x\""), Some("\"x\""));
        assert_eq!(parse_metadata("{"), None);
        assert_eq!(parse_metadata(""), None);
        assert_eq!(parse_metadata("1 2"), None);
    }

    proptest! {
        /// Every input gets an answer and none panics.
        #[test]
        fn any_text_gets_an_answer(text in ".{0,200}") {
            let _ = parse_inbound(&text);
        }

        /// Any JSON payload round-trips byte for byte.
        #[test]
        fn payload_round_trips(value in arb_json()) {
            let text = format!(r#"{{"type":"offer","to":"B","payload":{value}}}"#);
            let Ok(Inbound::Relay { payload, .. }) = parse_inbound(&text) else {
                panic!("not a relay: {text}");
            };
            prop_assert_eq!(payload.map(RawValue::get), Some(value.as_str()));
        }
    }

    fn arb_json() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            "[a-z \\\\u00e9\u{1F600}]{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(" , "))),
                prop::collection::vec(("[a-z]{1,4}", inner), 0..4).prop_map(|v| {
                    let fields: Vec<String> =
                        v.iter().map(|(k, x)| format!("\"{k}\" :{x}")).collect();
                    format!("{{{}}}", fields.join(","))
                }),
            ]
        })
    }
}

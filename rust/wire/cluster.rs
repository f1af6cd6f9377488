//! The messages cluster nodes send each other through their Redis inboxes
//! (see `engine::cluster` for what a node does with them).
//!
//! Inbox messages, by their first byte:
//! - `R`: a relay for a local peer: `to` (26), `from` (26), the origin
//!   node's name (u8 length, then bytes), the sender's `msgId` JSON (u16
//!   big-endian length, then bytes; 0 for none), then the WebSocket frame to
//!   write to `to`, ready to send;
//! - `D`: a frame that a local peer must receive (an error bounced back to
//!   a relay's sender): `to` (26), then the frame;
//! - `B`: a broadcast for every local peer of a topic: the origin's number
//!   for it (u64 big-endian), the origin node's name (u8 length, then
//!   bytes), the topic (u16 length, then bytes), then the frame to write to
//!   each of them (the sender's id is in it; its `msgId` stays with the
//!   origin, which tells the sender what missed it);
//! - `T`: a node's answer to a `B`: the origin's number for it (u64), how
//!   many local members missed it (u32 big-endian), then the answering
//!   node's name;
//! - `E`: several of the others for the same node, in order, each after
//!   its length (u32 big-endian): what one event loop iteration of the
//!   origin published to that node (`engine::publish`);
//! - `{`: a presence event, JSON:
//!   `{"topic":..,"v":..,"joined":[[peer,node,metadata|null],..],"left":[peer,..]}`,
//!   with `"dead":true` when the peers left because their node died.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::wire::peer_id::PeerId;

/// A member of a topic held by another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePeer {
    pub node: Arc<str>,
    pub metadata: Option<Box<str>>,
}

/// Membership changes of one topic, made by one Redis function call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub version: u64,
    pub left: Vec<PeerId>,
    pub joined: Vec<(PeerId, RemotePeer)>,
    /// The peers left because their node died: relays sent to them lately
    /// may have been lost with it.
    pub dead: bool,
    /// Peers whose session moved to another node (a resume there): the
    /// same members, on their new nodes (`wire::migrate`).
    pub moved: Vec<(PeerId, Arc<str>)>,
}

pub const RELAY: u8 = b'R';
pub const DIRECT: u8 = b'D';
pub const BROADCAST: u8 = b'B';
pub const TALLY: u8 = b'T';
pub const ENVELOPE: u8 = b'E';
const ID: usize = ulid::ULID_LEN;

/// A relay on its way to another node.
#[derive(Debug)]
pub struct Relay<'a> {
    pub to: PeerId,
    pub from: PeerId,
    pub origin: &'a str,
    pub msg_id: Option<&'a RawValue>,
    pub frame: &'a [u8],
}

/// Writes an `R` message; `frame` writes the WebSocket frame for `to`.
pub fn push_relay(
    out: &mut Vec<u8>,
    to: &PeerId,
    from: &PeerId,
    origin: &str,
    msg_id: Option<&RawValue>,
    frame: impl FnOnce(&mut Vec<u8>),
) {
    let origin = &origin.as_bytes()[..origin.len().min(255)];
    let msg_id = msg_id.map_or("", |id| id.get()).as_bytes();
    let msg_id = &msg_id[..msg_id.len().min(usize::from(u16::MAX))];
    out.push(RELAY);
    out.extend_from_slice(to.as_str().as_bytes());
    out.extend_from_slice(from.as_str().as_bytes());
    out.push(origin.len() as u8);
    out.extend_from_slice(origin);
    out.extend_from_slice(&(msg_id.len() as u16).to_be_bytes());
    out.extend_from_slice(msg_id);
    frame(out);
}

pub fn parse_relay(data: &[u8]) -> Option<Relay<'_>> {
    let rest = data.strip_prefix(&[RELAY])?;
    let (to, rest) = split(rest, ID)?;
    let (from, rest) = split(rest, ID)?;
    let (&origin_len, rest) = rest.split_first()?;
    let (origin, rest) = split(rest, usize::from(origin_len))?;
    let (id_len, rest) = split(rest, 2)?;
    let (msg_id, frame) = split(
        rest,
        usize::from(u16::from_be_bytes([id_len[0], id_len[1]])),
    )?;
    let msg_id = match msg_id {
        [] => None,
        text => Some(serde_json::from_slice::<&RawValue>(text).ok()?),
    };
    Some(Relay {
        to: peer_id(to)?,
        from: peer_id(from)?,
        origin: std::str::from_utf8(origin).ok()?,
        msg_id,
        frame,
    })
}

/// A broadcast on its way to another node's members of `topic`.
#[derive(Debug)]
pub struct Broadcast<'a> {
    pub topic: &'a str,
    /// The origin's number for it, which the answer (`T`) names.
    pub seq: u64,
    pub origin: &'a str,
    pub frame: &'a [u8],
}

/// Writes a `B` message.
pub fn push_broadcast(out: &mut Vec<u8>, broadcast: &Broadcast<'_>) {
    let origin = &broadcast.origin.as_bytes()[..broadcast.origin.len().min(255)];
    let topic = broadcast.topic.as_bytes();
    let topic = &topic[..topic.len().min(usize::from(u16::MAX))];
    out.push(BROADCAST);
    out.extend_from_slice(&broadcast.seq.to_be_bytes());
    out.push(origin.len() as u8);
    out.extend_from_slice(origin);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic);
    out.extend_from_slice(broadcast.frame);
}

pub fn parse_broadcast(data: &[u8]) -> Option<Broadcast<'_>> {
    let rest = data.strip_prefix(&[BROADCAST])?;
    let (seq, rest) = split(rest, 8)?;
    let (&origin_len, rest) = rest.split_first()?;
    let (origin, rest) = split(rest, usize::from(origin_len))?;
    let (topic, frame) = long_field(rest)?;
    Some(Broadcast {
        topic: std::str::from_utf8(topic).ok()?,
        seq: u64::from_be_bytes(seq.try_into().ok()?),
        origin: std::str::from_utf8(origin).ok()?,
        frame,
    })
}

/// A node's answer to a broadcast: how many of its members missed it.
#[derive(Debug, PartialEq, Eq)]
pub struct Tally<'a> {
    pub seq: u64,
    pub missed: u32,
    pub node: &'a str,
}

/// Writes a `T` message.
pub fn push_tally(out: &mut Vec<u8>, tally: &Tally<'_>) {
    out.push(TALLY);
    out.extend_from_slice(&tally.seq.to_be_bytes());
    out.extend_from_slice(&tally.missed.to_be_bytes());
    out.extend_from_slice(tally.node.as_bytes());
}

pub fn parse_tally(data: &[u8]) -> Option<Tally<'_>> {
    let rest = data.strip_prefix(&[TALLY])?;
    let (seq, rest) = split(rest, 8)?;
    let (missed, node) = split(rest, 4)?;
    Some(Tally {
        seq: u64::from_be_bytes(seq.try_into().ok()?),
        missed: u32::from_be_bytes(missed.try_into().ok()?),
        node: std::str::from_utf8(node).ok()?,
    })
}

/// A field of up to 65,535 bytes after its u16 big-endian length.
fn long_field(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = split(data, 2)?;
    split(rest, usize::from(u16::from_be_bytes([len[0], len[1]])))
}

/// Writes a `D` message: `frame` must reach local peer `to`.
pub fn push_direct(out: &mut Vec<u8>, to: &PeerId, frame: impl FnOnce(&mut Vec<u8>)) {
    out.push(DIRECT);
    out.extend_from_slice(to.as_str().as_bytes());
    frame(out);
}

pub fn parse_direct(data: &[u8]) -> Option<(PeerId, &[u8])> {
    let rest = data.strip_prefix(&[DIRECT])?;
    let (to, frame) = split(rest, ID)?;
    Some((peer_id(to)?, frame))
}

/// The length of the `E` message of `messages`.
pub fn envelope_len<'a>(messages: impl IntoIterator<Item = &'a [u8]>) -> usize {
    1 + messages.into_iter().map(|m| 4 + m.len()).sum::<usize>()
}

/// Writes an `E` message of `messages` (each shorter than 4 GiB).
pub fn push_envelope<'a>(out: &mut Vec<u8>, messages: impl IntoIterator<Item = &'a [u8]>) {
    out.push(ENVELOPE);
    for message in messages {
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
    }
}

/// The messages of an `E` message, in order; a cut one ends them.
pub fn envelope(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data.strip_prefix(&[ENVELOPE]).unwrap_or_default();
    std::iter::from_fn(move || {
        let (len, after) = split(rest, 4)?;
        let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
        let (message, after) = split(after, len)?;
        rest = after;
        Some(message)
    })
}

fn split(data: &[u8], at: usize) -> Option<(&[u8], &[u8])> {
    (data.len() >= at).then(|| data.split_at(at))
}

fn peer_id(bytes: &[u8]) -> Option<PeerId> {
    PeerId::parse(std::str::from_utf8(bytes).ok()?)
}

#[derive(Deserialize)]
struct WirePresence<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    v: u64,
    #[serde(default, borrow)]
    joined: Vec<(Cow<'a, str>, Cow<'a, str>, Option<&'a RawValue>)>,
    #[serde(default, borrow)]
    left: Vec<Cow<'a, str>>,
    #[serde(default)]
    dead: bool,
}

/// A presence event: its topic and its changes. Malformed: `None`.
pub fn parse_presence(data: &[u8]) -> Option<(String, Presence)> {
    let wire: WirePresence<'_> = serde_json::from_slice(data).ok()?;
    let mut joined = Vec::with_capacity(wire.joined.len());
    for (peer, node, metadata) in wire.joined {
        joined.push((PeerId::parse(&peer)?, remote_peer(&node, metadata)));
    }
    let left = wire
        .left
        .iter()
        .map(|peer| PeerId::parse(peer))
        .collect::<Option<Vec<_>>>()?;
    Some((
        wire.topic.into_owned(),
        Presence {
            version: wire.v,
            left,
            joined,
            dead: wire.dead,
            moved: Vec::new(),
        },
    ))
}

/// A remote member; JSON `null` metadata is none at all.
pub fn remote_peer(node: &str, metadata: Option<&RawValue>) -> RemotePeer {
    RemotePeer {
        node: Arc::from(node),
        metadata: metadata
            .map(RawValue::get)
            .filter(|text| *text != "null")
            .map(Box::from),
    }
}

/// Peers and members for the tests of this crate.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// The `n`th peer id.
    pub(crate) fn id(n: u8) -> PeerId {
        PeerId::parse(&format!("01J5{n:022}")).unwrap()
    }

    /// A member held by `node`, with `metadata`.
    pub(crate) fn member(node: &str, metadata: Option<&str>) -> RemotePeer {
        RemotePeer {
            node: Arc::from(node),
            metadata: metadata.map(Box::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{id, member};
    use super::*;

    fn remote(node: &str) -> RemotePeer {
        member(node, None)
    }

    #[test]
    fn relay_messages_round_trip() {
        let msg_id: &RawValue = serde_json::from_str(r#""abc""#).unwrap();
        let mut out = Vec::new();
        push_relay(&mut out, &id(1), &id(2), "node-a", Some(msg_id), |buf| {
            buf.extend_from_slice(b"frame bytes")
        });
        let relay = parse_relay(&out).unwrap();
        assert_eq!(relay.to, id(1));
        assert_eq!(relay.from, id(2));
        assert_eq!(relay.origin, "node-a");
        assert_eq!(relay.msg_id.unwrap().get(), r#""abc""#);
        assert_eq!(relay.frame, b"frame bytes");
        for cut in 0..out.len() - b"frame bytes".len() {
            assert!(parse_relay(&out[..cut]).is_none(), "cut at {cut}");
        }
        let mut out = Vec::new();
        push_relay(&mut out, &id(1), &id(2), "n", None, |_| {});
        assert!(parse_relay(&out).unwrap().msg_id.is_none());
    }

    #[test]
    fn envelopes_round_trip() {
        let messages: [&[u8]; 3] = [b"R1", b"", b"D12345"];
        let mut out = Vec::new();
        push_envelope(&mut out, messages);
        assert_eq!(out.len(), envelope_len(messages));
        assert_eq!(envelope(&out).collect::<Vec<_>>(), messages);
        // A cut message ends it; what is not an envelope has none.
        assert_eq!(envelope(&out[..out.len() - 1]).count(), 2);
        assert_eq!(envelope(b"R1").count(), 0);
    }

    #[test]
    fn direct_messages_round_trip() {
        let mut out = Vec::new();
        push_direct(&mut out, &id(7), |buf| buf.extend_from_slice(b"x"));
        assert_eq!(parse_direct(&out), Some((id(7), &b"x"[..])));
        assert_eq!(parse_direct(b"D123"), None);
    }

    #[test]
    fn broadcasts_and_their_answers_round_trip() {
        let broadcast = Broadcast {
            topic: "room",
            seq: 1 << 40,
            origin: "n1",
            frame: b"frame",
        };
        let mut out = Vec::new();
        push_broadcast(&mut out, &broadcast);
        let parsed = parse_broadcast(&out).expect("parses");
        assert_eq!(
            (parsed.topic, parsed.seq, parsed.origin, parsed.frame),
            ("room", 1 << 40, "n1", &b"frame"[..])
        );
        assert!(parse_broadcast(&out[..12]).is_none());

        let tally = Tally {
            seq: 7,
            missed: 70_000,
            node: "n2",
        };
        out.clear();
        push_tally(&mut out, &tally);
        assert_eq!(parse_tally(&out), Some(tally));
        assert_eq!(parse_tally(b"T1234"), None);
    }

    #[test]
    fn presence_events_parse() {
        let text = format!(
            r#"{{"topic":"room","v":17,"joined":[["{}","n1",{{"a":1}}],["{}","n2",null]],"left":["{}"]}}"#,
            id(1).as_str(),
            id(2).as_str(),
            id(3).as_str()
        );
        let (topic, event) = parse_presence(text.as_bytes()).unwrap();
        assert_eq!(topic, "room");
        assert_eq!(event.version, 17);
        assert_eq!(event.left, vec![id(3)]);
        assert_eq!(event.joined[0].1.metadata.as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(event.joined[1].1, remote("n2"));
        assert!(parse_presence(br#"{"topic":"room","v":1,"left":["short"]}"#).is_none());
    }
}

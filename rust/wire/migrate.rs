//! The inbox messages that move a resumable session from one cluster node
//! to another (PROTOCOL.md section 5; what the nodes do with them is in
//! `engine::migrate`). Inbox messages, by their first byte:
//!
//! - `Q`: a resume asked of the session's node (the *old* node) by the
//!   node its client reconnected to (the *new* one), through the Redis
//!   function `signaling_ask`, JSON: `{"topic","peer","count","seen","node","conn"}`
//!   (`seen` may be null; `node` and `conn` name the new node's connection);
//! - `N`: the old node's no, JSON `{"conn","result"}` (a resume result:
//!   `used`, `gone`, `unreplayable`);
//! - `M`: the move, published by the Redis function `signaling_move` to
//!   every node of the topic, JSON `{"topic","v","moved":[peer,from,to,conn,metadata],"flush":[node,..]}`,
//!   and to the new node with `"members":[[peer,node,metadata],..]` (every
//!   member as of the move, the new node's own too);
//!   `flush` names the nodes that held members before the move: each
//!   tells the old node `F` when it has seen the move;
//! - `H`: the hand-off, old node to new: a JSON header
//!   `{"topic","peer","conn","resumes"}` (u32 big-endian length first),
//!   then every message the client had not received, each a u32
//!   big-endian length and the WebSocket frame;
//! - `F`: `{"peer","node","to","v"}`: `node` has seen the move of `peer`
//!   to node `to` (at version `v`), so every relay it sent to the old node is there; the old
//!   node passes it on to `to` after those relays;
//! - `X`: a relay (`R` message) that reached the old node after the move,
//!   passed on to the new one.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::cluster::{remote_peer, RemotePeer};
use super::peer_id::PeerId;

pub const ASK: u8 = b'Q';
pub const REFUSED: u8 = b'N';
pub const MOVED: u8 = b'M';
pub const HANDOFF: u8 = b'H';
pub const FLUSHED: u8 = b'F';
pub const FORWARDED: u8 = b'X';

/// A resume asked of the session's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask {
    pub topic: String,
    pub peer: String,
    /// The resume count of the token.
    pub count: u32,
    pub seen: Option<u64>,
    /// The asking node and its connection.
    pub node: String,
    pub conn: u64,
}

/// The old node's answer when it cannot hand the session over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub conn: u64,
    pub result: String,
}

/// `node` has seen the move of `peer` to node `to`: sent to the old node,
/// which passes it on to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flushed {
    pub peer: String,
    pub node: String,
    pub to: String,
    /// The move's version.
    pub v: u64,
}

/// The header of a hand-off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffHeader {
    pub topic: String,
    pub peer: String,
    pub conn: u64,
    pub resumes: u32,
}

/// A session moved from one node to another, as Redis published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub topic: String,
    pub version: u64,
    pub peer: PeerId,
    pub from: String,
    pub to: String,
    /// The new node's connection.
    pub conn: u64,
    pub metadata: Option<Box<str>>,
    /// The nodes that held members of the topic before the move.
    pub flush: Vec<String>,
    /// For the new node: every member as of the move, its own too.
    pub members: Option<Vec<(PeerId, RemotePeer)>>,
}

/// `tag` then `value` as JSON.
pub fn push_json(out: &mut Vec<u8>, tag: u8, value: &impl Serialize) {
    out.push(tag);
    serde_json::to_writer(&mut *out, value).expect("serialising to a Vec cannot fail");
}

/// The JSON after `tag`, if `data` is such a message.
pub fn parse_json<'a, T: Deserialize<'a>>(data: &'a [u8], tag: u8) -> Option<T> {
    serde_json::from_slice(data.strip_prefix(&[tag])?).ok()
}

#[derive(Deserialize)]
struct WireMoved<'a> {
    topic: String,
    v: u64,
    #[serde(borrow)]
    moved: (String, String, String, u64, Option<&'a RawValue>),
    #[serde(default)]
    flush: Vec<String>,
    #[serde(default, borrow)]
    members: Option<Vec<(String, String, Option<&'a RawValue>)>>,
}

pub fn parse_moved(data: &[u8]) -> Option<Moved> {
    let wire: WireMoved<'_> = serde_json::from_slice(data.strip_prefix(&[MOVED])?).ok()?;
    let (peer, from, to, conn, metadata) = wire.moved;
    let members = match wire.members {
        Some(list) => {
            let mut members = Vec::with_capacity(list.len());
            for (peer, node, metadata) in list {
                members.push((PeerId::parse(&peer)?, remote_peer(&node, metadata)));
            }
            Some(members)
        }
        None => None,
    };
    Some(Moved {
        topic: wire.topic,
        version: wire.v,
        peer: PeerId::parse(&peer)?,
        from,
        to,
        conn,
        metadata: remote_peer("", metadata).metadata,
        flush: wire.flush,
        members,
    })
}

/// Writes an `H` message: `header`, then `frames`.
pub fn push_handoff<'a>(
    out: &mut Vec<u8>,
    header: &HandoffHeader,
    frames: impl IntoIterator<Item = &'a [u8]>,
) {
    let json = serde_json::to_vec(header).expect("serialising to a Vec cannot fail");
    out.push(HANDOFF);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    for frame in frames {
        out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        out.extend_from_slice(frame);
    }
}

pub fn parse_handoff(data: &[u8]) -> Option<(HandoffHeader, Vec<&[u8]>)> {
    let mut rest = data.strip_prefix(&[HANDOFF])?;
    let mut next = || -> Option<Option<&[u8]>> {
        if rest.is_empty() {
            return Some(None);
        }
        let (len, after) = rest.split_at_checked(4)?;
        let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
        let (item, after) = after.split_at_checked(len)?;
        rest = after;
        Some(Some(item))
    };
    let header = serde_json::from_slice(next()??).ok()?;
    let mut frames = Vec::new();
    while let Some(frame) = next()? {
        frames.push(frame);
    }
    Some((header, frames))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::cluster::testing::id;

    #[test]
    fn json_messages_round_trip() {
        let ask = Ask {
            topic: "room".into(),
            peer: id(1).as_str().into(),
            count: 2,
            seen: Some(7),
            node: "n2".into(),
            conn: 9,
        };
        let mut out = Vec::new();
        push_json(&mut out, ASK, &ask);
        assert_eq!(out[0], b'Q');
        assert_eq!(parse_json::<Ask>(&out, ASK), Some(ask));
        assert_eq!(parse_json::<Ask>(&out, REFUSED), None, "another tag");
        assert_eq!(parse_json::<Ask>(b"Q{", ASK), None);
    }

    #[test]
    fn handoffs_round_trip_and_cuts_fail() {
        let header = HandoffHeader {
            topic: "room".into(),
            peer: id(1).as_str().into(),
            conn: 3,
            resumes: 1,
        };
        let mut out = Vec::new();
        push_handoff(&mut out, &header, [&b"one"[..], b"", b"three"]);
        let (parsed, frames) = parse_handoff(&out).unwrap();
        assert_eq!(parsed, header);
        assert_eq!(frames, [&b"one"[..], b"", b"three"]);
        for cut in 1..out.len() - 1 {
            let parsed = parse_handoff(&out[..cut]);
            // A cut at a frame boundary is a shorter, valid hand-off.
            assert!(
                parsed.is_none() || parsed.unwrap().1.len() < 3,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn moves_parse() {
        let text = format!(
            r#"M{{"topic":"room","v":5,"moved":["{}","n1","n2",4,{{"a":1}}],"flush":["n3"],"members":[["{}","n3",null]]}}"#,
            id(1).as_str(),
            id(2).as_str()
        );
        let moved = parse_moved(text.as_bytes()).unwrap();
        assert_eq!((moved.from.as_str(), moved.to.as_str()), ("n1", "n2"));
        assert_eq!((moved.version, moved.conn, moved.peer), (5, 4, id(1)));
        assert_eq!(moved.metadata.as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(moved.flush, ["n3"]);
        let members = moved.members.unwrap();
        assert_eq!(members[0].0, id(2));
        assert_eq!(&*members[0].1.node, "n3");
        let bare = format!(
            r#"M{{"topic":"room","v":5,"moved":["{}","n1","n2",4,null],"flush":[]}}"#,
            id(1).as_str()
        );
        let moved = parse_moved(bare.as_bytes()).unwrap();
        assert!(moved.members.is_none() && moved.metadata.is_none());
    }
}

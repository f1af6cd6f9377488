//! Cluster mode: a resumable session moves to the node its client
//! reconnected to (PROTOCOL.md section 5; the messages are in
//! `wire::migrate`).
//!
//! The *new* node verifies the token, finds no local session with it and
//! asks the node that holds the peer, the *old* one, through Redis (`Ask`;
//! `Q` in the old node's inbox). The old node checks the session as a
//! local resume would. If it can be resumed, the old node closes its
//! connection (4011) if one was still open, keeps what the session is
//! sent, and has Redis move the member to the new node (`Move`): one
//! atomic step, published to every node of the topic (`M`). Reading the
//! move in its inbox, after everything published to it before, the old
//! node hands the new one every message the client had not received (`H`)
//! and from then on passes on what still reaches it for the peer (`X`).
//! The new node greets the client as a local resume would: `welcome`, the
//! replay, then what came for the session meanwhile. No one sees a leave
//! or a join.
//!
//! Per-pair order: a node that held members of the topic before the move
//! (listed in `M`) may have relays to the peer on their way to the old
//! node. Each tells the old node when it has seen the move (`F`); the old
//! node passes that on after those relays; until it comes, the new node
//! holds the relays from that node that reach it directly.
//!
//! Every wait is bounded: the new node starts the client afresh if the old
//! one does not answer within [`ASK_WAIT`] or hand over within
//! [`ARRIVE_WAIT`]; held relays go out after [`FLUSH_WAIT`]; the old node
//! ends a session that did not move within [`MOVE_WAIT`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use serde_json::value::RawValue;

use super::conn::{Closing, Conn, LeaveReason, Queued, State};
use super::liveness::Part;
use super::outbox::{ClusterOp, Outbox, SessionEvent};
use super::remote::RemoteTopic;
use super::session::Session;
use super::{Engine, JoinRequest, Newcomer, Now};
use crate::metrics::{cell, family, relay, resume as result, RESUME_RESULTS};
use crate::wire::cluster::{self as wire_cluster, Presence, RemotePeer};
use crate::wire::message::{self, RelayKind};
use crate::wire::migrate::{self as wire, Ask, Flushed, HandoffHeader, Moved, Refused};
use crate::wire::peer_id::PeerId;

/// The new node's wait for the old one to move the session.
pub const ASK_WAIT: Duration = Duration::from_secs(2);
/// The new node's wait for the hand-off once the session moved.
pub const ARRIVE_WAIT: Duration = Duration::from_secs(2);
/// The new node's wait for the nodes that had relays on their way to the
/// old node.
pub const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// The old node's wait for Redis to move the session.
pub const MOVE_WAIT: Duration = Duration::from_secs(3);
/// How long the old node passes on what reaches it for a peer that moved.
const GONE_WAIT: Duration = Duration::from_secs(10);

/// What a node keeps of the sessions moving to or from it.
#[derive(Debug, Default)]
pub(super) struct Migrations {
    /// New node: connections resuming a session of another node.
    resuming: FxHashMap<u64, Resuming>,
    /// Old node: sessions Redis is moving away.
    leaving: FxHashMap<PeerId, Leaving>,
    /// Old node: sessions moved away, and the nodes still to flush.
    gone: FxHashMap<PeerId, Gone>,
}

#[derive(Debug)]
struct Resuming {
    topic: Arc<str>,
    /// The token's peer.
    peer: PeerId,
    /// The request's metadata, for a fresh start.
    metadata: Option<Box<str>>,
    /// When its connection was accepted.
    accepted: Instant,
    since: Instant,
    /// The move came: the connection is a member, `Arriving`.
    arrived: bool,
    /// What the client sent meanwhile.
    input: Vec<u8>,
}

#[derive(Debug)]
struct Leaving {
    node: Arc<str>,
    conn: u64,
    seen: Option<u64>,
    since: Instant,
}

#[derive(Debug)]
struct Gone {
    node: Arc<str>,
    flush: Vec<String>,
    since: Instant,
}

/// A moved session's relays held per origin node until it has flushed.
#[derive(Debug)]
pub(crate) struct Held {
    /// The version of the move.
    version: u64,
    since: Instant,
    /// Each origin still to flush, with its `R` messages, oldest first.
    from: Vec<(String, Vec<Vec<u8>>)>,
    bytes: usize,
}

impl<W> Engine<W> {
    fn migrations(&mut self) -> Option<&mut Migrations> {
        self.cluster.as_mut().map(|cluster| &mut cluster.migrations)
    }

    fn node(&self) -> Option<Arc<str>> {
        self.cluster
            .as_ref()
            .map(|cluster| Arc::clone(&cluster.node))
    }

    fn publish(&self, node: &str, message: Vec<u8>, out: &mut Outbox) {
        out.cluster.push(ClusterOp::Publish {
            node: Arc::from(node),
            message,
            relay: false,
        });
    }

    // --- the new node --------------------------------------------------

    /// Cluster mode: the op that asks the node holding `peer` for its
    /// session, for connection `conn`; `None` on one machine.
    pub(super) fn ask_for_session(
        &mut self,
        conn: u64,
        request: &JoinRequest<'_>,
        peer: PeerId,
        count: u32,
        seen: Option<u64>,
        now: Instant,
    ) -> Option<ClusterOp> {
        let node = self.node()?;
        let ask = Ask {
            topic: request.topic.to_owned(),
            peer: peer.as_str().to_owned(),
            count,
            seen,
            node: node.to_string(),
            conn,
        };
        let mut message = Vec::new();
        wire::push_json(&mut message, wire::ASK, &ask);
        let topic: Arc<str> = Arc::from(request.topic);
        let resuming = Resuming {
            topic: Arc::clone(&topic),
            peer,
            metadata: request.metadata.map(Box::from),
            accepted: request.accepted.unwrap_or(now),
            since: now,
            arrived: false,
            input: Vec::new(),
        };
        let migrations = self.migrations().expect("cluster mode");
        migrations.resuming.insert(conn, resuming);
        Some(ClusterOp::Ask {
            topic,
            peer,
            conn,
            message,
        })
    }

    /// Whether `conn` waits for a session from another node.
    pub(super) fn is_resuming(&self, conn: u64) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|c| c.migrations.resuming.contains_key(&conn))
    }

    /// Keeps what a resuming connection sent; false if it is not one.
    pub(super) fn hold_resuming(&mut self, conn: u64, data: &[u8]) -> Option<usize> {
        let resuming = self.migrations()?.resuming.get_mut(&conn)?;
        resuming.input.extend_from_slice(data);
        Some(resuming.input.len())
    }

    /// Whether the ask for `conn` reached the old node; if not (the peer
    /// is no member, or its node listens no more), the client starts
    /// afresh.
    pub fn asked(&mut self, conn: u64, reached: bool, now: Now, out: &mut Outbox) {
        let waiting = self
            .cluster
            .as_ref()
            .and_then(|c| c.migrations.resuming.get(&conn))
            .is_some_and(|r| !r.arrived);
        if waiting && !reached {
            self.start_afresh(conn, result::GONE, now, out);
        }
        self.close_doomed(now.instant, out);
    }

    /// The resume asked for `conn` cannot be honoured: it becomes a new
    /// peer of its topic, `resumed:false`, counted as `result`.
    fn start_afresh(&mut self, conn: u64, result: usize, now: Now, out: &mut Outbox) {
        let Some(resuming) = self.migrations().and_then(|m| m.resuming.remove(&conn)) else {
            return;
        };
        self.metrics.add(cell(family::RESUMES, result), 1);
        if resuming.arrived {
            // The session moved here: it ends, as it would have there.
            self.leave(conn, LeaveReason::Closed, out);
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.state = State::Open;
        let mut session = Box::<Session>::default();
        session.refused = true;
        c.session = Some(session);
        let newcomer = Newcomer {
            peer: self.registry.new_peer_id(now.wall),
            metadata: resuming.metadata,
            accepted: resuming.accepted,
        };
        let topic = Arc::clone(&resuming.topic);
        out.sessions
            .push((newcomer.peer, Arc::clone(&topic), SessionEvent::Joined));
        self.join_cluster(conn, &topic, newcomer, now, out);
        if !resuming.input.is_empty() && !self.hold_joining(conn, &resuming.input) {
            self.feed(conn, &resuming.input, now.instant, out);
        }
    }

    /// `M` for this node: the session came here.
    fn arrive(&mut self, moved: Moved, now: Instant, out: &mut Outbox) {
        let here = self.node().expect("cluster mode");
        let conn = moved.conn;
        let waiting = self
            .cluster
            .as_ref()
            .and_then(|c| c.migrations.resuming.get(&conn))
            .is_some_and(|r| !r.arrived && r.peer == moved.peer && *r.topic == *moved.topic);
        self.flush_to_old(&moved, &here, out);
        if let Some(migrations) = self.migrations() {
            // Back where it was: what this node kept of its departure is stale.
            migrations.gone.remove(&moved.peer);
        }
        let topic: Arc<str> = match self.registry.conn_of(&moved.peer) {
            Some(_) => return, // already here (a replay of the event)
            None => Arc::from(moved.topic.as_str()),
        };
        let cluster = self.cluster.as_mut().expect("cluster mode");
        if let Some(remote) = cluster.remote.get_mut(&topic) {
            remote.members.remove(&moved.peer);
            if remote.pending.is_none() {
                remote.version = remote.version.max(moved.version);
            }
        } else if waiting {
            let members = moved.members.clone().unwrap_or_default();
            let others = members.into_iter().filter(|(_, m)| *m.node != *here);
            cluster.remote.insert(
                Arc::clone(&topic),
                RemoteTopic {
                    members: others.collect(),
                    version: moved.version,
                    ..RemoteTopic::default()
                },
            );
        }
        if !waiting {
            // Nobody waits for it here any more: the session ends.
            let mut left = Vec::new();
            message::push_peer_left(&mut left, moved.peer.as_str());
            self.broadcast_local(&topic, None, left, out);
            let peer = moved.peer;
            self.cluster_left(&topic, peer, LeaveReason::Disconnected, out);
            return;
        }
        let resuming = self
            .migrations()
            .and_then(|m| m.resuming.get_mut(&conn))
            .expect("checked");
        resuming.arrived = true;
        resuming.since = now;
        self.registry
            .join_as(conn, &topic, moved.metadata.clone(), moved.peer);
        let flush: Vec<(String, Vec<Vec<u8>>)> = moved
            .flush
            .into_iter()
            .map(|node| (node, Vec::new()))
            .collect();
        let c = self
            .conns
            .get_mut(&conn)
            .expect("resuming connections exist");
        c.state = State::Arriving;
        let mut session = Box::<Session>::default();
        if !flush.is_empty() {
            session.held = Some(Box::new(Held {
                version: moved.version,
                since: now,
                from: flush,
                bytes: 0,
            }));
        }
        c.session = Some(session);
        if let Some(members) = &moved.members {
            self.tell_what_the_old_node_could_not(conn, &topic, &here, members, out);
        }
    }

    /// The old node told the session of every change Redis made before the
    /// move; this node's own members that joined or left after it (their
    /// change published to nodes the session no longer is on) are told here:
    /// those it has and `members` (Redis's, as of the move) does not list
    /// joined, those listed it no longer has left.
    fn tell_what_the_old_node_could_not(
        &mut self,
        conn: u64,
        topic: &str,
        here: &str,
        members: &[(PeerId, RemotePeer)],
        out: &mut Outbox,
    ) {
        let Some(moving) = self.registry.member(conn).map(|m| m.peer) else {
            return;
        };
        let listed: Vec<PeerId> = members
            .iter()
            .filter(|(peer, m)| *m.node == *here && *peer != moving)
            .map(|(peer, _)| *peer)
            .collect();
        let local: Vec<(PeerId, Option<Box<str>>)> = self
            .registry
            .members(topic)
            .iter()
            .filter_map(|c| self.registry.member(*c))
            .filter(|m| m.peer != moving)
            .map(|m| (m.peer, m.metadata.clone()))
            .collect();
        for (peer, metadata) in &local {
            if !listed.contains(peer) {
                let mut joined = Vec::new();
                message::push_peer_joined(&mut joined, peer.as_str(), metadata.as_deref());
                self.send_must(conn, &joined, out);
            }
        }
        for peer in listed {
            if !local.iter().any(|(p, _)| *p == peer) {
                let mut left = Vec::new();
                message::push_peer_left(&mut left, peer.as_str());
                self.send_must(conn, &left, out);
            }
        }
    }

    /// `H`: the old node's hand-off of a session that arrived here.
    fn handed_over(&mut self, data: &[u8], now: Now, out: &mut Outbox) {
        let Some((header, frames)) = wire::parse_handoff(data) else {
            return;
        };
        let conn = header.conn;
        let arrived = self
            .cluster
            .as_ref()
            .and_then(|c| c.migrations.resuming.get(&conn))
            .is_some_and(|r| r.arrived && r.peer.as_str() == header.peer);
        if !arrived {
            return;
        }
        let resuming = self
            .migrations()
            .and_then(|m| m.resuming.remove(&conn))
            .expect("checked");
        let c = self
            .conns
            .get_mut(&conn)
            .expect("resuming connections exist");
        c.state = State::Open;
        let mut old = c.session.take().unwrap_or_default();
        let kept = old.take_kept();
        let mut session = Box::<Session>::default();
        session.resumes = header.resumes;
        session.restart();
        session.held = old.held.take();
        c.session = Some(session);
        let times = (resuming.accepted, now.instant);
        let replay = frames.into_iter().chain(kept.iter().map(|f| &f[..]));
        self.greet_resumed(conn, resuming.topic, resuming.peer, times, replay, out);
        self.metrics.add(cell(family::RESUMES, result::RESUMED), 1);
        if !resuming.input.is_empty() {
            self.feed(conn, &resuming.input, now.instant, out);
        }
    }

    /// `N`: the old node could not hand the session over.
    fn refused(&mut self, refused: Refused, now: Now, out: &mut Outbox) {
        let waiting = self
            .cluster
            .as_ref()
            .and_then(|c| c.migrations.resuming.get(&refused.conn))
            .is_some_and(|r| !r.arrived);
        if waiting {
            let result = RESUME_RESULTS
                .iter()
                .position(|name| *name == refused.result)
                .unwrap_or(result::GONE);
            self.start_afresh(refused.conn, result, now, out);
        }
    }

    /// Holds a relay for a session that just moved here, if its origin
    /// has not flushed yet; returns whether it did. `message` writes the
    /// relay's `R` message.
    pub(super) fn hold_relay(
        &mut self,
        conn: u64,
        origin: &str,
        message: impl FnOnce(&mut Vec<u8>),
    ) -> Option<Queued> {
        let max = self.config.max_queue;
        let held = self.conns.get_mut(&conn)?.session.as_mut()?.held.as_mut()?;
        let (_, relays) = held.from.iter_mut().find(|(node, _)| node == origin)?;
        let mut bytes = Vec::new();
        message(&mut bytes);
        if held.bytes + bytes.len() > max {
            return Some(Queued::OverBound);
        }
        held.bytes += bytes.len();
        relays.push(bytes);
        Some(Queued::Yes)
    }

    /// Holds a relay from a local peer for a session that just moved here,
    /// if this node has not flushed yet (its earlier relays went to the old
    /// node); `None` on one machine and for every other target.
    pub(super) fn hold_local_relay(
        &mut self,
        target: u64,
        from: PeerId,
        kind: RelayKind,
        payload: Option<&RawValue>,
        msg_id: Option<&RawValue>,
    ) -> Option<Queued> {
        let node = Arc::clone(&self.cluster.as_ref()?.node);
        let to = self.registry.member(target)?.peer;
        self.hold_relay(target, &node, |buf| {
            wire_cluster::push_relay(buf, &to, &from, &node, msg_id, |frame| {
                message::push_relay(frame, kind, from.as_str(), payload, msg_id)
            })
        })
    }

    /// `F` passed on by the old node: `node` has flushed; its held relays
    /// go out.
    fn flushed_here(&mut self, flushed: &Flushed, out: &mut Outbox) {
        let Some(peer) = PeerId::parse(&flushed.peer) else {
            return;
        };
        let Some(conn) = self.registry.conn_of(&peer) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(held) = c.session.as_mut().and_then(|s| s.held.as_mut()) else {
            return;
        };
        if held.version != flushed.v {
            return; // a flush of an earlier move
        }
        let Some(index) = held.from.iter().position(|(n, _)| *n == flushed.node) else {
            return;
        };
        let (_, relays) = held.from.swap_remove(index);
        if held.from.is_empty() {
            c.session.as_mut().expect("checked").held = None;
        } else {
            held.bytes -= relays.iter().map(Vec::len).sum::<usize>();
        }
        for relay in relays {
            self.deliver_relay(&relay, out);
        }
    }

    /// Delivers every relay `conn` still holds, flushed or not (waited
    /// long enough, or the session moves on).
    fn release_held(&mut self, conn: u64, out: &mut Outbox) {
        let held = self
            .conns
            .get_mut(&conn)
            .and_then(|c| c.session.as_mut())
            .and_then(|s| s.held.take());
        for (_, relays) in held.map(|h| h.from).unwrap_or_default() {
            for relay in relays {
                self.deliver_relay(&relay, out);
            }
        }
    }

    // --- the old node ----------------------------------------------------

    /// `Q`: another node asks for a local session.
    fn on_ask(&mut self, ask: Ask, now: Instant, out: &mut Outbox) {
        let answer = self.hand_over(&ask, now, out);
        if let Err(result) = answer {
            let refused = Refused {
                conn: ask.conn,
                result: RESUME_RESULTS[result].to_owned(),
            };
            let mut message = Vec::new();
            wire::push_json(&mut message, wire::REFUSED, &refused);
            self.publish(&ask.node, message, out);
        }
        self.close_doomed(now, out);
    }

    fn hand_over(&mut self, ask: &Ask, now: Instant, out: &mut Outbox) -> Result<(), usize> {
        let peer = PeerId::parse(&ask.peer).ok_or(result::GONE)?;
        let old = self.registry.conn_of(&peer).ok_or(result::GONE)?;
        let member = self.registry.member(old).ok_or(result::GONE)?;
        if *member.topic != *ask.topic {
            return Err(result::GONE);
        }
        let topic = Arc::clone(&member.topic);
        if self.is_leaving(&peer) {
            return Err(result::USED);
        }
        let c = self.conns.get(&old).ok_or(result::GONE)?;
        let session = c.session.as_ref().ok_or(result::GONE)?;
        if session.resumes != ask.count {
            return Err(result::USED);
        }
        if ask.seen.and_then(|seen| session.after(seen)).is_none() {
            self.end_session(old, now, out);
            return Err(result::UNREPLAYABLE);
        }
        if !c.suspended() {
            // A half-dead connection: closed, without a leave, while its
            // session waits here for the move, kept like a suspended one.
            let conn = self.next_conn;
            self.next_conn += 1;
            let mut detached = Conn::detached(now);
            detached.session = self.conns.get_mut(&old).and_then(|c| c.session.take());
            self.conns.insert(conn, Box::new(detached));
            self.registry.rebind(old, conn);
            self.suspended += 1;
            self.close(old, Closing::REPLACED, now, out);
        }
        let node: Arc<str> = Arc::from(ask.node.as_str());
        let leaving = Leaving {
            node: Arc::clone(&node),
            conn: ask.conn,
            seen: ask.seen,
            since: now,
        };
        self.migrations()
            .expect("cluster mode")
            .leaving
            .insert(peer, leaving);
        out.cluster.push(ClusterOp::Move {
            topic,
            peer,
            to: node,
            conn: ask.conn,
        });
        Ok(())
    }

    /// Whether `peer`'s session is on its way to another node.
    pub(super) fn is_leaving(&self, peer: &PeerId) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|c| c.migrations.leaving.contains_key(peer))
    }

    /// Whether the session of connection `conn` is on its way to another
    /// node.
    pub(super) fn is_moving_away(&self, conn: u64) -> bool {
        self.registry
            .member(conn)
            .is_some_and(|member| self.is_leaving(&member.peer))
    }

    /// `M` from this node: Redis moved the session; everything sent to it
    /// before is kept, so it is handed over.
    fn depart(&mut self, moved: Moved, now: Instant, out: &mut Outbox) {
        let Some(leaving) = self
            .migrations()
            .and_then(|m| m.leaving.remove(&moved.peer))
        else {
            return;
        };
        let Some(conn) = self.registry.conn_of(&moved.peer) else {
            return; // it ended meanwhile: its leave follows the move
        };
        // Relays still held since the session came here are kept, to go
        // with the rest.
        self.release_held(conn, out);
        let frames = self
            .conns
            .get(&conn)
            .and_then(|c| c.session.as_ref())
            .and_then(|s| Some((s.resumes, s.after(leaving.seen?)?)));
        let Some((resumes, frames)) = frames else {
            return;
        };
        let header = HandoffHeader {
            topic: moved.topic.clone(),
            peer: moved.peer.as_str().to_owned(),
            conn: leaving.conn,
            resumes,
        };
        let mut message = Vec::new();
        wire::push_handoff(&mut message, &header, frames.iter().map(|f| &f[..]));
        self.publish(&leaving.node, message, out);
        // Gone from here without a leave: a remote member for the others.
        let member = self.registry.leave(conn).expect("a member");
        if self.conns.remove(&conn).is_some_and(|c| c.suspended()) {
            self.suspended -= 1;
        }
        let cluster = self.cluster.as_mut().expect("cluster mode");
        let idle = self.registry.members(&member.topic).is_empty();
        if let Some(remote) = cluster.remote.get_mut(&member.topic) {
            if idle && remote.waiting.is_empty() {
                cluster.remote.remove(&member.topic);
            } else {
                let peer = RemotePeer {
                    node: Arc::clone(&leaving.node),
                    metadata: member.metadata,
                };
                remote.members.insert(moved.peer, peer);
                if remote.pending.is_none() {
                    remote.version = remote.version.max(moved.version);
                }
            }
        }
        let gone = Gone {
            node: leaving.node,
            flush: moved.flush,
            since: now,
        };
        cluster.migrations.gone.insert(moved.peer, gone);
    }

    /// A relay for a peer that moved away: passed on (`X`); false if `to`
    /// never was here.
    pub(super) fn pass_on(&mut self, to: &PeerId, data: &[u8], out: &mut Outbox) -> bool {
        let Some(gone) = self
            .cluster
            .as_ref()
            .and_then(|c| c.migrations.gone.get(to))
        else {
            return false;
        };
        let node = Arc::clone(&gone.node);
        let mut message = Vec::with_capacity(data.len() + 1);
        message.push(wire::FORWARDED);
        message.extend_from_slice(data);
        out.cluster.push(ClusterOp::Publish {
            node,
            message,
            relay: false,
        });
        self.count_relay(relay::FORWARDED);
        true
    }

    /// `F`: passed on to the new node by the old one, after the relays that
    /// reached it before; at the new node, the held relays go out.
    fn flushed(&mut self, data: &[u8], flushed: Flushed, out: &mut Outbox) {
        let Some(here) = self.node() else {
            return;
        };
        if *flushed.to == *here {
            return self.flushed_here(&flushed, out);
        }
        let Some(peer) = PeerId::parse(&flushed.peer) else {
            return;
        };
        let migrations = self.migrations().expect("cluster mode");
        if let Some(gone) = migrations.gone.get_mut(&peer) {
            gone.flush.retain(|node| *node != flushed.node);
            if gone.flush.is_empty() {
                migrations.gone.remove(&peer);
            }
        }
        self.publish(&flushed.to, data.to_vec(), out);
    }

    /// Redis did not move the session (the old node no longer holds the
    /// peer there): it ends here, and the new node starts afresh.
    pub fn move_failed(&mut self, peer: &PeerId, now: Instant, out: &mut Outbox) {
        let Some(leaving) = self.migrations().and_then(|m| m.leaving.remove(peer)) else {
            return;
        };
        if let Some(conn) = self.registry.conn_of(peer) {
            self.end_suspended(conn, LeaveReason::Closed, out);
        }
        let refused = Refused {
            conn: leaving.conn,
            result: RESUME_RESULTS[result::GONE].to_owned(),
        };
        let mut message = Vec::new();
        wire::push_json(&mut message, wire::REFUSED, &refused);
        self.publish(&leaving.node, message, out);
        self.close_doomed(now, out);
    }

    // --- every node ----------------------------------------------------

    /// Handles a migration message from the inbox; false if `data` is none.
    pub(super) fn deliver_migration(&mut self, data: &[u8], now: Now, out: &mut Outbox) -> bool {
        match data.first() {
            Some(&wire::ASK) => {
                if let Some(ask) = wire::parse_json(data, wire::ASK) {
                    self.on_ask(ask, now.instant, out);
                }
            }
            Some(&wire::REFUSED) => {
                if let Some(refused) = wire::parse_json(data, wire::REFUSED) {
                    self.refused(refused, now, out);
                }
            }
            Some(&wire::MOVED) => {
                if let Some(moved) = wire::parse_moved(data) {
                    self.moved(moved, now.instant, out);
                }
            }
            Some(&wire::HANDOFF) => self.handed_over(data, now, out),
            Some(&wire::FLUSHED) => {
                if let Some(flushed) = wire::parse_json(data, wire::FLUSHED) {
                    self.flushed(data, flushed, out);
                }
            }
            Some(&wire::FORWARDED) => {
                // Passed on by the old node: after every relay that went
                // there, so never held.
                let relay = &data[1..];
                if relay.first() == Some(&wire_cluster::RELAY) {
                    self.deliver_relay(relay, out);
                }
            }
            _ => return false,
        }
        true
    }

    /// `M`: a session of one of this node's topics moved.
    fn moved(&mut self, moved: Moved, now: Instant, out: &mut Outbox) {
        let Some(here) = self.node() else {
            return;
        };
        if moved.from == moved.to {
            return;
        }
        if moved.to == *here {
            return self.arrive(moved, now, out);
        }
        if moved.from == *here {
            return self.depart(moved, now, out);
        }
        // The same member on its new node; applied in version order, like
        // any presence event (it waits for a snapshot on its way).
        let event = Presence {
            version: moved.version,
            left: Vec::new(),
            joined: Vec::new(),
            dead: false,
            moved: vec![(moved.peer, Arc::from(moved.to.as_str()))],
        };
        self.presence(&moved.topic, event, now, out);
        self.flush_to_old(&moved, &here, out);
    }

    /// If this node held members of the topic before the move, tells the
    /// old node that its relays for the peer are all on their way (`F`).
    fn flush_to_old(&self, moved: &Moved, here: &str, out: &mut Outbox) {
        if moved.flush.iter().any(|node| node == here) {
            let flushed = Flushed {
                peer: moved.peer.as_str().to_owned(),
                node: here.to_owned(),
                to: moved.to.clone(),
                v: moved.version,
            };
            let mut message = Vec::new();
            wire::push_json(&mut message, wire::FLUSHED, &flushed);
            self.publish(&moved.from, message, out);
        }
    }

    /// The bounded waits of sessions moving between nodes (see
    /// `migrate.rs`); call with `tick_part`, with the same part (the held
    /// messages of that part's connections are released).
    pub fn tick_migrations(&mut self, now: Now, part: Part, out: &mut Outbox) {
        let Some(migrations) = self.migrations() else {
            return;
        };
        let instant = now.instant;
        let late: Vec<u64> = migrations
            .resuming
            .iter()
            .filter(|(_, r)| {
                let wait = if r.arrived { ARRIVE_WAIT } else { ASK_WAIT };
                instant.saturating_duration_since(r.since) >= wait
            })
            .map(|(conn, _)| *conn)
            .collect();
        let stuck: Vec<PeerId> = migrations
            .leaving
            .iter()
            .filter(|(_, l)| instant.saturating_duration_since(l.since) >= MOVE_WAIT)
            .map(|(peer, _)| *peer)
            .collect();
        migrations
            .gone
            .retain(|_, g| instant.saturating_duration_since(g.since) < GONE_WAIT);
        for conn in late {
            self.start_afresh(conn, result::GONE, now, out);
        }
        for peer in stuck {
            self.move_failed(&peer, instant, out);
        }
        let unflushed: Vec<u64> = self
            .conns
            .iter()
            .filter(|(conn, _)| part.holds(**conn))
            .filter(|(_, c)| {
                c.session
                    .as_ref()
                    .and_then(|s| s.held.as_ref())
                    .is_some_and(|h| instant.saturating_duration_since(h.since) >= FLUSH_WAIT)
            })
            .map(|(conn, _)| *conn)
            .collect();
        for conn in unflushed {
            self.release_held(conn, out);
        }
        self.close_doomed(instant, out);
    }

    /// Forgets a resuming connection that ends; true if it was one that
    /// had not arrived (it is no member).
    pub(super) fn forget_resuming(&mut self, conn: u64) -> bool {
        self.migrations()
            .and_then(|m| m.resuming.remove(&conn))
            .is_some_and(|r| !r.arrived)
    }
}

impl<W> Conn<W> {
    /// A connection without a transport, for a session whose own was
    /// closed while it waits to move (see `hand_over`).
    fn detached(now: Instant) -> Self {
        Self {
            state: State::Suspended { since: now },
            ..Conn::empty(now)
        }
    }
}

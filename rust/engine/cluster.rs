//! The engine in cluster mode: each worker process is a node, and a topic's
//! members on other nodes are its *remote* members. The engine keeps them
//! per topic beside its own (see [`RemoteTopic`]), so a joiner's
//! `peer-list` and every relay lookup see the whole topic; the caller
//! carries out the [`ClusterOp`]s it asks for on Redis and brings back
//! what Redis answers (`snapshot`, `deliver`, `undeliverable`).
//!
//! The local path calls into this module through a few methods that do
//! nothing on one machine: `join_cluster`, `cluster_holds`, `hold`,
//! `remote_count`, `remote_members`, `remote_target`, `forward`,
//! `cluster_forget_joiner` and `cluster_left`.

use std::collections::VecDeque;
use std::mem;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use serde_json::value::RawValue;

use super::conn::{Closing, LeaveReason, Queued, State};
use super::migrate::Migrations;
pub use super::outbox::ClusterOp;
use super::outbox::Outbox;
use super::remote::{Changes, RemoteTopic};
use super::{Engine, Newcomer, Now};
use crate::metrics::relay;
use crate::wire::close;
use crate::wire::cluster::{self, Presence, RemotePeer};
use crate::wire::message::{self, ErrorCode, RelayKind};
use crate::wire::peer_id::PeerId;

/// Bytes past the largest message a joining connection may send before it
/// has joined (it joins within a Redis round trip).
pub(super) const MAX_HELD_EXTRA: usize = 4096;
/// Relays forwarded to other nodes are remembered this long, and at most
/// this many, so that if the target's node is found dead meanwhile their
/// senders are told `target_not_found` (the relay may have died with it).
const FORWARD_MEMORY: Duration = Duration::from_secs(5);
const FORWARD_MEMORY_LEN: usize = 16 * 1024;

/// A connection that will join `topic` as `peer` once the cluster's
/// snapshot of the topic is here, and what it sent meanwhile.
#[derive(Debug)]
struct Joining {
    topic: Arc<str>,
    newcomer: Newcomer,
    held: Vec<u8>,
}

/// A relay forwarded to another node, as remembered.
#[derive(Debug)]
struct Forward {
    at: Instant,
    to: PeerId,
    from: PeerId,
    msg_id: Option<Box<RawValue>>,
}

/// A relay to a peer on another node, on its way there.
pub(super) struct Forwarded<'a> {
    pub(super) node: Arc<str>,
    pub(super) to: PeerId,
    pub(super) from: PeerId,
    pub(super) kind: RelayKind,
    pub(super) payload: Option<&'a RawValue>,
    pub(super) msg_id: Option<&'a RawValue>,
}

/// What a node keeps of the cluster.
#[derive(Debug)]
pub(super) struct ClusterState {
    pub(super) node: Arc<str>,
    /// Each followed topic's members on other nodes.
    pub(super) remote: FxHashMap<Arc<str>, RemoteTopic>,
    joining: FxHashMap<u64, Joining>,
    /// The recent relays forwarded, oldest first.
    forwards: VecDeque<Forward>,
    /// Resumable sessions moving to or from this node.
    pub(super) migrations: Migrations,
    /// Local peers' broadcasts whose other nodes have not all answered, by
    /// the number this node gave them.
    broadcasts: FxHashMap<u64, Awaited>,
    next_broadcast: u64,
    /// Topics with doubted members (see `remote`), in the order of their
    /// deadlines.
    doubts: VecDeque<(Instant, Box<str>)>,
}

/// A local peer's broadcast published to other nodes: its sender hears
/// once, when every node has answered or [`TALLY_WAIT`] has passed, how
/// many members missed it (PROTOCOL section 9: one `dropped`).
#[derive(Debug)]
struct Awaited {
    conn: u64,
    msg_id: Option<Box<RawValue>>,
    missed: usize,
    /// The nodes yet to answer, each with its members when it was sent:
    /// those of a node that never answers count as missed.
    nodes: Vec<(Arc<str>, usize)>,
    deadline: Instant,
}

/// How long a broadcast's sender waits for the other nodes' answers.
const TALLY_WAIT: Duration = Duration::from_secs(2);

/// How long members missing from the resync snapshot of a Redis that lost
/// its data (or of a new master) stay doubted: their nodes try to reconnect at least every 2 s
/// (the backoff's longest wait) and rewrite them at once. A node slower
/// than that (a Sentinel that does not answer) has its members told as
/// left, then joined again when it is back.
pub const DOUBT_GRACE: Duration = Duration::from_secs(5);

impl ClusterState {
    pub(super) fn new(node: Arc<str>) -> Self {
        Self {
            node,
            remote: FxHashMap::default(),
            joining: FxHashMap::default(),
            forwards: VecDeque::new(),
            migrations: Migrations::default(),
            broadcasts: FxHashMap::default(),
            next_broadcast: 0,
            doubts: VecDeque::new(),
        }
    }
}

impl<W> Engine<W> {
    // --- what the local path asks ----------------------------------------

    /// Cluster mode: tells the cluster `conn` joins `topic` as `peer`; it
    /// enters at once if the topic's remote members are known, else once
    /// their snapshot is here. One machine: it enters at once.
    pub(super) fn join_cluster(
        &mut self,
        conn: u64,
        topic: &str,
        newcomer: Newcomer,
        now: Now,
        out: &mut Outbox,
    ) {
        let Some(cluster) = &mut self.cluster else {
            return self.enter(conn, topic, newcomer, now, out);
        };
        let (topic, fresh): (Arc<str>, bool) = match cluster.remote.get_key_value(topic) {
            Some((name, _)) => (Arc::clone(name), false),
            None => (Arc::from(topic), true),
        };
        let remote = cluster
            .remote
            .entry(Arc::clone(&topic))
            .or_insert_with(|| RemoteTopic {
                pending: Some(Vec::new()),
                ..RemoteTopic::default()
            });
        out.cluster.push(ClusterOp::Join {
            topic: Arc::clone(&topic),
            peer: newcomer.peer,
            metadata: newcomer.metadata.clone(),
            snapshot: fresh,
        });
        if remote.pending.is_none() {
            return self.enter(conn, &topic, newcomer, now, out);
        }
        remote.waiting.push(conn);
        let joining = Joining {
            topic,
            newcomer,
            held: Vec::new(),
        };
        cluster.joining.insert(conn, joining);
    }

    /// Whether `conn` waits to join (its input is held, it is not pinged).
    pub(super) fn cluster_holds(&self, conn: u64) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|cluster| cluster.joining.contains_key(&conn))
            || self.is_resuming(conn)
    }

    /// Keeps `data` for a connection waiting to join; false if it is not.
    pub(super) fn hold_joining(&mut self, conn: u64, data: &[u8]) -> bool {
        let joining = self
            .cluster
            .as_mut()
            .and_then(|cluster| cluster.joining.get_mut(&conn));
        match joining {
            Some(joining) => {
                joining.held.extend_from_slice(data);
                true
            }
            None => false,
        }
    }

    /// Keeps what a joining connection sent until it has joined: nothing
    /// may reach it before its `welcome`, not even a `pong`.
    pub(super) fn hold(&mut self, conn: u64, data: &[u8], now: Instant, out: &mut Outbox) {
        if !matches!(self.conns.get(&conn), Some(c) if c.state == State::Open) {
            return;
        }
        let joining = self
            .cluster
            .as_mut()
            .and_then(|cluster| cluster.joining.get_mut(&conn));
        let held = match joining {
            Some(joining) => {
                joining.held.extend_from_slice(data);
                joining.held.len()
            }
            None => match self.hold_resuming(conn, data) {
                Some(held) => held,
                None => return,
            },
        };
        if held > self.config.max_message + MAX_HELD_EXTRA {
            let closing = Closing {
                code: close::POLICY,
                reason: "too much data before welcome",
                error: None,
                why: LeaveReason::ProtocolError,
            };
            self.close(conn, closing, now, out);
        }
    }

    /// Members of `topic` on other nodes, counting those about to join here.
    pub(super) fn remote_count(&self, topic: &str) -> usize {
        let remote = self.cluster.as_ref().and_then(|c| c.remote.get(topic));
        remote.map_or(0, |r| r.members.len() + r.waiting.len())
    }

    /// The members of `topic` on other nodes, with their metadata.
    pub(super) fn remote_members<'a>(
        &'a self,
        topic: &str,
    ) -> impl Iterator<Item = (&'a str, Option<&'a str>)> + 'a {
        let remote = self.cluster.as_ref().and_then(|c| c.remote.get(topic));
        remote.into_iter().flat_map(|r| {
            r.members
                .iter()
                .map(|(peer, remote)| (peer.as_str(), remote.metadata.as_deref()))
        })
    }

    /// Publishes a local peer's broadcast (`frame`, ready to write) once to
    /// every other node holding members of `topic`, and returns the number
    /// their answers will name ([`Self::add_missed`]); `None` if no other
    /// node has members.
    pub(super) fn broadcast_to_nodes(
        &mut self,
        topic: &str,
        frame: &[u8],
        conn: u64,
        msg_id: Option<&RawValue>,
        now: Instant,
        out: &mut Outbox,
    ) -> Option<u64> {
        let cluster = self.cluster.as_mut()?;
        let remote = cluster.remote.get(topic)?;
        let mut nodes: Vec<(Arc<str>, usize)> = Vec::new();
        for member in remote.members.values() {
            match nodes.iter_mut().find(|(node, _)| *node == member.node) {
                Some((_, n)) => *n += 1,
                None => nodes.push((Arc::clone(&member.node), 1)),
            }
        }
        if nodes.is_empty() {
            return None;
        }
        nodes.sort_unstable();
        cluster.next_broadcast += 1;
        let seq = cluster.next_broadcast;
        let mut message = Vec::with_capacity(16 + cluster.node.len() + topic.len() + frame.len());
        let broadcast = cluster::Broadcast {
            topic,
            seq,
            origin: &cluster.node,
            frame,
        };
        cluster::push_broadcast(&mut message, &broadcast);
        for (node, _) in &nodes {
            out.cluster.push(ClusterOp::Publish {
                node: Arc::clone(node),
                message: message.clone(),
                relay: false,
            });
        }
        let awaited = Awaited {
            conn,
            msg_id: msg_id.map(ToOwned::to_owned),
            missed: 0,
            nodes,
            deadline: now + TALLY_WAIT,
        };
        cluster.broadcasts.insert(seq, awaited);
        Some(seq)
    }

    /// Adds the local members that missed broadcast `seq` to its count.
    pub(super) fn add_missed(&mut self, seq: u64, missed: usize) {
        let awaited = self
            .cluster
            .as_mut()
            .and_then(|c| c.broadcasts.get_mut(&seq));
        if let Some(awaited) = awaited {
            awaited.missed += missed;
        }
    }

    /// Another node's broadcast: written to every local member of its
    /// topic; the sender's node hears how many missed it (`T`).
    fn deliver_broadcast(&mut self, data: &[u8], out: &mut Outbox) {
        let Some(broadcast) = cluster::parse_broadcast(data) else {
            return;
        };
        let frame = broadcast.frame.to_vec();
        let (reached, missed) = self.broadcast_message(broadcast.topic, None, frame, out);
        self.count_broadcast(reached, missed);
        let Some(cluster) = &self.cluster else {
            return;
        };
        let mut message = Vec::with_capacity(16 + cluster.node.len());
        let tally = cluster::Tally {
            seq: broadcast.seq,
            missed: u32::try_from(missed).unwrap_or(u32::MAX),
            node: &cluster.node,
        };
        cluster::push_tally(&mut message, &tally);
        out.cluster.push(ClusterOp::Publish {
            node: Arc::from(broadcast.origin),
            message,
            relay: false,
        });
    }

    /// A node's answer to a local peer's broadcast; the last one due tells
    /// the sender how many missed it.
    fn tally_arrived(&mut self, data: &[u8], out: &mut Outbox) {
        let Some(tally) = cluster::parse_tally(data) else {
            return;
        };
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        // None: answered after the wait, its sender has already heard.
        let Some(awaited) = cluster.broadcasts.get_mut(&tally.seq) else {
            return;
        };
        let Some(i) = awaited.nodes.iter().position(|(n, _)| &**n == tally.node) else {
            return;
        };
        awaited.nodes.swap_remove(i);
        awaited.missed += tally.missed as usize;
        if awaited.nodes.is_empty() {
            let done = cluster.broadcasts.remove(&tally.seq).expect("found above");
            self.report_missed(done.conn, done.msg_id.as_deref(), done.missed, out);
        }
    }

    /// Broadcasts that some node has not answered in time: their members
    /// there count as missed.
    pub(super) fn expire_broadcasts(&mut self, now: Instant, out: &mut Outbox) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        if cluster.broadcasts.is_empty() {
            return;
        }
        let mut late = Vec::new();
        cluster.broadcasts.retain(|_, awaited| {
            let keep = awaited.deadline > now;
            if !keep {
                let unanswered: usize = awaited.nodes.iter().map(|(_, n)| n).sum();
                late.push((
                    awaited.conn,
                    awaited.msg_id.take(),
                    awaited.missed + unanswered,
                ));
            }
            keep
        });
        for (conn, msg_id, missed) in late {
            self.report_missed(conn, msg_id.as_deref(), missed, out);
        }
    }

    /// The node holding peer `to` of `conn`'s topic, if another does.
    pub(super) fn remote_target(&self, conn: u64, to: &str) -> Option<(Arc<str>, PeerId)> {
        let cluster = self.cluster.as_ref()?;
        let topic = &self.registry.member(conn)?.topic;
        let to = PeerId::parse(to)?;
        let remote = cluster.remote.get(topic)?.members.get(&to)?;
        Some((Arc::clone(&remote.node), to))
    }

    /// Publishes a relay to the inbox of the node that holds its target.
    pub(super) fn forward(&mut self, relay: Forwarded<'_>, now: Instant, out: &mut Outbox) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let Forwarded {
            node,
            to,
            from,
            kind,
            payload,
            msg_id,
        } = relay;
        let mut message = Vec::new();
        cluster::push_relay(&mut message, &to, &from, &cluster.node, msg_id, |frame| {
            message::push_relay(frame, kind, from.as_str(), payload, msg_id)
        });
        out.cluster.push(ClusterOp::Publish {
            node,
            message,
            relay: true,
        });
        let forwards = &mut cluster.forwards;
        while forwards.front().is_some_and(|f| {
            forwards.len() >= FORWARD_MEMORY_LEN
                || now.saturating_duration_since(f.at) > FORWARD_MEMORY
        }) {
            forwards.pop_front();
        }
        forwards.push_back(Forward {
            at: now,
            to,
            from,
            msg_id: msg_id.map(|id| id.to_owned()),
        });
        self.count_relay(relay::FORWARDED);
    }

    /// Forgets `conn` if it was waiting to join (it never joined here, but
    /// the cluster was told it would); returns whether it was.
    pub(super) fn cluster_forget_joiner(
        &mut self,
        conn: u64,
        why: LeaveReason,
        out: &mut Outbox,
    ) -> bool {
        if self.forget_resuming(conn) {
            return true;
        }
        let Some(cluster) = &mut self.cluster else {
            return false;
        };
        let Some(joining) = cluster.joining.remove(&conn) else {
            return false;
        };
        if let Some(remote) = cluster.remote.get_mut(&joining.topic) {
            remote.waiting.retain(|waiting| *waiting != conn);
        }
        self.cluster_left(&joining.topic, joining.newcomer.peer, why, out);
        true
    }

    /// Tells the cluster a local peer left; forgets the topic's remote
    /// members once no local peer is in it or waiting for it.
    pub(super) fn cluster_left(
        &mut self,
        topic: &Arc<str>,
        peer: PeerId,
        reason: LeaveReason,
        out: &mut Outbox,
    ) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let idle = self.registry.members(topic).is_empty()
            && cluster
                .remote
                .get(topic)
                .is_some_and(|r| r.waiting.is_empty());
        if idle {
            cluster.remote.remove(topic);
        }
        let topic = Arc::clone(topic);
        let reason = Some(reason);
        out.cluster.push(ClusterOp::Leave {
            topic,
            peer,
            reason,
        });
    }

    // --- what Redis brings back ------------------------------------------

    /// The other nodes' members of `topic` as of `version`, which the
    /// cluster answered to a `Join` with `snapshot` or to a resync; `None`
    /// when it could not be asked (Redis is down), in which case what was
    /// known stands. Local peers are told what changed, and connections
    /// waiting to join the topic join it.
    pub fn snapshot(
        &mut self,
        topic: &str,
        snapshot: Option<(u64, FxHashMap<PeerId, RemotePeer>)>,
        now: Now,
        out: &mut Outbox,
    ) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let Some(remote) = cluster.remote.get_mut(topic) else {
            return; // nobody here follows the topic any more
        };
        let forgetful = snapshot.is_some() && remote.forgetful;
        let changes = match snapshot {
            Some((version, _)) if remote.pending.is_none() && version <= remote.version => {
                return; // older than what was applied since
            }
            Some((version, members)) => remote.replace(version, members),
            None if remote.pending.is_none() => return,
            None => {
                // Not asked: what was known stands, doubts and all (the
                // next resync says again whether Redis forgot).
                remote.forgetful = false;
                let doubted = mem::take(&mut remote.doubted);
                let members = mem::take(&mut remote.members);
                let changes = remote.replace(remote.version, members);
                remote.doubted = doubted;
                changes
            }
        };
        if remote.doubted.is_empty() {
            remote.doubted_until = None;
        } else if forgetful {
            // New doubts: the grace starts again for all of them.
            let deadline = now.instant + DOUBT_GRACE;
            remote.doubted_until = Some(deadline);
            cluster.doubts.push_back((deadline, topic.into()));
        }
        self.announce(topic, changes, out);
        self.greet_waiting(topic, now, out);
    }

    /// Gives up the doubted members whose grace is over (see `remote`):
    /// local peers hear they left. Not while the topic awaits a snapshot
    /// (Redis is away again): its grace starts again.
    pub fn tick_doubts(&mut self, now: Instant, out: &mut Outbox) {
        let mut over = Vec::new();
        if let Some(cluster) = &mut self.cluster {
            while cluster.doubts.front().is_some_and(|(at, _)| *at <= now) {
                let (at, topic) = cluster.doubts.pop_front().expect("checked");
                let Some(remote) = cluster.remote.get_mut(&*topic) else {
                    continue;
                };
                if remote.doubted_until != Some(at) {
                    continue; // cleared, or given a later deadline
                }
                if remote.pending.is_some() {
                    let deadline = now + DOUBT_GRACE;
                    remote.doubted_until = Some(deadline);
                    cluster.doubts.push_back((deadline, topic));
                } else {
                    over.push((topic, remote.give_up_doubts()));
                }
            }
        }
        for (topic, changes) in over {
            self.announce(&topic, changes, out);
        }
    }

    /// Greets the connections waiting to join `topic` with what is known of
    /// it now: once its snapshot is here, or without waiting for it any
    /// longer (Redis is slow to answer), in which case the snapshot, when it
    /// comes, tells them what they missed.
    pub fn greet_waiting(&mut self, topic: &str, now: Now, out: &mut Outbox) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let Some(remote) = cluster.remote.get_mut(topic) else {
            return;
        };
        let mut entering = Vec::new();
        for conn in mem::take(&mut remote.waiting) {
            if let Some(joining) = cluster.joining.remove(&conn) {
                entering.push((conn, joining));
            }
        }
        for (conn, joining) in entering {
            let Joining {
                topic,
                newcomer,
                held,
            } = joining;
            self.enter(conn, &topic, newcomer, now, out);
            if !held.is_empty() {
                self.feed(conn, &held, now.instant, out);
            }
        }
        self.close_doomed(now.instant, out);
    }

    /// Handles a message from this node's inbox: a relay or a frame for a
    /// local peer, or a presence event of a topic.
    pub fn deliver(&mut self, data: &[u8], now: Now, out: &mut Outbox) {
        if data.first() == Some(&cluster::ENVELOPE) {
            // One level: no node puts an envelope in an envelope.
            let messages = cluster::envelope(data);
            for message in messages.filter(|m| m.first() != Some(&cluster::ENVELOPE)) {
                self.deliver(message, now, out);
            }
            return;
        }
        if self.deliver_migration(data, now, out) {
            return self.close_doomed(now.instant, out);
        }
        let now = now.instant;
        match data.first() {
            Some(&cluster::RELAY) => self.deliver_relay_held(data, true, out),
            Some(&cluster::BROADCAST) => self.deliver_broadcast(data, out),
            Some(&cluster::TALLY) => self.tally_arrived(data, out),
            Some(&cluster::DIRECT) => {
                if let Some((to, frame)) = cluster::parse_direct(data) {
                    if let Some(conn) = self.registry.conn_of(&to) {
                        self.send_must(conn, frame, out);
                    }
                }
            }
            Some(b'{') => {
                if let Some((topic, event)) = cluster::parse_presence(data) {
                    self.presence(&topic, event, now, out);
                }
            }
            _ => {}
        }
        self.close_doomed(now, out);
    }

    /// Applies a presence event of `topic`, or keeps it for the snapshot
    /// on its way.
    pub(super) fn presence(
        &mut self,
        topic: &str,
        event: Presence,
        now: Instant,
        out: &mut Outbox,
    ) {
        if event.dead {
            self.answer_lost(&event.left, now, out);
        }
        let Some(remote) = self
            .cluster
            .as_mut()
            .and_then(|cluster| cluster.remote.get_mut(topic))
        else {
            return;
        };
        if let Some(pending) = &mut remote.pending {
            pending.push(event);
            return;
        }
        let changes = remote.apply(event);
        self.announce(topic, changes, out);
    }

    /// Answers `target_not_found` to the recent relays to `gone` peers,
    /// whose node died: they may have been lost with it.
    fn answer_lost(&mut self, gone: &[PeerId], now: Instant, out: &mut Outbox) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let mut lost = Vec::new();
        cluster.forwards.retain_mut(|forward| {
            let fresh = now.saturating_duration_since(forward.at) <= FORWARD_MEMORY;
            if fresh && gone.contains(&forward.to) {
                lost.push((forward.from, forward.msg_id.take()));
                return false;
            }
            fresh
        });
        for (from, msg_id) in lost {
            if let Some(sender) = self.registry.conn_of(&from) {
                self.count_relay(relay::TARGET_NOT_FOUND);
                self.send_error(sender, ErrorCode::TargetNotFound, msg_id.as_deref(), out);
            }
        }
    }

    /// Tells the local members of `topic` of remote peers that left or joined.
    fn announce(&mut self, topic: &str, changes: Changes, out: &mut Outbox) {
        let Changes {
            left,
            joined,
            updated,
        } = changes;
        for (peer, metadata) in updated {
            let mut bytes = Vec::new();
            message::push_peer_updated(&mut bytes, peer.as_str(), metadata.as_deref());
            self.broadcast(topic, None, bytes, out);
        }
        for peer in left {
            let mut bytes = Vec::new();
            message::push_peer_left(&mut bytes, peer.as_str());
            self.broadcast(topic, None, bytes, out);
        }
        for (peer, remote) in joined {
            let mut bytes = Vec::new();
            message::push_peer_joined(&mut bytes, peer.as_str(), remote.metadata.as_deref());
            self.broadcast(topic, None, bytes, out);
        }
    }

    /// Delivers an `R` message to its local target, or bounces it.
    pub(super) fn deliver_relay(&mut self, data: &[u8], out: &mut Outbox) {
        self.deliver_relay_held(data, false, out);
    }

    /// `R` from the inbox (`hold`): held if its target just moved here and
    /// its origin has not flushed yet.
    fn deliver_relay_held(&mut self, data: &[u8], hold: bool, out: &mut Outbox) {
        let Some(relay) = cluster::parse_relay(data) else {
            return;
        };
        let code = match self.registry.conn_of(&relay.to) {
            Some(conn) => {
                let held = if hold {
                    self.hold_relay(conn, relay.origin, |buf| buf.extend_from_slice(data))
                } else {
                    None
                };
                if let Some(Queued::Yes) = held {
                    return; // counted when it goes out
                }
                let write = |buf: &mut Vec<u8>| buf.extend_from_slice(relay.frame);
                match held.unwrap_or_else(|| self.queue_or_write(conn, out, write)) {
                    Queued::Yes => {
                        self.count_relay(relay::DELIVERED);
                        return;
                    }
                    Queued::OverBound => {
                        self.count_relay(relay::DROPPED);
                        ErrorCode::Dropped
                    }
                }
            }
            None if self.pass_on(&relay.to, data, out) => return,
            None => {
                self.count_relay(relay::TARGET_NOT_FOUND);
                ErrorCode::TargetNotFound
            }
        };
        self.count_error(code);
        bounce(relay.origin, &relay.from, out, |frame| {
            message::push_error(frame, code, relay.msg_id)
        });
    }

    /// A relay this node published (`message`, of a `ClusterOp::Publish`
    /// with `relay`) did not arrive: no node listens on the target's inbox
    /// (`unreachable`: the target is gone, its sender gets
    /// `target_not_found` and everyone here a `peer-left`), or Redis could
    /// not be reached (its sender gets `dropped`).
    pub fn undeliverable(
        &mut self,
        message: &[u8],
        unreachable: bool,
        now: Instant,
        out: &mut Outbox,
    ) {
        let Some(relay) = cluster::parse_relay(message) else {
            return;
        };
        let Some(sender) = self.registry.conn_of(&relay.from) else {
            return;
        };
        let (code, result) = if unreachable {
            (ErrorCode::TargetNotFound, relay::TARGET_NOT_FOUND)
        } else {
            (ErrorCode::Dropped, relay::DROPPED)
        };
        self.count_relay(result);
        self.send_error(sender, code, relay.msg_id, out);
        let topic = match self.registry.member(sender) {
            Some(member) if unreachable => Arc::clone(&member.topic),
            _ => return self.close_doomed(now, out),
        };
        let gone = self
            .cluster
            .as_mut()
            .and_then(|cluster| cluster.remote.get_mut(&topic))
            .and_then(|remote| remote.members.remove(&relay.to));
        if gone.is_some() {
            let gone = Changes {
                left: vec![relay.to],
                ..Changes::default()
            };
            self.announce(&topic, gone, out);
            out.cluster.push(ClusterOp::Leave {
                topic,
                peer: relay.to,
                reason: None,
            });
        }
        self.close_doomed(now, out);
    }

    // --- what the caller asks --------------------------------------------

    /// Every topic this node follows, with its local peers (and those
    /// about to join): what the cluster must hold of this node.
    #[allow(clippy::type_complexity)]
    pub fn local_members(&self) -> Vec<(Arc<str>, Vec<(PeerId, Option<&str>)>)> {
        let Some(cluster) = &self.cluster else {
            return Vec::new();
        };
        cluster
            .remote
            .iter()
            .map(|(topic, remote)| {
                let members = self.registry.members(topic).iter().map(|conn| {
                    let member = self.registry.member(*conn).expect("listed members exist");
                    (member.peer, member.metadata.as_deref())
                });
                let waiting = remote.waiting.iter().filter_map(|conn| {
                    let joining = cluster.joining.get(conn)?;
                    Some((joining.newcomer.peer, joining.newcomer.metadata.as_deref()))
                });
                (Arc::clone(topic), members.chain(waiting).collect())
            })
            .collect()
    }

    /// Starts resynchronising every topic (after Redis came back): presence
    /// events wait until the topic's snapshot is here. `forgot`: Redis lost
    /// its data, so members missing from the snapshots are doubted first.
    pub fn begin_resync(&mut self, forgot: bool) {
        if let Some(cluster) = &mut self.cluster {
            for remote in cluster.remote.values_mut() {
                remote.pending.get_or_insert_with(Vec::new);
                remote.forgetful |= forgot;
            }
        }
    }

    /// The other nodes that hold members of this node's topics.
    pub fn remote_nodes(&self) -> Vec<Arc<str>> {
        let mut nodes: Vec<Arc<str>> = Vec::new();
        let Some(cluster) = &self.cluster else {
            return nodes;
        };
        for remote in cluster.remote.values() {
            // A doubted member's node may not be back yet: not dead.
            let known = remote
                .members
                .iter()
                .filter(|(peer, _)| !remote.doubted.contains(*peer));
            for (_, peer) in known {
                if !nodes
                    .iter()
                    .any(|node| Arc::ptr_eq(node, &peer.node) || *node == peer.node)
                {
                    nodes.push(Arc::clone(&peer.node));
                }
            }
        }
        nodes
    }
}

/// Publishes a frame that peer `to`, on node `origin`, must receive (an
/// error about what it sent there) to that node's inbox (`D`).
fn bounce(origin: &str, to: &PeerId, out: &mut Outbox, frame: impl FnOnce(&mut Vec<u8>)) {
    let mut message = Vec::new();
    cluster::push_direct(&mut message, to, frame);
    out.cluster.push(ClusterOp::Publish {
        node: Arc::from(origin),
        message,
        relay: false,
    });
}

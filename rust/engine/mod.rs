//! One worker's connections after the upgrade: the per-message hot path.
//!
//! The engine is sans-I/O and reads no clock. The caller feeds it what it
//! read from a socket (`receive`), what happened to a socket (`eof`,
//! `release`, `pause`, `resume`) and the passing of time (`tick`), each
//! with the time it happened; every call fills an [`Outbox`] with what to
//! write to which connection and which sockets to shut down, and the
//! caller carries that out after the call returns.
//!
//! Outbound bytes go straight to the caller's transport while it accepts
//! them; once the transport reports it is full (`pause`), they wait here in
//! the connection's queue, bounded by `max_queue` bytes. Over the bound a
//! relay is refused (`dropped` to the sender) and anything the peer must
//! see (presence, errors, pongs) disconnects it with 4008 instead, so a
//! connected peer's view of its topic is never wrong.
//!
//! The concerns, a module each: [`conn`] (a connection's state, its
//! queue, how it ends), [`topics`] (who is in which topic), [`relay`]
//! (frames read, messages answered and relayed), [`limits`] (refusals and
//! the rate limit), [`liveness`] (pings and timeouts) and [`cluster`]
//! (remote members, in cluster mode only).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rustc_hash::FxHashMap;

mod admin;
pub mod cluster;
mod config;
mod conn;
mod flush;
mod limits;
mod liveness;
mod migrate;
mod outbox;
pub mod publish;
mod relay;
pub mod remote;
mod resume;
mod session;
pub mod topics;

pub use admin::{Missing, PeerView};
pub use config::{BroadcastLimits, Config, RateLimit};
pub use conn::LeaveReason;
pub use limits::{Refusal, ABUSE_LIMIT, ABUSE_WINDOW};
pub use liveness::Part;
pub use outbox::{Action, MemberChange, Outbox, SessionEvent};

use cluster::ClusterState;
use conn::{Closing, Conn, State};
use topics::Registry;

use crate::metrics::{cell, family, Recorder};
use crate::wire::message::{self, ErrorCode};
use crate::wire::peer_id::PeerId;

/// When an engine call happens: `instant` for every timeout, `wall` for
/// what carries the date (peer ids, TURN credentials). The caller reads
/// the clocks; the engine reads none.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub wall: SystemTime,
}

#[derive(Debug)]
pub struct Engine<W> {
    config: Config,
    /// `pingInterval` as written in `welcome`.
    ping_interval_text: String,
    registry: Registry,
    /// Boxed: the table is twice the entries right after it grows, and an
    /// empty slot then costs the size of a pointer, not of a connection.
    conns: FxHashMap<u64, Box<Conn<W>>>,
    next_conn: u64,
    /// Unmasking buffer lent to every connection's reader in turn.
    scratch: Vec<u8>,
    /// Connections found over their bound by a must-deliver write; closed
    /// once the write that found them is done.
    doomed: Vec<u64>,
    metrics: Recorder,
    /// Cluster mode only.
    cluster: Option<ClusterState>,
    /// Sessions suspended now.
    suspended: usize,
    /// Connections whose transport refused more bytes, and since when
    /// (their queue's wait is measured from there).
    paused_at: FxHashMap<u64, Instant>,
    /// What waits for the caller's flush, if it defers writes.
    flush: flush::Flush,
}

/// What a connection asks of its join: the query's `metadata`,
/// `resumable=1`, and `resume` (a token and `seen`).
#[derive(Debug, Clone, Copy, Default)]
pub struct JoinRequest<'a> {
    pub topic: &'a str,
    pub metadata: Option<&'a str>,
    pub resumable: bool,
    pub resume: Option<(&'a str, Option<u64>)>,
    /// The metadata is the token's, which does not let the peer change it
    /// (`update-metadata` is `forbidden`).
    pub metadata_locked: bool,
    /// When the connection was accepted (the join latency counts from
    /// there); `None`: now.
    pub accepted: Option<Instant>,
    /// Written to the connection before anything else, in the same write:
    /// the HTTP response that upgraded it.
    pub head: &'a [u8],
}

/// A connection about to enter a topic: its peer id and metadata, and when
/// it was accepted.
#[derive(Debug)]
pub(super) struct Newcomer {
    pub(super) peer: PeerId,
    pub(super) metadata: Option<Box<str>>,
    pub(super) accepted: Instant,
}

/// A connection admitted: its peer id, and whether it resumed a session
/// (else it is a new peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    pub peer: PeerId,
    pub resumed: bool,
}

impl<W> Engine<W> {
    pub fn new(config: Config) -> Self {
        Self::with_metrics(config, Recorder::default())
    }

    /// An engine counting into `metrics` (its worker's row of the table
    /// every worker maps).
    pub fn with_metrics(config: Config, metrics: Recorder) -> Self {
        let ping_interval_text = format!("{}", config.ping_interval.as_secs_f64());
        let cluster = config.cluster_node.clone().map(ClusterState::new);
        Self {
            config,
            ping_interval_text,
            registry: Registry::new(),
            conns: FxHashMap::default(),
            next_conn: 1,
            scratch: Vec::new(),
            doomed: Vec::new(),
            metrics,
            cluster,
            suspended: 0,
            paused_at: FxHashMap::default(),
            flush: flush::Flush::default(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Recorder {
        &self.metrics
    }

    /// Writes the gauges (connections, peers, topics) into the metrics.
    pub fn record_gauges(&self) {
        let connections = self.conns.len() as u64;
        self.metrics.set(cell(family::CONNECTIONS, 0), connections);
        self.metrics
            .set(cell(family::WORKER_CONNECTIONS, 0), connections);
        self.metrics
            .set(cell(family::PEERS, 0), self.registry.member_count() as u64);
        self.metrics
            .set(cell(family::TOPICS, 0), self.registry.topic_count() as u64);
        self.metrics
            .set(cell(family::SESSIONS_SUSPENDED, 0), self.suspended as u64);
    }

    fn count_error(&self, code: ErrorCode) {
        self.metrics.add(cell(family::ERRORS, code as usize), 1);
    }

    pub fn transport(&self, conn: u64) -> Option<&W> {
        self.conns.get(&conn).and_then(|c| c.transport.as_ref())
    }

    pub fn peer_id(&self, conn: u64) -> Option<PeerId> {
        self.registry.member(conn).map(|m| m.peer)
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn peer_count(&self) -> usize {
        self.registry.member_count()
    }

    pub fn topic_count(&self) -> usize {
        self.registry.topic_count()
    }

    /// A new connection, sent `head` first.
    fn add_conn(&mut self, transport: W, head: &[u8], now: Instant, out: &mut Outbox) -> u64 {
        let conn = self.next_conn;
        self.next_conn += 1;
        let burst = self.config.rate_limit.map(|limit| limit.burst);
        self.conns
            .insert(conn, Box::new(Conn::new(transport, burst, now)));
        if !head.is_empty() {
            out.private(conn).extend_from_slice(head);
            out.heads.push((conn, head.len() as u64));
        }
        conn
    }

    /// Adds an upgraded connection as a new peer of `request.topic`: it is
    /// sent `welcome` and `peer-list`, the others `peer-joined`; or, for a
    /// resume that can be honoured, it takes its session over (see
    /// `resume.rs`). Over a limit it is refused instead (the error, then
    /// the close). Returns the connection id the caller passes to every
    /// later call.
    pub fn join(
        &mut self,
        transport: W,
        request: JoinRequest<'_>,
        now: Now,
        out: &mut Outbox,
    ) -> (u64, Result<Joined, Refusal>) {
        let conn = self.add_conn(transport, request.head, now.instant, out);
        if request.metadata_locked {
            let c = self.conns.get_mut(&conn).expect("just added");
            c.metadata_locked = true;
        }
        if self.conns.len() > self.config.max_connections {
            self.close(
                conn,
                Closing::refusal(Refusal::ServerFull),
                now.instant,
                out,
            );
            return (conn, Err(Refusal::ServerFull));
        }
        if let Some((token, seen)) = request.resume {
            if let Some(peer) = self.resume_session(conn, &request, token, seen, now, out) {
                return (
                    conn,
                    Ok(Joined {
                        peer,
                        resumed: true,
                    }),
                );
            }
        }
        if self.topic_size(request.topic) >= self.config.max_peers_per_topic {
            self.close(conn, Closing::refusal(Refusal::TopicFull), now.instant, out);
            return (conn, Err(Refusal::TopicFull));
        }
        let resumable = request.resumable || request.resume.is_some();
        if resumable && self.config.resume_window.is_some() {
            let c = self.conns.get_mut(&conn).expect("just added");
            c.session.get_or_insert_with(Box::default);
        }
        let newcomer = Newcomer {
            peer: self.registry.new_peer_id(now.wall),
            metadata: request.metadata.map(Box::from),
            accepted: request.accepted.unwrap_or(now.instant),
        };
        let peer = newcomer.peer;
        self.join_cluster(conn, request.topic, newcomer, now, out);
        let joined = Joined {
            peer,
            resumed: false,
        };
        (conn, Ok(joined))
    }

    /// Peers in `topic`, here and (cluster mode) on other nodes, counting
    /// those about to join.
    fn topic_size(&self, topic: &str) -> usize {
        self.registry.members(topic).len() + self.remote_count(topic)
    }

    /// Makes `conn` a member of `topic` as `peer`: it is sent `welcome` and
    /// `peer-list` (every local and remote member), the others `peer-joined`.
    fn enter(&mut self, conn: u64, topic: &str, newcomer: Newcomer, now: Now, out: &mut Outbox) {
        let Newcomer {
            peer,
            metadata,
            accepted,
        } = newcomer;
        self.registry.join_as(conn, topic, metadata, peer);
        let member = self.registry.member(conn).expect("just joined");
        let topic = Arc::clone(&member.topic);
        let unix = now
            .wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let ice = self.config.ice.welcome_field(peer.as_str(), unix);
        let extra = ice + &self.resume_field(conn, &topic, peer, None);
        self.push_welcome(conn, peer, &extra, accepted, now.instant, out);
        let others = self.registry.members(&topic);
        let others = &others[..others.len() - 1];
        let local = others.iter().map(|other| {
            let member = self.registry.member(*other).expect("listed members exist");
            (member.peer.as_str(), member.metadata.as_deref())
        });
        let mut list = Vec::new();
        message::push_peer_list(&mut list, local.chain(self.remote_members(&topic)));
        // The first message numbered after the welcome.
        self.send_must(conn, &list, out);
        let mut joined = Vec::new();
        let metadata = self
            .registry
            .member(conn)
            .and_then(|m| m.metadata.as_deref());
        message::push_peer_joined(&mut joined, peer.as_str(), metadata);
        out.joined
            .push((peer, Arc::clone(&topic), metadata.map(Box::from)));
        self.broadcast_local(&topic, Some(conn), joined, out);
        self.metrics.add(cell(family::JOINED, 0), 1);
        self.close_doomed(now.instant, out);
    }

    /// Writes `welcome` for `peer` (with `extra`, more fields) to `conn`,
    /// and counts its join from `accepted`, when the connection was, to
    /// the welcome's write: `now`, or the flush.
    fn push_welcome(
        &mut self,
        conn: u64,
        peer: PeerId,
        extra: &str,
        accepted: Instant,
        now: Instant,
        out: &mut Outbox,
    ) {
        let greeting = out.private(conn);
        message::push_welcome(greeting, peer.as_str(), &self.ping_interval_text, extra);
        if !self.flush.defers_join(accepted) {
            self.metrics
                .observe_join(now.saturating_duration_since(accepted));
        }
    }

    /// Takes an upgraded connection that may not join (e.g. its token was
    /// refused): it is sent the refusal's error and close code, and learns
    /// nothing of any topic.
    pub fn refuse(
        &mut self,
        transport: W,
        refusal: Refusal,
        head: &[u8],
        now: Instant,
        out: &mut Outbox,
    ) -> u64 {
        let conn = self.add_conn(transport, head, now, out);
        self.close(conn, Closing::refusal(refusal), now, out);
        conn
    }

    /// Handles bytes read from `conn`'s socket.
    pub fn receive(&mut self, conn: u64, data: &[u8], now: Instant, out: &mut Outbox) {
        self.metrics
            .add(cell(family::RECEIVED_BYTES, 0), data.len() as u64);
        if self.cluster_holds(conn) {
            self.hold(conn, data, now, out);
        } else {
            self.feed(conn, data, now, out);
        }
    }

    /// The client half-closed its side (or finished our close handshake).
    /// A resumable session is suspended: no close frame came.
    pub fn eof(&mut self, conn: u64, now: Instant, out: &mut Outbox) {
        if !self.suspend(conn, now, out) {
            self.end(conn, LeaveReason::Disconnected, out);
        }
        self.close_doomed(now, out);
    }

    /// The socket is gone; forget the connection, unless it is a resumable
    /// session, which is suspended (or already was).
    pub fn release(&mut self, conn: u64, now: Instant, out: &mut Outbox) {
        let suspended = self.conns.get(&conn).is_some_and(|c| c.suspended());
        if suspended || self.suspend(conn, now, out) {
            // Only the session is kept: the dead transport is let go.
            if let Some(c) = self.conns.get_mut(&conn) {
                c.transport = None;
            }
        } else {
            self.leave(conn, LeaveReason::Disconnected, out);
            self.conns.remove(&conn);
        }
        self.close_doomed(now, out);
    }

    /// The transport's buffer is over its high-water mark.
    pub fn pause(&mut self, conn: u64, now: Instant) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.paused = true;
            self.paused_at.entry(conn).or_insert(now);
        }
    }

    /// The transport drained below its low-water mark: write the queue
    /// (counting how long it waited since the pause).
    pub fn resume(&mut self, conn: u64, now: Instant, out: &mut Outbox) {
        let since = self.paused_at.remove(&conn);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.paused = false;
        if !c.queue.is_empty() {
            if let Some(since) = since {
                self.metrics.observe(
                    family::QUEUE_WAIT_SECONDS,
                    now.saturating_duration_since(since),
                );
            }
            let queue = std::mem::take(&mut c.queue);
            let index = out.shared(queue);
            out.act(conn, Action::Write(index));
        }
    }

    /// Closes every open connection with `code` (1001 when draining), and
    /// ends every suspended session.
    pub fn close_all(&mut self, code: u16, reason: &str, now: Instant, out: &mut Outbox) {
        let open: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Open || c.suspended())
            .map(|(conn, _)| *conn)
            .collect();
        let closing = Closing {
            code,
            reason,
            error: None,
            why: LeaveReason::Shutdown,
        };
        for conn in open {
            self.close(conn, closing, now, out);
        }
    }

    /// Resets every connection still here (the end of a drain).
    pub fn abort_all(&mut self, out: &mut Outbox) {
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        for conn in conns {
            if self.end(conn, LeaveReason::Shutdown, out) {
                out.act(conn, Action::Abort);
            }
        }
    }
}

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod migrate_tests;
#[cfg(test)]
mod resume_tests;
#[cfg(test)]
mod tests;

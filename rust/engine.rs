//! One worker's connections after the upgrade: the per-message hot path.
//!
//! The engine is sans-I/O. The caller feeds it what it read from a socket
//! (`receive`), what happened to a socket (`eof`, `release`, `pause`,
//! `resume`) and the passing of time (`tick`); every call fills an
//! [`Outbox`] with what to write to which connection and which sockets to
//! shut down, and the caller carries that out after the call returns.
//!
//! Outbound bytes go straight to the caller's transport while it accepts
//! them; once the transport reports it is full (`pause`), they wait here in
//! the connection's queue, bounded by `max_queue` bytes. Over the bound a
//! relay is refused (`dropped` to the sender) and anything the peer must
//! see (presence, errors, pongs) disconnects it with 4008 instead, so a
//! connected peer's view of its topic is never wrong.

use std::collections::VecDeque;
use std::mem;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustc_hash::FxHashMap;
use serde_json::value::RawValue;

use crate::cluster::{self, ClusterOp, RemotePeer, RemoteTopic};
use crate::frame::{self, Event, Flow, FrameReader};
use crate::ice::IceServers;
use crate::message::{self, ErrorCode, Inbound};
use crate::metrics::{cell, family, relay, Recorder};
use crate::registry::{PeerId, Registry};

/// Close code for a peer that cannot keep up with what it is sent.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code for a client that sent too much before its `welcome`.
const CLOSE_POLICY: u16 = 1008;
/// Bytes past the largest message a joining connection may send before it
/// has joined (cluster mode; it joins within a Redis round trip).
const MAX_HELD_EXTRA: usize = 4096;
/// Relays forwarded to other nodes are remembered this long, and at most
/// this many, so that if the target's node is found dead meanwhile their
/// senders are told `target_not_found` (the relay may have died with it).
const FORWARD_MEMORY: Duration = Duration::from_secs(5);
const FORWARD_MEMORY_LEN: usize = 16 * 1024;

/// A relay forwarded to another node, as remembered.
#[derive(Debug)]
struct Forward {
    at: Instant,
    to: PeerId,
    from: PeerId,
    msg_id: Option<Box<RawValue>>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Largest message (all fragments) a client may send; over it, 1009.
    pub max_message: usize,
    /// Bytes a connection may have queued while its transport is full.
    pub max_queue: usize,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// How long a closing connection may take to finish the close
    /// handshake before it is aborted.
    pub close_timeout: Duration,
    /// Peers a topic may hold; the next joiner is refused with 4009.
    pub max_peers_per_topic: usize,
    /// Connections this engine may hold (closing ones included); the next
    /// is refused with 4029.
    pub max_connections: usize,
    /// Messages per second each connection may send; `None` for no limit.
    pub rate_limit: Option<RateLimit>,
    /// STUN and TURN servers announced in `welcome`.
    pub ice: IceServers,
    /// This worker's node name in cluster mode; `None`: one machine.
    pub cluster_node: Option<Arc<str>>,
}

/// A token bucket: `per_second` messages a second on average, bursts of up
/// to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

/// Rate-limit violations within [`ABUSE_WINDOW`] that disconnect a peer.
pub const ABUSE_LIMIT: u32 = 10;
pub const ABUSE_WINDOW: Duration = Duration::from_secs(10);

impl Default for Config {
    fn default() -> Self {
        Self {
            max_message: 64 * 1024,
            max_queue: 1024 * 1024,
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            max_peers_per_topic: 1000,
            max_connections: 50_000,
            rate_limit: None,
            ice: IceServers::default(),
            cluster_node: None,
        }
    }
}

/// Why a connection is not admitted as a peer; it is sent the error, then
/// the close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unauthorized,
    TopicFull,
    ServerFull,
    InvalidTopic,
    InvalidMetadata,
}

impl Refusal {
    pub const ALL: [Self; 5] = [
        Self::Unauthorized,
        Self::TopicFull,
        Self::ServerFull,
        Self::InvalidTopic,
        Self::InvalidMetadata,
    ];

    fn error(self) -> ErrorCode {
        match self {
            Self::Unauthorized => ErrorCode::Unauthorized,
            Self::TopicFull => ErrorCode::TopicFull,
            Self::ServerFull => ErrorCode::ServerFull,
            Self::InvalidTopic => ErrorCode::InvalidTopic,
            Self::InvalidMetadata => ErrorCode::InvalidMetadata,
        }
    }

    fn close_code(self) -> u16 {
        match self {
            Self::Unauthorized => 4001,
            Self::TopicFull => 4009,
            Self::ServerFull => 4029,
            Self::InvalidTopic | Self::InvalidMetadata => 4400,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.error().code()
    }
}

/// What the caller does to a connection's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write `Outbox::bufs[i]`.
    Write(usize),
    /// Half-close: send FIN after what was written, keep reading until the
    /// client closes (it has been sent a close frame).
    Finish,
    /// Close after what was written (the close handshake is complete).
    Close,
    /// Reset now: the peer is dead or did not finish closing in time.
    Abort,
}

/// Why a peer left its topic; logged by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    Closed,
    Disconnected,
    PingTimeout,
    SlowConsumer,
    RateAbuse,
    ProtocolError,
    Shutdown,
}

impl LeaveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Disconnected => "disconnected",
            Self::PingTimeout => "ping timeout",
            Self::SlowConsumer => "slow consumer",
            Self::RateAbuse => "rate abuse",
            Self::ProtocolError => "protocol error",
            Self::Shutdown => "shutdown",
        }
    }
}

/// What one engine call asks of the caller, in order per connection.
#[derive(Debug, Default)]
pub struct Outbox {
    pub bufs: Vec<Vec<u8>>,
    pub actions: Vec<(u64, Action)>,
    /// Peers that left their topic during the call.
    pub left: Vec<(PeerId, Arc<str>, LeaveReason)>,
    /// Work for the cluster's Redis connection (cluster mode only).
    pub cluster: Vec<ClusterOp>,
    /// The buffer each connection is still appending to: written only to
    /// that connection and its last action, so later bytes can join it.
    open: FxHashMap<u64, usize>,
}

impl Outbox {
    pub fn clear(&mut self) {
        self.bufs.clear();
        self.actions.clear();
        self.left.clear();
        self.cluster.clear();
        self.open.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.left.is_empty() && self.cluster.is_empty()
    }

    /// The buffer for bytes to `conn`, coalesced with what it was already
    /// sent in this call.
    fn private(&mut self, conn: u64) -> &mut Vec<u8> {
        let index = *self.open.entry(conn).or_insert_with(|| {
            self.bufs.push(Vec::new());
            self.actions
                .push((conn, Action::Write(self.bufs.len() - 1)));
            self.bufs.len() - 1
        });
        &mut self.bufs[index]
    }

    fn shared(&mut self, bytes: Vec<u8>) -> usize {
        self.bufs.push(bytes);
        self.bufs.len() - 1
    }

    fn act(&mut self, conn: u64, action: Action) {
        self.open.remove(&conn);
        self.actions.push((conn, action));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A member of its topic.
    Open,
    /// Sent a close frame and FIN; waiting for the client's FIN.
    Closing { since: Instant },
    /// Being closed or reset; waiting for `release`.
    Done,
}

#[derive(Debug)]
struct Conn<W> {
    transport: W,
    state: State,
    reader: FrameReader,
    /// Bytes waiting for the transport to accept more (`paused`).
    queue: Vec<u8>,
    paused: bool,
    ping_sent: Instant,
    awaiting_pong: bool,
    /// Rate-limit tokens left, as of `refilled`.
    tokens: f64,
    refilled: Instant,
    /// Rate-limit violations since `violations_since`.
    violations: u32,
    violations_since: Instant,
    /// Input held while the connection waits to join (cluster mode).
    held: Vec<u8>,
}

/// A connection that will join `topic` as `peer` once the cluster's
/// snapshot of the topic is here.
#[derive(Debug)]
struct Joining {
    topic: Arc<str>,
    peer: PeerId,
    metadata: Option<Box<str>>,
}

/// What the rate limit says of one more message.
enum Admission {
    Yes,
    Limited,
    Abusive,
}

/// The outcome of queueing bytes for a connection.
enum Queued {
    Yes,
    OverBound,
}

#[derive(Debug)]
pub struct Engine<W> {
    config: Config,
    /// `pingInterval` as written in `welcome`.
    ping_interval_text: String,
    registry: Registry,
    conns: FxHashMap<u64, Conn<W>>,
    next_conn: u64,
    /// Unmasking buffer lent to every connection's reader in turn.
    scratch: Vec<u8>,
    /// Connections found over their bound by a must-deliver write; closed
    /// once the write that found them is done.
    doomed: Vec<u64>,
    metrics: Recorder,
    /// Cluster mode: each topic's members on other nodes.
    remote: FxHashMap<Arc<str>, RemoteTopic>,
    joining: FxHashMap<u64, Joining>,
    forwards: VecDeque<Forward>,
}

impl<W> Engine<W> {
    pub fn new(config: Config) -> Self {
        Self::with_metrics(config, Recorder::default())
    }

    /// An engine counting into `metrics` (its worker's row of the table
    /// every worker maps).
    pub fn with_metrics(config: Config, metrics: Recorder) -> Self {
        let ping_interval_text = format!("{}", config.ping_interval.as_secs_f64());
        Self {
            config,
            ping_interval_text,
            registry: Registry::new(),
            conns: FxHashMap::default(),
            next_conn: 1,
            scratch: Vec::new(),
            doomed: Vec::new(),
            metrics,
            remote: FxHashMap::default(),
            joining: FxHashMap::default(),
            forwards: VecDeque::new(),
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
    }

    fn count_error(&self, code: ErrorCode) {
        self.metrics.add(cell(family::ERRORS, code as usize), 1);
    }

    fn count_relay(&self, result: usize) {
        self.metrics.add(cell(family::RELAYS, result), 1);
    }

    pub fn transport(&self, conn: u64) -> Option<&W> {
        self.conns.get(&conn).map(|c| &c.transport)
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

    fn add_conn(&mut self, transport: W, now: Instant) -> u64 {
        let conn = self.next_conn;
        self.next_conn += 1;
        let burst = self.config.rate_limit.map_or(0.0, |limit| limit.burst);
        self.conns.insert(
            conn,
            Conn {
                transport,
                state: State::Open,
                reader: FrameReader::default(),
                queue: Vec::new(),
                paused: false,
                ping_sent: now,
                awaiting_pong: false,
                tokens: burst,
                refilled: now,
                violations: 0,
                violations_since: now,
                held: Vec::new(),
            },
        );
        conn
    }

    /// Adds an upgraded connection as a new peer of `topic`: it is sent
    /// `welcome` and `peer-list`, the others `peer-joined`. Over a limit it
    /// is refused instead (the error, then the close). Returns the
    /// connection id the caller passes to every later call.
    pub fn join(
        &mut self,
        transport: W,
        topic: &str,
        metadata: Option<&str>,
        now: Instant,
        out: &mut Outbox,
    ) -> (u64, Result<PeerId, Refusal>) {
        let conn = self.add_conn(transport, now);
        let refusal = if self.conns.len() > self.config.max_connections {
            Some(Refusal::ServerFull)
        } else if self.topic_size(topic) >= self.config.max_peers_per_topic {
            Some(Refusal::TopicFull)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            self.refuse_conn(conn, refusal, now, out);
            return (conn, Err(refusal));
        }
        let metadata = metadata.map(Box::from);
        let peer = self.registry.new_peer_id();
        if self.config.cluster_node.is_none() {
            self.enter(conn, topic, peer, metadata, now, out);
            return (conn, Ok(peer));
        }
        let (topic, fresh): (Arc<str>, bool) = match self.remote.get_key_value(topic) {
            Some((name, _)) => (Arc::clone(name), false),
            None => (Arc::from(topic), true),
        };
        let remote = self
            .remote
            .entry(Arc::clone(&topic))
            .or_insert_with(|| RemoteTopic {
                pending: Some(Vec::new()),
                ..RemoteTopic::default()
            });
        out.cluster.push(ClusterOp::Join {
            topic: Arc::clone(&topic),
            peer,
            metadata: metadata.clone(),
            snapshot: fresh,
        });
        if remote.pending.is_some() {
            remote.waiting.push(conn);
            self.joining.insert(
                conn,
                Joining {
                    topic,
                    peer,
                    metadata,
                },
            );
        } else {
            self.enter(conn, &topic, peer, metadata, now, out);
        }
        (conn, Ok(peer))
    }

    /// Peers in `topic`, here and (cluster mode) on other nodes, counting
    /// those about to join.
    fn topic_size(&self, topic: &str) -> usize {
        let remote = self
            .remote
            .get(topic)
            .map_or(0, |r| r.members.len() + r.waiting.len());
        self.registry.members(topic).len() + remote
    }

    /// Makes `conn` a member of `topic` as `peer`: it is sent `welcome` and
    /// `peer-list` (every local and remote member), the others `peer-joined`.
    fn enter(
        &mut self,
        conn: u64,
        topic: &str,
        peer: PeerId,
        metadata: Option<Box<str>>,
        now: Instant,
        out: &mut Outbox,
    ) {
        self.registry.join_as(conn, topic, metadata, peer);
        let member = self.registry.member(conn).expect("just joined");
        let topic = Arc::clone(&member.topic);
        let greeting = out.private(conn);
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let ice = self.config.ice.welcome_field(peer.as_str(), unix_now);
        message::push_welcome(greeting, peer.as_str(), &self.ping_interval_text, &ice);
        let others = self.registry.members(&topic);
        let others = &others[..others.len() - 1];
        let local = others.iter().map(|other| {
            let member = self.registry.member(*other).expect("listed members exist");
            (member.peer.as_str(), member.metadata.as_deref())
        });
        let remote = self.remote.get(&topic).into_iter().flat_map(|r| {
            r.members
                .iter()
                .map(|(peer, remote)| (peer.as_str(), remote.metadata.as_deref()))
        });
        message::push_peer_list(greeting, local.chain(remote));
        let mut joined = Vec::new();
        let metadata = self
            .registry
            .member(conn)
            .and_then(|m| m.metadata.as_deref());
        message::push_peer_joined(&mut joined, peer.as_str(), metadata);
        self.broadcast(&topic, Some(conn), joined, out);
        self.metrics.add(cell(family::JOINED, 0), 1);
        self.close_doomed(now, out);
        let held = self.conns.get_mut(&conn).map(|c| mem::take(&mut c.held));
        if let Some(held) = held.filter(|held| !held.is_empty()) {
            self.feed(conn, &held, now, out);
        }
    }

    /// Takes an upgraded connection that may not join (e.g. its token was
    /// refused): it is sent the refusal's error and close code, and learns
    /// nothing of any topic.
    pub fn refuse(
        &mut self,
        transport: W,
        refusal: Refusal,
        now: Instant,
        out: &mut Outbox,
    ) -> u64 {
        let conn = self.add_conn(transport, now);
        self.refuse_conn(conn, refusal, now, out);
        conn
    }

    fn refuse_conn(&mut self, conn: u64, refusal: Refusal, now: Instant, out: &mut Outbox) {
        let reason = refusal.error().message();
        let why = LeaveReason::Closed;
        self.close(
            conn,
            refusal.close_code(),
            reason,
            Some(refusal.error()),
            why,
            now,
            out,
        );
    }

    /// Handles bytes read from `conn`'s socket.
    pub fn receive(&mut self, conn: u64, data: &[u8], now: Instant, out: &mut Outbox) {
        self.metrics
            .add(cell(family::RECEIVED_BYTES, 0), data.len() as u64);
        if self.joining.contains_key(&conn) {
            self.hold(conn, data, now, out);
        } else {
            self.feed(conn, data, now, out);
        }
    }

    /// Keeps what a joining connection sent until it has joined: nothing
    /// may reach it before its `welcome`, not even a `pong`.
    fn hold(&mut self, conn: u64, data: &[u8], now: Instant, out: &mut Outbox) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.state != State::Open {
            return;
        }
        c.held.extend_from_slice(data);
        if c.held.len() > self.config.max_message + MAX_HELD_EXTRA {
            let why = LeaveReason::ProtocolError;
            self.close(
                conn,
                CLOSE_POLICY,
                "too much data before welcome",
                None,
                why,
                now,
                out,
            );
        }
    }

    fn feed(&mut self, conn: u64, data: &[u8], now: Instant, out: &mut Outbox) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.state != State::Open {
            return; // closing: the rest of the input is of no interest
        }
        c.awaiting_pong = false;
        let mut reader = mem::take(&mut c.reader);
        let mut scratch = mem::take(&mut self.scratch);
        let max_message = self.config.max_message;
        let result = reader.feed(data, max_message, &mut scratch, |event| {
            self.on_event(conn, event, now, out)
        });
        self.scratch = scratch;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.reader = reader;
        }
        if let Err(fault) = result {
            self.close(
                conn,
                fault.close_code(),
                fault.reason(),
                None,
                LeaveReason::ProtocolError,
                now,
                out,
            );
        }
        self.close_doomed(now, out);
    }

    fn on_event(&mut self, conn: u64, event: Event<'_>, now: Instant, out: &mut Outbox) -> Flow {
        if let Event::Close(code) = event {
            self.end(conn, LeaveReason::Closed, out);
            frame::push_close(out.private(conn), code.unwrap_or(frame::CLOSE_NORMAL), "");
            out.act(conn, Action::Close);
            return Flow::Stop;
        }
        // Every frame but a close counts against the rate limit: control
        // frames cost as much to answer as messages.
        match self.admit(conn, now) {
            Admission::Yes => self.on_frame(conn, event, out),
            Admission::Limited => {
                // A message is told why it was dropped; a ping is not
                // answered, a pong is ignored.
                if let Event::Text(_) | Event::Binary = event {
                    let msg_id = match event {
                        Event::Text(text) => message::msg_id_of(text),
                        _ => None,
                    };
                    self.send_error(conn, ErrorCode::RateLimited, msg_id, out);
                }
            }
            Admission::Abusive => {
                let (code, error) = (CLOSE_SLOW_CONSUMER, ErrorCode::SlowConsumer);
                let why = LeaveReason::RateAbuse;
                self.close(conn, code, "rate limit abuse", Some(error), why, now, out);
                return Flow::Stop;
            }
        }
        // A must-deliver write may have doomed this very connection.
        match self.conns.get(&conn) {
            Some(c) if c.state == State::Open && !self.doomed.contains(&conn) => Flow::Continue,
            _ => Flow::Stop,
        }
    }

    /// Answers a message or control frame the rate limit admitted.
    fn on_frame(&mut self, conn: u64, event: Event<'_>, out: &mut Outbox) {
        match event {
            Event::Text(text) => self.on_text(conn, text, out),
            Event::Binary => self.send_error(conn, ErrorCode::UnsupportedFrame, None, out),
            Event::Ping(payload) => {
                let mut pong = Vec::with_capacity(2 + payload.len());
                frame::push_pong(&mut pong, payload);
                self.send_must(conn, &pong, out);
            }
            Event::Pong | Event::Close(_) => {}
        }
    }

    /// Takes a token from `conn`'s bucket, refilled for the time elapsed.
    fn admit(&mut self, conn: u64, now: Instant) -> Admission {
        let Some(limit) = self.config.rate_limit else {
            return Admission::Yes;
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return Admission::Yes;
        };
        let elapsed = now.saturating_duration_since(c.refilled).as_secs_f64();
        c.tokens = (c.tokens + elapsed * limit.per_second).min(limit.burst);
        c.refilled = now;
        if c.tokens >= 1.0 {
            c.tokens -= 1.0;
            return Admission::Yes;
        }
        if now.saturating_duration_since(c.violations_since) > ABUSE_WINDOW {
            c.violations = 0;
            c.violations_since = now;
        }
        c.violations += 1;
        if c.violations >= ABUSE_LIMIT {
            Admission::Abusive
        } else {
            Admission::Limited
        }
    }

    fn on_text(&mut self, conn: u64, text: &str, out: &mut Outbox) {
        match message::parse_inbound(text) {
            Ok(Inbound::Relay {
                kind,
                to,
                payload,
                msg_id,
            }) => {
                let from = self
                    .registry
                    .member(conn)
                    .expect("open connections are members")
                    .peer;
                let Some(target) = self.registry.find_in_topic_of(conn, &to) else {
                    if let Some((node, to)) = self.remote_target(conn, &to) {
                        return self.forward(node, to, from, kind, payload, msg_id, out);
                    }
                    self.count_relay(relay::TARGET_NOT_FOUND);
                    return self.send_error(conn, ErrorCode::TargetNotFound, msg_id, out);
                };
                let delivered = self.queue_or_write(target, out, |buf| {
                    message::push_relay(buf, kind, from.as_str(), payload, msg_id);
                });
                if let Queued::OverBound = delivered {
                    self.count_relay(relay::DROPPED);
                    self.send_error(conn, ErrorCode::Dropped, msg_id, out);
                } else {
                    self.count_relay(relay::DELIVERED);
                }
            }
            Ok(Inbound::Ping { msg_id }) => {
                let mut pong = Vec::new();
                message::push_pong_message(&mut pong, msg_id);
                self.send_must(conn, &pong, out);
            }
            Err(rejected) => self.send_error(conn, rejected.code, rejected.msg_id, out),
        }
    }

    /// The node holding peer `to` of `conn`'s topic, if another does.
    fn remote_target(&self, conn: u64, to: &str) -> Option<(Arc<str>, PeerId)> {
        let topic = &self.registry.member(conn)?.topic;
        let to = PeerId::parse(to)?;
        let remote = self.remote.get(topic)?.members.get(&to)?;
        Some((Arc::clone(&remote.node), to))
    }

    /// Publishes a relay to the inbox of the node that holds its target.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        node: Arc<str>,
        to: PeerId,
        from: PeerId,
        kind: message::RelayKind,
        payload: Option<&RawValue>,
        msg_id: Option<&RawValue>,
        out: &mut Outbox,
    ) {
        let origin = self.config.cluster_node.as_deref().unwrap_or_default();
        let mut message = Vec::new();
        cluster::push_relay(&mut message, &to, &from, origin, msg_id, |frame| {
            message::push_relay(frame, kind, from.as_str(), payload, msg_id)
        });
        self.count_relay(relay::FORWARDED);
        out.cluster.push(ClusterOp::Publish { node, message });
        let now = Instant::now();
        while self.forwards.front().is_some_and(|f| {
            self.forwards.len() >= FORWARD_MEMORY_LEN
                || now.saturating_duration_since(f.at) > FORWARD_MEMORY
        }) {
            self.forwards.pop_front();
        }
        self.forwards.push_back(Forward {
            at: now,
            to,
            from,
            msg_id: msg_id.map(|id| id.to_owned()),
        });
    }

    fn send_error(
        &mut self,
        conn: u64,
        code: ErrorCode,
        msg_id: Option<&RawValue>,
        out: &mut Outbox,
    ) {
        self.count_error(code);
        let mut bytes = Vec::new();
        message::push_error(&mut bytes, code, msg_id);
        self.send_must(conn, &bytes, out);
    }

    /// Sends bytes the peer must receive; over its bound it is doomed.
    fn send_must(&mut self, conn: u64, bytes: &[u8], out: &mut Outbox) {
        if let Queued::OverBound =
            self.queue_or_write(conn, out, |buf| buf.extend_from_slice(bytes))
        {
            self.doom(conn);
        }
    }

    fn doom(&mut self, conn: u64) {
        if !self.doomed.contains(&conn) {
            self.doomed.push(conn);
        }
    }

    /// Writes to `conn` directly, or queues while its transport is full.
    fn queue_or_write(
        &mut self,
        conn: u64,
        out: &mut Outbox,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Queued {
        let Some(c) = self.conns.get_mut(&conn) else {
            return Queued::OverBound;
        };
        if !c.paused {
            write(out.private(conn));
            return Queued::Yes;
        }
        let mark = c.queue.len();
        write(&mut c.queue);
        if c.queue.len() > self.config.max_queue {
            c.queue.truncate(mark);
            return Queued::OverBound;
        }
        Queued::Yes
    }

    /// Sends `bytes` to every member of `topic` but `except`.
    fn broadcast(&mut self, topic: &str, except: Option<u64>, bytes: Vec<u8>, out: &mut Outbox) {
        let members = self.registry.members(topic);
        let mut shared = None;
        let mut doomed = Vec::new();
        for &member in members {
            if Some(member) == except {
                continue;
            }
            let c = self
                .conns
                .get_mut(&member)
                .expect("members have connections");
            if c.paused {
                if c.queue.len() + bytes.len() > self.config.max_queue {
                    doomed.push(member);
                } else {
                    c.queue.extend_from_slice(&bytes);
                }
                continue;
            }
            let index = *shared.get_or_insert_with(|| out.shared(bytes.clone()));
            out.act(member, Action::Write(index));
        }
        for member in doomed {
            self.doom(member);
        }
    }

    /// Removes `conn` from its topic and tells the others.
    fn leave(&mut self, conn: u64, reason: LeaveReason, out: &mut Outbox) {
        if let Some(joining) = self.joining.remove(&conn) {
            // It never joined here, but the cluster was told it would.
            if let Some(remote) = self.remote.get_mut(&joining.topic) {
                remote.waiting.retain(|waiting| *waiting != conn);
            }
            self.left_cluster(joining.topic, joining.peer, out);
            return;
        }
        let Some(member) = self.registry.leave(conn) else {
            return;
        };
        let mut left = Vec::new();
        message::push_peer_left(&mut left, member.peer.as_str());
        self.broadcast(&member.topic, None, left, out);
        self.metrics.add(cell(family::LEFT, reason as usize), 1);
        if self.config.cluster_node.is_some() {
            self.left_cluster(Arc::clone(&member.topic), member.peer, out);
        }
        out.left.push((member.peer, member.topic, reason));
    }

    /// Tells the cluster a local peer left; forgets the topic's remote
    /// members once no local peer is in it or waiting for it.
    fn left_cluster(&mut self, topic: Arc<str>, peer: PeerId, out: &mut Outbox) {
        let idle = self.registry.members(&topic).is_empty()
            && self
                .remote
                .get(&topic)
                .is_some_and(|r| r.waiting.is_empty());
        if idle {
            self.remote.remove(&topic);
        }
        out.cluster.push(ClusterOp::Leave { topic, peer });
    }

    /// Server-side close: the peer leaves at once, is sent an optional
    /// `error`, then the close frame and FIN, and has `close_timeout` to
    /// close its side. What it still had queued is dropped.
    #[allow(clippy::too_many_arguments)]
    fn close(
        &mut self,
        conn: u64,
        code: u16,
        reason: &str,
        error: Option<ErrorCode>,
        why: LeaveReason,
        now: Instant,
        out: &mut Outbox,
    ) {
        match self.conns.get(&conn) {
            Some(c) if c.state == State::Open => {}
            _ => return,
        }
        self.leave(conn, why, out);
        let c = self.conns.get_mut(&conn).expect("checked above");
        c.state = State::Closing { since: now };
        c.queue = Vec::new();
        let buf = out.private(conn);
        if let Some(error) = error {
            message::push_error(buf, error, None);
            self.count_error(error);
        }
        frame::push_close(buf, code, reason);
        out.act(conn, Action::Finish);
    }

    fn close_doomed(&mut self, now: Instant, out: &mut Outbox) {
        while let Some(conn) = self.doomed.pop() {
            self.close(
                conn,
                CLOSE_SLOW_CONSUMER,
                "slow consumer",
                Some(ErrorCode::SlowConsumer),
                LeaveReason::SlowConsumer,
                now,
                out,
            );
        }
    }

    /// The peer leaves its topic (if it still was in one) and its socket is
    /// on its way out: nothing more is read from or queued for it. Returns
    /// whether the connection was not already ending so.
    fn end(&mut self, conn: u64, reason: LeaveReason, out: &mut Outbox) -> bool {
        self.leave(conn, reason, out);
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        c.queue = Vec::new();
        let was_done = c.state == State::Done;
        c.state = State::Done;
        !was_done
    }

    /// The client half-closed its side (or finished our close handshake).
    pub fn eof(&mut self, conn: u64, out: &mut Outbox) {
        self.end(conn, LeaveReason::Disconnected, out);
        self.close_doomed(Instant::now(), out);
    }

    /// The socket is gone; forget the connection.
    pub fn release(&mut self, conn: u64, out: &mut Outbox) {
        self.leave(conn, LeaveReason::Disconnected, out);
        self.conns.remove(&conn);
        self.close_doomed(Instant::now(), out);
    }

    /// The transport's buffer is over its high-water mark.
    pub fn pause(&mut self, conn: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.paused = true;
        }
    }

    /// The transport drained below its low-water mark: write the queue.
    pub fn resume(&mut self, conn: u64, out: &mut Outbox) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.paused = false;
        if !c.queue.is_empty() {
            let queue = mem::take(&mut c.queue);
            let index = out.shared(queue);
            out.act(conn, Action::Write(index));
        }
    }

    /// Pings, ping timeouts and close timeouts; call a few times per
    /// `min(ping_interval, ping_timeout)`.
    pub fn tick(&mut self, now: Instant, out: &mut Outbox) {
        let mut dead = Vec::new();
        let mut ping = Vec::new();
        frame::push_ping(&mut ping);
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        for conn in conns {
            let c = self.conns.get_mut(&conn).expect("listed");
            match c.state {
                // Held until the cluster answers its join (a Redis round
                // trip, bounded by the command timeout): nothing may reach
                // it before its welcome, and its pongs are held too.
                State::Open if self.joining.contains_key(&conn) => {}
                State::Open if c.awaiting_pong => {
                    if now.saturating_duration_since(c.ping_sent) >= self.config.ping_timeout {
                        dead.push((conn, LeaveReason::PingTimeout));
                    }
                }
                State::Open => {
                    if now.saturating_duration_since(c.ping_sent) >= self.config.ping_interval {
                        c.ping_sent = now;
                        c.awaiting_pong = true;
                        self.send_must(conn, &ping, out);
                    }
                }
                State::Closing { since } => {
                    if now.saturating_duration_since(since) >= self.config.close_timeout {
                        dead.push((conn, LeaveReason::Disconnected));
                    }
                }
                State::Done => {}
            }
        }
        for (conn, reason) in dead {
            self.end(conn, reason, out);
            out.act(conn, Action::Abort);
        }
        self.close_doomed(now, out);
    }

    /// Closes every open connection with `code` (1001 when draining).
    pub fn close_all(&mut self, code: u16, reason: &str, now: Instant, out: &mut Outbox) {
        let open: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Open)
            .map(|(conn, _)| *conn)
            .collect();
        for conn in open {
            self.close(conn, code, reason, None, LeaveReason::Shutdown, now, out);
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

    // --- cluster mode -------------------------------------------------------

    /// The other nodes' members of `topic` as of `version`, which the
    /// cluster answered to a `Join` with `snapshot` or to a resync; `None`
    /// when it could not be asked (Redis is down), in which case what was
    /// known stands. Local peers are told what changed, and connections
    /// waiting to join the topic join it.
    pub fn snapshot(
        &mut self,
        topic: &str,
        snapshot: Option<(u64, FxHashMap<PeerId, RemotePeer>)>,
        now: Instant,
        out: &mut Outbox,
    ) {
        let Some(remote) = self.remote.get_mut(topic) else {
            return; // nobody here follows the topic any more
        };
        let (left, joined) = match snapshot {
            Some((version, _)) if remote.pending.is_none() && version <= remote.version => {
                return; // older than what was applied since
            }
            Some((version, members)) => remote.replace(version, members),
            None if remote.pending.is_none() => return,
            None => {
                let members = mem::take(&mut remote.members);
                remote.replace(remote.version, members)
            }
        };
        self.announce(topic, left, joined, out);
        self.greet_waiting(topic, now, out);
    }

    /// Greets the connections waiting to join `topic` with what is known of
    /// it now: once its snapshot is here, or without waiting for it any
    /// longer (Redis is slow to answer), in which case the snapshot, when it
    /// comes, tells them what they missed.
    pub fn greet_waiting(&mut self, topic: &str, now: Instant, out: &mut Outbox) {
        let Some(remote) = self.remote.get_mut(topic) else {
            return;
        };
        for conn in mem::take(&mut remote.waiting) {
            if let Some(joining) = self.joining.remove(&conn) {
                self.enter(
                    conn,
                    &joining.topic,
                    joining.peer,
                    joining.metadata,
                    now,
                    out,
                );
            }
        }
        self.close_doomed(now, out);
    }

    /// Handles a message from this node's inbox: a relay or a frame for a
    /// local peer, or a presence event of a topic.
    pub fn deliver(&mut self, data: &[u8], now: Instant, out: &mut Outbox) {
        match data.first() {
            Some(&cluster::RELAY) => self.deliver_relay(data, out),
            Some(&cluster::DIRECT) => {
                if let Some((to, frame)) = cluster::parse_direct(data) {
                    if let Some(conn) = self.registry.conn_of(&to) {
                        self.send_must(conn, frame, out);
                    }
                }
            }
            Some(b'{') => {
                if let Some((topic, event)) = cluster::parse_presence(data) {
                    self.presence(&topic, event, out);
                }
            }
            _ => {}
        }
        self.close_doomed(now, out);
    }

    fn presence(&mut self, topic: &str, event: cluster::Presence, out: &mut Outbox) {
        if event.dead {
            self.answer_lost(&event.left, out);
        }
        let Some(remote) = self.remote.get_mut(topic) else {
            return;
        };
        if let Some(pending) = &mut remote.pending {
            pending.push(event);
            return;
        }
        let (left, joined) = remote.apply(event);
        self.announce(topic, left, joined, out);
    }

    /// Answers `target_not_found` to the recent relays to `gone` peers,
    /// whose node died: they may have been lost with it.
    fn answer_lost(&mut self, gone: &[PeerId], out: &mut Outbox) {
        let now = Instant::now();
        let mut lost = Vec::new();
        self.forwards.retain_mut(|forward| {
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
    fn announce(
        &mut self,
        topic: &str,
        left: Vec<PeerId>,
        joined: Vec<(PeerId, RemotePeer)>,
        out: &mut Outbox,
    ) {
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

    fn deliver_relay(&mut self, data: &[u8], out: &mut Outbox) {
        let Some(relay) = cluster::parse_relay(data) else {
            return;
        };
        let bounce = match self.registry.conn_of(&relay.to) {
            Some(conn) => {
                let write = |buf: &mut Vec<u8>| buf.extend_from_slice(relay.frame);
                match self.queue_or_write(conn, out, write) {
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
            None => {
                self.count_relay(relay::TARGET_NOT_FOUND);
                ErrorCode::TargetNotFound
            }
        };
        self.count_error(bounce);
        let mut message = Vec::new();
        cluster::push_direct(&mut message, &relay.from, |frame| {
            message::push_error(frame, bounce, relay.msg_id)
        });
        out.cluster.push(ClusterOp::Publish {
            node: Arc::from(relay.origin),
            message,
        });
    }

    /// A relay this node published did not arrive: no node listens on the
    /// target's inbox (`unreachable`: the target is gone, its sender gets
    /// `target_not_found` and everyone here a `peer-left`), or Redis could
    /// not be reached (its sender gets `dropped`).
    pub fn undeliverable(
        &mut self,
        data: &[u8],
        unreachable: bool,
        now: Instant,
        out: &mut Outbox,
    ) {
        let Some(relay) = cluster::parse_relay(data) else {
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
            .remote
            .get_mut(&topic)
            .and_then(|remote| remote.members.remove(&relay.to));
        if gone.is_some() {
            self.announce(&topic, vec![relay.to], Vec::new(), out);
            out.cluster.push(ClusterOp::Leave {
                topic,
                peer: relay.to,
            });
        }
        self.close_doomed(now, out);
    }

    /// Every topic this node follows, with its local peers (and those
    /// about to join): what the cluster must hold of this node.
    #[allow(clippy::type_complexity)]
    pub fn local_members(&self) -> Vec<(Arc<str>, Vec<(PeerId, Option<&str>)>)> {
        self.remote
            .iter()
            .map(|(topic, remote)| {
                let members = self.registry.members(topic).iter().map(|conn| {
                    let member = self.registry.member(*conn).expect("listed members exist");
                    (member.peer, member.metadata.as_deref())
                });
                let waiting = remote.waiting.iter().filter_map(|conn| {
                    let joining = self.joining.get(conn)?;
                    Some((joining.peer, joining.metadata.as_deref()))
                });
                (Arc::clone(topic), members.chain(waiting).collect())
            })
            .collect()
    }

    /// Starts resynchronising every topic (after Redis came back): presence
    /// events wait until the topic's snapshot is here.
    pub fn begin_resync(&mut self) {
        for remote in self.remote.values_mut() {
            remote.pending.get_or_insert_with(Vec::new);
        }
    }

    /// The other nodes that hold members of this node's topics.
    pub fn remote_nodes(&self) -> Vec<Arc<str>> {
        let mut nodes: Vec<Arc<str>> = Vec::new();
        for remote in self.remote.values() {
            for peer in remote.members.values() {
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

#[cfg(test)]
#[path = "engine_cluster_tests.rs"]
mod cluster_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::apply_mask;

    /// Text of the frames written to `conn`, decoded; "<close N>" for a
    /// close frame, "<ping>"/"<pong>" for control frames.
    pub(super) fn written(out: &Outbox, conn: u64) -> Vec<String> {
        let mut bytes = Vec::new();
        for (c, action) in &out.actions {
            if let (true, Action::Write(i)) = (*c == conn, action) {
                bytes.extend_from_slice(&out.bufs[*i]);
            }
        }
        decode(&bytes)
    }

    fn decode(mut bytes: &[u8]) -> Vec<String> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let (len, start) = match bytes[1] {
                126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            let payload = &bytes[start..start + len];
            frames.push(match bytes[0] & 0x0f {
                1 => String::from_utf8(payload.to_vec()).unwrap(),
                8 => format!("<close {}>", u16::from_be_bytes([payload[0], payload[1]])),
                9 => "<ping>".into(),
                10 => "<pong>".into(),
                op => format!("<op {op}>"),
            });
            bytes = &bytes[start + len..];
        }
        frames
    }

    pub(super) fn text(payload: &str) -> Vec<u8> {
        masked(0x81, payload.as_bytes())
    }

    pub(super) fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let key = [1, 2, 3, 4];
        let mut out = vec![first, 0x80 | payload.len() as u8];
        out.extend_from_slice(&key);
        let mut body = payload.to_vec();
        apply_mask(&mut body, key);
        out.extend(body);
        out
    }

    struct Harness {
        engine: Engine<()>,
        out: Outbox,
        now: Instant,
    }

    impl Harness {
        fn new(config: Config) -> Self {
            Self {
                engine: Engine::new(config),
                out: Outbox::default(),
                now: Instant::now(),
            }
        }

        fn join(&mut self, topic: &str) -> (u64, String) {
            self.out.clear();
            let (conn, peer) = self.engine.join((), topic, None, self.now, &mut self.out);
            (conn, peer.expect("admitted").as_str().to_owned())
        }

        fn send(&mut self, conn: u64, bytes: &[u8]) {
            self.out.clear();
            self.engine.receive(conn, bytes, self.now, &mut self.out);
        }
    }

    #[test]
    fn join_relay_leave() {
        let mut h = Harness::new(Config::default());
        let (a, a_id) = h.join("room");
        assert_eq!(written(&h.out, a).len(), 2);
        let (b, b_id) = h.join("room");
        assert_eq!(
            written(&h.out, a),
            vec![format!(r#"{{"type":"peer-joined","peerId":"{b_id}"}}"#)]
        );
        assert_eq!(
            written(&h.out, b)[1],
            format!(r#"{{"type":"peer-list","peers":[{{"id":"{a_id}"}}]}}"#)
        );
        h.send(
            a,
            &text(&format!(
                r#"{{"type":"offer","to":"{b_id}","payload":{{"x":1}},"msgId":"m"}}"#
            )),
        );
        assert_eq!(
            written(&h.out, b),
            vec![format!(
                r#"{{"type":"offer","from":"{a_id}","payload":{{"x":1}},"msgId":"m"}}"#
            )]
        );
        h.send(a, &masked(0x88, &1000u16.to_be_bytes()));
        assert_eq!(written(&h.out, a), vec!["<close 1000>"]);
        assert!(h.out.actions.contains(&(a, Action::Close)));
        assert_eq!(
            written(&h.out, b),
            vec![format!(r#"{{"type":"peer-left","peerId":"{a_id}"}}"#)]
        );
        assert_eq!(h.engine.peer_count(), 1);
    }

    #[test]
    fn many_messages_in_one_chunk_are_one_write() {
        let mut h = Harness::new(Config::default());
        let (a, _) = h.join("room");
        let (b, b_id) = h.join("room");
        let msg = text(&format!(r#"{{"type":"ice-candidate","to":"{b_id}"}}"#));
        let chunk: Vec<u8> = msg.iter().copied().cycle().take(msg.len() * 5).collect();
        h.send(a, &chunk);
        let writes: Vec<_> = h.out.actions.iter().filter(|(c, _)| *c == b).collect();
        assert_eq!(writes.len(), 1);
        assert_eq!(written(&h.out, b).len(), 5);
    }

    #[test]
    fn errors_keep_the_connection_open() {
        let mut h = Harness::new(Config::default());
        let (a, _) = h.join("room");
        h.send(a, &text("nope"));
        h.send(a, &masked(0x82, b"bin"));
        assert!(written(&h.out, a)[0].contains("unsupported_frame"));
        h.send(
            a,
            &text(r#"{"type":"offer","to":"01ARZ3NDEKTSV4RRFFQ69G5FAV","msgId":"q"}"#),
        );
        assert!(written(&h.out, a)[0]
            .contains(r#""code":"target_not_found","message":"peer not found","msgId":"q""#));
        assert_eq!(h.engine.peer_count(), 1);
    }

    #[test]
    fn protocol_fault_closes_with_its_code() {
        let mut h = Harness::new(Config::default());
        let (a, _) = h.join("room");
        let (b, _) = h.join("room");
        h.send(a, &masked(0x81, &[0xff]));
        assert_eq!(written(&h.out, a), vec!["<close 1007>"]);
        assert!(h.out.actions.contains(&(a, Action::Finish)));
        assert!(written(&h.out, b)[0].contains("peer-left"));
    }

    #[test]
    fn full_queue_drops_relays_and_dooms_on_presence() {
        let config = Config {
            max_queue: 200,
            ..Config::default()
        };
        let mut h = Harness::new(config);
        let (a, _) = h.join("room");
        let (b, b_id) = h.join("room");
        h.engine.pause(b);
        let offer = text(&format!(
            r#"{{"type":"offer","to":"{b_id}","payload":"xxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#
        ));
        let mut dropped = 0;
        for _ in 0..10 {
            h.send(a, &offer);
            dropped += written(&h.out, a)
                .iter()
                .filter(|m| m.contains("\"dropped\""))
                .count();
        }
        assert!(dropped > 0, "a full queue refuses relays");
        assert_eq!(
            h.engine.peer_count(),
            2,
            "a relay never disconnects the target"
        );
        // A presence event that does not fit: b is cut rather than left with a wrong view.
        let (_c, _) = h.join("room");
        assert_eq!(
            written(&h.out, b),
            vec![
                r#"{"type":"error","code":"slow_consumer","message":"outbound buffer full"}"#
                    .to_owned(),
                "<close 4008>".to_owned(),
            ]
        );
        assert!(h
            .out
            .left
            .iter()
            .any(|(_, _, why)| *why == LeaveReason::SlowConsumer));
        assert_eq!(h.engine.peer_count(), 2);
        // Resuming writes nothing more: its queue went with it.
        h.out.clear();
        h.engine.resume(b, &mut h.out);
        assert!(written(&h.out, b).is_empty());
    }

    #[test]
    fn queue_is_written_on_resume_in_order() {
        let mut h = Harness::new(Config::default());
        let (a, _) = h.join("room");
        let (b, b_id) = h.join("room");
        h.engine.pause(b);
        for i in 0..3 {
            h.send(
                a,
                &text(&format!(
                    r#"{{"type":"answer","to":"{b_id}","msgId":"{i}"}}"#
                )),
            );
            assert!(written(&h.out, b).is_empty());
        }
        h.out.clear();
        h.engine.resume(b, &mut h.out);
        let got = written(&h.out, b);
        assert_eq!(got.len(), 3);
        assert!(got[0].ends_with(r#""msgId":"0"}"#) && got[2].ends_with(r#""msgId":"2"}"#));
    }

    #[test]
    fn silent_peer_times_out() {
        let config = Config {
            ping_interval: Duration::from_millis(100),
            ping_timeout: Duration::from_millis(100),
            ..Config::default()
        };
        let mut h = Harness::new(config);
        let (a, _) = h.join("room");
        let (b, _) = h.join("room");
        h.out.clear();
        h.engine
            .tick(h.now + Duration::from_millis(100), &mut h.out);
        assert_eq!(written(&h.out, a), vec!["<ping>"]);
        // a answers, b stays silent
        h.send(a, &masked(0x8A, b""));
        h.out.clear();
        h.engine
            .tick(h.now + Duration::from_millis(200), &mut h.out);
        assert!(h.out.actions.contains(&(b, Action::Abort)));
        assert!(!h.out.actions.contains(&(a, Action::Abort)));
        assert!(written(&h.out, a).iter().any(|m| m.contains("peer-left")));
    }

    #[test]
    fn full_topic_and_full_server_refuse_with_their_codes() {
        let config = Config {
            max_peers_per_topic: 2,
            max_connections: 3,
            ..Config::default()
        };
        let mut h = Harness::new(config);
        let (a, _) = h.join("room");
        h.join("room");
        h.out.clear();
        let (c, refused) = h.engine.join((), "room", None, h.now, &mut h.out);
        assert_eq!(refused, Err(Refusal::TopicFull));
        assert_eq!(
            written(&h.out, c),
            vec![
                r#"{"type":"error","code":"topic_full","message":"topic is full"}"#.to_owned(),
                "<close 4009>".to_owned(),
            ]
        );
        assert!(
            written(&h.out, a).is_empty(),
            "the others learn nothing of it"
        );
        h.out.clear();
        let (d, refused) = h.engine.join((), "other", None, h.now, &mut h.out);
        assert_eq!(refused, Err(Refusal::ServerFull));
        assert_eq!(written(&h.out, d)[1], "<close 4029>");
        assert_eq!(h.engine.peer_count(), 2);
    }

    #[test]
    fn rate_limit_drops_then_disconnects_abusers() {
        let limit = RateLimit {
            per_second: 1.0,
            burst: 2.0,
        };
        let mut h = Harness::new(Config {
            rate_limit: Some(limit),
            ..Config::default()
        });
        let (a, _) = h.join("room");
        let (b, _) = h.join("room");
        let ping = text(r#"{"type":"ping","msgId":"p"}"#);
        let mut codes = Vec::new();
        for _ in 0..ABUSE_LIMIT + 2 {
            h.send(a, &ping);
            codes.extend(written(&h.out, a));
        }
        assert_eq!(
            codes[..2],
            [
                r#"{"type":"pong","msgId":"p"}"#,
                r#"{"type":"pong","msgId":"p"}"#
            ]
        );
        assert_eq!(
            codes[2],
            r#"{"type":"error","code":"rate_limited","message":"message rate limit exceeded","msgId":"p"}"#
        );
        assert!(codes.ends_with(&["<close 4008>".to_owned()]), "{codes:?}");
        assert!(h
            .out
            .left
            .iter()
            .any(|(_, _, why)| *why == LeaveReason::RateAbuse));
        assert!(written(&h.out, b).iter().any(|m| m.contains("peer-left")));
        // Tokens come back with time.
        let (c, _) = h.join("room");
        h.send(c, &ping);
        h.send(c, &ping);
        h.now += Duration::from_secs(1);
        h.send(c, &ping);
        assert_eq!(written(&h.out, c), vec![r#"{"type":"pong","msgId":"p"}"#]);
    }

    #[test]
    fn close_all_then_timeout_aborts() {
        let mut h = Harness::new(Config::default());
        let (a, _) = h.join("room");
        h.out.clear();
        h.engine.close_all(1001, "going away", h.now, &mut h.out);
        assert_eq!(written(&h.out, a), vec!["<close 1001>"]);
        h.out.clear();
        h.engine.tick(h.now + Duration::from_secs(3), &mut h.out);
        assert!(h.out.actions.contains(&(a, Action::Abort)));
        h.out.clear();
        h.engine.release(a, &mut h.out);
        assert_eq!(h.engine.connection_count(), 0);
        assert_eq!(h.engine.topic_count(), 0);
    }
}

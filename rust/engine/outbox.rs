//! What one engine call asks of its caller.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::wire::peer_id::PeerId;
use crate::wire::reason::LeaveReason;

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

/// Work for the worker's Redis connection, in the order it must be done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterOp {
    /// Add a local peer to the topic; `snapshot`: the caller wants the
    /// topic's members back (through `Engine::snapshot`).
    Join {
        topic: Arc<str>,
        peer: PeerId,
        metadata: Option<Box<str>>,
        snapshot: bool,
    },
    /// Replace a local peer's metadata (`None`: none).
    Update {
        topic: Arc<str>,
        peer: PeerId,
        metadata: Option<Box<str>>,
    },
    /// Remove a peer from the topic: a local one that left for `reason`,
    /// or (`None`) a remote one found gone with its node.
    Leave {
        topic: Arc<str>,
        peer: PeerId,
        reason: Option<LeaveReason>,
    },
    /// Publish `message` to `node`'s inbox. A relay (`relay`) that does
    /// not arrive comes back through `Engine::undeliverable`.
    Publish {
        node: Arc<str>,
        message: Vec<u8>,
        relay: bool,
    },
    /// Publish `message` (a resume asked of another node, for connection
    /// `conn`) to the node holding `peer` of `topic`; whether it arrived
    /// comes back through `Engine::asked`.
    Ask {
        topic: Arc<str>,
        peer: PeerId,
        conn: u64,
        message: Vec<u8>,
    },
    /// Move local peer `peer` of `topic` to node `to`, its connection
    /// `conn` there; a move that could not be comes back through
    /// `Engine::move_failed`.
    Move {
        topic: Arc<str>,
        peer: PeerId,
        to: Arc<str>,
        conn: u64,
    },
}

/// What became of a resumable session, for the caller's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEvent {
    /// Its connection was lost without a close frame: it stays in its
    /// topic, and what it is sent is kept.
    Suspended,
    /// A new connection took it over.
    Resumed,
    /// Cluster mode: a resume that another node could not honour started
    /// this new session instead.
    Joined,
}

impl SessionEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Suspended => "suspended",
            Self::Resumed => "resumed",
            Self::Joined => "joined",
        }
    }
}

/// A peer, its topic and its metadata: a join or a metadata change.
pub type MemberChange = (PeerId, Arc<str>, Option<Box<str>>);

/// What one engine call asks of the caller, in order per connection.
#[derive(Debug, Default)]
pub struct Outbox {
    pub bufs: Vec<Vec<u8>>,
    pub actions: Vec<(u64, Action)>,
    /// Peers that joined a topic during the call, with their metadata
    /// (a resumed session is no join). A peer joins in an earlier call
    /// than it leaves, or earlier in `joined` than in `left`.
    pub joined: Vec<MemberChange>,
    /// Peers whose metadata changed during the call, with the new one.
    pub updated: Vec<MemberChange>,
    /// Peers that left their topic during the call.
    pub left: Vec<(PeerId, Arc<str>, LeaveReason)>,
    /// Sessions suspended or resumed during the call.
    pub sessions: Vec<(PeerId, Arc<str>, SessionEvent)>,
    /// Work for the cluster's Redis connection (cluster mode only).
    pub cluster: Vec<ClusterOp>,
    /// The buffer each connection is still appending to: written only to
    /// that connection and its last action, so later bytes can join it.
    open: FxHashMap<u64, usize>,
    /// The bytes in `bufs` that are not WebSocket bytes (the HTTP
    /// responses of upgrades), by connection: the sent-bytes counter
    /// leaves them out.
    pub heads: Vec<(u64, u64)>,
}

impl Outbox {
    pub fn clear(&mut self) {
        self.clear_writes();
        self.clear_events();
    }

    /// Forgets the socket work (`bufs` and `actions`), once carried out.
    /// Until then later calls add to it, and bytes to a connection join
    /// its open buffer, even once its actions are taken out: what several
    /// calls send one connection can be written at once.
    pub fn clear_writes(&mut self) {
        self.bufs.clear();
        self.actions.clear();
        self.open.clear();
        self.heads.clear();
    }

    /// Forgets everything but the socket work.
    pub fn clear_events(&mut self) {
        self.joined.clear();
        self.updated.clear();
        self.left.clear();
        self.sessions.clear();
        self.cluster.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
            && self.joined.is_empty()
            && self.updated.is_empty()
            && self.left.is_empty()
            && self.sessions.is_empty()
            && self.cluster.is_empty()
    }

    /// The buffer for bytes to `conn`, coalesced with what it was already
    /// sent in this call.
    pub(super) fn private(&mut self, conn: u64) -> &mut Vec<u8> {
        let index = *self.open.entry(conn).or_insert_with(|| {
            self.bufs.push(Vec::new());
            self.actions
                .push((conn, Action::Write(self.bufs.len() - 1)));
            self.bufs.len() - 1
        });
        &mut self.bufs[index]
    }

    /// A buffer written to several connections (see [`Outbox::act`]).
    pub(super) fn shared(&mut self, bytes: Vec<u8>) -> usize {
        self.bufs.push(bytes);
        self.bufs.len() - 1
    }

    pub(super) fn act(&mut self, conn: u64, action: Action) {
        self.open.remove(&conn);
        self.actions.push((conn, action));
    }
}

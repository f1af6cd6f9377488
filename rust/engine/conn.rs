//! One connection after the upgrade: its state, what waits to be written
//! to it, and how it ends.

use std::sync::Arc;
use std::time::Instant;

use super::limits::{Bucket, Refusal};
use super::outbox::{Action, Outbox, SessionEvent};
use super::session::{Kept, Session};
use super::Engine;
use crate::metrics::{cell, family};
use crate::wire::close;
use crate::wire::frame::{self, Fault, FrameReader};
use crate::wire::message::{self, ErrorCode};
pub use crate::wire::reason::LeaveReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// A member of its topic (or, in cluster mode, about to be).
    Open,
    /// Sent a close frame and FIN; waiting for the client's FIN.
    Closing { since: Instant },
    /// Being closed or reset; waiting for `release`.
    Done,
    /// A resumable session whose connection was lost: still a member, its
    /// transport gone, what it is sent kept for a resume (`session.rs`).
    Suspended { since: Instant },
    /// Cluster mode: a session moved here from another node, whose
    /// hand-off is on its way: a member, greeted once it comes; what it is
    /// sent meanwhile is kept (`migrate.rs`).
    Arriving,
}

#[derive(Debug)]
pub(super) struct Conn<W> {
    /// None once a suspended session's socket is gone (`release`).
    pub(super) transport: Option<W>,
    pub(super) state: State,
    pub(super) reader: FrameReader,
    /// Bytes waiting for the transport to accept more (`paused`).
    pub(super) queue: Vec<u8>,
    pub(super) paused: bool,
    /// Bytes put in the outbox for it since the caller's last flush
    /// (`flush.rs`); 32 bits keep the record in a smaller heap block.
    pub(super) unflushed: u32,
    pub(super) ping_sent: Instant,
    pub(super) awaiting_pong: bool,
    /// The rate limit's bucket (`--rate-limit` only).
    pub(super) bucket: Option<Box<Bucket>>,
    /// The broadcast rate's bucket, from the first broadcast on.
    pub(super) broadcasts: Option<Box<Bucket>>,
    /// Its token fixed its metadata: `update-metadata` is `forbidden`.
    pub(super) metadata_locked: bool,
    /// A resumable session's memory of what it sent.
    pub(super) session: Option<Box<Session>>,
}

impl<W> Conn<W> {
    pub(super) fn new(transport: W, burst: Option<f64>, now: Instant) -> Self {
        Self {
            transport: Some(transport),
            bucket: burst.map(|burst| Box::new(Bucket::full(burst, now))),
            ..Self::empty(now)
        }
    }

    /// Open, without a transport, rate limit or session.
    pub(super) fn empty(now: Instant) -> Self {
        Self {
            transport: None,
            state: State::Open,
            reader: FrameReader::default(),
            queue: Vec::new(),
            paused: false,
            unflushed: 0,
            ping_sent: now,
            awaiting_pong: false,
            bucket: None,
            broadcasts: None,
            metadata_locked: false,
            session: None,
        }
    }

    pub(super) fn suspended(&self) -> bool {
        matches!(self.state, State::Suspended { .. })
    }

    /// Whether what it is sent is only kept, not written: suspended, or
    /// arriving.
    pub(super) fn keeps(&self) -> bool {
        matches!(self.state, State::Suspended { .. } | State::Arriving)
    }
}

/// How the server closes a connection: the close frame's code and reason,
/// the `error` sent before it, if any, and why the peer leaves.
#[derive(Debug, Clone, Copy)]
pub(super) struct Closing<'a> {
    pub(super) code: u16,
    pub(super) reason: &'a str,
    pub(super) error: Option<ErrorCode>,
    pub(super) why: LeaveReason,
}

impl Closing<'static> {
    pub(super) const REPLACED: Self = Self {
        code: close::REPLACED,
        reason: "replaced",
        error: None,
        why: LeaveReason::Closed,
    };
    pub(super) const KICKED: Self = Self {
        code: close::KICKED,
        reason: "kicked",
        error: Some(ErrorCode::Kicked),
        why: LeaveReason::Kicked,
    };
    pub(super) const SLOW_CONSUMER: Self = Self {
        code: close::SLOW_CONSUMER,
        reason: "slow consumer",
        error: Some(ErrorCode::SlowConsumer),
        why: LeaveReason::SlowConsumer,
    };
    pub(super) const RATE_ABUSE: Self = Self {
        code: close::SLOW_CONSUMER,
        reason: "rate limit abuse",
        error: Some(ErrorCode::SlowConsumer),
        why: LeaveReason::RateAbuse,
    };

    pub(super) fn fault(fault: Fault) -> Self {
        Self {
            code: fault.close_code(),
            reason: fault.reason(),
            error: None,
            why: LeaveReason::ProtocolError,
        }
    }

    pub(super) fn refusal(refusal: Refusal) -> Self {
        Self {
            code: refusal.close_code(),
            reason: refusal.error().message(),
            error: Some(refusal.error()),
            why: LeaveReason::Closed,
        }
    }
}

/// The outcome of queueing bytes for a connection.
pub(super) enum Queued {
    Yes,
    OverBound,
}

impl<W> Engine<W> {
    /// Writes a text message to `conn` directly, or queues it while its
    /// transport is full; a resumable session numbers it and keeps it, and
    /// a suspended one only keeps it. `OverBound` past the queue bound:
    /// the caller drops a relay, and dooms the peer for what it must see.
    pub(super) fn queue_or_write(
        &mut self,
        conn: u64,
        out: &mut Outbox,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Queued {
        let max = self.config.max_queue;
        let Some(c) = self.conns.get_mut(&conn) else {
            return Queued::OverBound;
        };
        if c.keeps() {
            let mut frame = Vec::new();
            write(&mut frame);
            let session = c
                .session
                .as_mut()
                .expect("a session that keeps is resumable");
            return match session.keep(&frame, max, true) {
                Kept::Yes => Queued::Yes,
                Kept::Over => Queued::OverBound,
            };
        }
        if !c.paused {
            let buf = out.private(conn);
            let mark = buf.len();
            write(buf);
            if let Some(session) = &mut c.session {
                session.keep(&buf[mark..], max, false);
            }
            self.flush.count(conn, c, buf.len() - mark);
            return Queued::Yes;
        }
        let mark = c.queue.len();
        write(&mut c.queue);
        if c.queue.len() > max {
            c.queue.truncate(mark);
            return Queued::OverBound;
        }
        if let Some(session) = &mut c.session {
            session.keep(&c.queue[mark..], max, false);
        }
        Queued::Yes
    }

    /// Sends a text message the peer must receive; over its bound it is
    /// doomed.
    pub(super) fn send_must(&mut self, conn: u64, bytes: &[u8], out: &mut Outbox) {
        if let Queued::OverBound =
            self.queue_or_write(conn, out, |buf| buf.extend_from_slice(bytes))
        {
            self.doom(conn);
        }
    }

    /// Sends a control frame (a ping, a pong): not a message, so neither
    /// numbered nor kept, and nothing for a suspended session.
    pub(super) fn send_control(&mut self, conn: u64, frame: &[u8], out: &mut Outbox) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.keeps() {
            return;
        }
        if !c.paused {
            out.private(conn).extend_from_slice(frame);
            self.flush.count(conn, c, frame.len());
        } else if c.queue.len() + frame.len() > self.config.max_queue {
            self.doom(conn);
        } else {
            c.queue.extend_from_slice(frame);
        }
    }

    pub(super) fn send_error(
        &mut self,
        conn: u64,
        code: ErrorCode,
        msg_id: Option<&serde_json::value::RawValue>,
        out: &mut Outbox,
    ) {
        self.count_error(code);
        let mut bytes = Vec::new();
        message::push_error(&mut bytes, code, msg_id);
        self.send_must(conn, &bytes, out);
    }

    pub(super) fn doom(&mut self, conn: u64) {
        if !self.doomed.contains(&conn) {
            self.doomed.push(conn);
        }
    }

    /// Closes the connections that a must-deliver write found over their
    /// bound (slow consumers), once the write that found them is done.
    pub(super) fn close_doomed(&mut self, now: Instant, out: &mut Outbox) {
        while let Some(conn) = self.doomed.pop() {
            self.close(conn, Closing::SLOW_CONSUMER, now, out);
        }
    }

    /// Sends `bytes` (one text message) to every member of `topic` but
    /// `except`.
    pub(super) fn broadcast(
        &mut self,
        topic: &str,
        except: Option<u64>,
        bytes: Vec<u8>,
        out: &mut Outbox,
    ) {
        self.broadcast_from(topic, except, bytes, Origin::Remote, out);
    }

    /// Sends `frame` (a client's `broadcast`) to every member of `topic`
    /// but `except`, as a relay is sent: a member over its bound misses
    /// it. Returns how many got it and how many missed it.
    pub(super) fn broadcast_message(
        &mut self,
        topic: &str,
        except: Option<u64>,
        frame: Vec<u8>,
        out: &mut Outbox,
    ) -> (usize, usize) {
        self.deliver_to_topic(topic, except, frame, Origin::Remote, Over::Miss, out)
    }

    /// [`Engine::broadcast`] of a change of this node's own members (a
    /// join, a leave): a session on its way to another node is not told,
    /// since Redis tells its new node of every such change made after the
    /// move was asked (`migrate.rs`).
    pub(super) fn broadcast_local(
        &mut self,
        topic: &str,
        except: Option<u64>,
        bytes: Vec<u8>,
        out: &mut Outbox,
    ) {
        self.broadcast_from(topic, except, bytes, Origin::Here, out);
    }

    /// A presence message every member must get: one over its bound is
    /// doomed (a slow consumer).
    fn broadcast_from(
        &mut self,
        topic: &str,
        except: Option<u64>,
        bytes: Vec<u8>,
        origin: Origin,
        out: &mut Outbox,
    ) {
        self.deliver_to_topic(topic, except, bytes, origin, Over::Doom, out);
    }

    /// Writes `bytes` (one text message, encoded once) to every member of
    /// `topic` but `except`; one over its bound is doomed or misses it
    /// (`over`). Returns how many got it and how many did not.
    fn deliver_to_topic(
        &mut self,
        topic: &str,
        except: Option<u64>,
        bytes: Vec<u8>,
        origin: Origin,
        over: Over,
        out: &mut Outbox,
    ) -> (usize, usize) {
        let max = self.config.max_queue;
        let members = self.registry.members(topic);
        let mut shared = None;
        let mut doomed = Vec::new();
        let mut reached = 0;
        for &member in members {
            if Some(member) == except {
                continue;
            }
            let c = self
                .conns
                .get_mut(&member)
                .expect("members have connections");
            if c.keeps() {
                if origin == Origin::Here && self.is_moving_away(member) {
                    continue;
                }
                let session = self
                    .conns
                    .get_mut(&member)
                    .and_then(|c| c.session.as_mut())
                    .expect("a session that keeps is resumable");
                if session.keep(&bytes, max, true) == Kept::Over {
                    doomed.push(member);
                } else {
                    reached += 1;
                }
                continue;
            }
            if c.paused {
                if c.queue.len() + bytes.len() > max {
                    doomed.push(member);
                    continue;
                }
                c.queue.extend_from_slice(&bytes);
            } else {
                let index = *shared.get_or_insert_with(|| out.shared(bytes.clone()));
                out.act(member, Action::Write(index));
                self.flush.count(member, c, bytes.len());
            }
            if let Some(session) = &mut c.session {
                session.keep(&bytes, max, false);
            }
            reached += 1;
        }
        let missed = doomed.len();
        if over == Over::Doom {
            for member in doomed {
                self.doom(member);
            }
        }
        (reached, missed)
    }

    /// The connection of a resumable session was lost without a close
    /// frame from the client: the session stays in its topic, suspended,
    /// until it is resumed or its window runs out. Returns false (and does
    /// nothing) for a connection that is not an open resumable session.
    pub(super) fn suspend(&mut self, conn: u64, now: Instant, out: &mut Outbox) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        if !(c.state == State::Open && c.session.is_some()) {
            return false;
        }
        let Some(member) = self.registry.member(conn) else {
            return false; // not joined yet (cluster mode): nothing to keep
        };
        c.state = State::Suspended { since: now };
        c.queue = Vec::new();
        c.paused = false;
        c.reader = FrameReader::default();
        self.suspended += 1;
        let topic = Arc::clone(&member.topic);
        out.sessions
            .push((member.peer, topic, SessionEvent::Suspended));
        true
    }

    /// Ends a suspended session: it leaves its topic and is forgotten.
    pub(super) fn end_suspended(&mut self, conn: u64, why: LeaveReason, out: &mut Outbox) {
        if self.conns.get(&conn).is_some_and(|c| c.suspended()) {
            self.suspended -= 1;
            self.leave(conn, why, out);
            self.conns.remove(&conn);
        }
    }

    /// Removes `conn` from its topic and tells the others.
    pub(super) fn leave(&mut self, conn: u64, reason: LeaveReason, out: &mut Outbox) {
        if self.cluster_forget_joiner(conn, reason, out) {
            return;
        }
        let Some(member) = self.registry.leave(conn) else {
            return;
        };
        let mut left = Vec::new();
        message::push_peer_left(&mut left, member.peer.as_str());
        self.broadcast_local(&member.topic, None, left, out);
        self.metrics.add(cell(family::LEFT, reason as usize), 1);
        self.cluster_left(&member.topic, member.peer, reason, out);
        out.left.push((member.peer, member.topic, reason));
    }

    /// Server-side close: the peer leaves at once, is sent an optional
    /// `error`, then the close frame and FIN, and has `close_timeout` to
    /// close its side. What it still had queued is dropped.
    pub(super) fn close(
        &mut self,
        conn: u64,
        closing: Closing<'_>,
        now: Instant,
        out: &mut Outbox,
    ) {
        match self.conns.get(&conn) {
            Some(c) if matches!(c.state, State::Open | State::Arriving) => {}
            Some(c) if c.suspended() => return self.end_suspended(conn, closing.why, out),
            _ => return,
        }
        self.leave(conn, closing.why, out);
        let c = self.conns.get_mut(&conn).expect("checked above");
        c.state = State::Closing { since: now };
        c.queue = Vec::new();
        let buf = out.private(conn);
        if let Some(error) = closing.error {
            message::push_error(buf, error, None);
            self.count_error(error);
        }
        frame::push_close(buf, closing.code, closing.reason);
        out.act(conn, Action::Finish);
    }

    /// The peer leaves its topic (if it still was in one) and its socket is
    /// on its way out: nothing more is read from or queued for it. Returns
    /// whether the connection was not already ending so.
    pub(super) fn end(&mut self, conn: u64, reason: LeaveReason, out: &mut Outbox) -> bool {
        if self.conns.get(&conn).is_some_and(|c| c.suspended()) {
            self.end_suspended(conn, reason, out);
            return false; // its socket is gone already
        }
        self.leave(conn, reason, out);
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        c.queue = Vec::new();
        let was_done = c.state == State::Done;
        c.state = State::Done;
        !was_done
    }
}

/// What becomes of a member over its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    /// It must have the message: it is closed as a slow consumer.
    Doom,
    /// It misses the message, as a relay's target does.
    Miss,
}

/// Where a presence change broadcast to a topic's members was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// By this node's own members.
    Here,
    /// On another node (cluster mode), as Redis told.
    Remote,
}

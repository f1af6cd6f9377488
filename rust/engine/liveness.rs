//! Pings, ping timeouts and close timeouts.

use std::time::Instant;

use super::conn::State;
use super::outbox::{Action, Outbox};
use super::{Engine, LeaveReason};
use crate::wire::frame;

/// One of `of` parts of the connections. A key's part is its Fibonacci
/// hash scaled to `of`: keys handed out in turn fall in the parts in turn,
/// and so do keys of any stride (every other one refused, say), where a
/// plain modulo would leave parts empty and others twice as full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    index: u64,
    of: u64,
}

impl Part {
    /// Every connection.
    pub const ALL: Part = Part { index: 0, of: 1 };

    /// Part `index` of `of` (`index` is taken modulo `of`; `of` 0 is 1).
    pub fn new(index: u64, of: u64) -> Self {
        let of = of.max(1);
        Part {
            index: index % of,
            of,
        }
    }

    /// The part a sweep over all parts starts with.
    pub fn is_first(self) -> bool {
        self.index == 0
    }

    pub fn holds(self, conn: u64) -> bool {
        let hash = conn.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((u128::from(hash) * u128::from(self.of)) >> 64) as u64 == self.index
    }
}

impl<W> Engine<W> {
    /// Pings, ping timeouts and close timeouts of every connection; see
    /// `tick_part`.
    pub fn tick(&mut self, now: Instant, out: &mut Outbox) {
        self.tick_part(now, Part::ALL, out);
    }

    /// Pings, ping timeouts and close timeouts of one part of the
    /// connections; call each part in turn, all of them a few times per
    /// `min(ping_interval, ping_timeout)`.
    ///
    /// In parts, because pings due together go out together and their
    /// pongs come back together: peers that joined in the same second
    /// would be pinged in the same burst every `ping_interval`, and with
    /// 100,000 held such a burst (a write per ping, a read per pong) held
    /// up the relays behind it by tens of milliseconds. A peer pinged in
    /// one part is pinged in the same part the next time, so the bursts
    /// stay a part's size.
    pub fn tick_part(&mut self, now: Instant, part: Part, out: &mut Outbox) {
        if part.is_first() {
            // Connections that ended while paused.
            let conns = &self.conns;
            self.paused_at.retain(|conn, _| conns.contains_key(conn));
        }
        let mut dead = Vec::new();
        let mut ping = Vec::new();
        frame::push_ping(&mut ping);
        let conns: Vec<u64> = (self.conns.keys().copied())
            .filter(|conn| part.holds(*conn))
            .collect();
        let window = self.config.resume_window.unwrap_or_default();
        for conn in conns {
            // Held until the cluster answers its join (a Redis round trip,
            // bounded by the command timeout): nothing may reach it before
            // its welcome, and its pongs are held too.
            if self.cluster_holds(conn) {
                continue;
            }
            let c = self.conns.get_mut(&conn).expect("listed");
            match c.state {
                State::Open if c.awaiting_pong => {
                    if now.saturating_duration_since(c.ping_sent) >= self.config.ping_timeout {
                        dead.push((conn, LeaveReason::PingTimeout));
                    }
                }
                State::Open => {
                    if now.saturating_duration_since(c.ping_sent) >= self.config.ping_interval {
                        c.ping_sent = now;
                        c.awaiting_pong = true;
                        if let Some(session) = &mut c.session {
                            session.pinged();
                        }
                        self.send_control(conn, &ping, out);
                    }
                }
                State::Closing { since } => {
                    if now.saturating_duration_since(since) >= self.config.close_timeout {
                        dead.push((conn, LeaveReason::Disconnected));
                    }
                }
                State::Suspended { since } => {
                    // A session on its way to another node ends there, or
                    // here if the move fails (bounded by MOVE_WAIT).
                    if now.saturating_duration_since(since) >= window && !self.is_moving_away(conn)
                    {
                        self.end_suspended(conn, LeaveReason::Expired, out);
                    }
                }
                State::Done | State::Arriving => {}
            }
        }
        for (conn, reason) in dead {
            // A resumable session outlives a dead connection.
            if reason != LeaveReason::PingTimeout || !self.suspend(conn, now, out) {
                self.end(conn, reason, out);
            }
            out.act(conn, Action::Abort);
        }
        self.expire_broadcasts(now, out);
        self.close_doomed(now, out);
    }
}

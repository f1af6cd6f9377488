//! Pings, ping timeouts and close timeouts.

use std::time::Instant;

use super::conn::State;
use super::outbox::{Action, Outbox};
use super::{Engine, LeaveReason};
use crate::wire::frame;

impl<W> Engine<W> {
    /// Pings, ping timeouts and close timeouts; call a few times per
    /// `min(ping_interval, ping_timeout)`.
    pub fn tick(&mut self, now: Instant, out: &mut Outbox) {
        // Connections that ended while paused.
        let conns = &self.conns;
        self.paused_at.retain(|conn, _| conns.contains_key(conn));
        let mut dead = Vec::new();
        let mut ping = Vec::new();
        frame::push_ping(&mut ping);
        let conns: Vec<u64> = self.conns.keys().copied().collect();
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

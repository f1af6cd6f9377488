//! Resuming a session on a new connection (PROTOCOL.md section 5): the
//! token checked, the old connection taken over or forgotten, the new one
//! greeted with the same peer id and everything its client had not
//! received.

use std::sync::Arc;
use std::time::Instant;

use super::conn::{Closing, LeaveReason, State};
use super::outbox::{Outbox, SessionEvent};
use super::{Engine, JoinRequest, Now};

use crate::metrics::{cell, family, resume as result};
use crate::wire::peer_id::PeerId;
use crate::wire::resume::{token, verify};

/// A resume that can be honoured: done, or asked of another node.
pub(super) enum Resume {
    Done(PeerId),
    Asked(PeerId),
}

impl<W> Engine<W> {
    /// Resumes the session that `token` names on the new connection `conn`
    /// and returns its peer, if it can be honoured; else the caller makes
    /// `conn` a new peer, and no session but one whose token this is (and
    /// whose messages are lost) ends.
    pub(super) fn resume_session(
        &mut self,
        conn: u64,
        request: &JoinRequest<'_>,
        token: &str,
        seen: Option<u64>,
        now: Now,
        out: &mut Outbox,
    ) -> Option<PeerId> {
        let outcome = self.try_resume(conn, request, token, seen, now, out);
        let counted = match outcome {
            Ok(Resume::Asked(peer)) => return Some(peer), // counted once answered
            Ok(Resume::Done(_)) => result::RESUMED,
            Err(refused) => refused,
        };
        self.metrics.add(cell(family::RESUMES, counted), 1);
        if let Some(c) = self.conns.get_mut(&conn) {
            if outcome.is_err() {
                // The client asked for a session: it gets a new one.
                c.session = self.config.resume_window.map(|_| Box::default());
                if let Some(session) = &mut c.session {
                    session.refused = true;
                }
            }
        }
        outcome
            .ok()
            .map(|(Resume::Done(peer) | Resume::Asked(peer))| peer)
    }

    fn try_resume(
        &mut self,
        conn: u64,
        request: &JoinRequest<'_>,
        token: &str,
        seen: Option<u64>,
        now: Now,
        out: &mut Outbox,
    ) -> Result<Resume, usize> {
        let topic = request.topic;
        self.config.resume_window.ok_or(result::GONE)?;
        let (peer, count) =
            verify(&self.config.resume_secret, topic, token).ok_or(result::FORGED)?;
        let Some(old) = self.registry.conn_of(&peer) else {
            // Cluster mode: the session may be on another node.
            let ask = self.ask_for_session(conn, request, peer, count, seen, now.instant);
            let ask = ask.ok_or(result::GONE)?;
            out.cluster.push(ask);
            return Ok(Resume::Asked(peer));
        };
        let c = self.conns.get(&old).ok_or(result::GONE)?;
        let session = c.session.as_ref().ok_or(result::GONE)?;
        if session.resumes != count || self.is_leaving(&peer) {
            return Err(result::USED);
        }
        let replay = seen.and_then(|seen| session.after(seen));
        let Some(replay) = replay else {
            // A genuine token, but what the client missed is not all kept:
            // its old session ends, and it starts afresh.
            self.end_session(old, now.instant, out);
            return Err(result::UNREPLAYABLE);
        };
        let was_suspended = c.suspended();
        let mut session = self
            .conns
            .get_mut(&old)
            .and_then(|c| c.session.take())
            .expect("checked above");
        session.restart();
        self.registry.rebind(old, conn);
        if was_suspended {
            self.conns.remove(&old);
            self.suspended -= 1;
        } else {
            // A half-dead connection the server had not noticed: it is
            // closed, without a leave, since its peer lives on.
            self.close(old, Closing::REPLACED, now.instant, out);
        }
        self.conns.get_mut(&conn).expect("just added").session = Some(session);
        let topic: Arc<str> = Arc::clone(&self.registry.member(conn).expect("rebound").topic);
        let accepted = request.accepted.unwrap_or(now.instant);
        let replay = replay.iter().map(|frame| &frame[..]);
        self.greet_resumed(conn, topic, peer, (accepted, now.instant), replay, out);
        self.close_doomed(now.instant, out);
        Ok(Resume::Done(peer))
    }

    /// Greets `conn`, which took `peer`'s session over: `welcome` with
    /// `"resumed":true` and a new token, then `replay`, what its client had
    /// not received; the caller logs it as resumed. `times`: when the
    /// connection was accepted, and now.
    pub(super) fn greet_resumed<'a>(
        &mut self,
        conn: u64,
        topic: Arc<str>,
        peer: PeerId,
        (accepted, now): (Instant, Instant),
        replay: impl IntoIterator<Item = &'a [u8]>,
        out: &mut Outbox,
    ) {
        let extra = self.resume_field(conn, &topic, peer, Some(true));
        self.push_welcome(conn, peer, &extra, accepted, now, out);
        for frame in replay {
            self.send_must(conn, frame, out);
        }
        out.sessions.push((peer, topic, SessionEvent::Resumed));
    }

    /// Ends the session of connection `conn`, suspended or not.
    pub(super) fn end_session(&mut self, conn: u64, now: Instant, out: &mut Outbox) {
        match self.conns.get(&conn).map(|c| c.state) {
            Some(State::Suspended { .. }) => self.end_suspended(conn, LeaveReason::Closed, out),
            Some(State::Open) => self.close(conn, Closing::REPLACED, now, out),
            _ => {}
        }
    }

    /// The `resumeToken` (and `resumed`) fields of `welcome` for a
    /// resumable session; empty for a connection without one.
    pub(super) fn resume_field(
        &self,
        conn: u64,
        topic: &str,
        peer: PeerId,
        resumed: Option<bool>,
    ) -> String {
        let Some(session) = self.conns.get(&conn).and_then(|c| c.session.as_ref()) else {
            return String::new();
        };
        let token = token(&self.config.resume_secret, topic, &peer, session.resumes);
        let resumed = resumed.or(session.refused.then_some(false));
        match resumed {
            Some(resumed) => format!(",\"resumeToken\":\"{token}\",\"resumed\":{resumed}"),
            None => format!(",\"resumeToken\":\"{token}\""),
        }
    }
}

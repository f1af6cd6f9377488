//! What the admin API asks of one worker (PROTOCOL.md section 10): its
//! topics, a topic's peers, a kick, a server message. The caller (the
//! server's HTTP side) gathers the answers of every worker.

use serde_json::value::RawValue;

use super::conn::{Closing, LeaveReason};
use super::outbox::Outbox;
use super::Engine;
use crate::wire::message;
use crate::wire::peer_id::PeerId;
use std::time::Instant;

/// One peer as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub id: PeerId,
    pub metadata: Option<Box<str>>,
    /// When it joined: its id's milliseconds since the Unix epoch.
    pub since_ms: u64,
    pub suspended: bool,
}

/// What became of a request about one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    Topic,
    Peer,
}

impl<W> Engine<W> {
    /// Every local topic with its number of peers, suspended ones included.
    pub fn topic_counts(&self) -> Vec<(String, usize)> {
        self.registry
            .topics()
            .map(|(name, count)| (name.to_string(), count))
            .collect()
    }

    /// The local peers of `topic`, oldest first; `None` if it has none.
    pub fn peer_views(&self, topic: &str) -> Option<Vec<PeerView>> {
        let members = self.registry.members(topic);
        if members.is_empty() {
            return None;
        }
        let mut views: Vec<PeerView> = members
            .iter()
            .filter_map(|conn| {
                let member = self.registry.member(*conn)?;
                Some(PeerView {
                    id: member.peer,
                    metadata: member.metadata.clone(),
                    since_ms: member.peer.millis(),
                    suspended: self.conns.get(conn).is_some_and(|c| c.suspended()),
                })
            })
            .collect();
        views.sort_by_key(|view| view.id);
        Some(views)
    }

    /// Removes `peer` from `topic`: it is sent `kicked` and closed with
    /// 4010 (a suspended session just ends), and the others get
    /// `peer-left`.
    pub fn kick(
        &mut self,
        topic: &str,
        peer: &PeerId,
        now: Instant,
        out: &mut Outbox,
    ) -> Result<(), Missing> {
        let conn = self.local_peer(topic, peer)?;
        if self.conns.get(&conn).is_some_and(|c| c.suspended()) {
            self.end_suspended(conn, LeaveReason::Kicked, out);
        } else {
            self.close(conn, Closing::KICKED, now, out);
        }
        self.close_doomed(now, out);
        Ok(())
    }

    /// Sends `{"type":"server-message","payload":...}` to `to`, or to every
    /// peer of `topic`, as a relay is sent (kept for a suspended session;
    /// missed by a peer whose queue is full). Returns how many it reached.
    pub fn server_message(
        &mut self,
        topic: &str,
        to: Option<&PeerId>,
        payload: &RawValue,
        now: Instant,
        out: &mut Outbox,
    ) -> Result<usize, Missing> {
        let targets = match to {
            Some(peer) => vec![self.local_peer(topic, peer)?],
            None => {
                let members = self.registry.members(topic);
                if members.is_empty() {
                    return Err(Missing::Topic);
                }
                members.to_vec()
            }
        };
        let mut frame = Vec::new();
        message::push_server_message(&mut frame, payload);
        let reached = targets
            .into_iter()
            .filter(|conn| {
                let queued = self.queue_or_write(*conn, out, |buf| buf.extend_from_slice(&frame));
                matches!(queued, super::conn::Queued::Yes)
            })
            .count();
        self.close_doomed(now, out);
        Ok(reached)
    }

    /// The connection of `peer` if it is a local member of `topic`.
    fn local_peer(&self, topic: &str, peer: &PeerId) -> Result<u64, Missing> {
        if self.registry.members(topic).is_empty() {
            return Err(Missing::Topic);
        }
        let conn = self.registry.conn_of(peer).ok_or(Missing::Peer)?;
        let member = self.registry.member(conn).ok_or(Missing::Peer)?;
        if *member.topic != *topic {
            return Err(Missing::Peer);
        }
        Ok(conn)
    }
}

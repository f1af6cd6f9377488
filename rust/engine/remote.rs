//! What a node knows of one topic's members on other nodes (cluster mode).
//!
//! Remote membership changes arrive as presence events, published by the
//! Redis functions that change the topic (see the server's `cluster.lua`)
//! in the order Redis ran them, each with the topic's version then. A node
//! that starts following a topic takes a snapshot (version `v`) and applies
//! only later events; events that arrive while the snapshot is on its way
//! wait for it.

use rustc_hash::FxHashMap;

use crate::wire::cluster::{Presence, RemotePeer};
use crate::wire::peer_id::PeerId;

/// What a worker knows of one topic's remote members. It exists while the
/// worker has members of the topic, or connections waiting to become so.
#[derive(Debug, Default)]
pub struct RemoteTopic {
    pub members: FxHashMap<PeerId, RemotePeer>,
    /// The version of the last snapshot or event applied.
    pub version: u64,
    /// `Some` while a snapshot is awaited: the events that came meanwhile.
    pub pending: Option<Vec<Presence>>,
    /// Connections to greet once the snapshot is here, in arrival order.
    pub waiting: Vec<u64>,
}

impl RemoteTopic {
    /// Applies `event` if it is newer than what is known; returns the
    /// changes that were news (peers that left, peers that joined).
    pub fn apply(&mut self, event: Presence) -> (Vec<PeerId>, Vec<(PeerId, RemotePeer)>) {
        if event.version <= self.version {
            return (Vec::new(), Vec::new());
        }
        self.version = event.version;
        let left = event
            .left
            .into_iter()
            .filter(|peer| self.members.remove(peer).is_some())
            .collect();
        let joined = event
            .joined
            .into_iter()
            .filter(|(peer, remote)| self.members.insert(*peer, remote.clone()).is_none())
            .collect();
        for (peer, node) in event.moved {
            if let Some(member) = self.members.get_mut(&peer) {
                member.node = node;
            }
        }
        (left, joined)
    }

    /// Replaces the members with a snapshot taken at `version`, then
    /// applies the events that waited for it; returns what changed.
    pub fn replace(
        &mut self,
        version: u64,
        members: FxHashMap<PeerId, RemotePeer>,
    ) -> (Vec<PeerId>, Vec<(PeerId, RemotePeer)>) {
        let mut left: Vec<PeerId> = self
            .members
            .keys()
            .filter(|peer| !members.contains_key(peer))
            .copied()
            .collect();
        let mut joined: Vec<(PeerId, RemotePeer)> = members
            .iter()
            .filter(|(peer, _)| !self.members.contains_key(peer))
            .map(|(peer, remote)| (*peer, remote.clone()))
            .collect();
        self.members = members;
        self.version = version;
        for event in self.pending.take().unwrap_or_default() {
            let (gone, came) = self.apply(event);
            for peer in gone {
                // Joined then left before anyone was told: no news at all.
                match joined.iter().position(|(p, _)| *p == peer) {
                    Some(index) => {
                        joined.swap_remove(index);
                    }
                    None => left.push(peer),
                }
            }
            for (peer, remote) in came {
                match left.iter().position(|p| *p == peer) {
                    Some(index) => {
                        left.swap_remove(index);
                    }
                    None => joined.push((peer, remote)),
                }
            }
        }
        (left, joined)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::cluster::testing::{id, member};

    fn remote(node: &str) -> RemotePeer {
        member(node, None)
    }

    #[test]
    fn stale_events_are_ignored_and_pending_ones_wait_for_the_snapshot() {
        let mut topic = RemoteTopic {
            pending: Some(Vec::new()),
            ..RemoteTopic::default()
        };
        // Came before the snapshot: one older than it, two newer.
        let events = vec![
            Presence {
                version: 4,
                left: vec![],
                joined: vec![(id(9), remote("n"))],
                dead: false,
                moved: vec![],
            },
            Presence {
                version: 6,
                left: vec![id(1)],
                joined: vec![(id(2), remote("n"))],
                dead: false,
                moved: vec![],
            },
            Presence {
                version: 7,
                left: vec![id(2)],
                joined: vec![(id(3), remote("n"))],
                dead: false,
                moved: vec![],
            },
        ];
        topic.pending = Some(events);
        let snapshot = [(id(1), remote("n"))].into_iter().collect();
        let (left, joined) = topic.replace(5, snapshot);
        // Before: nothing; snapshot: 1; then 1 left, 2 came and went, 3 came.
        assert_eq!(left, Vec::<PeerId>::new());
        assert_eq!(joined, vec![(id(3), remote("n"))]);
        assert_eq!(
            topic.members.keys().copied().collect::<Vec<_>>(),
            vec![id(3)]
        );
        assert_eq!(topic.version, 7);
        let (left, joined) = topic.apply(Presence {
            version: 7,
            left: vec![id(3)],
            joined: vec![],
            dead: false,
            moved: vec![],
        });
        assert!(
            left.is_empty() && joined.is_empty(),
            "a replayed event is news again"
        );
    }
}

//! What a node knows of one topic's members on other nodes (cluster mode).
//!
//! Remote membership changes arrive as presence events, published by the
//! Redis functions that change the topic (see the server's `cluster.lua`)
//! in the order Redis ran them, each with the topic's version then. A node
//! that starts following a topic takes a snapshot (version `v`) and applies
//! only later events; events that arrive while the snapshot is on its way
//! wait for it.
//!
//! A Redis that lost what it held (restarted empty) answers a resync with
//! only the members already rewritten by their nodes: the others' nodes may
//! not be back yet. Members missing from such a snapshot are *doubted*
//! rather than gone: kept, and told as left only if no event about them
//! comes within the grace their nodes have to rewrite them.

use std::mem;
use std::time::Instant;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::wire::cluster::{Presence, RemotePeer};
use crate::wire::peer_id::PeerId;

/// What changed in a topic's remote members that local peers must hear.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub left: Vec<PeerId>,
    pub joined: Vec<(PeerId, RemotePeer)>,
    /// Members whose metadata changed, with the new one.
    pub updated: Vec<(PeerId, Option<Box<str>>)>,
}

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
    /// Whether the awaited snapshot comes from a Redis that lost its data
    /// (members missing from it are doubted, not gone).
    pub forgetful: bool,
    /// Members missing from such a snapshot and not heard of since (still
    /// in `members`).
    pub doubted: FxHashSet<PeerId>,
    /// When they are given up.
    pub doubted_until: Option<Instant>,
}

impl RemoteTopic {
    /// Applies `event` if it is newer than what is known; returns the
    /// changes that were news. A member listed as joined again with other
    /// metadata changed it (`update` in cluster.lua).
    pub fn apply(&mut self, event: Presence) -> Changes {
        let mut changes = Changes::default();
        if event.version <= self.version {
            return changes;
        }
        self.version = event.version;
        if !self.doubted.is_empty() {
            for peer in event.left.iter().chain(event.joined.iter().map(|(p, _)| p)) {
                self.doubted.remove(peer);
            }
            if self.doubted.is_empty() {
                self.doubted_until = None;
            }
        }
        changes.left = event
            .left
            .into_iter()
            .filter(|peer| self.members.remove(peer).is_some())
            .collect();
        for (peer, remote) in event.joined {
            match self.members.insert(peer, remote.clone()) {
                None => changes.joined.push((peer, remote)),
                Some(old) if old.metadata != remote.metadata => {
                    changes.updated.push((peer, remote.metadata));
                }
                Some(_) => {}
            }
        }
        for (peer, node) in event.moved {
            if let Some(member) = self.members.get_mut(&peer) {
                member.node = node;
            }
        }
        changes
    }

    /// Replaces the members with a snapshot taken at `version`, then
    /// applies the events that waited for it; returns what changed.
    pub fn replace(&mut self, version: u64, members: FxHashMap<PeerId, RemotePeer>) -> Changes {
        let mut updated: Vec<(PeerId, Option<Box<str>>)> = members
            .iter()
            .filter(|(peer, remote)| {
                self.members
                    .get(peer)
                    .is_some_and(|old| old.metadata != remote.metadata)
            })
            .map(|(peer, remote)| (*peer, remote.metadata.clone()))
            .collect();
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
        let mut members = members;
        if mem::take(&mut self.forgetful) {
            // Those it lists are confirmed; those it lacks are doubted.
            self.doubted.retain(|peer| !members.contains_key(peer));
            for peer in left.drain(..) {
                let remote = self.members.remove(&peer).expect("listed");
                members.insert(peer, remote);
                self.doubted.insert(peer);
            }
        } else {
            // An exact snapshot: the doubted it lacks are in `left`.
            self.doubted.clear();
        }
        self.members = members;
        self.version = version;
        for event in self.pending.take().unwrap_or_default() {
            let Changes {
                left: gone,
                joined: came,
                updated: changed,
            } = self.apply(event);
            for (peer, metadata) in changed {
                // Told as it joins if it is news, else as an update.
                match joined.iter_mut().find(|(p, _)| *p == peer) {
                    Some((_, remote)) => remote.metadata = metadata,
                    None => updated.push((peer, metadata)),
                }
            }
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
        updated.retain(|(peer, _)| !left.contains(peer));
        Changes {
            left,
            joined,
            updated,
        }
    }

    /// The grace is over: the doubted members are gone.
    pub fn give_up_doubts(&mut self) -> Changes {
        self.doubted_until = None;
        let left = mem::take(&mut self.doubted)
            .into_iter()
            .filter(|peer| self.members.remove(peer).is_some())
            .collect();
        Changes {
            left,
            ..Changes::default()
        }
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
        let Changes { left, joined, .. } = topic.replace(5, snapshot);
        // Before: nothing; snapshot: 1; then 1 left, 2 came and went, 3 came.
        assert_eq!(left, Vec::<PeerId>::new());
        assert_eq!(joined, vec![(id(3), remote("n"))]);
        assert_eq!(
            topic.members.keys().copied().collect::<Vec<_>>(),
            vec![id(3)]
        );
        assert_eq!(topic.version, 7);
        let changes = topic.apply(Presence {
            version: 7,
            left: vec![id(3)],
            joined: vec![],
            dead: false,
            moved: vec![],
        });
        assert_eq!(
            changes,
            Changes::default(),
            "a replayed event is news again"
        );
    }

    #[test]
    fn a_member_joined_again_with_other_metadata_updated_it() {
        let mut topic = RemoteTopic::default();
        let event = |version, metadata: Option<&str>| Presence {
            version,
            left: vec![],
            joined: vec![(id(1), member("n", metadata))],
            dead: false,
            moved: vec![],
        };
        assert_eq!(topic.apply(event(1, None)).joined.len(), 1);
        let changes = topic.apply(event(2, Some("{\"n\":2}")));
        assert_eq!(changes.updated, vec![(id(1), Some(Box::from("{\"n\":2}")))]);
        assert!(changes.joined.is_empty());
        assert_eq!(topic.apply(event(3, Some("{\"n\":2}"))), Changes::default());
        // Waiting for a snapshot: an update of a member it lists is news
        // as an update; of one it does not, it is the metadata it joins with.
        topic.pending = Some(vec![event(9, Some("3"))]);
        let snapshot = [(id(1), member("n", Some("{\"n\":2}")))]
            .into_iter()
            .collect();
        let changes = topic.replace(8, snapshot);
        assert_eq!(changes.updated, vec![(id(1), Some(Box::from("3")))]);
    }
}

//! Who is in which topic.
//!
//! Members are named by the caller's connection id (`u64`) and by the peer
//! id (a ULID) the registry gives them. A topic exists exactly while it has
//! members: it is created by the first join and removed by the last leave in
//! the same call, so no joiner can be stranded in a topic being deleted.
//! One event-loop thread owns a registry; nothing here blocks or locks.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustc_hash::FxHashMap;
use ulid::Generator;

use crate::wire::peer_id::PeerId;

/// One member of a topic.
#[derive(Debug)]
pub struct Member {
    pub peer: PeerId,
    pub topic: Arc<str>,
    /// The `?metadata=` JSON text, if the peer gave one.
    pub metadata: Option<Box<str>>,
    /// Index in its topic's member list, for O(1) removal.
    slot: usize,
}

#[derive(Debug, Default)]
pub struct Registry {
    topics: FxHashMap<Arc<str>, Vec<u64>>,
    members: FxHashMap<u64, Member>,
    by_peer: FxHashMap<PeerId, u64>,
    ids: Generator,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds connection `conn` to `topic` under a new peer id. The members
    /// that were there before are `members(topic)` minus the last entry.
    ///
    /// Panics if `conn` is already a member: a connection joins once.
    #[cfg(test)]
    pub fn join(&mut self, conn: u64, topic: &str, metadata: Option<Box<str>>) -> PeerId {
        let peer = self.new_peer_id(SystemTime::now());
        self.join_as(conn, topic, metadata, peer);
        peer
    }

    /// Like [`Registry::join`], under an id from [`Registry::new_peer_id`]
    /// (given out before the join, while the cluster is asked about it).
    pub fn join_as(&mut self, conn: u64, topic: &str, metadata: Option<Box<str>>, peer: PeerId) {
        assert!(
            !self.members.contains_key(&conn),
            "connection {conn} joined twice"
        );
        let topic: Arc<str> = match self.topics.get_key_value(topic) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(topic),
        };
        let list = self.topics.entry(Arc::clone(&topic)).or_default();
        list.push(conn);
        let slot = list.len() - 1;
        self.members.insert(
            conn,
            Member {
                peer,
                topic,
                metadata,
                slot,
            },
        );
        self.by_peer.insert(peer, conn);
    }

    /// A fresh peer id, unused by any member, for a peer joining at `wall`.
    pub fn new_peer_id(&mut self, wall: SystemTime) -> PeerId {
        let mut at = wall;
        loop {
            // Monotonic within a millisecond; on the (2^80 per ms) overflow,
            // take the next millisecond rather than break ordering.
            match self.ids.generate_from_datetime(at) {
                Ok(id) => {
                    let peer = PeerId::from_ulid(id);
                    if !self.by_peer.contains_key(&peer) {
                        return peer;
                    }
                }
                Err(_) => at += Duration::from_millis(1),
            }
        }
    }

    /// Removes `conn` from its topic, removing the topic if it was the last
    /// member. Returns the member, or `None` if it was not one.
    pub fn leave(&mut self, conn: u64) -> Option<Member> {
        let member = self.members.remove(&conn)?;
        self.by_peer.remove(&member.peer);
        let list = self
            .topics
            .get_mut(&member.topic)
            .expect("a member's topic exists");
        let removed = list.swap_remove(member.slot);
        debug_assert_eq!(removed, conn);
        if let Some(&moved) = list.get(member.slot) {
            self.members
                .get_mut(&moved)
                .expect("listed members exist")
                .slot = member.slot;
        }
        if list.is_empty() {
            self.topics.remove(&member.topic);
        }
        Some(member)
    }

    /// Moves the member of connection `from` to connection `to` (a session
    /// resumed on a new connection): the same peer in the same topic.
    pub fn rebind(&mut self, from: u64, to: u64) {
        let member = self.members.remove(&from).expect("a member moves");
        let list = self
            .topics
            .get_mut(&member.topic)
            .expect("a member's topic exists");
        list[member.slot] = to;
        self.by_peer.insert(member.peer, to);
        self.members.insert(to, member);
    }

    /// The connection of peer `peer`, wherever it is.
    pub fn conn_of(&self, peer: &PeerId) -> Option<u64> {
        self.by_peer.get(peer).copied()
    }

    pub fn member(&self, conn: u64) -> Option<&Member> {
        self.members.get(&conn)
    }

    /// Replaces the metadata of `conn`'s membership; the member, if any.
    pub fn set_metadata(&mut self, conn: u64, metadata: Option<Box<str>>) -> Option<&Member> {
        let member = self.members.get_mut(&conn)?;
        member.metadata = metadata;
        Some(member)
    }

    /// The connection of peer `to`, if it is in the same topic as `from`.
    pub fn find_in_topic_of(&self, from: u64, to: &str) -> Option<u64> {
        let target = *self.by_peer.get(&PeerId::parse(to)?)?;
        let (a, b) = (self.members.get(&from)?, self.members.get(&target)?);
        Arc::ptr_eq(&a.topic, &b.topic).then_some(target)
    }

    /// The connections in `topic`, in no particular order.
    pub fn members(&self, topic: &str) -> &[u64] {
        self.topics.get(topic).map_or(&[], Vec::as_slice)
    }

    /// Every topic and its number of members, in no particular order.
    pub fn topics(&self) -> impl Iterator<Item = (&Arc<str>, usize)> {
        self.topics.iter().map(|(name, list)| (name, list.len()))
    }

    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Checks every internal invariant; for tests.
    #[cfg(test)]
    fn check(&self) {
        let mut listed = 0;
        for (name, list) in &self.topics {
            assert!(!list.is_empty(), "empty topic {name} kept");
            for (slot, conn) in list.iter().enumerate() {
                let member = &self.members[conn];
                assert_eq!(member.slot, slot);
                assert!(Arc::ptr_eq(&member.topic, name));
                assert_eq!(self.by_peer[&member.peer], *conn);
            }
            listed += list.len();
        }
        assert_eq!(listed, self.members.len());
        assert_eq!(self.by_peer.len(), self.members.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};
    use ulid::Ulid;

    #[test]
    fn join_find_leave() {
        let mut registry = Registry::new();
        let a = registry.join(1, "room", None);
        let b = registry.join(2, "room", Some("{}".into()));
        registry.join(3, "other", None);
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 26);
        assert!(Ulid::from_string(a.as_str()).is_ok());
        assert_eq!(registry.find_in_topic_of(1, b.as_str()), Some(2));
        assert_eq!(
            registry.find_in_topic_of(3, b.as_str()),
            None,
            "other topic"
        );
        assert_eq!(registry.find_in_topic_of(1, "nope"), None);
        assert_eq!(registry.topic_count(), 2);
        assert_eq!(registry.leave(1).unwrap().peer, a);
        assert!(registry.leave(1).is_none());
        assert_eq!(registry.members("room"), &[2]);
        registry.leave(2);
        assert_eq!(
            registry.topic_count(),
            1,
            "empty topic removed with its last member"
        );
        registry.check();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Join(u8, u8),
        Leave(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..16, 0u8..4).prop_map(|(c, t)| Op::Join(c, t)),
            (0u8..16).prop_map(Op::Leave),
        ]
    }

    proptest! {
        /// Against a model (connection -> topic): membership, lookups and
        /// topic lifetimes agree after every step.
        #[test]
        fn registry_matches_model(ops in prop::collection::vec(op(), 1..200)) {
            let mut registry = Registry::new();
            let mut model: BTreeMap<u64, String> = BTreeMap::new();
            let mut ids: BTreeMap<u64, PeerId> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Join(conn, topic) => {
                        let conn = u64::from(conn);
                        if model.contains_key(&conn) {
                            continue;
                        }
                        let topic = format!("t{topic}");
                        let before: BTreeSet<u64> = registry.members(&topic).iter().copied().collect();
                        let peer = registry.join(conn, &topic, None);
                        prop_assert!(!ids.values().any(|p| *p == peer), "ids are unique");
                        let after: BTreeSet<u64> = registry.members(&topic).iter().copied().collect();
                        let mut expected = before;
                        expected.insert(conn);
                        prop_assert_eq!(after, expected);
                        model.insert(conn, topic);
                        ids.insert(conn, peer);
                    }
                    Op::Leave(conn) => {
                        let conn = u64::from(conn);
                        let left = registry.leave(conn);
                        prop_assert_eq!(left.is_some(), model.remove(&conn).is_some());
                        ids.remove(&conn);
                    }
                }
                registry.check();
                let topics: BTreeSet<&String> = model.values().collect();
                prop_assert_eq!(registry.topic_count(), topics.len());
                for (conn, topic) in &model {
                    prop_assert!(registry.members(topic).contains(conn));
                    for (other, other_topic) in &model {
                        let found = registry.find_in_topic_of(*conn, ids[other].as_str());
                        prop_assert_eq!(found.is_some(), topic == other_topic);
                    }
                }
            }
        }
    }
}

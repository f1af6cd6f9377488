//! A peer's view of its topic: its `peer-list`, plus every `peer-joined`,
//! minus every `peer-left`. Events that cannot happen on a correct server
//! (a `peer-left` for a peer never seen, a second `peer-joined` for a peer
//! already in the view, ...) are counted as violations.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::client::Incoming;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Violation {
    /// `peer-left` for an id not in the view.
    UnknownLeft,
    /// `peer-joined` for an id already in the view.
    DuplicateJoined,
    /// `peer-joined` or `peer-left` naming the peer itself.
    SelfEvent,
    /// The same id twice in `peer-list`, or the peer itself in it.
    BadList,
    /// A presence event before `peer-list`, or a second `peer-list`.
    OutOfOrder,
    /// A presence message without its id.
    MissingId,
}

impl Violation {
    pub fn name(self) -> &'static str {
        match self {
            Self::UnknownLeft => "unknown_left",
            Self::DuplicateJoined => "duplicate_joined",
            Self::SelfEvent => "self_event",
            Self::BadList => "bad_list",
            Self::OutOfOrder => "out_of_order",
            Self::MissingId => "missing_id",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a view differs from the true membership.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub struct Diff {
    /// Members the view lacks.
    pub missing: usize,
    /// Ids in the view that are not members.
    pub extra: usize,
}

impl Diff {
    pub fn is_exact(self) -> bool {
        self.missing == 0 && self.extra == 0
    }
}

#[derive(Default)]
pub struct View {
    self_id: Option<Box<str>>,
    members: HashSet<Box<str>>,
    has_list: bool,
    violations: BTreeMap<Violation, u64>,
}

impl View {
    pub fn self_id(&self) -> Option<&str> {
        self.self_id.as_deref()
    }

    pub fn has_list(&self) -> bool {
        self.has_list
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|m| &**m)
    }

    pub fn violations(&self) -> &BTreeMap<Violation, u64> {
        &self.violations
    }

    fn violate(&mut self, v: Violation) -> Result<(), Violation> {
        *self.violations.entry(v).or_default() += 1;
        Err(v)
    }

    pub fn set_self(&mut self, id: &str) {
        self.self_id = Some(id.into());
    }

    /// The `peer-list`. Returns the first violation in it, if any.
    pub fn list<'a>(&mut self, ids: impl IntoIterator<Item = &'a str>) -> Result<(), Violation> {
        let mut result = if self.has_list {
            self.violate(Violation::OutOfOrder)
        } else {
            Ok(())
        };
        self.has_list = true;
        for id in ids {
            let bad = self.self_id() == Some(id) || !self.members.insert(id.into());
            if bad {
                let v = self.violate(Violation::BadList);
                result = result.and(v);
            }
        }
        result
    }

    fn check_event(&mut self, id: &str) -> Result<(), Violation> {
        if self.self_id() == Some(id) {
            return self.violate(Violation::SelfEvent);
        }
        if !self.has_list {
            return self.violate(Violation::OutOfOrder);
        }
        Ok(())
    }

    pub fn joined(&mut self, id: &str) -> Result<(), Violation> {
        let order = self.check_event(id);
        if order == Err(Violation::SelfEvent) {
            return order;
        }
        if !self.members.insert(id.into()) {
            return self.violate(Violation::DuplicateJoined);
        }
        order
    }

    pub fn left(&mut self, id: &str) -> Result<(), Violation> {
        let order = self.check_event(id);
        if order == Err(Violation::SelfEvent) {
            return order;
        }
        if !self.members.remove(id) {
            return self.violate(Violation::UnknownLeft);
        }
        order
    }

    /// Applies `welcome`, `peer-list`, `peer-joined` and `peer-left`; other
    /// messages are ignored. Returns whether the message was one of these.
    pub fn apply(&mut self, msg: &Incoming) -> Result<bool, Violation> {
        match msg.kind {
            "welcome" => {
                if let Some(id) = msg.self_id {
                    self.set_self(id);
                }
            }
            "peer-list" => {
                let ids = msg.peers.iter().flatten().map(|p| p.id);
                self.list(ids)?;
            }
            "peer-joined" | "peer-left" => {
                let Some(id) = msg.peer_id else {
                    return self.violate(Violation::MissingId).map(|()| true);
                };
                if msg.kind == "peer-joined" {
                    self.joined(id)?;
                } else {
                    self.left(id)?;
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Compares the view with the true membership of the topic, which may
    /// include the peer itself.
    pub fn compare(&self, membership: &HashSet<&str>) -> Diff {
        let me = self.self_id();
        let expected = membership.iter().filter(|m| Some(**m) != me).count();
        let present = self
            .members
            .iter()
            .filter(|m| membership.contains(&***m))
            .count();
        Diff {
            missing: expected - present,
            extra: self.members.len() - present,
        }
    }
}

/// Adds the violation counts of `view` into a report's map.
pub fn add_violations(into: &mut BTreeMap<String, u64>, view: &View) {
    for (v, n) in view.violations() {
        *into.entry(v.name().to_owned()).or_default() += n;
    }
}

const LOUD_LIMIT: usize = 20;
static LOUD: AtomicUsize = AtomicUsize::new(0);

/// Prints an impossible event on stderr as soon as it is seen (the first
/// few of a run; all of them are counted in the report).
pub fn shout(who: &str, violation: Violation, msg: &Incoming) {
    let n = LOUD.fetch_add(1, Ordering::Relaxed);
    if n < LOUD_LIMIT {
        eprintln!(
            "VIOLATION {who}: {violation} ({} {})",
            msg.kind,
            msg.peer_id.unwrap_or("")
        );
    } else if n == LOUD_LIMIT {
        eprintln!("VIOLATION ... further violations are only counted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(text: &str) -> Incoming<'_> {
        serde_json::from_str(text).unwrap()
    }

    fn joined_view() -> View {
        let mut v = View::default();
        v.apply(&msg(r#"{"type":"welcome","selfId":"ME"}"#))
            .unwrap();
        v.apply(&msg(
            r#"{"type":"peer-list","peers":[{"id":"A"},{"id":"B"}]}"#,
        ))
        .unwrap();
        v
    }

    #[test]
    fn tracks_presence() {
        let mut v = joined_view();
        assert_eq!(v.self_id(), Some("ME"));
        assert!(v.has_list());
        assert_eq!(
            v.apply(&msg(r#"{"type":"peer-joined","peerId":"C"}"#)),
            Ok(true)
        );
        assert_eq!(
            v.apply(&msg(r#"{"type":"peer-left","peerId":"A"}"#)),
            Ok(true)
        );
        assert_eq!(v.apply(&msg(r#"{"type":"pong","msgId":"x"}"#)), Ok(false));
        let mut ids: Vec<&str> = v.members().collect();
        ids.sort_unstable();
        assert_eq!(ids, ["B", "C"]);
        assert!(v.violations().is_empty());
    }

    #[test]
    fn empty_list_without_peers_field() {
        let mut v = View::default();
        v.apply(&msg(r#"{"type":"welcome","selfId":"ME"}"#))
            .unwrap();
        v.apply(&msg(r#"{"type":"peer-list"}"#)).unwrap();
        assert!(v.has_list());
        assert_eq!(v.len(), 0);
    }

    #[test]
    fn counts_impossible_events() {
        let mut v = joined_view();
        assert_eq!(v.left("Z"), Err(Violation::UnknownLeft));
        assert_eq!(v.joined("A"), Err(Violation::DuplicateJoined));
        assert_eq!(v.joined("ME"), Err(Violation::SelfEvent));
        assert_eq!(v.list(["Q"]), Err(Violation::OutOfOrder));
        assert_eq!(
            v.apply(&msg(r#"{"type":"peer-left"}"#)),
            Err(Violation::MissingId)
        );
        assert_eq!(v.violations().values().sum::<u64>(), 5);
        // The view itself stays a set.
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn bad_lists() {
        let mut v = View::default();
        v.set_self("ME");
        assert_eq!(v.list(["A", "A", "ME"]), Err(Violation::BadList));
        assert_eq!(v.violations()[&Violation::BadList], 2);
        let mut early = View::default();
        early.set_self("ME");
        assert_eq!(early.joined("A"), Err(Violation::OutOfOrder));
        assert!(early.members().any(|m| m == "A"));
    }

    #[test]
    fn compares_with_membership() {
        let v = joined_view();
        let exact: HashSet<&str> = ["ME", "A", "B"].into();
        assert!(v.compare(&exact).is_exact());
        let without_self: HashSet<&str> = ["A", "B"].into();
        assert!(v.compare(&without_self).is_exact());
        let other: HashSet<&str> = ["ME", "B", "C", "D"].into();
        assert_eq!(
            v.compare(&other),
            Diff {
                missing: 2,
                extra: 1
            }
        );
        let mut counts = BTreeMap::new();
        let mut bad = joined_view();
        let _ = bad.left("Z");
        add_violations(&mut counts, &bad);
        assert_eq!(counts["unknown_left"], 1);
    }
}

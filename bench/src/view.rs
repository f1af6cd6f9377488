//! A peer's view of its topic: its `peer-list`, plus every `peer-joined`,
//! minus every `peer-left`, with each member's metadata (as listed or
//! joined, then replaced by every `peer-updated`). Events that cannot
//! happen on a correct server (a `peer-left` for a peer never seen, a
//! second `peer-joined` for a peer already in the view, ...) are counted
//! as violations.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::client::Incoming;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Violation {
    /// `peer-left` for an id not in the view.
    UnknownLeft,
    /// `peer-updated` for an id not in the view.
    UnknownUpdated,
    /// `peer-updated` whose [`Stamp`] is not the next one of the member's
    /// metadata: an update lost, repeated, reordered or given to another peer.
    UpdateOutOfOrder,
    /// `peer-joined` for an id already in the view.
    DuplicateJoined,
    /// `peer-joined`, `peer-left` or `peer-updated` naming the peer itself.
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
            Self::UnknownUpdated => "unknown_updated",
            Self::UpdateOutOfOrder => "update_out_of_order",
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

/// The metadata of the peers whose updates are checked: who gave it (`tag`,
/// one per peer) and how many updates it has had (`seq`, 0 at the join).
/// Each `peer-updated` of such a peer must carry the next stamp of the one
/// the view holds, so a view can tell an update lost or out of order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub tag: String,
    pub seq: u64,
}

/// A [`Stamp`] read from a frame without copying its tag.
#[derive(Deserialize)]
struct StampRef<'a> {
    tag: &'a str,
    seq: u64,
}

impl Stamp {
    /// The stamp of a peer's join.
    pub fn new(tag: impl Into<String>) -> Self {
        Self {
            tag: tag.into(),
            seq: 0,
        }
    }

    /// Moves on to the stamp of the next update.
    pub fn advance(&mut self) {
        self.seq += 1;
    }

    /// The metadata's JSON text.
    pub fn text(&self) -> String {
        serde_json::to_string(self).expect("a stamp is always JSON")
    }
}

/// Whether metadata `new` may replace `old`: false only when both are
/// stamps and `new` is not the next one of `old`. Other metadata is not
/// checked.
fn follows(old: Option<&str>, new: Option<&str>) -> bool {
    fn parse(text: Option<&str>) -> Option<StampRef<'_>> {
        serde_json::from_str(text?).ok()
    }
    match (parse(old), parse(new)) {
        (Some(old), Some(new)) => new.tag == old.tag && Some(new.seq) == old.seq.checked_add(1),
        _ => true,
    }
}

#[derive(Default)]
pub struct View {
    self_id: Option<Box<str>>,
    /// Every other member and its metadata (`None`: it has none).
    members: HashMap<Box<str>, Option<Box<str>>>,
    has_list: bool,
    violations: BTreeMap<Violation, u64>,
    /// `peer-updated` messages received.
    updates: u64,
    /// The metadata each member had when it left; kept only once
    /// [`View::keep_departed`] asked for it.
    departed: Option<HashMap<Box<str>, Option<Box<str>>>>,
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
        self.members.keys().map(|m| &**m)
    }

    /// The metadata of member `id`: `None` if it is not in the view,
    /// `Some(None)` if it has none.
    pub fn metadata(&self, id: &str) -> Option<Option<&str>> {
        self.members.get(id).map(Option::as_deref)
    }

    /// How many `peer-updated` messages the view received.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// From now on, remember the metadata of every member that leaves.
    pub fn keep_departed(&mut self) {
        self.departed.get_or_insert_with(HashMap::new);
    }

    /// The metadata member `id` had when it left: `None` if it did not
    /// leave (or departures are not kept).
    pub fn departed(&self, id: &str) -> Option<Option<&str>> {
        self.departed.as_ref()?.get(id).map(Option::as_deref)
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

    /// The `peer-list`: each entry's id and metadata. Returns the first
    /// violation in it, if any.
    pub fn list<'a>(
        &mut self,
        entries: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Result<(), Violation> {
        let mut result = if self.has_list {
            self.violate(Violation::OutOfOrder)
        } else {
            Ok(())
        };
        self.has_list = true;
        for (id, metadata) in entries {
            let bad = self.self_id() == Some(id)
                || self
                    .members
                    .insert(id.into(), metadata.map(Box::from))
                    .is_some();
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

    /// A `peer-joined`; a duplicate keeps the metadata the view had.
    pub fn joined(&mut self, id: &str, metadata: Option<&str>) -> Result<(), Violation> {
        let order = self.check_event(id);
        if order == Err(Violation::SelfEvent) {
            return order;
        }
        if self.members.contains_key(id) {
            return self.violate(Violation::DuplicateJoined);
        }
        self.members.insert(id.into(), metadata.map(Box::from));
        order
    }

    pub fn left(&mut self, id: &str) -> Result<(), Violation> {
        let order = self.check_event(id);
        if order == Err(Violation::SelfEvent) {
            return order;
        }
        let Some(metadata) = self.members.remove(id) else {
            return self.violate(Violation::UnknownLeft);
        };
        if let Some(departed) = &mut self.departed {
            departed.insert(id.into(), metadata);
        }
        order
    }

    /// A `peer-updated`: the member's metadata is replaced (even when the
    /// update is out of order, so that one lost update counts once).
    pub fn updated(&mut self, id: &str, metadata: Option<&str>) -> Result<(), Violation> {
        self.updates += 1;
        let order = self.check_event(id);
        if order == Err(Violation::SelfEvent) {
            return order;
        }
        let Some(slot) = self.members.get_mut(id) else {
            return self.violate(Violation::UnknownUpdated);
        };
        let in_order = follows(slot.as_deref(), metadata);
        *slot = metadata.map(Box::from);
        if !in_order {
            return self.violate(Violation::UpdateOutOfOrder);
        }
        order
    }

    /// Applies `welcome`, `peer-list`, `peer-joined`, `peer-left` and
    /// `peer-updated`; other messages are ignored. Returns whether the
    /// message was one of these.
    pub fn apply(&mut self, msg: &Incoming) -> Result<bool, Violation> {
        match msg.kind {
            "welcome" => {
                if let Some(id) = msg.self_id {
                    self.set_self(id);
                }
            }
            "peer-list" => {
                let entries = msg
                    .peers
                    .iter()
                    .flatten()
                    .map(|p| (p.id, p.metadata.map(RawValue::get)));
                self.list(entries)?;
            }
            "peer-joined" | "peer-left" | "peer-updated" => {
                let Some(id) = msg.peer_id else {
                    return self.violate(Violation::MissingId).map(|()| true);
                };
                let metadata = msg.metadata.map(RawValue::get);
                match msg.kind {
                    "peer-joined" => self.joined(id, metadata)?,
                    "peer-left" => self.left(id)?,
                    _ => self.updated(id, metadata)?,
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
            .keys()
            .filter(|m| membership.contains(&***m))
            .count();
        Diff {
            missing: expected - present,
            extra: self.members.len() - present,
        }
    }

    /// How many members of the view hold other metadata than `truth` says
    /// they have (each member's id and metadata text, `None`: none). Only
    /// members in both are compared: [`View::compare`] counts the others.
    pub fn stale_metadata(&self, truth: &HashMap<&str, Option<&str>>) -> usize {
        self.members
            .iter()
            .filter(|(id, metadata)| {
                truth
                    .get(&***id)
                    .is_some_and(|want| *want != metadata.as_deref())
            })
            .count()
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
        assert_eq!(v.joined("A", None), Err(Violation::DuplicateJoined));
        assert_eq!(v.joined("ME", None), Err(Violation::SelfEvent));
        assert_eq!(v.list([("Q", None)]), Err(Violation::OutOfOrder));
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
        assert_eq!(
            v.list([("A", None), ("A", None), ("ME", None)]),
            Err(Violation::BadList)
        );
        assert_eq!(v.violations()[&Violation::BadList], 2);
        let mut early = View::default();
        early.set_self("ME");
        assert_eq!(early.joined("A", None), Err(Violation::OutOfOrder));
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

    #[test]
    fn tracks_metadata() {
        let mut v = View::default();
        v.keep_departed();
        v.apply(&msg(r#"{"type":"welcome","selfId":"ME"}"#))
            .unwrap();
        v.apply(&msg(
            r#"{"type":"peer-list","peers":[{"id":"A","metadata":{"name":"a"}},{"id":"B"}]}"#,
        ))
        .unwrap();
        assert_eq!(v.metadata("A"), Some(Some(r#"{"name":"a"}"#)));
        assert_eq!(v.metadata("B"), Some(None));
        assert_eq!(v.metadata("Z"), None);
        v.apply(&msg(
            r#"{"type":"peer-joined","peerId":"C","metadata":[1]}"#,
        ))
        .unwrap();
        v.apply(&msg(
            r#"{"type":"peer-updated","peerId":"B","metadata":"b"}"#,
        ))
        .unwrap();
        v.apply(&msg(
            r#"{"type":"peer-updated","peerId":"A","metadata":null}"#,
        ))
        .unwrap();
        assert_eq!(v.metadata("A"), Some(None));
        assert_eq!(v.metadata("B"), Some(Some(r#""b""#)));
        assert_eq!(v.metadata("C"), Some(Some("[1]")));
        assert_eq!(v.updates(), 2);
        v.apply(&msg(r#"{"type":"peer-left","peerId":"B"}"#))
            .unwrap();
        assert_eq!(v.departed("B"), Some(Some(r#""b""#)));
        assert_eq!(v.departed("A"), None);
        assert!(v.violations().is_empty());

        let truth: HashMap<&str, Option<&str>> = [
            ("ME", Some("x")),
            ("A", None),
            ("C", Some("[2]")),
            ("D", None),
        ]
        .into();
        assert_eq!(v.stale_metadata(&truth), 1);
    }

    #[test]
    fn checks_the_order_of_updates() {
        let mut v = joined_view();
        let mut a = Stamp::new("a");
        v.joined("S", Some(&a.text())).unwrap();
        a.advance();
        assert_eq!(a.text(), r#"{"tag":"a","seq":1}"#);
        assert_eq!(v.updated("S", Some(&a.text())), Ok(()));
        // The same update twice, one skipped, another peer's stamp.
        assert_eq!(
            v.updated("S", Some(&a.text())),
            Err(Violation::UpdateOutOfOrder)
        );
        a.seq = 3;
        assert_eq!(
            v.updated("S", Some(&a.text())),
            Err(Violation::UpdateOutOfOrder)
        );
        let mut b = Stamp::new("b");
        b.seq = 4;
        assert_eq!(
            v.updated("S", Some(&b.text())),
            Err(Violation::UpdateOutOfOrder)
        );
        // Metadata that is not a stamp is not checked.
        assert_eq!(v.updated("A", Some("{}")), Ok(()));
        assert_eq!(v.updated("A", Some(&a.text())), Ok(()));
        assert_eq!(v.updated("Z", None), Err(Violation::UnknownUpdated));
        assert_eq!(v.updated("ME", None), Err(Violation::SelfEvent));
        assert_eq!(
            v.apply(&msg(r#"{"type":"peer-updated","metadata":{}}"#)),
            Err(Violation::MissingId)
        );
        assert_eq!(v.violations()[&Violation::UpdateOutOfOrder], 3);
        assert_eq!(v.violations().values().sum::<u64>(), 6);
        let mut early = View::default();
        let _ = early.joined("A", None);
        assert_eq!(early.updated("A", None), Err(Violation::OutOfOrder));
    }
}

//! The engine in cluster mode, sans-I/O: what it asks of Redis, and what
//! it does with what comes back.

use super::cluster::{ClusterOp, DOUBT_GRACE};
use super::tests::{at, masked, request, text, written};
use super::*;
use crate::wire::cluster;
use crate::wire::cluster::testing::{id as rid, member as remote};
use serde_json::value::RawValue;
use std::time::Duration;

/// This engine's node name.
const HERE: &str = "n1";

/// An engine of a node and the outbox of its last call.
pub(super) struct Node {
    pub(super) engine: Engine<()>,
    pub(super) out: Outbox,
    pub(super) now: Instant,
}

impl Node {
    fn new() -> Self {
        Self::named(HERE)
    }

    /// An engine of node `name`.
    pub(super) fn named(name: &str) -> Self {
        Self {
            engine: Engine::new(Config {
                cluster_node: Some(Arc::from(name)),
                ..Config::default()
            }),
            out: Outbox::default(),
            now: Instant::now(),
        }
    }

    fn join(&mut self, topic: &str, metadata: Option<&str>) -> (u64, PeerId) {
        let (conn, joined) = self.join_with(request(topic, metadata));
        (conn, joined.expect("admitted").peer)
    }

    pub(super) fn join_with(&mut self, request: JoinRequest<'_>) -> (u64, Result<Joined, Refusal>) {
        self.out.clear();
        self.engine.join((), request, at(self.now), &mut self.out)
    }

    /// The first local peer of `topic`, greeted with a snapshot at `v`.
    fn first(&mut self, topic: &str, v: u64, remote: &[Member<'_>]) -> (u64, PeerId) {
        let (conn, peer) = self.join(topic, None);
        self.snapshot(topic, v, remote);
        assert_eq!(written(&self.out, conn)[0], welcome(&peer));
        (conn, peer)
    }

    pub(super) fn send(&mut self, conn: u64, bytes: &[u8]) {
        self.out.clear();
        self.engine.receive(conn, bytes, self.now, &mut self.out);
    }

    pub(super) fn deliver(&mut self, data: &[u8]) {
        self.out.clear();
        self.engine.deliver(data, at(self.now), &mut self.out);
    }

    pub(super) fn snapshot(&mut self, topic: &str, v: u64, members: &[Member<'_>]) {
        let members = members
            .iter()
            .map(|(peer, node, metadata)| (*peer, remote(node, *metadata)))
            .collect();
        self.out.clear();
        self.engine
            .snapshot(topic, Some((v, members)), at(self.now), &mut self.out);
    }

    fn undeliverable(&mut self, message: &[u8], unreachable: bool) {
        self.out.clear();
        self.engine
            .undeliverable(message, unreachable, self.now, &mut self.out);
    }

    pub(super) fn release(&mut self, conn: u64) {
        self.out.clear();
        self.engine.release(conn, self.now, &mut self.out);
    }

    /// The remote members of `topic` as the engine knows them, sorted.
    fn remote_members(&self, topic: &str) -> Vec<PeerId> {
        let mut peers: Vec<PeerId> = self
            .engine
            .cluster
            .as_ref()
            .and_then(|cluster| cluster.remote.get(topic))
            .map(|r| r.members.keys().copied().collect())
            .unwrap_or_default();
        peers.sort();
        peers
    }

    /// The message `from` relays to `to` on node `node`: the one `Publish`
    /// the call emitted.
    fn relay_to(&mut self, from: u64, to: &PeerId, msg_id: &str, node: &str) -> Vec<u8> {
        self.send(
            from,
            &text(&format!(
                r#"{{"type":"offer","to":"{}","msgId":"{msg_id}"}}"#,
                to.as_str()
            )),
        );
        match self.out.cluster.as_slice() {
            [ClusterOp::Publish {
                node: to_node,
                message,
                relay: true,
            }] if &**to_node == node => message.clone(),
            ops => panic!("expected one publish to {node}: {ops:?}"),
        }
    }
}

/// A remote member: peer, node, metadata JSON.
pub(super) type Member<'a> = (PeerId, &'a str, Option<&'a str>);

/// The bytes written to `conn`, in order.
fn bytes_to(out: &Outbox, conn: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (c, action) in &out.actions {
        if let (true, Action::Write(i)) = (*c == conn, action) {
            bytes.extend_from_slice(&out.bufs[*i]);
        }
    }
    bytes
}

/// An unmasked (server) text frame.
fn server_frame(payload: &str) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut frame = vec![0x81, payload.len() as u8];
    frame.extend_from_slice(payload.as_bytes());
    frame
}

fn presence(topic: &str, v: u64, joined: &[Member<'_>], left: &[PeerId], dead: bool) -> Vec<u8> {
    let joined: Vec<String> = joined
        .iter()
        .map(|(peer, node, metadata)| {
            format!(
                r#"["{}","{node}",{}]"#,
                peer.as_str(),
                metadata.unwrap_or("null")
            )
        })
        .collect();
    let left: Vec<String> = left
        .iter()
        .map(|p| format!(r#""{}""#, p.as_str()))
        .collect();
    let dead = if dead { r#","dead":true"# } else { "" };
    format!(
        r#"{{"topic":"{topic}","v":{v},"joined":[{}],"left":[{}]{dead}}}"#,
        joined.join(","),
        left.join(",")
    )
    .into_bytes()
}

fn welcome(peer: &PeerId) -> String {
    format!(
        r#"{{"type":"welcome","selfId":"{}","pingInterval":30}}"#,
        peer.as_str()
    )
}

fn peer_list(peers: &[(&PeerId, Option<&str>)]) -> String {
    let peers: Vec<String> = peers
        .iter()
        .map(|(peer, metadata)| match metadata {
            Some(m) => format!(r#"{{"id":"{}","metadata":{m}}}"#, peer.as_str()),
            None => format!(r#"{{"id":"{}"}}"#, peer.as_str()),
        })
        .collect();
    format!(r#"{{"type":"peer-list","peers":[{}]}}"#, peers.join(","))
}

fn peer_joined(peer: &PeerId, metadata: Option<&str>) -> String {
    match metadata {
        Some(m) => format!(
            r#"{{"type":"peer-joined","peerId":"{}","metadata":{m}}}"#,
            peer.as_str()
        ),
        None => format!(r#"{{"type":"peer-joined","peerId":"{}"}}"#, peer.as_str()),
    }
}

fn peer_left(peer: &PeerId) -> String {
    format!(r#"{{"type":"peer-left","peerId":"{}"}}"#, peer.as_str())
}

fn error(code: &str, message: &str, msg_id: &str) -> String {
    format!(r#"{{"type":"error","code":"{code}","message":"{message}","msgId":"{msg_id}"}}"#)
}

fn not_found(msg_id: &str) -> String {
    error("target_not_found", "peer not found", msg_id)
}

fn join_op(topic: &str, peer: PeerId, metadata: Option<&str>, snapshot: bool) -> ClusterOp {
    ClusterOp::Join {
        topic: Arc::from(topic),
        peer,
        metadata: metadata.map(Box::from),
        snapshot,
    }
}

fn leave_op(topic: &str, peer: PeerId, reason: Option<LeaveReason>) -> ClusterOp {
    ClusterOp::Leave {
        topic: Arc::from(topic),
        peer,
        reason,
    }
}

#[test]
fn first_join_waits_for_the_snapshot_and_holds_input() {
    let mut n = Node::new();
    let (a, a_id) = n.join("room", Some(r#"{"n":"a"}"#));
    assert!(
        n.out.actions.is_empty(),
        "nothing reaches it before welcome"
    );
    assert_eq!(
        n.out.cluster,
        vec![join_op("room", a_id, Some(r#"{"n":"a"}"#), true)]
    );
    assert_eq!(n.engine.peer_count(), 0);

    n.send(a, &text(r#"{"type":"ping","msgId":"x"}"#));
    assert!(n.out.is_empty(), "the ping is held: {:?}", n.out);

    let r = rid(1);
    n.snapshot("room", 10, &[(r, "n2", Some(r#"{"n":"r"}"#))]);
    assert_eq!(
        written(&n.out, a),
        vec![
            welcome(&a_id),
            peer_list(&[(&r, Some(r#"{"n":"r"}"#))]),
            r#"{"type":"pong","msgId":"x"}"#.to_owned(),
        ]
    );
    assert!(n.out.cluster.is_empty());
    assert_eq!(n.engine.peer_id(a), Some(a_id));
    assert_eq!(n.engine.remote_nodes(), vec![Arc::<str>::from("n2")]);

    // Input after the welcome is answered at once.
    n.send(a, &text(r#"{"type":"ping","msgId":"y"}"#));
    assert_eq!(written(&n.out, a), vec![r#"{"type":"pong","msgId":"y"}"#]);
}

#[test]
fn joins_while_the_snapshot_is_pending_all_wait_for_it() {
    let mut n = Node::new();
    let (a, a_id) = n.join("room", None);
    let (b, b_id) = n.join("room", None);
    assert!(n.out.actions.is_empty());
    assert_eq!(n.out.cluster, vec![join_op("room", b_id, None, false)]);

    let r = rid(1);
    n.snapshot("room", 10, &[(r, "n2", None)]);
    assert_eq!(
        written(&n.out, a),
        vec![
            welcome(&a_id),
            peer_list(&[(&r, None)]),
            peer_joined(&b_id, None)
        ]
    );
    assert_eq!(
        written(&n.out, b),
        vec![welcome(&b_id), peer_list(&[(&a_id, None), (&r, None)])]
    );
}

#[test]
fn join_of_a_ready_topic_is_greeted_at_once() {
    let mut n = Node::new();
    let r = rid(1);
    let (a, a_id) = n.join("room", Some(r#"{"n":"a"}"#));
    n.snapshot("room", 10, &[(r, "n2", Some(r#"{"n":"r"}"#))]);

    let (b, b_id) = n.join("room", Some("7"));
    assert_eq!(n.out.cluster, vec![join_op("room", b_id, Some("7"), false)]);
    assert_eq!(
        written(&n.out, b),
        vec![
            welcome(&b_id),
            peer_list(&[(&a_id, Some(r#"{"n":"a"}"#)), (&r, Some(r#"{"n":"r"}"#))]),
        ]
    );
    assert_eq!(written(&n.out, a), vec![peer_joined(&b_id, Some("7"))]);
}

#[test]
fn snapshot_without_redis_greets_with_what_is_known() {
    let mut n = Node::new();
    let (a, a_id) = n.join("room", None);
    n.out.clear();
    n.engine.snapshot("room", None, at(n.now), &mut n.out);
    assert_eq!(written(&n.out, a), vec![welcome(&a_id), peer_list(&[])]);
    // Once ready, a failed snapshot changes nothing.
    n.out.clear();
    n.engine.snapshot("room", None, at(n.now), &mut n.out);
    assert!(n.out.is_empty());
}

#[test]
fn presence_events_newer_than_what_is_known_are_news() {
    let mut n = Node::new();
    let (r1, r2, r3) = (rid(1), rid(2), rid(3));
    let (a, _) = n.first("room", 10, &[(r1, "n2", None)]);

    n.deliver(&presence(
        "room",
        11,
        &[(r2, "n3", Some(r#"{"k":[1]}"#))],
        &[r1],
        false,
    ));
    assert_eq!(
        written(&n.out, a),
        vec![peer_left(&r1), peer_joined(&r2, Some(r#"{"k":[1]}"#))]
    );
    assert!(n.out.cluster.is_empty());
    assert_eq!(n.remote_members("room"), vec![r2]);

    // Equal or older versions: already applied, or overtaken.
    n.deliver(&presence("room", 11, &[(r3, "n3", None)], &[r2], false));
    assert!(n.out.is_empty(), "{:?}", n.out);
    n.deliver(&presence("room", 5, &[(r3, "n3", None)], &[r2], false));
    assert!(n.out.is_empty(), "{:?}", n.out);
    assert_eq!(n.remote_members("room"), vec![r2]);

    // A topic nobody here follows.
    n.deliver(&presence("elsewhere", 99, &[(r3, "n3", None)], &[], false));
    assert!(n.out.is_empty());
    assert_eq!(n.remote_members("elsewhere"), vec![]);
}

#[test]
fn events_during_a_resync_wait_for_the_snapshot() {
    let mut n = Node::new();
    let (r1, r2, r3, r4) = (rid(1), rid(2), rid(3), rid(4));
    let (a, _) = n.first("room", 10, &[(r1, "n2", None)]);

    n.engine.begin_resync(false);
    // Older than the snapshot to come (r1 is back in it).
    n.deliver(&presence("room", 14, &[], &[r1], false));
    assert!(n.out.is_empty(), "{:?}", n.out);
    // Newer than it.
    n.deliver(&presence("room", 20, &[(r3, "n2", None)], &[], false));
    assert!(n.out.is_empty(), "{:?}", n.out);

    n.snapshot("room", 15, &[(r1, "n2", None), (r4, "n4", Some("1"))]);
    assert_eq!(
        written(&n.out, a),
        vec![peer_joined(&r4, Some("1")), peer_joined(&r3, None)]
    );
    assert_eq!(n.remote_members("room"), vec![r1, r3, r4]);

    // Applied since: 20 is the version now.
    n.deliver(&presence("room", 18, &[(r2, "n2", None)], &[], false));
    assert!(n.out.is_empty());
    n.deliver(&presence("room", 21, &[(r2, "n2", None)], &[r4], false));
    assert_eq!(
        written(&n.out, a),
        vec![peer_left(&r4), peer_joined(&r2, None)]
    );
}

#[test]
fn a_resync_snapshot_tells_what_changed() {
    let mut n = Node::new();
    let (r1, r2) = (rid(1), rid(2));
    let (a, _) = n.first("room", 10, &[(r1, "n2", None)]);
    n.engine.begin_resync(false);
    n.snapshot("room", 30, &[(r2, "n3", None)]);
    assert_eq!(
        written(&n.out, a),
        vec![peer_left(&r1), peer_joined(&r2, None)]
    );
    // A snapshot older than what was applied since is stale.
    n.snapshot("room", 29, &[(r1, "n2", None)]);
    assert!(n.out.is_empty());
    assert_eq!(n.remote_members("room"), vec![r2]);
}

#[test]
fn members_missing_after_redis_forgot_are_doubted_until_the_grace_ends() {
    let mut n = Node::new();
    let (r1, r2, r3, r4) = (rid(1), rid(2), rid(3), rid(4));
    let (a, _) = n.first(
        "room",
        10,
        &[(r1, "n2", None), (r2, "n2", None), (r3, "n3", None)],
    );

    // Redis came back empty: only n3 has rewritten its member so far, and
    // r4 joined there meanwhile.
    n.engine.begin_resync(true);
    n.snapshot("room", 30, &[(r3, "n3", None), (r4, "n3", None)]);
    assert_eq!(written(&n.out, a), vec![peer_joined(&r4, None)]);
    assert_eq!(n.remote_members("room"), vec![r1, r2, r3, r4]);

    // n2 is back and rewrites r1 (r2 left while Redis was away): no news.
    n.deliver(&presence("room", 31, &[(r1, "n2", None)], &[], false));
    assert!(n.out.is_empty(), "{:?}", n.out);

    // Within the grace, r2 stays; once it is over, r2 left.
    n.now += DOUBT_GRACE - Duration::from_millis(1);
    n.out.clear();
    n.engine.tick_doubts(n.now, &mut n.out);
    assert!(n.out.is_empty(), "{:?}", n.out);
    n.now += Duration::from_millis(1);
    n.engine.tick_doubts(n.now, &mut n.out);
    assert_eq!(written(&n.out, a), vec![peer_left(&r2)]);
    assert_eq!(n.remote_members("room"), vec![r1, r3, r4]);

    // An ordinary resync after: a missing member left at once.
    n.engine.begin_resync(false);
    n.snapshot("room", 40, &[(r1, "n2", None), (r4, "n3", None)]);
    assert_eq!(written(&n.out, a), vec![peer_left(&r3)]);
    n.now += DOUBT_GRACE;
    n.out.clear();
    n.engine.tick_doubts(n.now, &mut n.out);
    assert!(n.out.is_empty(), "{:?}", n.out);
}

#[test]
fn a_later_snapshot_confirms_doubts_and_an_outage_holds_them() {
    let mut n = Node::new();
    let (r1, r2) = (rid(1), rid(2));
    let (a, _) = n.first("room", 10, &[(r1, "n2", None), (r2, "n2", None)]);
    n.engine.begin_resync(true);
    n.snapshot("room", 30, &[]);
    assert!(written(&n.out, a).is_empty());

    // Another forgetful resync within the grace lists r1: confirmed; r2
    // gets a grace of its own from now.
    n.now += DOUBT_GRACE / 2;
    n.engine.begin_resync(true);
    n.snapshot("room", 31, &[(r1, "n2", None)]);
    assert!(written(&n.out, a).is_empty());
    n.now += DOUBT_GRACE / 2;
    n.out.clear();
    n.engine.tick_doubts(n.now, &mut n.out);
    assert!(
        n.out.is_empty(),
        "the first deadline still counted: {:?}",
        n.out
    );
    assert_eq!(n.remote_members("room"), vec![r1, r2]);
    assert_eq!(n.engine.remote_nodes(), vec![Arc::from("n2")]);

    // Redis is away when the grace ends: it starts again.
    n.engine.begin_resync(false);
    n.now += DOUBT_GRACE / 2;
    n.engine.tick_doubts(n.now, &mut n.out);
    assert!(n.out.is_empty(), "{:?}", n.out);
    // An exact snapshot settles it: r2 left.
    n.snapshot("room", 40, &[(r1, "n2", None)]);
    assert_eq!(written(&n.out, a), vec![peer_left(&r2)]);
    n.now += DOUBT_GRACE * 2;
    n.out.clear();
    n.engine.tick_doubts(n.now, &mut n.out);
    assert!(n.out.is_empty(), "{:?}", n.out);
    assert_eq!(n.remote_members("room"), vec![r1]);
}

#[test]
fn the_node_of_doubted_members_alone_is_not_checked_for_death() {
    let mut n = Node::new();
    let (r1, r2) = (rid(1), rid(2));
    n.first("room", 10, &[(r1, "n2", None), (r2, "n3", None)]);
    n.engine.begin_resync(true);
    n.snapshot("room", 30, &[(r2, "n3", None)]);
    assert_eq!(n.engine.remote_nodes(), vec![Arc::from("n3")]);
    n.deliver(&presence("room", 31, &[(r1, "n2", None)], &[], false));
    let mut nodes = n.engine.remote_nodes();
    nodes.sort();
    assert_eq!(nodes, vec![Arc::from("n2"), Arc::from("n3")]);
}

#[test]
fn a_doubted_member_that_leaves_is_told_at_once() {
    let mut n = Node::new();
    let r1 = rid(1);
    let (a, _) = n.first("room", 10, &[(r1, "n2", None)]);
    n.engine.begin_resync(true);
    n.snapshot("room", 30, &[]);
    assert!(written(&n.out, a).is_empty());
    n.deliver(&presence("room", 31, &[], &[r1], false));
    assert_eq!(written(&n.out, a), vec![peer_left(&r1)]);
    n.now += DOUBT_GRACE;
    n.out.clear();
    n.engine.tick_doubts(n.now, &mut n.out);
    assert!(n.out.is_empty(), "{:?}", n.out);
}

#[test]
fn relay_to_a_remote_member_is_published_to_its_node() {
    let mut n = Node::new();
    let r = rid(1);
    let (a, a_id) = n.first("room", 10, &[(r, "n2", None)]);
    n.send(
        a,
        &text(&format!(
            r#"{{"type":"offer","to":"{}","payload":{{"sdp":"v=0"}},"msgId":"m1"}}"#,
            r.as_str()
        )),
    );
    assert!(written(&n.out, a).is_empty());
    let [ClusterOp::Publish {
        node,
        message,
        relay: true,
    }] = n.out.cluster.as_slice()
    else {
        panic!("expected one publish: {:?}", n.out.cluster);
    };
    assert_eq!(&**node, "n2");
    let relay = cluster::parse_relay(message).expect("an R message");
    assert_eq!(relay.to, r);
    assert_eq!(relay.from, a_id);
    assert_eq!(relay.origin, HERE);
    assert_eq!(relay.msg_id.map(RawValue::get), Some(r#""m1""#));
    assert_eq!(
        relay.frame,
        server_frame(&format!(
            r#"{{"type":"offer","from":"{}","payload":{{"sdp":"v=0"}},"msgId":"m1"}}"#,
            a_id.as_str()
        ))
    );

    // A peer id known nowhere is still not found, without asking anyone.
    n.send(
        a,
        &text(&format!(
            r#"{{"type":"answer","to":"{}","msgId":"m2"}}"#,
            rid(9).as_str()
        )),
    );
    assert_eq!(written(&n.out, a), vec![not_found("m2")]);
    assert!(n.out.cluster.is_empty());
}

#[test]
fn relay_from_another_node_reaches_its_target_byte_for_byte() {
    let mut n = Node::new();
    let r = rid(1);
    let (a, a_id) = n.first("room", 10, &[(r, "n2", None)]);
    let frame = server_frame(&format!(
        r#"{{"type":"ice-candidate","from":"{}","payload":[1,2],"msgId":7}}"#,
        r.as_str()
    ));
    let mut message = Vec::new();
    let msg_id: &RawValue = serde_json::from_str("7").unwrap();
    cluster::push_relay(&mut message, &a_id, &r, "n2", Some(msg_id), |buf| {
        buf.extend_from_slice(&frame)
    });
    n.deliver(&message);
    assert_eq!(bytes_to(&n.out, a), frame);
    assert!(n.out.cluster.is_empty());

    // A frame bounced back to a local sender.
    let bounce = server_frame(&error("dropped", "delivery failed", "q"));
    let mut message = Vec::new();
    cluster::push_direct(&mut message, &a_id, |buf| buf.extend_from_slice(&bounce));
    n.deliver(&message);
    assert_eq!(bytes_to(&n.out, a), bounce);
    assert!(n.out.cluster.is_empty());
}

#[test]
fn an_envelope_is_its_messages_in_order_one_level_deep() {
    let mut n = Node::new();
    let r = rid(1);
    let (a, a_id) = n.first("room", 10, &[(r, "n2", None)]);
    let frames: Vec<Vec<u8>> = (0..3)
        .map(|i| server_frame(&format!(r#"{{"n":{i}}}"#)))
        .collect();
    let messages: Vec<Vec<u8>> = frames
        .iter()
        .map(|frame| {
            let mut message = Vec::new();
            cluster::push_direct(&mut message, &a_id, |buf| buf.extend_from_slice(frame));
            message
        })
        .collect();
    // An envelope inside one is no node's: it is dropped, not followed.
    let mut inner = Vec::new();
    cluster::push_envelope(&mut inner, [messages[2].as_slice()]);
    let mut envelope = Vec::new();
    let parts = [
        messages[0].as_slice(),
        inner.as_slice(),
        messages[1].as_slice(),
    ];
    cluster::push_envelope(&mut envelope, parts);
    n.deliver(&envelope);
    assert_eq!(
        bytes_to(&n.out, a),
        [&frames[0][..], &frames[1][..]].concat()
    );
}

#[test]
fn relay_for_an_unknown_local_peer_bounces_to_its_origin() {
    let mut n = Node::new();
    let r = rid(1);
    let (a, _) = n.first("room", 10, &[(r, "n2", None)]);
    let msg_id: &RawValue = serde_json::from_str(r#""m3""#).unwrap();
    let mut message = Vec::new();
    cluster::push_relay(&mut message, &rid(8), &r, "n2", Some(msg_id), |buf| {
        buf.extend_from_slice(&server_frame("{}"))
    });
    n.deliver(&message);
    assert!(written(&n.out, a).is_empty());
    let mut expected = vec![cluster::DIRECT];
    expected.extend_from_slice(r.as_str().as_bytes());
    expected.extend_from_slice(&server_frame(&not_found("m3")));
    assert_eq!(
        n.out.cluster,
        vec![ClusterOp::Publish {
            node: Arc::from("n2"),
            message: expected,
            relay: false,
        }]
    );
}

#[test]
fn unreachable_relay_target_is_gone() {
    let mut n = Node::new();
    let (r1, r2) = (rid(1), rid(2));
    let (a, _) = n.first("room", 10, &[(r1, "n2", None), (r2, "n3", None)]);
    let (b, _) = n.join("room", None);
    let message = n.relay_to(a, &r1, "m4", "n2");

    n.undeliverable(&message, true);
    assert_eq!(written(&n.out, a), vec![not_found("m4"), peer_left(&r1)]);
    assert_eq!(written(&n.out, b), vec![peer_left(&r1)]);
    assert_eq!(n.out.cluster, vec![leave_op("room", r1, None)]);
    assert_eq!(n.remote_members("room"), vec![r2]);
    assert_eq!(n.engine.remote_nodes(), vec![Arc::<str>::from("n3")]);
}

#[test]
fn relay_that_redis_could_not_take_is_dropped() {
    let mut n = Node::new();
    let r = rid(1);
    let (a, _) = n.first("room", 10, &[(r, "n2", None)]);
    let (b, _) = n.join("room", None);
    let message = n.relay_to(a, &r, "m5", "n2");

    n.undeliverable(&message, false);
    assert_eq!(
        written(&n.out, a),
        vec![error("dropped", "delivery failed", "m5")]
    );
    assert!(written(&n.out, b).is_empty());
    assert!(n.out.cluster.is_empty());
    assert!(n.out.left.is_empty());
    assert_eq!(n.remote_members("room"), vec![r]);
}

#[test]
fn relays_to_peers_of_a_dead_node_are_answered_not_found() {
    let mut n = Node::new();
    let (r1, r2) = (rid(1), rid(2));
    let (a, _) = n.first("room", 10, &[(r1, "n2", None), (r2, "n3", None)]);
    let (b, _) = n.join("room", None);
    n.relay_to(a, &r1, "lost", "n2");
    n.relay_to(b, &r2, "fine", "n3");

    n.deliver(&presence("room", 11, &[], &[r1], true));
    assert_eq!(written(&n.out, a), vec![not_found("lost"), peer_left(&r1)]);
    assert_eq!(written(&n.out, b), vec![peer_left(&r1)]);
    assert!(n.out.cluster.is_empty());

    // Each relay is answered once.
    n.deliver(&presence("room", 12, &[], &[r1], true));
    assert!(n.out.is_empty(), "{:?}", n.out);
}

#[test]
fn a_peer_that_left_normally_does_not_answer_relays() {
    let mut n = Node::new();
    let r = rid(1);
    let (a, _) = n.first("room", 10, &[(r, "n2", None)]);
    n.relay_to(a, &r, "m6", "n2");
    n.deliver(&presence("room", 11, &[], &[r], false));
    assert_eq!(written(&n.out, a), vec![peer_left(&r)]);
}

#[test]
fn last_local_leave_forgets_the_topic() {
    let mut n = Node::new();
    let r = rid(1);
    let (a, a_id) = n.first("room", 10, &[(r, "n2", None)]);
    let (b, b_id) = n.join("room", None);

    n.send(a, &masked(0x88, &1000u16.to_be_bytes()));
    assert_eq!(written(&n.out, a), vec!["<close 1000>"]);
    assert_eq!(written(&n.out, b), vec![peer_left(&a_id)]);
    assert_eq!(
        n.out.cluster,
        vec![leave_op("room", a_id, Some(LeaveReason::Closed))]
    );
    assert_eq!(n.engine.remote_nodes(), vec![Arc::<str>::from("n2")]);

    n.release(b);
    assert_eq!(
        n.out.cluster,
        vec![leave_op("room", b_id, Some(LeaveReason::Disconnected))]
    );
    assert!(n.engine.remote_nodes().is_empty());
    assert!(n.engine.local_members().is_empty());

    n.deliver(&presence("room", 11, &[(rid(2), "n2", None)], &[r], false));
    assert!(n.out.is_empty(), "{:?}", n.out);
    assert!(n.engine.remote_nodes().is_empty());

    // The next joiner starts over.
    let (_, c_id) = n.join("room", None);
    assert_eq!(n.out.cluster, vec![join_op("room", c_id, None, true)]);
    assert!(n.out.actions.is_empty());
}

#[test]
fn held_connection_that_closes_leaves_the_cluster() {
    let mut n = Node::new();
    let (a, a_id) = n.join("room", None);
    n.release(a);
    assert_eq!(
        n.out.cluster,
        vec![leave_op("room", a_id, Some(LeaveReason::Disconnected))]
    );
    assert!(n.engine.local_members().is_empty());
    // Its snapshot comes back to nobody.
    n.snapshot("room", 10, &[(rid(1), "n2", None)]);
    assert!(n.out.is_empty(), "{:?}", n.out);
    assert!(n.engine.remote_nodes().is_empty());
    assert_eq!(n.engine.peer_count(), 0);

    // A half-close while held: the same, once.
    let (b, b_id) = n.join("room", None);
    n.out.clear();
    n.engine.eof(b, n.now, &mut n.out);
    assert_eq!(
        n.out.cluster,
        vec![leave_op("room", b_id, Some(LeaveReason::Disconnected))]
    );
    n.release(b);
    assert!(n.out.cluster.is_empty());
}

#[test]
fn held_connection_leaving_keeps_the_others_waiting() {
    let mut n = Node::new();
    let (a, a_id) = n.join("room", None);
    let (b, b_id) = n.join("room", None);
    n.release(a);
    assert_eq!(
        n.out.cluster,
        vec![leave_op("room", a_id, Some(LeaveReason::Disconnected))]
    );
    n.snapshot("room", 10, &[]);
    assert_eq!(written(&n.out, b), vec![welcome(&b_id), peer_list(&[])]);
}

#[test]
fn too_much_input_before_welcome_is_refused() {
    let mut n = Node::new();
    let (a, a_id) = n.join("room", None);
    let chunk = vec![0u8; n.engine.config().max_message + super::cluster::MAX_HELD_EXTRA + 1];
    n.send(a, &chunk);
    assert_eq!(written(&n.out, a), vec!["<close 1008>"]);
    assert_eq!(
        n.out.cluster,
        vec![leave_op("room", a_id, Some(LeaveReason::ProtocolError))]
    );
}

#[test]
fn local_members_lists_peers_and_joiners() {
    let mut n = Node::new();
    let (_, a_id) = n.first("room", 10, &[(rid(1), "n2", None)]);
    let (_, b_id) = n.join("room", Some(r#"{"b":true}"#));
    let (_, c_id) = n.join("lobby", Some("3"));
    type Listed = (String, Vec<(PeerId, Option<String>)>);
    let mut listed: Vec<Listed> = n
        .engine
        .local_members()
        .into_iter()
        .map(|(topic, members)| {
            let mut members: Vec<_> = members
                .into_iter()
                .map(|(peer, metadata)| (peer, metadata.map(str::to_owned)))
                .collect();
            members.sort();
            (topic.to_string(), members)
        })
        .collect();
    listed.sort();
    let mut room = vec![(a_id, None), (b_id, Some(r#"{"b":true}"#.to_owned()))];
    room.sort();
    assert_eq!(
        listed,
        vec![
            ("lobby".to_owned(), vec![(c_id, Some("3".to_owned()))]),
            ("room".to_owned(), room),
        ]
    );
}

#[test]
fn held_connection_is_neither_pinged_nor_timed_out() {
    let mut n = Node::new();
    let (a, _) = n.join("room", None);
    n.out.clear();
    n.engine.tick(n.now + Duration::from_secs(30), &mut n.out);
    assert!(written(&n.out, a).is_empty(), "nothing before welcome");
    // The client is alive: it answers (what it sends is held meanwhile).
    n.send(a, &masked(0x8A, b""));
    n.out.clear();
    n.engine.tick(n.now + Duration::from_secs(41), &mut n.out);
    assert!(!n.out.actions.contains(&(a, Action::Abort)));
    assert!(n.out.cluster.is_empty());
}

#[test]
fn joiners_greeted_before_the_snapshot_learn_the_rest_from_it() {
    let mut node = Node::new();
    let (conn, peer) = node.join("room", None);
    assert!(written(&node.out, conn).is_empty());
    node.out.clear();
    node.engine
        .greet_waiting("room", at(node.now), &mut node.out);
    assert_eq!(
        written(&node.out, conn),
        vec![welcome(&peer), peer_list(&[])]
    );
    // Events still wait for the snapshot, which tells what was missed.
    node.deliver(&presence("room", 9, &[(rid(2), "n2", None)], &[], false));
    assert!(written(&node.out, conn).is_empty());
    node.snapshot("room", 8, &[(rid(1), "n2", None)]);
    assert_eq!(
        written(&node.out, conn),
        vec![peer_joined(&rid(1), None), peer_joined(&rid(2), None)]
    );
    assert_eq!(node.remote_members("room"), vec![rid(1), rid(2)]);
}

#[test]
fn a_broadcast_is_published_once_per_node_and_written_to_each_member_there() {
    let mut n = Node::new();
    let members = [
        (rid(1), "n2", None),
        (rid(2), "n2", None),
        (rid(3), "n3", None),
    ];
    let (a, a_id) = n.first("room", 10, &members);
    let (b, _) = n.join("room", None);
    n.send(a, &text(r#"{"type":"broadcast","payload":7,"msgId":"m"}"#));
    let from = a_id.as_str();
    let frame = format!(r#"{{"type":"broadcast","from":"{from}","payload":7,"msgId":"m"}}"#);
    assert_eq!(written(&n.out, b), vec![frame.clone()]);
    let published: Vec<(&str, &[u8])> = n
        .out
        .cluster
        .iter()
        .map(|op| match op {
            ClusterOp::Publish { node, message, .. } => (&**node, message.as_slice()),
            other => panic!("not a publish: {other:?}"),
        })
        .collect();
    assert_eq!(
        published.iter().map(|(node, _)| *node).collect::<Vec<_>>(),
        ["n2", "n3"]
    );
    let message = published[0].1.to_vec();
    let parsed = cluster::parse_broadcast(&message).expect("a B message");
    assert_eq!((parsed.topic, parsed.origin), ("room", HERE));
    assert!(
        message.ends_with(frame.as_bytes()),
        "the frame, naming the sender"
    );

    // At another node, every local member of the topic gets the frame, and
    // the sender's node hears how many missed it (none, then a full one).
    let mut m = Node::named("n2");
    let (c, _) = m.first("room", 10, &[(a_id, HERE, None)]);
    let (d, _) = m.join("room", None);
    m.deliver(&message);
    assert_eq!(written(&m.out, c), vec![frame.clone()]);
    assert_eq!(written(&m.out, d), vec![frame]);
    let answer = |m: &Node| match m.out.cluster.as_slice() {
        [ClusterOp::Publish { node, message, .. }] => {
            assert_eq!(&**node, HERE);
            let tally = cluster::parse_tally(message).expect("a T message");
            (tally.seq, tally.missed, tally.node.to_owned())
        }
        other => panic!("not one answer: {other:?}"),
    };
    assert_eq!(answer(&m), (parsed.seq, 0, "n2".to_owned()));
    let max_queue = m.engine.config().max_queue;
    m.engine.pause(d, m.now);
    for _ in 0..=max_queue / 20 {
        m.deliver(&message);
        if answer(&m).1 > 0 {
            break;
        }
    }
    assert_eq!(answer(&m), (parsed.seq, 1, "n2".to_owned()));
}

/// A `T` answer from node `node` to broadcast `seq`.
fn tally(seq: u64, missed: u32, node: &str) -> Vec<u8> {
    let mut message = Vec::new();
    cluster::push_tally(&mut message, &cluster::Tally { seq, missed, node });
    message
}

/// The number the sender's node gave the broadcast it just published.
fn published_seq(out: &Outbox) -> u64 {
    match out.cluster.first() {
        Some(ClusterOp::Publish { message, .. }) => {
            cluster::parse_broadcast(message).expect("a B message").seq
        }
        other => panic!("no broadcast published: {other:?}"),
    }
}

#[test]
fn a_broadcasts_sender_hears_once_how_many_missed_it_on_every_node() {
    let mut n = Node::new();
    let members = [
        (rid(1), "n2", None),
        (rid(2), "n2", None),
        (rid(3), "n3", None),
    ];
    let (a, _) = n.first("room", 10, &members);
    n.send(a, &text(r#"{"type":"broadcast","payload":1,"msgId":"m"}"#));
    let seq = published_seq(&n.out);
    assert!(written(&n.out, a).is_empty(), "nobody here missed it");
    n.deliver(&tally(seq, 2, "n2"));
    assert!(written(&n.out, a).is_empty(), "n3 has not answered");
    n.deliver(&tally(seq, 2, "n2")); // a repeat counts once
    assert!(written(&n.out, a).is_empty());
    n.deliver(&tally(seq, 1, "n3"));
    assert_eq!(
        written(&n.out, a),
        vec![
            r#"{"type":"error","code":"dropped","message":"delivery failed","msgId":"m","missed":3}"#
        ]
    );
    n.deliver(&tally(seq, 1, "n3")); // answered: nothing more
    assert!(written(&n.out, a).is_empty());

    // Every node answering none missed it: no error at all.
    n.send(a, &text(r#"{"type":"broadcast","payload":2,"msgId":"q"}"#));
    let seq = published_seq(&n.out);
    n.deliver(&tally(seq, 0, "n3"));
    n.deliver(&tally(seq, 0, "n2"));
    assert!(written(&n.out, a).is_empty());
}

#[test]
fn the_members_of_a_node_that_never_answers_count_as_missed() {
    let mut n = Node::new();
    let members = [
        (rid(1), "n2", None),
        (rid(2), "n3", None),
        (rid(3), "n3", None),
    ];
    let (a, _) = n.first("room", 10, &members);
    n.send(a, &text(r#"{"type":"broadcast","payload":1,"msgId":"m"}"#));
    let seq = published_seq(&n.out);
    n.deliver(&tally(seq, 0, "n2"));
    n.out.clear();
    n.engine
        .tick(n.now + Duration::from_millis(1900), &mut n.out);
    assert!(written(&n.out, a).is_empty(), "still waiting for n3");
    n.out.clear();
    n.engine.tick(n.now + Duration::from_secs(2), &mut n.out);
    assert_eq!(
        written(&n.out, a),
        vec![
            r#"{"type":"error","code":"dropped","message":"delivery failed","msgId":"m","missed":2}"#
        ]
    );
    n.deliver(&tally(seq, 0, "n3")); // too late: already told
    assert!(written(&n.out, a).is_empty());
}

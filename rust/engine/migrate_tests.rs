//! Cluster mode, sans-I/O: a resumable session moving from node `n1` (the
//! old node, A) to node `n2` (the new one, B). The tests play Redis: they
//! carry each node's publishes to the other and write the move (`M`) as
//! `cluster.lua`'s `signaling_move` would.

use serde_json::Value;

use super::cluster::ClusterOp;
use super::cluster_tests::Node;
use super::migrate::{ARRIVE_WAIT, ASK_WAIT, FLUSH_WAIT, MOVE_WAIT};
use super::tests::{at, text, written};
use super::*;
use crate::wire::migrate as wire;

const TOPIC: &str = "room";

fn json(frames: Vec<String>) -> Vec<Value> {
    frames
        .iter()
        .map(|f| serde_json::from_str(f).unwrap_or(Value::String(f.clone())))
        .collect()
}

fn msg_ids(frames: &[Value]) -> Vec<&str> {
    frames.iter().filter_map(|f| f["msgId"].as_str()).collect()
}

fn types(frames: &[Value]) -> Vec<&str> {
    frames.iter().filter_map(|f| f["type"].as_str()).collect()
}

/// A peer: its node's connection, id, and its welcome's resume token.
#[derive(Debug, Clone)]
struct Client {
    conn: u64,
    id: PeerId,
    token: Option<String>,
}

impl Node {
    fn frames(&self, conn: u64) -> Vec<Value> {
        json(written(&self.out, conn))
    }

    /// Joins `TOPIC`; the first peer of the node is greeted once the
    /// tests answer its snapshot with `remote`.
    fn peer(&mut self, resumable: bool, remote: &[super::cluster_tests::Member<'_>]) -> Client {
        let request = JoinRequest {
            topic: TOPIC,
            resumable,
            ..JoinRequest::default()
        };
        let (conn, joined) = self.join_with(request);
        let id = joined.expect("admitted").peer;
        let waits = self
            .out
            .cluster
            .iter()
            .any(|op| matches!(op, ClusterOp::Join { snapshot: true, .. }));
        if waits {
            self.snapshot(TOPIC, 1, remote);
        }
        let frames = self.frames(conn);
        assert_eq!(frames[0]["type"], "welcome");
        let token = frames[0]["resumeToken"].as_str().map(str::to_owned);
        Client { conn, id, token }
    }

    fn offer(&mut self, from: &Client, to: &Client, msg_id: &str) {
        let message = format!(
            r#"{{"type":"offer","to":"{}","msgId":"{msg_id}"}}"#,
            to.id.as_str()
        );
        self.send(from.conn, &text(&message));
    }

    /// The messages this node's last call published to `node`.
    fn published(&self, node: &str) -> Vec<Vec<u8>> {
        self.out
            .cluster
            .iter()
            .filter_map(|op| match op {
                ClusterOp::Publish {
                    node: to, message, ..
                } if &**to == node => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    fn tick(&mut self, after: std::time::Duration) {
        self.now += after;
        self.out.clear();
        self.engine.tick(self.now, &mut self.out);
        self.engine
            .tick_migrations(at(self.now), Part::ALL, &mut self.out);
    }
}

/// What `signaling_move` publishes for a move from `n1` to `n2` (version
/// 7): `M` to the old node and the others, and to the new node with the
/// other nodes' `members`.
fn moved(peer: &PeerId, conn: u64, flush: &[&str], members: Option<&[(&PeerId, &str)]>) -> Vec<u8> {
    move_message(peer, ("n1", "n2", 7), conn, flush, members)
}

/// `M` for a move `(from, to, version)`.
fn move_message(
    peer: &PeerId,
    (from, to, v): (&str, &str, u64),
    conn: u64,
    flush: &[&str],
    members: Option<&[(&PeerId, &str)]>,
) -> Vec<u8> {
    let flush: Vec<String> = flush.iter().map(|n| format!(r#""{n}""#)).collect();
    let members = members.map_or(String::new(), |members| {
        let members: Vec<String> = members
            .iter()
            .map(|(peer, node)| format!(r#"["{}","{node}",null]"#, peer.as_str()))
            .collect();
        format!(r#","members":[{}]"#, members.join(","))
    });
    format!(
        r#"M{{"topic":"{TOPIC}","v":{v},"moved":["{}","{from}","{to}",{conn},null],"flush":[{}]{members}}}"#,
        peer.as_str(),
        flush.join(",")
    )
    .into_bytes()
}

/// The client of `session` resumes at `node`, having seen `seen`: the new
/// connection, and the ask the node published.
fn resume_at(node: &mut Node, session: &Client, seen: u64) -> (u64, Vec<u8>) {
    let request = JoinRequest {
        topic: TOPIC,
        resume: Some((session.token.as_deref().expect("resumable"), Some(seen))),
        ..JoinRequest::default()
    };
    let (conn, joined) = node.join_with(request);
    let joined = joined.expect("admitted");
    assert_eq!(joined.peer, session.id);
    assert!(node.frames(conn).is_empty(), "no welcome before the move");
    let ask = match node.out.cluster.as_slice() {
        [ClusterOp::Ask {
            peer,
            conn: asked,
            message,
            ..
        }] if *peer == session.id && *asked == conn => message.clone(),
        ops => panic!("expected an ask: {ops:?}"),
    };
    (conn, ask)
}

/// The old node reads the ask: the move to `to` it asks of Redis.
fn answer_ask(old: &mut Node, ask: &[u8], session: &Client, conn: u64, to: &str) {
    old.deliver(ask);
    let moves: Vec<&ClusterOp> = old
        .out
        .cluster
        .iter()
        .filter(|op| matches!(op, ClusterOp::Move { .. }))
        .collect();
    match moves.as_slice() {
        [ClusterOp::Move {
            peer,
            to: t,
            conn: c,
            ..
        }] => {
            assert_eq!(*peer, session.id);
            assert_eq!(&**t, to);
            assert_eq!(*c, conn);
        }
        ops => panic!("expected a move: {ops:?}"),
    }
}

struct Pair {
    a: Node,
    b: Node,
}

impl Pair {
    fn new() -> Self {
        Self {
            a: Node::named("n1"),
            b: Node::named("n2"),
        }
    }

    /// The client of `session` resumes at B, having seen `seen`.
    fn resume_at_b(&mut self, session: &Client, seen: u64) -> (u64, Vec<u8>) {
        resume_at(&mut self.b, session, seen)
    }

    /// B starts `conn` afresh: what it writes once Redis answers the join's
    /// snapshot with `remote`.
    fn fresh_at_b(&mut self, conn: u64, remote: &[super::cluster_tests::Member<'_>]) -> Vec<Value> {
        let join = self.b.out.cluster.iter().find_map(|op| match op {
            ClusterOp::Join { peer, snapshot, .. } => Some((*peer, *snapshot)),
            _ => None,
        });
        let (peer, snapshot) = join.expect("a fresh start joins");
        if snapshot {
            self.b.snapshot(TOPIC, 3, remote);
        }
        let frames = self.b.frames(conn);
        assert_eq!(frames[0]["type"], "welcome");
        assert_eq!(frames[0]["resumed"], false);
        assert_eq!(frames[0]["selfId"], peer.as_str());
        assert_eq!(frames[1]["type"], "peer-list");
        frames
    }

    /// p, suspended at A, resumes at B, where l is; the move reached B:
    /// p, l, and p's connection at B, arriving.
    fn arriving_at_b(&mut self) -> (Client, Client, u64) {
        let (p, l, conn) = self.asked_from_b();
        let members = [(&p.id, "n2"), (&l.id, "n2")];
        self.b.deliver(&moved(&p.id, conn, &["n2"], Some(&members)));
        (p, l, conn)
    }

    /// p, suspended at A, resumes at B, where l is; A asked Redis for the
    /// move: p, l, and p's connection at B.
    fn asked_from_b(&mut self) -> (Client, Client, u64) {
        let p = self.a.peer(true, &[]);
        self.a.release(p.conn);
        let l = self.b.peer(false, &[(p.id, "n1", None)]);
        let (conn, ask) = self.resume_at_b(&p, 1);
        self.ask_a(&ask, &p, conn);
        (p, l, conn)
    }

    /// p, suspended at A beside q, resumes at B; A asked Redis for the
    /// move: p, q, and p's connection at B.
    fn asked_beside_q(&mut self) -> (Client, Client, u64) {
        let p = self.a.peer(true, &[]);
        let q = self.a.peer(false, &[]);
        self.a.release(p.conn);
        let (conn, ask) = self.resume_at_b(&p, 2);
        self.ask_a(&ask, &p, conn);
        (p, q, conn)
    }

    /// A reads the ask: the move it asks of Redis.
    fn ask_a(&mut self, ask: &[u8], session: &Client, conn: u64) {
        answer_ask(&mut self.a, ask, session, conn, "n2");
    }
}

#[test]
fn a_session_moves_with_what_was_kept_for_it_and_no_one_sees_it() {
    let mut pair = Pair::new();
    let p = pair.a.peer(true, &[]);
    let q = pair.a.peer(false, &[]);
    // p saw welcome, peer-list (1), q's peer-joined (2); then it is lost.
    pair.a.release(p.conn);
    for n in ["1", "2"] {
        pair.a.offer(&q, &p, n);
        assert!(pair.a.frames(q.conn).is_empty());
    }
    let (conn, ask) = pair.resume_at_b(&p, 2);
    pair.ask_a(&ask, &p, conn);
    // Redis moves p and publishes the move: B had no members, no flush.
    pair.b
        .deliver(&moved(&p.id, conn, &[], Some(&[(&q.id, "n1")])));
    assert!(pair.b.frames(conn).is_empty(), "arriving: nothing yet");
    pair.a.deliver(&moved(&p.id, conn, &[], None));
    assert!(pair.a.frames(q.conn).is_empty(), "no peer-left at A");
    assert!(pair.a.out.left.is_empty());
    let handoff = pair.a.published("n2");
    assert_eq!(handoff.len(), 1);
    assert_eq!(handoff[0][0], wire::HANDOFF);
    // After the move q's relays go to B directly.
    pair.a.offer(&q, &p, "3");
    let relay = pair.a.published("n2");
    assert_eq!(relay.len(), 1, "a relay to the moved peer, at B");

    pair.b.deliver(&handoff[0]);
    let frames = pair.b.frames(conn);
    assert_eq!(frames[0]["type"], "welcome");
    assert_eq!(frames[0]["selfId"], p.id.as_str());
    assert_eq!(frames[0]["resumed"], true);
    assert_ne!(frames[0]["resumeToken"].as_str(), p.token.as_deref());
    assert_eq!(msg_ids(&frames[1..]), ["1", "2"]);
    assert_eq!(frames.len(), 3, "no peer-list after a resumed welcome");
    assert_eq!(pair.b.out.sessions.len(), 1, "logged as resumed");
    pair.b.deliver(&relay[0]);
    assert_eq!(msg_ids(&pair.b.frames(conn)), ["3"]);

    // B knows q as a remote member: p's relays reach it through A.
    pair.b.offer(
        &Client {
            conn,
            id: p.id,
            token: None,
        },
        &q,
        "back",
    );
    let back = pair.b.published("n1");
    assert_eq!(back.len(), 1);
    pair.a.deliver(&back[0]);
    assert_eq!(msg_ids(&pair.a.frames(q.conn)), ["back"]);
}

#[test]
fn relays_sent_toward_the_old_node_come_first() {
    let mut pair = Pair::new();
    let p = pair.a.peer(true, &[]);
    pair.a.release(p.conn);
    // l, on B, relays to p at A: its first relay is still on its way when
    // the session moves.
    let l = pair.b.peer(false, &[(p.id, "n1", None)]);
    pair.b.offer(&l, &p, "1");
    let first = pair.b.published("n1");
    assert_eq!(first.len(), 1);
    let (conn, ask) = pair.resume_at_b(&p, 1);
    pair.ask_a(&ask, &p, conn);

    // B held members before the move: it flushes.
    pair.b.deliver(&moved(&p.id, conn, &["n2"], Some(&[])));
    let flushed = pair.b.published("n1");
    assert_eq!(flushed.len(), 1);
    assert_eq!(flushed[0][0], wire::FLUSHED);
    // l's second relay is local now, but must wait for the first.
    pair.b.offer(&l, &p, "2");
    assert!(pair.b.out.cluster.is_empty());
    assert!(pair.b.frames(conn).is_empty());

    pair.a.deliver(&moved(&p.id, conn, &["n2"], None));
    let handoff = pair.a.published("n2");
    // The first relay reaches A after the move: passed on.
    pair.a.deliver(&first[0]);
    let passed = pair.a.published("n2");
    assert_eq!(passed.len(), 1);
    assert_eq!(passed[0][0], wire::FORWARDED);
    pair.a.deliver(&flushed[0]);
    let flush_done = pair.a.published("n2");
    assert_eq!(
        flush_done, flushed,
        "the flush is passed on after the relay"
    );

    pair.b.deliver(&handoff[0]);
    let frames = pair.b.frames(conn);
    assert_eq!(frames[0]["resumed"], true);
    assert!(msg_ids(&frames).is_empty(), "2 is held");
    pair.b.deliver(&passed[0]);
    assert_eq!(msg_ids(&pair.b.frames(conn)), ["1"]);
    pair.b.deliver(&flush_done[0]);
    assert_eq!(msg_ids(&pair.b.frames(conn)), ["2"]);
    pair.b.offer(&l, &p, "3");
    assert_eq!(msg_ids(&pair.b.frames(conn)), ["3"], "live again");
}

/// A session moved to b, with relay "1" held there for the flush that
/// never comes; its connection at b.
fn holding_a_relay(pair: &mut Pair) -> u64 {
    let (p, l, conn) = pair.arriving_at_b();
    pair.a.deliver(&moved(&p.id, conn, &["n2"], None));
    let handoff = pair.a.published("n2");
    pair.b.deliver(&handoff[0]);
    pair.b.offer(&l, &p, "1");
    assert!(msg_ids(&pair.b.frames(conn)).is_empty());
    conn
}

#[test]
fn held_relays_go_out_when_a_flush_never_comes() {
    let mut pair = Pair::new();
    let conn = holding_a_relay(&mut pair);
    pair.b.tick(FLUSH_WAIT);
    assert_eq!(msg_ids(&pair.b.frames(conn)), ["1"]);
}

#[test]
fn held_relays_are_released_by_their_own_part_of_the_tick() {
    let mut pair = Pair::new();
    let conn = holding_a_relay(&mut pair);
    let b = &mut pair.b;
    b.now += FLUSH_WAIT;
    let (mine, other): (Vec<Part>, Vec<Part>) = (0..2)
        .map(|i| Part::new(i, 2))
        .partition(|part| part.holds(conn));
    b.out.clear();
    b.engine.tick_migrations(at(b.now), other[0], &mut b.out);
    assert!(msg_ids(&b.frames(conn)).is_empty(), "not its part");
    b.engine.tick_migrations(at(b.now), mine[0], &mut b.out);
    assert_eq!(msg_ids(&b.frames(conn)), ["1"]);
}

#[test]
fn a_half_dead_connection_at_the_old_node_is_taken_over() {
    let mut pair = Pair::new();
    let p = pair.a.peer(true, &[]);
    let q = pair.a.peer(false, &[]);
    let (conn, ask) = pair.resume_at_b(&p, 2);
    pair.ask_a(&ask, &p, conn);
    assert_eq!(pair.a.frames(p.conn), ["<close 4011>"]);
    assert!(pair.a.frames(q.conn).is_empty());
    // q's relay meanwhile is kept for the move.
    pair.a.offer(&q, &p, "1");
    assert!(pair.a.frames(q.conn).is_empty(), "no error");
    pair.a.release(p.conn);
    assert!(pair.a.out.left.is_empty(), "its end changes nothing");
    pair.b
        .deliver(&moved(&p.id, conn, &[], Some(&[(&q.id, "n1")])));
    pair.a.deliver(&moved(&p.id, conn, &[], None));
    let handoff = pair.a.published("n2");
    pair.b.deliver(&handoff[0]);
    assert_eq!(msg_ids(&pair.b.frames(conn)), ["1"]);
}

#[test]
fn a_used_token_starts_afresh_and_ends_no_one() {
    let mut pair = Pair::new();
    let p = pair.a.peer(true, &[]);
    let q = pair.a.peer(false, &[]);
    pair.a.release(p.conn);
    // p resumed at A once: the first token is used.
    let request = JoinRequest {
        topic: TOPIC,
        resume: Some((p.token.as_deref().unwrap(), Some(2))),
        ..JoinRequest::default()
    };
    let (again, joined) = pair.a.join_with(request);
    assert!(joined.expect("admitted").resumed);
    pair.a.release(again);
    let (conn, ask) = pair.resume_at_b(&p, 2);
    pair.a.deliver(&ask);
    let refused = pair.a.published("n2");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0][0], wire::REFUSED);
    assert!(pair.a.frames(q.conn).is_empty(), "p stays");
    pair.b.deliver(&refused[0]);
    let frames = pair.fresh_at_b(conn, &[(p.id, "n1", None), (q.id, "n1", None)]);
    assert_ne!(frames[0]["selfId"], p.id.as_str());
}

#[test]
fn no_answer_from_the_old_node_is_a_fresh_start_within_the_wait() {
    let mut pair = Pair::new();
    let p = pair.a.peer(true, &[]);
    pair.a.release(p.conn);
    let (conn, _) = pair.resume_at_b(&p, 1);
    // What the client sends meanwhile is kept for its session.
    pair.b.send(conn, &text(r#"{"type":"ping-me"}"#));
    pair.b.tick(ASK_WAIT / 2);
    assert!(pair.b.frames(conn).is_empty());
    pair.b.tick(ASK_WAIT / 2);
    let frames = pair.fresh_at_b(conn, &[(p.id, "n1", None)]);
    assert_ne!(frames[0]["selfId"], p.id.as_str());
    assert_eq!(frames[2]["type"], "error", "its message was answered");
}

#[test]
fn an_ask_that_reaches_no_one_is_a_fresh_start_at_once() {
    let mut pair = Pair::new();
    let p = pair.a.peer(true, &[]);
    let (conn, _) = pair.resume_at_b(&p, 1);
    pair.b.out.clear();
    pair.b
        .engine
        .asked(conn, false, at(pair.b.now), &mut pair.b.out);
    let frames = pair.fresh_at_b(conn, &[(p.id, "n1", None)]);
    assert_ne!(frames[0]["selfId"], p.id.as_str());
}

#[test]
fn a_hand_off_that_never_comes_ends_the_moved_session() {
    let mut pair = Pair::new();
    let (p, l, conn) = pair.arriving_at_b();
    pair.b.tick(ARRIVE_WAIT);
    // The session that moved here ends, as it would have at A, and the
    // client starts afresh.
    let seen = pair.b.frames(l.conn);
    assert_eq!(types(&seen), ["peer-left", "peer-joined"]);
    assert_eq!(seen[0]["peerId"], p.id.as_str());
    assert!(pair
        .b
        .out
        .cluster
        .iter()
        .any(|op| matches!(op, ClusterOp::Leave { peer, .. } if *peer == p.id)));
    let frames = pair.fresh_at_b(conn, &[]);
    assert_eq!(seen[1]["peerId"], frames[0]["selfId"]);
}

#[test]
fn a_move_redis_never_made_ends_the_session_at_the_old_node() {
    let mut pair = Pair::new();
    let (p, q, conn) = pair.asked_beside_q();
    pair.a.tick(MOVE_WAIT);
    let left = pair.a.frames(q.conn);
    assert_eq!(types(&left), ["peer-left"]);
    assert_eq!(left[0]["peerId"], p.id.as_str());
    let refused = pair.a.published("n2");
    assert_eq!(refused.len(), 1);
    pair.b.deliver(&refused[0]);
    pair.fresh_at_b(conn, &[(q.id, "n1", None)]);
}

#[test]
fn a_client_that_goes_while_its_session_arrives_leaves() {
    let mut pair = Pair::new();
    let (p, l, conn) = pair.arriving_at_b();
    pair.b.release(conn);
    assert_eq!(types(&pair.b.frames(l.conn)), ["peer-left"]);
    // The hand-off that comes later finds no one.
    pair.a.deliver(&moved(&p.id, conn, &["n2"], None));
    let handoff = pair.a.published("n2");
    pair.b.deliver(&handoff[0]);
    assert!(pair.b.frames(conn).is_empty());
}

#[test]
fn a_session_does_not_expire_on_its_way() {
    let mut pair = Pair::new();
    let p = pair.a.peer(true, &[]);
    let q = pair.a.peer(false, &[]);
    pair.a.release(p.conn);
    pair.a.tick(std::time::Duration::from_secs(29));
    let (conn, ask) = pair.resume_at_b(&p, 2);
    pair.ask_a(&ask, &p, conn);
    pair.a.tick(std::time::Duration::from_secs(2)); // past the window
    assert!(types(&pair.a.frames(q.conn)).is_empty(), "no peer-left");
    assert!(pair.a.out.left.is_empty());
    pair.b
        .deliver(&moved(&p.id, conn, &[], Some(&[(&q.id, "n1")])));
    pair.a.deliver(&moved(&p.id, conn, &[], None));
    let handoff = pair.a.published("n2");
    pair.b.deliver(&handoff[0]);
    assert_eq!(pair.b.frames(conn)[0]["resumed"], true);
}

/// p moves from A to B while l (at B) relays to it, then back to A while
/// q (at A) does: each flush releases its own move's held relays, however
/// recently the session left the node it comes back to, and relays still
/// held when it moves on go with it.
#[test]
fn a_session_that_moves_back_keeps_every_relay_in_order() {
    let mut pair = Pair::new();
    let p = pair.a.peer(true, &[]);
    let q = pair.a.peer(false, &[]);
    pair.a.release(p.conn);
    let l = pair
        .b
        .peer(false, &[(p.id, "n1", None), (q.id, "n1", None)]);
    let (at_b, ask) = pair.resume_at_b(&p, 2);
    pair.ask_a(&ask, &p, at_b);
    // Both nodes held members: both flush.
    pair.b
        .deliver(&moved(&p.id, at_b, &["n2"], Some(&[(&q.id, "n1")])));
    let b_flush = pair.b.published("n1");
    pair.a.deliver(&moved(&p.id, at_b, &["n2"], None));
    let handoff = pair.a.published("n2");
    pair.b.deliver(&handoff[0]);
    let welcome = pair.b.frames(at_b);
    assert_eq!(welcome[0]["resumed"], true);
    // l's relay waits for B's own flush, which never comes back before p
    // moves on.
    pair.b.offer(&l, &p, "held");
    assert!(msg_ids(&pair.b.frames(at_b)).is_empty());
    drop(b_flush);
    pair.b.release(at_b);
    let session = Client {
        conn: at_b,
        id: p.id,
        token: welcome[0]["resumeToken"].as_str().map(str::to_owned),
    };
    let (at_a, ask) = resume_at(&mut pair.a, &session, 0);
    answer_ask(&mut pair.b, &ask, &session, at_a, "n1");
    let back = ("n2", "n1", 9);
    pair.a.deliver(&move_message(
        &p.id,
        back,
        at_a,
        &["n1"],
        Some(&[(&l.id, "n2")]),
    ));
    let a_flush = pair.a.published("n2");
    assert_eq!(a_flush.len(), 1);
    // q's relay is local at A again, after A's earlier ones went to B.
    pair.a.offer(&q, &p, "q-1");
    assert!(pair.a.frames(at_a).is_empty());
    pair.b
        .deliver(&move_message(&p.id, back, at_a, &["n1"], None));
    let handoff = pair.b.published("n1");
    assert_eq!(handoff.len(), 1);
    pair.a.deliver(&handoff[0]);
    let frames = pair.a.frames(at_a);
    assert_eq!(frames[0]["resumed"], true);
    assert_eq!(msg_ids(&frames[1..]), ["held"], "it came along");
    // B passes A's flush back: q's relay goes out at once.
    pair.b.deliver(&a_flush[0]);
    let passed = pair.b.published("n1");
    assert_eq!(passed.len(), 1);
    pair.a.deliver(&passed[0]);
    assert_eq!(msg_ids(&pair.a.frames(at_a)), ["q-1"]);
}

/// The node of `peer` as `node` knows it.
fn node_of(node: &Node, peer: &PeerId) -> Option<String> {
    let remote = node.engine.cluster.as_ref()?.remote.get(TOPIC)?;
    Some(remote.members.get(peer)?.node.to_string())
}

#[test]
fn other_nodes_follow_the_move_even_before_their_snapshot() {
    let mut pair = Pair::new();
    let p = pair.a.peer(true, &[]);
    pair.a.release(p.conn);
    // c, on a third node, already follows the topic.
    let mut third = Node::named("n3");
    let c = third.peer(false, &[(p.id, "n1", None)]);
    let (conn, ask) = pair.resume_at_b(&p, 1);
    pair.ask_a(&ask, &p, conn);
    third.deliver(&moved(&p.id, conn, &["n3"], None));
    assert_eq!(node_of(&third, &p.id).as_deref(), Some("n2"));
    let flushed = third.published("n1");
    assert_eq!(flushed.len(), 1, "n3 had members: it flushes");
    assert!(third.frames(c.conn).is_empty(), "c sees nothing");
    third.offer(&c, &p, "1");
    assert_eq!(third.published("n2").len(), 1, "relays go to the new node");

    // A fourth node joins the topic while the move happens: its snapshot,
    // taken before the move, comes after it.
    let mut fourth = Node::named("n4");
    let request = JoinRequest {
        topic: TOPIC,
        ..JoinRequest::default()
    };
    let (d, _) = fourth.join_with(request);
    fourth.deliver(&moved(&p.id, conn, &["n3"], None));
    fourth.snapshot(TOPIC, 5, &[(p.id, "n1", None), (c.id, "n3", None)]);
    let frames = fourth.frames(d);
    assert_eq!(types(&frames), ["welcome", "peer-list"]);
    assert_eq!(frames[1]["peers"].as_array().map(Vec::len), Some(2));
    assert_eq!(node_of(&fourth, &p.id).as_deref(), Some("n2"));
}

/// A peer joins the old node between its ask for the move and its reading
/// of the move: Redis tells the new node of that join (after the move), so
/// the old node does not keep it for the moving session as well.
#[test]
fn a_join_at_the_old_node_during_the_move_reaches_the_session_once() {
    let mut pair = Pair::new();
    let (p, q, conn) = pair.asked_beside_q();
    let x = pair.a.peer(false, &[]);
    pair.b
        .deliver(&moved(&p.id, conn, &[], Some(&[(&q.id, "n1")])));
    pair.a.deliver(&moved(&p.id, conn, &[], None));
    let handoff = pair.a.published("n2");
    pair.b.deliver(&handoff[0]);
    let mut frames = pair.b.frames(conn);
    assert_eq!(frames[0]["resumed"], true);
    // Redis's event of x's join, which came after the move.
    let event = format!(
        r#"{{"topic":"{TOPIC}","v":8,"joined":[["{}","n1",null]],"left":[]}}"#,
        x.id.as_str()
    );
    pair.b.deliver(event.as_bytes());
    frames.extend(pair.b.frames(conn));
    let joined: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] == "peer-joined")
        .collect();
    assert_eq!(joined.len(), 1, "{frames:?}");
    assert_eq!(joined[0]["peerId"], x.id.as_str());
}

/// Peers join and leave the new node between Redis making the move and the
/// new node reading it: Redis told only the nodes the session no longer is
/// on, so the new node tells the session itself, from Redis's list of
/// members as of the move.
#[test]
fn changes_at_the_new_node_during_the_move_reach_the_session() {
    let mut pair = Pair::new();
    let (p, l, conn) = pair.asked_from_b();
    // Redis moved p; before B reads it, z joins B and l leaves it.
    let z = pair.b.peer(false, &[]);
    pair.b.release(l.conn);
    let members = [(&p.id, "n2"), (&l.id, "n2")];
    pair.b.deliver(&moved(&p.id, conn, &["n2"], Some(&members)));
    pair.a.deliver(&moved(&p.id, conn, &["n2"], None));
    let handoff = pair.a.published("n2");
    pair.b.deliver(&handoff[0]);
    let frames = pair.b.frames(conn);
    assert_eq!(frames[0]["resumed"], true);
    let told: Vec<(&str, &str)> = frames[1..]
        .iter()
        .map(|f| (f["type"].as_str().unwrap(), f["peerId"].as_str().unwrap()))
        .collect();
    assert_eq!(
        told,
        [("peer-joined", z.id.as_str()), ("peer-left", l.id.as_str())]
    );
}

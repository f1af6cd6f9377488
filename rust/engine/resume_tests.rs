//! Resumable sessions, sans-I/O: suspension, resume, replay, takeover,
//! expiry, and the tokens that cannot resume.

use std::time::Duration;

use serde_json::Value;

use super::tests::{at, text, written};
use super::*;

struct Room {
    engine: Engine<()>,
    out: Outbox,
    now: Instant,
}

/// A connected peer: its connection, id and resume token.
#[derive(Debug, Clone)]
struct Client {
    conn: u64,
    id: String,
    token: Option<String>,
}

fn json(frames: &[String]) -> Vec<Value> {
    frames
        .iter()
        .map(|f| serde_json::from_str(f).unwrap_or(Value::String(f.clone())))
        .collect()
}

impl Room {
    fn new() -> Self {
        Self::with(Config::default())
    }

    fn with(config: Config) -> Self {
        Self {
            engine: Engine::new(config),
            out: Outbox::default(),
            now: Instant::now(),
        }
    }

    fn join_with(&mut self, request: JoinRequest<'_>) -> (Client, Vec<Value>, Joined) {
        self.out.clear();
        let (conn, joined) = self.engine.join((), request, at(self.now), &mut self.out);
        let joined = joined.expect("admitted");
        let frames = json(&written(&self.out, conn));
        let welcome = &frames[0];
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["selfId"], joined.peer.as_str());
        let token = welcome["resumeToken"].as_str().map(str::to_owned);
        let client = Client {
            conn,
            id: joined.peer.as_str().to_owned(),
            token,
        };
        (client, frames, joined)
    }

    fn join(&mut self, resumable: bool) -> Client {
        let request = JoinRequest {
            topic: "room",
            resumable,
            ..JoinRequest::default()
        };
        self.join_with(request).0
    }

    fn resume(&mut self, token: &str, seen: u64) -> (Client, Vec<Value>, Joined) {
        let request = JoinRequest {
            topic: "room",
            resume: Some((token, Some(seen))),
            ..JoinRequest::default()
        };
        self.join_with(request)
    }

    fn offer(&mut self, from: &Client, to: &Client, n: u32) {
        self.out.clear();
        let message = format!(r#"{{"type":"offer","to":"{}","msgId":"{n}"}}"#, to.id);
        self.engine
            .receive(from.conn, &text(&message), self.now, &mut self.out);
    }

    fn to(&self, client: &Client) -> Vec<Value> {
        json(&written(&self.out, client.conn))
    }

    fn lose(&mut self, client: &Client) {
        self.out.clear();
        self.engine.release(client.conn, self.now, &mut self.out);
    }

    fn pong(&mut self, client: &Client) {
        self.out.clear();
        let pong = super::tests::masked(0x8A, b"");
        self.engine
            .receive(client.conn, &pong, self.now, &mut self.out);
    }

    fn tick(&mut self, after: Duration) {
        self.now += after;
        self.out.clear();
        self.engine.tick(self.now, &mut self.out);
    }
}

fn msg_ids(frames: &[Value]) -> Vec<&str> {
    frames.iter().filter_map(|f| f["msgId"].as_str()).collect()
}

#[test]
fn only_a_resumable_session_has_a_token() {
    let mut room = Room::new();
    assert!(room.join(false).token.is_none());
    assert!(room.join(true).token.is_some());
    let mut off = Room::with(Config {
        resume_window: None,
        ..Config::default()
    });
    assert!(off.join(true).token.is_none(), "resumes are off");
}

#[test]
fn a_lost_connection_is_suspended_and_resumed_without_anyone_noticing() {
    let mut room = Room::new();
    let a = room.join(true);
    let b = room.join(false);
    room.lose(&a);
    assert!(room.to(&b).is_empty(), "no peer-left while suspended");
    assert_eq!(room.out.sessions.len(), 1);
    assert!(
        room.engine.transport(a.conn).is_none(),
        "the dead transport is let go"
    );
    assert_eq!(room.engine.peer_count(), 2);
    // Relays to it while suspended are kept.
    for n in 1..=3 {
        room.offer(&b, &a, n);
        assert!(room.to(&b).is_empty(), "no error to the sender");
    }
    // a had received welcome, peer-list and b's peer-joined (2 messages).
    let (resumed, frames, joined) = room.resume(a.token.as_deref().unwrap(), 2);
    assert!(joined.resumed);
    assert_eq!(resumed.id, a.id, "the same peer");
    assert_eq!(frames[0]["resumed"], true);
    assert_ne!(resumed.token, a.token, "a new token");
    assert_eq!(msg_ids(&frames[1..]), ["1", "2", "3"]);
    assert_eq!(frames.len(), 4, "no peer-list after a resumed welcome");
    assert!(room.to(&b).is_empty(), "b saw nothing");
    // Live again.
    room.offer(&b, &resumed, 4);
    assert_eq!(msg_ids(&room.to(&resumed)), ["4"]);
}

#[test]
fn what_arrived_is_not_sent_again() {
    let mut room = Room::new();
    let a = room.join(true);
    let b = room.join(false);
    for n in 1..=5 {
        room.offer(&b, &a, n); // written to a's socket; some may be lost
    }
    room.lose(&a);
    // Arrived: peer-list, peer-joined, offers 1 and 2.
    let (resumed, frames, _) = room.resume(a.token.as_deref().unwrap(), 4);
    assert_eq!(msg_ids(&frames[1..]), ["3", "4", "5"]);
    // Numbering starts again with the replay: a second resume counts from it.
    room.lose(&resumed);
    let (_, frames, joined) = room.resume(resumed.token.as_deref().unwrap(), 1);
    assert!(joined.resumed);
    assert_eq!(msg_ids(&frames[1..]), ["4", "5"]);
}

#[test]
fn a_resume_takes_over_a_half_dead_connection() {
    let mut room = Room::new();
    let a = room.join(true);
    let b = room.join(false);
    let (resumed, _, joined) = room.resume(a.token.as_deref().unwrap(), 2);
    assert!(joined.resumed);
    assert_eq!(room.to(&a), ["<close 4011>"]);
    assert!(room.to(&b).is_empty());
    assert_eq!(room.engine.peer_count(), 2);
    // The old connection's end changes nothing for the session.
    room.lose(&a);
    assert!(room.to(&b).is_empty());
    room.offer(&b, &resumed, 1);
    assert_eq!(msg_ids(&room.to(&resumed)), ["1"]);
}

#[test]
fn tokens_that_cannot_resume_start_afresh_and_end_no_one() {
    let mut room = Room::new();
    let a = room.join(true);
    let b = room.join(false);
    room.lose(&a);
    let token = a.token.clone().unwrap();
    let mut forged = token.clone().into_bytes();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    for attempt in [forged.as_str(), "garbage"] {
        let (fresh, frames, joined) = room.resume(attempt, 2);
        assert!(!joined.resumed);
        assert_ne!(fresh.id, a.id);
        assert_eq!(frames[0]["resumed"], false);
        assert_eq!(frames[1]["type"], "peer-list");
        let listed: Vec<&str> = frames[1]["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap())
            .collect();
        assert!(listed.contains(&a.id.as_str()), "a is still in the topic");
        assert!(!msg_ids(&room.to(&b)).contains(&"peer-left"));
    }
    // The genuine token still works, once.
    let (_, _, joined) = room.resume(&token, 2);
    assert!(joined.resumed);
    let (again, _, joined) = room.resume(&token, 2);
    assert!(!joined.resumed, "used");
    assert_ne!(again.id, a.id);
}

#[test]
fn a_close_frame_or_no_opt_in_leaves_at_once() {
    let mut room = Room::new();
    let a = room.join(true);
    let b = room.join(false);
    let c = room.join(false);
    room.out.clear();
    room.engine.receive(
        a.conn,
        &super::tests::masked(0x88, &1000u16.to_be_bytes()),
        room.now,
        &mut room.out,
    );
    assert_eq!(room.to(&b)[0]["type"], "peer-left");
    room.lose(&c);
    assert_eq!(room.to(&b)[0]["type"], "peer-left", "not resumable: leaves");
    assert!(room.out.sessions.is_empty());
}

#[test]
fn a_suspended_session_expires_with_its_window() {
    let mut room = Room::new();
    let a = room.join(true);
    let b = room.join(false);
    room.lose(&a);
    room.tick(Duration::from_secs(29));
    assert!(room.to(&b).is_empty());
    room.tick(Duration::from_secs(2));
    let left: Vec<Value> = room
        .to(&b)
        .into_iter()
        .filter(|f| f["type"] == "peer-left")
        .collect();
    assert_eq!(left.len(), 1);
    assert_eq!(room.out.left[0].2, LeaveReason::Expired);
    let (fresh, _, joined) = room.resume(a.token.as_deref().unwrap(), 2);
    assert!(
        !joined.resumed && fresh.id != a.id,
        "expired: a fresh start"
    );
}

#[test]
fn a_suspended_session_over_the_bound_ends() {
    let mut room = Room::with(Config {
        max_queue: 400,
        ..Config::default()
    });
    let a = room.join(true);
    let b = room.join(false);
    room.lose(&a);
    let mut ended = false;
    for n in 1..=20 {
        room.offer(&b, &a, n);
        let errors: Vec<Value> = room.to(&b);
        if errors.iter().any(|e| e["code"] == "dropped") {
            // A relay over the bound is dropped, as for a slow reader.
            ended = true;
            break;
        }
    }
    assert!(ended, "the bound is reached");
    // Presence it cannot keep ends it.
    let c = room.join(false);
    let _ = c;
    assert_eq!(
        room.to(&b)
            .iter()
            .filter(|f| f["type"] == "peer-left")
            .count(),
        1
    );
}

#[test]
fn a_silent_peer_is_suspended_and_a_pong_forgets_what_arrived() {
    let mut room = Room::new();
    let a = room.join(true);
    let b = room.join(false);
    room.offer(&b, &a, 1);
    room.tick(Duration::from_secs(30)); // ping
    assert_eq!(room.to(&a), ["<ping>"]);
    room.pong(&a);
    room.pong(&b);
    room.offer(&b, &a, 2);
    room.tick(Duration::from_secs(30)); // ping again: b answers, a does not
    room.pong(&b);
    room.tick(Duration::from_secs(10)); // ping timeout: suspended
    assert_eq!(room.out.sessions.len(), 1);
    assert!(room.to(&b).is_empty());
    // The dead socket is aborted; once it is gone, only the session stays.
    assert!(room.out.actions.contains(&(a.conn, Action::Abort)));
    assert!(room.engine.transport(a.conn).is_some());
    room.lose(&a);
    assert!(room.engine.transport(a.conn).is_none());
    // Messages before the first ping are known to have arrived: a resume
    // claiming fewer cannot be honoured, and the old session ends.
    let (fresh, _, joined) = room.resume(a.token.as_deref().unwrap(), 1);
    assert!(!joined.resumed && fresh.id != a.id);
    assert_eq!(room.to(&b)[0]["type"], "peer-left");
}

#[test]
fn a_join_is_reported_once_and_a_resume_is_no_join() {
    let mut room = Room::new();
    let request = JoinRequest {
        topic: "room",
        resumable: true,
        metadata: Some(r#"{"n":1}"#),
        ..JoinRequest::default()
    };
    let (a, _, _) = room.join_with(request);
    let reported: Vec<_> = room
        .out
        .joined
        .iter()
        .map(|(peer, topic, metadata)| (peer.as_str(), &**topic, metadata.as_deref()))
        .collect();
    assert_eq!(reported, [(a.id.as_str(), "room", Some(r#"{"n":1}"#))]);
    room.lose(&a);
    assert!(
        room.out.joined.is_empty() && room.out.left.is_empty(),
        "suspended: no leave"
    );
    let (resumed, _, joined) = room.resume(a.token.as_deref().unwrap(), 1);
    assert!(joined.resumed && resumed.id == a.id);
    assert!(room.out.joined.is_empty(), "a resume is no join");
}

#[test]
fn a_suspended_session_keeps_broadcasts_up_to_its_bound_then_misses_them() {
    let mut room = Room::with(Config {
        max_queue: 1000,
        ..Config::default()
    });
    let a = room.join(false);
    let b = room.join(true);
    room.lose(&b);
    let mut dropped = 0;
    for n in 0..20 {
        room.out.clear();
        let message = format!(
            r#"{{"type":"broadcast","payload":"{}","msgId":"{n}"}}"#,
            "x".repeat(40)
        );
        room.engine
            .receive(a.conn, &text(&message), room.now, &mut room.out);
        dropped += room
            .to(&a)
            .iter()
            .filter(|m| m["code"] == "dropped" && m["missed"] == 1)
            .count();
    }
    assert!(dropped > 0, "the bound was reached");
    assert!(dropped < 20, "some were kept");
}

//! The engine on one machine, sans-I/O.

use super::*;
use crate::wire::frame::apply_mask;
use crate::wire::peer_id::PeerId;
use serde_json::value::RawValue;
use std::time::{Duration, SystemTime};

/// A join of `topic`, not resumable.
pub(super) fn request<'a>(topic: &'a str, metadata: Option<&'a str>) -> JoinRequest<'a> {
    JoinRequest {
        topic,
        metadata,
        ..JoinRequest::default()
    }
}

/// A call at `instant`, on today's date.
pub(super) fn at(instant: Instant) -> Now {
    Now {
        instant,
        wall: SystemTime::now(),
    }
}

/// Text of the frames written to `conn`, decoded; "<close N>" for a
/// close frame, "<ping>"/"<pong>" for control frames.
pub(super) fn written(out: &Outbox, conn: u64) -> Vec<String> {
    let mut bytes = Vec::new();
    for (c, action) in &out.actions {
        if let (true, Action::Write(i)) = (*c == conn, action) {
            bytes.extend_from_slice(&out.bufs[*i]);
        }
    }
    decode(&bytes)
}

fn decode(mut bytes: &[u8]) -> Vec<String> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let (len, start) = match bytes[1] {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let payload = &bytes[start..start + len];
        frames.push(match bytes[0] & 0x0f {
            1 => String::from_utf8(payload.to_vec()).unwrap(),
            8 => format!("<close {}>", u16::from_be_bytes([payload[0], payload[1]])),
            9 => "<ping>".into(),
            10 => "<pong>".into(),
            op => format!("<op {op}>"),
        });
        bytes = &bytes[start + len..];
    }
    frames
}

pub(super) fn text(payload: &str) -> Vec<u8> {
    masked(0x81, payload.as_bytes())
}

pub(super) fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let key = [1, 2, 3, 4];
    let mut out = vec![first, 0x80 | payload.len() as u8];
    out.extend_from_slice(&key);
    let mut body = payload.to_vec();
    apply_mask(&mut body, key);
    out.extend(body);
    out
}

struct Harness {
    engine: Engine<()>,
    out: Outbox,
    now: Instant,
}

impl Harness {
    fn new(config: Config) -> Self {
        Self {
            engine: Engine::new(config),
            out: Outbox::default(),
            now: Instant::now(),
        }
    }

    fn join(&mut self, topic: &str) -> (u64, String) {
        self.out.clear();
        let (conn, peer) = self
            .engine
            .join((), request(topic, None), at(self.now), &mut self.out);
        (conn, peer.expect("admitted").peer.as_str().to_owned())
    }

    fn send(&mut self, conn: u64, bytes: &[u8]) {
        self.out.clear();
        self.engine.receive(conn, bytes, self.now, &mut self.out);
    }
}

#[test]
fn join_relay_leave() {
    let mut h = Harness::new(Config::default());
    let (a, a_id) = h.join("room");
    assert_eq!(written(&h.out, a).len(), 2);
    let (b, b_id) = h.join("room");
    assert_eq!(
        written(&h.out, a),
        vec![format!(r#"{{"type":"peer-joined","peerId":"{b_id}"}}"#)]
    );
    assert_eq!(
        written(&h.out, b)[1],
        format!(r#"{{"type":"peer-list","peers":[{{"id":"{a_id}"}}]}}"#)
    );
    h.send(
        a,
        &text(&format!(
            r#"{{"type":"offer","to":"{b_id}","payload":{{"x":1}},"msgId":"m"}}"#
        )),
    );
    assert_eq!(
        written(&h.out, b),
        vec![format!(
            r#"{{"type":"offer","from":"{a_id}","payload":{{"x":1}},"msgId":"m"}}"#
        )]
    );
    h.send(a, &masked(0x88, &1000u16.to_be_bytes()));
    assert_eq!(written(&h.out, a), vec!["<close 1000>"]);
    assert!(h.out.actions.contains(&(a, Action::Close)));
    assert_eq!(
        written(&h.out, b),
        vec![format!(r#"{{"type":"peer-left","peerId":"{a_id}"}}"#)]
    );
    assert_eq!(h.engine.peer_count(), 1);
}

#[test]
fn many_messages_in_one_chunk_are_one_write() {
    let mut h = Harness::new(Config::default());
    let (a, _) = h.join("room");
    let (b, b_id) = h.join("room");
    let msg = text(&format!(r#"{{"type":"ice-candidate","to":"{b_id}"}}"#));
    let chunk: Vec<u8> = msg.iter().copied().cycle().take(msg.len() * 5).collect();
    h.send(a, &chunk);
    let writes: Vec<_> = h.out.actions.iter().filter(|(c, _)| *c == b).collect();
    assert_eq!(writes.len(), 1);
    assert_eq!(written(&h.out, b).len(), 5);
}

#[test]
fn errors_keep_the_connection_open() {
    let mut h = Harness::new(Config::default());
    let (a, _) = h.join("room");
    h.send(a, &text("nope"));
    h.send(a, &masked(0x82, b"bin"));
    assert!(written(&h.out, a)[0].contains("unsupported_frame"));
    h.send(
        a,
        &text(r#"{"type":"offer","to":"01ARZ3NDEKTSV4RRFFQ69G5FAV","msgId":"q"}"#),
    );
    assert!(written(&h.out, a)[0]
        .contains(r#""code":"target_not_found","message":"peer not found","msgId":"q""#));
    assert_eq!(h.engine.peer_count(), 1);
}

#[test]
fn protocol_fault_closes_with_its_code() {
    let mut h = Harness::new(Config::default());
    let (a, _) = h.join("room");
    let (b, _) = h.join("room");
    h.send(a, &masked(0x81, &[0xff]));
    assert_eq!(written(&h.out, a), vec!["<close 1007>"]);
    assert!(h.out.actions.contains(&(a, Action::Finish)));
    assert!(written(&h.out, b)[0].contains("peer-left"));
}

#[test]
fn full_queue_drops_relays_and_dooms_on_presence() {
    let config = Config {
        max_queue: 200,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let (a, _) = h.join("room");
    let (b, b_id) = h.join("room");
    h.engine.pause(b, h.now);
    let offer = text(&format!(
        r#"{{"type":"offer","to":"{b_id}","payload":"xxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#
    ));
    let mut dropped = 0;
    for _ in 0..10 {
        h.send(a, &offer);
        dropped += written(&h.out, a)
            .iter()
            .filter(|m| m.contains("\"dropped\""))
            .count();
    }
    assert!(dropped > 0, "a full queue refuses relays");
    assert_eq!(
        h.engine.peer_count(),
        2,
        "a relay never disconnects the target"
    );
    // A presence event that does not fit: b is cut rather than left with a wrong view.
    let (_c, _) = h.join("room");
    assert_eq!(
        written(&h.out, b),
        vec![
            r#"{"type":"error","code":"slow_consumer","message":"outbound buffer full"}"#
                .to_owned(),
            "<close 4008>".to_owned(),
        ]
    );
    assert!(h
        .out
        .left
        .iter()
        .any(|(_, _, why)| *why == LeaveReason::SlowConsumer));
    assert_eq!(h.engine.peer_count(), 2);
    // Resuming writes nothing more: its queue went with it.
    h.out.clear();
    h.engine.resume(b, h.now, &mut h.out);
    assert!(written(&h.out, b).is_empty());
}

#[test]
fn queue_is_written_on_resume_in_order() {
    let mut h = Harness::new(Config::default());
    let (a, _) = h.join("room");
    let (b, b_id) = h.join("room");
    h.engine.pause(b, h.now);
    for i in 0..3 {
        h.send(
            a,
            &text(&format!(
                r#"{{"type":"answer","to":"{b_id}","msgId":"{i}"}}"#
            )),
        );
        assert!(written(&h.out, b).is_empty());
    }
    h.out.clear();
    h.engine
        .resume(b, h.now + Duration::from_millis(30), &mut h.out);
    let got = written(&h.out, b);
    assert_eq!(got.len(), 3);
    assert!(got[0].ends_with(r#""msgId":"0"}"#) && got[2].ends_with(r#""msgId":"2"}"#));
    // The wait is counted once, in the bucket of 30 ms (up to 50 ms).
    use crate::metrics::{cell, family, LATENCY_BUCKETS};
    let metrics = h.engine.metrics().clone();
    let counts: Vec<u64> = (0..LATENCY_BUCKETS.len())
        .map(|bucket| metrics.get(cell(family::QUEUE_WAIT_SECONDS, bucket)))
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 1);
    assert_eq!(counts[6], 1, "{counts:?}");
    // A resume with nothing queued counts nothing.
    h.engine.pause(b, h.now);
    h.engine.resume(b, h.now, &mut h.out);
    let total: u64 = (0..LATENCY_BUCKETS.len())
        .map(|bucket| metrics.get(cell(family::QUEUE_WAIT_SECONDS, bucket)))
        .sum();
    assert_eq!(total, 1);
}

/// A ping every 100 ms, and 100 ms to answer it.
fn fast_pings() -> Config {
    Config {
        ping_interval: Duration::from_millis(100),
        ping_timeout: Duration::from_millis(100),
        ..Config::default()
    }
}

#[test]
fn silent_peer_times_out() {
    let mut h = Harness::new(fast_pings());
    let (a, _) = h.join("room");
    let (b, _) = h.join("room");
    h.out.clear();
    h.engine
        .tick(h.now + Duration::from_millis(100), &mut h.out);
    assert_eq!(written(&h.out, a), vec!["<ping>"]);
    // a answers, b stays silent
    h.send(a, &masked(0x8A, b""));
    h.out.clear();
    h.engine
        .tick(h.now + Duration::from_millis(200), &mut h.out);
    assert!(h.out.actions.contains(&(b, Action::Abort)));
    assert!(!h.out.actions.contains(&(a, Action::Abort)));
    assert!(written(&h.out, a).iter().any(|m| m.contains("peer-left")));
}

#[test]
fn a_tick_in_parts_pings_and_times_out_only_its_part() {
    let mut h = Harness::new(fast_pings());
    let conns: Vec<u64> = (0..100).map(|_| h.join("room").0).collect();
    let pinged = |h: &Harness| -> Vec<u64> {
        (conns.iter().copied())
            .filter(|c| written(&h.out, *c).contains(&"<ping>".to_string()))
            .collect()
    };
    let due = h.now + Duration::from_millis(100);
    let mut seen = Vec::new();
    for index in 0..5 {
        h.out.clear();
        h.engine.tick_part(due, Part::new(index, 5), &mut h.out);
        let part = pinged(&h);
        // About a fifth, each in its part, none twice.
        assert!((18..=22).contains(&part.len()), "part {index}: {part:?}");
        assert!(part.iter().all(|c| Part::new(index, 5).holds(*c)));
        assert!(part.iter().all(|c| !seen.contains(c)));
        seen.extend(part);
    }
    assert_eq!(seen.len(), conns.len());
    // All pinged once: a full sweep at the same time pings no one again.
    h.out.clear();
    h.engine.tick(due, &mut h.out);
    assert!(pinged(&h).is_empty());
    // Nobody answers: a part times out its own peers and no others.
    let late = due + Duration::from_millis(100);
    h.out.clear();
    h.engine.tick_part(late, Part::new(1, 5), &mut h.out);
    let aborted: Vec<u64> = (conns.iter().copied())
        .filter(|c| h.out.actions.contains(&(*c, Action::Abort)))
        .collect();
    assert!((18..=22).contains(&aborted.len()), "{aborted:?}");
    assert!(aborted.iter().all(|c| Part::new(1, 5).holds(*c)));
}

#[test]
fn part_is_taken_modulo_and_never_of_zero() {
    assert_eq!(Part::new(7, 5), Part::new(2, 5));
    assert_eq!(Part::new(3, 0), Part::ALL);
    assert!(Part::new(5, 5).is_first());
    assert!((0..10).all(|conn| Part::ALL.holds(conn)));
}

#[test]
fn parts_stay_even_whatever_the_stride_of_the_keys() {
    for stride in [1, 2, 3, 10, 64] {
        let mut counts = [0; 10];
        for conn in (1..=1000).map(|k| k * stride) {
            let parts: Vec<u64> = (0..10).filter(|i| Part::new(*i, 10).holds(conn)).collect();
            assert_eq!(parts.len(), 1, "key {conn} in parts {parts:?}");
            counts[parts[0] as usize] += 1;
        }
        assert!(
            counts.iter().all(|n| (90..=110).contains(n)),
            "stride {stride}: {counts:?}"
        );
    }
}

#[test]
fn full_topic_and_full_server_refuse_with_their_codes() {
    let config = Config {
        max_peers_per_topic: 2,
        max_connections: 3,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let (a, _) = h.join("room");
    h.join("room");
    h.out.clear();
    let (c, refused) = h
        .engine
        .join((), request("room", None), at(h.now), &mut h.out);
    assert_eq!(refused, Err(Refusal::TopicFull));
    assert_eq!(
        written(&h.out, c),
        vec![
            r#"{"type":"error","code":"topic_full","message":"topic is full"}"#.to_owned(),
            "<close 4009>".to_owned(),
        ]
    );
    assert!(
        written(&h.out, a).is_empty(),
        "the others learn nothing of it"
    );
    h.out.clear();
    let (d, refused) = h
        .engine
        .join((), request("other", None), at(h.now), &mut h.out);
    assert_eq!(refused, Err(Refusal::ServerFull));
    assert_eq!(written(&h.out, d)[1], "<close 4029>");
    assert_eq!(h.engine.peer_count(), 2);
}

#[test]
fn rate_limit_drops_then_disconnects_abusers() {
    let limit = RateLimit {
        per_second: 1.0,
        burst: 2.0,
    };
    let mut h = Harness::new(Config {
        rate_limit: Some(limit),
        ..Config::default()
    });
    let (a, _) = h.join("room");
    let (b, _) = h.join("room");
    let ping = text(r#"{"type":"ping","msgId":"p"}"#);
    let mut codes = Vec::new();
    for _ in 0..ABUSE_LIMIT + 2 {
        h.send(a, &ping);
        codes.extend(written(&h.out, a));
    }
    assert_eq!(
        codes[..2],
        [
            r#"{"type":"pong","msgId":"p"}"#,
            r#"{"type":"pong","msgId":"p"}"#
        ]
    );
    assert_eq!(
        codes[2],
        r#"{"type":"error","code":"rate_limited","message":"message rate limit exceeded","msgId":"p"}"#
    );
    assert!(codes.ends_with(&["<close 4008>".to_owned()]), "{codes:?}");
    assert!(h
        .out
        .left
        .iter()
        .any(|(_, _, why)| *why == LeaveReason::RateAbuse));
    assert!(written(&h.out, b).iter().any(|m| m.contains("peer-left")));
    // Tokens come back with time.
    let (c, _) = h.join("room");
    h.send(c, &ping);
    h.send(c, &ping);
    h.now += Duration::from_secs(1);
    h.send(c, &ping);
    assert_eq!(written(&h.out, c), vec![r#"{"type":"pong","msgId":"p"}"#]);
}

#[test]
fn close_all_then_timeout_aborts() {
    let mut h = Harness::new(Config::default());
    let (a, _) = h.join("room");
    h.out.clear();
    h.engine.close_all(1001, "going away", h.now, &mut h.out);
    assert_eq!(written(&h.out, a), vec!["<close 1001>"]);
    h.out.clear();
    h.engine.tick(h.now + Duration::from_secs(3), &mut h.out);
    assert!(h.out.actions.contains(&(a, Action::Abort)));
    h.out.clear();
    h.engine.release(a, h.now, &mut h.out);
    assert_eq!(h.engine.connection_count(), 0);
    assert_eq!(h.engine.topic_count(), 0);
}

#[test]
fn admin_lists_kicks_and_speaks() {
    let mut h = Harness::new(Config::default());
    let (a, a_id) = h.join("room");
    let (b, b_id) = h.join("room");
    let (_, c_id) = h.join("other");
    let mut topics = h.engine.topic_counts();
    topics.sort();
    assert_eq!(topics, [("other".to_owned(), 1), ("room".to_owned(), 2)]);
    let views = h.engine.peer_views("room").expect("a topic");
    let ids: Vec<&str> = views.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids, [a_id.as_str(), b_id.as_str()]);
    assert!(views[0].since_ms > 0 && !views[0].suspended);
    assert!(h.engine.peer_views("nobody").is_none());

    h.out.clear();
    let payload: &RawValue = serde_json::from_str(r#"{"x":1}"#).unwrap();
    let reached = h
        .engine
        .server_message("room", None, payload, h.now, &mut h.out);
    assert_eq!(reached, Ok(2));
    let frame = r#"{"type":"server-message","payload":{"x":1}}"#;
    assert_eq!(written(&h.out, a), [frame]);
    assert_eq!(written(&h.out, b), [frame]);
    let to_c = PeerId::parse(&c_id).unwrap();
    let wrong = h
        .engine
        .server_message("room", Some(&to_c), payload, h.now, &mut h.out);
    assert_eq!(wrong, Err(Missing::Peer), "c is in another topic");

    h.out.clear();
    let victim = PeerId::parse(&a_id).unwrap();
    assert_eq!(h.engine.kick("room", &victim, h.now, &mut h.out), Ok(()));
    let kicked = r#"{"type":"error","code":"kicked","message":"removed by the server"}"#;
    assert_eq!(written(&h.out, a), [kicked, "<close 4010>"]);
    assert_eq!(
        written(&h.out, b),
        [format!(r#"{{"type":"peer-left","peerId":"{a_id}"}}"#)]
    );
    assert_eq!(h.out.left[0].2, LeaveReason::Kicked);
    let again = h.engine.kick("room", &victim, h.now, &mut h.out);
    assert_eq!(again, Err(Missing::Peer));
    assert_eq!(
        h.engine.kick("gone", &victim, h.now, &mut h.out),
        Err(Missing::Topic)
    );
}

#[test]
fn a_broadcast_reaches_every_other_peer_once_encoded() {
    let mut h = Harness::new(Config::default());
    let (a, a_id) = h.join("room");
    let (b, _) = h.join("room");
    let (c, _) = h.join("room");
    let (elsewhere, _) = h.join("other");
    h.send(
        a,
        &text(r#"{"type":"broadcast","payload":{"n":1},"msgId":"m1"}"#),
    );
    let expected =
        format!(r#"{{"type":"broadcast","from":"{a_id}","payload":{{"n":1}},"msgId":"m1"}}"#);
    assert_eq!(written(&h.out, b), vec![expected.clone()]);
    assert_eq!(written(&h.out, c), vec![expected]);
    assert!(written(&h.out, a).is_empty(), "not to the sender");
    assert!(
        written(&h.out, elsewhere).is_empty(),
        "not to another topic"
    );
    assert_eq!(h.out.bufs.len(), 1, "one buffer written to both");
}

#[test]
fn a_full_target_misses_a_broadcast_and_the_sender_hears_how_many() {
    let config = Config {
        max_queue: 200,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let (a, _) = h.join("room");
    let (b, _) = h.join("room");
    let (c, _) = h.join("room");
    h.engine.pause(b, h.now);
    h.engine.pause(c, h.now);
    let broadcast = text(
        r#"{"type":"broadcast","payload":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","msgId":"m"}"#,
    );
    let mut errors = Vec::new();
    for _ in 0..6 {
        h.send(a, &broadcast);
        errors.extend(written(&h.out, a));
    }
    assert!(!errors.is_empty(), "the queues filled");
    for error in &errors {
        let error: serde_json::Value = serde_json::from_str(error).unwrap();
        assert_eq!(
            (error["code"].as_str(), error["missed"].as_u64()),
            (Some("dropped"), Some(2))
        );
        assert_eq!(error["msgId"], "m");
    }
    assert_eq!(
        h.engine.peer_count(),
        4 - 1,
        "a broadcast disconnects nobody"
    );
}

#[test]
fn broadcasts_are_bounded_in_size_and_rate_and_can_be_off() {
    let limits = BroadcastLimits {
        max_size: 80,
        rate: RateLimit {
            per_second: 1.0,
            burst: 2.0,
        },
    };
    let config = Config {
        broadcast: Some(limits),
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let (a, _) = h.join("room");
    let (_b, _) = h.join("room");
    let code = |h: &Harness, conn| {
        let frames = written(&h.out, conn);
        frames
            .first()
            .map(|f| serde_json::from_str::<serde_json::Value>(f).unwrap()["code"].clone())
    };
    let big = format!(r#"{{"type":"broadcast","payload":"{}"}}"#, "x".repeat(80));
    h.send(a, &text(&big));
    assert_eq!(code(&h, a), Some("invalid_message".into()));
    let small = text(r#"{"type":"broadcast","payload":1}"#);
    for _ in 0..2 {
        h.send(a, &small);
        assert_eq!(code(&h, a), None, "within the burst");
    }
    h.send(a, &small);
    assert_eq!(code(&h, a), Some("rate_limited".into()));
    h.now += Duration::from_secs(1);
    h.send(a, &small);
    assert_eq!(code(&h, a), None, "a token a second");

    let mut off = Harness::new(Config {
        broadcast: None,
        ..Config::default()
    });
    let (a, _) = off.join("room");
    off.send(a, &small);
    assert_eq!(code(&off, a), Some("forbidden".into()));
}

#[test]
fn an_allowed_relay_type_is_relayed_like_an_offer() {
    let config = Config {
        relay_types: vec!["bye"],
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let (a, a_id) = h.join("room");
    let (b, b_id) = h.join("room");
    h.send(
        a,
        &text(&format!(r#"{{"type":"bye","to":"{b_id}","msgId":"x"}}"#)),
    );
    assert_eq!(
        written(&h.out, b),
        vec![format!(r#"{{"type":"bye","from":"{a_id}","msgId":"x"}}"#)]
    );
    h.send(a, &text(&format!(r#"{{"type":"hello","to":"{b_id}"}}"#)));
    assert!(written(&h.out, a)[0].contains("invalid_type"));
}

#[test]
fn a_metadata_update_reaches_the_others_and_later_joiners() {
    let mut h = Harness::new(Config::default());
    let (a, a_id) = h.join("room");
    let (b, _) = h.join("room");
    h.send(
        a,
        &text(r#"{"type":"update-metadata","metadata":{"name":"ada"}}"#),
    );
    assert_eq!(
        written(&h.out, b),
        vec![format!(
            r#"{{"type":"peer-updated","peerId":"{a_id}","metadata":{{"name":"ada"}}}}"#
        )]
    );
    assert!(written(&h.out, a).is_empty(), "no echo");
    assert_eq!(h.out.updated.len(), 1);
    let (c, _) = h.join("room");
    assert!(written(&h.out, c)[1].contains(r#""metadata":{"name":"ada"}"#));
    h.send(a, &text(r#"{"type":"update-metadata","metadata":null}"#));
    assert_eq!(
        written(&h.out, b),
        vec![format!(
            r#"{{"type":"peer-updated","peerId":"{a_id}","metadata":null}}"#
        )]
    );
    h.send(a, &text(r#"{"type":"update-metadata"}"#));
    assert!(written(&h.out, a)[0].contains("invalid_message"));
}

#[test]
fn a_locked_metadata_cannot_be_updated() {
    let mut h = Harness::new(Config::default());
    h.out.clear();
    let request = JoinRequest {
        metadata_locked: true,
        ..request("room", Some(r#"{"role":"host"}"#))
    };
    let (a, _) = h.engine.join((), request, at(h.now), &mut h.out);
    let (b, _) = h.join("room");
    h.send(
        a,
        &text(r#"{"type":"update-metadata","metadata":1,"msgId":"u"}"#),
    );
    assert!(written(&h.out, a)[0].contains(r#""code":"forbidden""#));
    assert!(written(&h.out, b).is_empty());
}

#[test]
fn bytes_past_the_mark_ask_for_a_flush_and_joins_are_timed_to_it() {
    let mut h = Harness::new(Config::default());
    h.engine.defer_writes(300);
    let (a, _) = h.join("room");
    let (b, b_id) = h.join("room");
    let joins = |engine: &Engine<()>| {
        let text = engine.metrics().table().render();
        text.contains("signaling_join_seconds_count 2\n")
    };
    assert!(
        !joins(&h.engine),
        "a join is counted when its welcome is written"
    );
    h.engine.written(h.now);
    assert!(joins(&h.engine));
    let offer = text(&format!(
        r#"{{"type":"offer","to":"{b_id}","payload":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#
    ));
    let mut sent = 0;
    for _ in 0..10 {
        if h.engine.flush_now() {
            break;
        }
        h.send(a, &offer);
        sent += written(&h.out, b).len();
    }
    assert!(h.engine.flush_now());
    assert_eq!(sent, 3, "three relays of 109 bytes pass 300");
    h.engine.written(h.now);
    assert!(!h.engine.flush_now());
    h.send(a, &offer);
    assert!(!h.engine.flush_now(), "the mark counts afresh");
}

/// Every idle peer has one record, boxed: 136 bytes fill a 144-byte heap
/// block (glibc's chunks are the size plus 8, in steps of 16). A field more
/// costs every peer 16 bytes (docs/performance.md, RSS per idle peer).
#[test]
fn a_connection_record_fits_its_heap_block() {
    assert!(std::mem::size_of::<Conn<Box<u8>>>() <= 136);
    assert_eq!(std::mem::size_of::<crate::wire::frame::FrameReader>(), 32);
}

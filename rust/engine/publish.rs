//! Cluster mode: the writes to Redis' writer connection and the reading
//! of its replies, sans-I/O.
//!
//! What the engine publishes to other nodes' inboxes ([`ClusterOp::Publish`])
//! is gathered over an event loop iteration: each node's messages become
//! one `PUBLISH` of an envelope (`wire::cluster`'s `E`), so a burst of
//! relays to one node costs one command, one reply and one inbox message
//! instead of one each. The other work for Redis is encoded by the server
//! ([`Publisher::raw`]) and is a barrier: what was published before it is
//! written before it, in order, so that (say) a peer's relays reach their
//! node before the leave that follows them. Messages to different nodes
//! may pass each other, as no node sees the others' inboxes.
//!
//! The writer's replies come back in the order of the commands; those of a
//! raw command are handed back to the server as they came, those of a
//! publish are read here: a relay that reached no subscriber is
//! undeliverable.
//!
//! [`ClusterOp::Publish`]: super::outbox::ClusterOp::Publish

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::outbox::ClusterOp;

use crate::wire::cluster::{envelope_len, push_envelope};
use crate::wire::resp::{self, Malformed, Stream};

/// The writer's commands since the last [`Publisher::take`], and the
/// replies it waits for.
#[derive(Debug, Default)]
pub struct Publisher {
    channel_prefix: Vec<u8>,
    items: Vec<Item>,
    /// Each node's batch in `items` still open to more messages (until a
    /// raw command).
    open: FxHashMap<Arc<str>, usize>,
    expected: VecDeque<Expected>,
    /// The writer's bytes, cut into replies.
    stream: Stream,
    /// When a reply last came, or the first command was written that found
    /// none waiting.
    progress: Option<Instant>,
    /// When [`Publisher::take`] last took something, and the bytes of
    /// what waits since.
    last_write: Option<Instant>,
    waiting_bytes: usize,
}

/// Past this many bytes waiting, they are written without a pause (the
/// transports' high-water mark).
const PAUSE_BYTES: usize = 64 * 1024;

#[derive(Debug)]
enum Item {
    Batch {
        node: Arc<str>,
        /// Each message, and whether it is a relay.
        messages: Vec<(Vec<u8>, bool)>,
    },
    Raw {
        data: Vec<u8>,
        replies: u32,
    },
}

#[derive(Debug)]
enum Expected {
    /// A publish, with the relays it carries.
    Publish { relays: Vec<Vec<u8>> },
    /// This many replies of raw commands.
    Raw(u32),
}

/// What the writer's replies ask of the caller, in the order they came.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Replies of raw commands, whole, as they came.
    Raw(Vec<u8>),
    /// Relays that reached no subscriber (their target's node is gone).
    Unreachable(Vec<Vec<u8>>),
    /// A publish that Redis answered with an error (its text): its relays
    /// did not arrive, as far as anyone knows.
    Failed(String, Vec<Vec<u8>>),
}

/// The replies read from one batch of bytes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replies {
    pub replies: Vec<Reply>,
    /// What followed them was not RESP, or answered nothing asked: the
    /// connection is unusable (what came before still counts).
    pub malformed: bool,
}

impl Replies {
    fn raw(&mut self, reply: &[u8]) {
        if let Some(Reply::Raw(raw)) = self.replies.last_mut() {
            raw.extend_from_slice(reply);
        } else {
            self.replies.push(Reply::Raw(reply.to_vec()));
        }
    }

    fn unreachable(&mut self, relays: &mut Vec<Vec<u8>>) {
        if relays.is_empty() {
            return;
        }
        if let Some(Reply::Unreachable(some)) = self.replies.last_mut() {
            some.append(relays);
        } else {
            self.replies
                .push(Reply::Unreachable(std::mem::take(relays)));
        }
    }
}

impl Publisher {
    /// `channel_prefix`: what every node's inbox channel starts with.
    pub fn new(channel_prefix: Vec<u8>) -> Self {
        Self {
            channel_prefix,
            ..Self::default()
        }
    }

    /// Publishes `message` to `node`'s inbox; a relay (`relay`) that reaches
    /// no one comes back in [`Replies::unreachable`].
    pub fn publish(&mut self, node: &Arc<str>, message: Vec<u8>, relay: bool) {
        self.waiting_bytes += message.len();
        if let Some(&at) = self.open.get(node) {
            if let Item::Batch { messages, .. } = &mut self.items[at] {
                messages.push((message, relay));
                return;
            }
        }
        self.open.insert(Arc::clone(node), self.items.len());
        self.items.push(Item::Batch {
            node: Arc::clone(node),
            messages: vec![(message, relay)],
        });
    }

    /// Takes `op` if it is a publish (see [`Publisher::publish`]); gives it
    /// back if not.
    pub fn offer(&mut self, op: ClusterOp) -> Option<ClusterOp> {
        match op {
            ClusterOp::Publish {
                node,
                message,
                relay,
            } => {
                self.publish(&node, message, relay);
                None
            }
            op => Some(op),
        }
    }

    /// Writes `data`, encoded commands whose `replies` replies go back to
    /// the caller as they are; after everything published so far.
    pub fn raw(&mut self, data: Vec<u8>, replies: u32) {
        self.open.clear();
        self.waiting_bytes += data.len();
        self.items.push(Item::Raw { data, replies });
    }

    /// Whether anything waits to be written.
    pub fn has_writes(&self) -> bool {
        !self.items.is_empty()
    }

    /// Whether anything waits to be written or answered.
    pub fn busy(&self) -> bool {
        !self.items.is_empty() || !self.expected.is_empty()
    }

    /// How much longer what waits should wait, writes being at least
    /// `pause` apart: none after a quiet spell of `pause` (a relay alone
    /// is not held up), nor past [`PAUSE_BYTES`]. The pause lets a steady
    /// stream of relays gather more per command.
    pub fn wait(&self, now: Instant, pause: Duration) -> Option<Duration> {
        let since = now.saturating_duration_since(self.last_write?);
        (since < pause && !self.full()).then(|| pause - since)
    }

    /// Whether what waits is past [`PAUSE_BYTES`].
    pub fn full(&self) -> bool {
        self.waiting_bytes >= PAUSE_BYTES
    }

    /// The bytes to write now: every command since the last call, in order.
    pub fn take(&mut self, now: Instant) -> Vec<u8> {
        if self.expected.is_empty() && !self.items.is_empty() {
            self.progress = Some(now);
        }
        if !self.items.is_empty() {
            self.last_write = Some(now);
        }
        self.waiting_bytes = 0;
        self.open.clear();
        let mut out = Vec::new();
        for item in self.items.drain(..) {
            match item {
                Item::Raw { data, replies } => {
                    out.extend_from_slice(&data);
                    if replies > 0 {
                        self.expected.push_back(Expected::Raw(replies));
                    }
                }
                Item::Batch { node, messages } => {
                    let prefix = &self.channel_prefix;
                    if let [(message, _)] = messages.as_slice() {
                        resp::push_publish(&mut out, prefix, &node, message.len(), |o| {
                            o.extend_from_slice(message);
                        });
                    } else {
                        let each = || messages.iter().map(|(m, _)| m.as_slice());
                        resp::push_publish(&mut out, prefix, &node, envelope_len(each()), |o| {
                            push_envelope(o, each());
                        });
                    }
                    let relays = messages
                        .into_iter()
                        .filter_map(|(message, relay)| relay.then_some(message))
                        .collect();
                    self.expected.push_back(Expected::Publish { relays });
                }
            }
        }
        out
    }

    /// Reads replies from `data` (the writer's bytes as they came).
    pub fn read(&mut self, data: &[u8], now: Instant) -> Replies {
        let mut replies = Replies::default();
        let Self {
            stream,
            expected,
            progress,
            ..
        } = self;
        let read = stream.feed(data, |reply| {
            *progress = Some(now);
            match expected.front_mut() {
                // Nothing was asked: not a reply to this writer.
                None => return Err(Malformed),
                Some(Expected::Raw(left)) => {
                    replies.raw(reply);
                    *left -= 1;
                    if *left == 0 {
                        expected.pop_front();
                    }
                }
                Some(Expected::Publish { relays }) => {
                    if let Some(text) = resp::error(reply) {
                        let relays = std::mem::take(relays);
                        replies.replies.push(Reply::Failed(text.to_owned(), relays));
                    } else if resp::integer(reply) == Some(0) {
                        replies.unreachable(relays);
                    }
                    expected.pop_front();
                }
            }
            Ok(())
        });
        replies.malformed = read.is_err();
        replies
    }

    /// Seconds since the writer last made progress while replies are
    /// awaited; 0 when none is.
    pub fn stalled(&self, now: Instant) -> f64 {
        match self.progress {
            Some(since) if !self.expected.is_empty() => {
                now.saturating_duration_since(since).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// Forgets everything (the connection is lost): the relays that were
    /// waiting to be written or answered, which did not arrive as far as
    /// anyone knows.
    pub fn abandon(&mut self) -> Vec<Vec<u8>> {
        self.open.clear();
        self.stream.clear();
        self.progress = None;
        self.last_write = None;
        self.waiting_bytes = 0;
        let mut relays = Vec::new();
        for expected in self.expected.drain(..) {
            if let Expected::Publish { relays: mut some } = expected {
                relays.append(&mut some);
            }
        }
        for item in self.items.drain(..) {
            if let Item::Batch { messages, .. } = item {
                relays.extend(messages.into_iter().filter_map(|(m, r)| r.then_some(m)));
            }
        }
        relays
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::wire::cluster::envelope;

    fn node(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    /// The commands in `data`, as the payloads of their PUBLISHes (a raw
    /// command as `raw:` and its bytes).
    fn commands(mut data: &[u8]) -> Vec<(String, Vec<Vec<u8>>)> {
        let mut out = Vec::new();
        while let Some(len) = resp::reply_len(data).unwrap() {
            let (command, rest) = data.split_at(len);
            data = rest;
            match resp::bulk_strings(command).as_deref() {
                Some([b"PUBLISH", channel, payload]) => {
                    let messages = if payload.first() == Some(&b'E') {
                        envelope(payload).map(<[u8]>::to_vec).collect()
                    } else {
                        vec![payload.to_vec()]
                    };
                    out.push((String::from_utf8(channel.to_vec()).unwrap(), messages));
                }
                _ => out.push(("raw".into(), vec![command.to_vec()])),
            }
        }
        out
    }

    #[test]
    fn each_nodes_messages_go_in_one_publish_until_a_raw_command() {
        let mut publisher = Publisher::new(b"p:node:".to_vec());
        let (a, b) = (node("a"), node("b"));
        publisher.publish(&a, b"R1".to_vec(), true);
        publisher.publish(&b, b"R2".to_vec(), true);
        publisher.publish(&a, b"D3".to_vec(), false);
        publisher.raw(b"*1\r\n$4\r\nPING\r\n".to_vec(), 1);
        publisher.publish(&a, b"R4".to_vec(), true);
        assert!(publisher.has_writes());
        let written = publisher.take(Instant::now());
        assert!(!publisher.has_writes());
        let m = |x: &[u8]| x.to_vec();
        assert_eq!(
            commands(&written),
            vec![
                ("p:node:a".into(), vec![m(b"R1"), m(b"D3")]),
                ("p:node:b".into(), vec![m(b"R2")]),
                ("raw".into(), vec![m(b"*1\r\n$4\r\nPING\r\n")]),
                ("p:node:a".into(), vec![m(b"R4")]),
            ]
        );
    }

    #[test]
    fn replies_go_to_their_commands_in_order() {
        let now = Instant::now();
        let mut publisher = Publisher::new(b"p:node:".to_vec());
        let a = node("a");
        publisher.publish(&a, b"R1".to_vec(), true);
        publisher.publish(&a, b"D2".to_vec(), false);
        publisher.raw(b"two commands".to_vec(), 2);
        publisher.publish(&a, b"R3".to_vec(), true);
        publisher.publish(&node("b"), b"R4".to_vec(), true);
        publisher.take(now);
        let data = b":0\r\n*2\r\n:1\r\n$1\r\nx\r\n+OK\r\n-ERR no\r\n:1\r\n";
        // Fed a byte at a time: replies cut anywhere are put together.
        let mut all = Vec::new();
        for byte in data {
            let got = publisher.read(std::slice::from_ref(byte), now);
            assert!(!got.malformed);
            all.extend(got.replies);
        }
        let m = |x: &[u8]| x.to_vec();
        assert_eq!(
            all,
            vec![
                Reply::Unreachable(vec![m(b"R1")]),
                Reply::Raw(m(b"*2\r\n:1\r\n$1\r\nx\r\n")),
                Reply::Raw(m(b"+OK\r\n")),
                Reply::Failed("ERR no".into(), vec![m(b"R3")]),
            ]
        );
        assert_eq!(publisher.stalled(now), 0.0);
        assert!(!publisher.busy());
        // A reply that nothing asked for is not this writer's.
        assert!(publisher.read(b":1\r\n", now).malformed);
    }

    #[test]
    fn what_came_before_bytes_that_are_not_resp_counts() {
        let now = Instant::now();
        let mut publisher = Publisher::new(b"p:node:".to_vec());
        publisher.publish(&node("a"), b"R1".to_vec(), true);
        publisher.raw(b"x".to_vec(), 1);
        publisher.publish(&node("b"), b"R2".to_vec(), true);
        publisher.take(now);
        let got = publisher.read(b":0\r\n+OK\r\n%1\r\n", now);
        assert!(got.malformed);
        assert_eq!(
            got.replies,
            vec![
                Reply::Unreachable(vec![b"R1".to_vec()]),
                Reply::Raw(b"+OK\r\n".to_vec())
            ]
        );
        // The relay still waiting is handed back with the connection.
        assert_eq!(publisher.abandon(), vec![b"R2".to_vec()]);
    }

    #[test]
    fn a_writer_that_stops_answering_is_stalled() {
        let start = Instant::now();
        let mut publisher = Publisher::new(b"p:node:".to_vec());
        publisher.publish(&node("a"), b"R1".to_vec(), true);
        assert_eq!(publisher.stalled(start + Duration::from_secs(9)), 0.0);
        publisher.take(start);
        assert_eq!(publisher.stalled(start + Duration::from_secs(3)), 3.0);
        publisher.read(b":1\r\n", start + Duration::from_secs(4));
        assert_eq!(publisher.stalled(start + Duration::from_secs(9)), 0.0);
    }

    #[test]
    fn writes_are_kept_a_pause_apart_but_not_after_a_quiet_spell() {
        let start = Instant::now();
        let pause = Duration::from_millis(10);
        let mut publisher = Publisher::new(b"p:node:".to_vec());
        publisher.publish(&node("a"), b"R1".to_vec(), true);
        // Nothing written yet: the first goes at once.
        assert_eq!(publisher.wait(start, pause), None);
        assert!(!publisher.take(start).is_empty());
        publisher.publish(&node("a"), b"R2".to_vec(), true);
        let soon = start + Duration::from_millis(4);
        assert_eq!(publisher.wait(soon, pause), Some(Duration::from_millis(6)));
        assert_eq!(publisher.wait(start + pause, pause), None);
        publisher.take(start + pause);
        // A quiet spell of a pause: no wait.
        publisher.publish(&node("a"), b"R3".to_vec(), true);
        assert_eq!(publisher.wait(start + pause * 2, pause), None);
        // No pause: nothing waits, however recent the last write.
        publisher.take(start + pause * 2);
        publisher.publish(&node("a"), b"R4".to_vec(), true);
        assert_eq!(publisher.wait(start + pause * 2, Duration::ZERO), None);
    }

    #[test]
    fn a_lost_connection_leaves_no_pause_for_the_next() {
        let start = Instant::now();
        let pause = Duration::from_secs(1);
        let mut publisher = Publisher::new(b"p:node:".to_vec());
        publisher.publish(&node("a"), b"R1".to_vec(), true);
        publisher.take(start);
        publisher.publish(&node("a"), vec![b'x'; PAUSE_BYTES], true);
        assert!(publisher.full());
        assert_eq!(publisher.abandon().len(), 2);
        assert!(!publisher.full());
        publisher.publish(&node("a"), b"R2".to_vec(), true);
        assert_eq!(publisher.wait(start, pause), None);
    }

    #[test]
    fn a_full_batch_does_not_wait() {
        let start = Instant::now();
        let pause = Duration::from_secs(1);
        let mut publisher = Publisher::new(b"p:node:".to_vec());
        publisher.raw(b"*1\r\n$4\r\nPING\r\n".to_vec(), 1);
        publisher.take(start);
        publisher.publish(&node("a"), vec![b'x'; PAUSE_BYTES - 1], true);
        assert!(publisher.wait(start, pause).is_some());
        publisher.publish(&node("b"), b"R".to_vec(), true);
        assert!(publisher.full());
        assert_eq!(publisher.wait(start, pause), None);
        publisher.take(start);
        assert!(!publisher.full());
    }

    #[test]
    fn abandoned_relays_are_handed_back() {
        let mut publisher = Publisher::new(b"p:node:".to_vec());
        publisher.publish(&node("a"), b"R1".to_vec(), true);
        publisher.publish(&node("a"), b"D2".to_vec(), false);
        publisher.take(Instant::now());
        assert!(publisher.busy() && !publisher.has_writes());
        publisher.raw(b"x".to_vec(), 1);
        publisher.publish(&node("b"), b"R3".to_vec(), true);
        assert_eq!(publisher.abandon(), vec![b"R1".to_vec(), b"R3".to_vec()]);
        assert!(!publisher.busy());
        assert!(publisher.read(b":0\r\n", Instant::now()).malformed);
    }
}

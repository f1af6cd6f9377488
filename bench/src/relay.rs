//! The `relay` scenario: offer/answer round trips between the peers of many
//! topics.
//!
//! Every peer keeps `window` offers in flight, each to a random other peer of
//! its topic. The target answers with the same `msgId`; when the answer comes
//! back the round trip is complete and the offerer sends its next offer. One
//! round trip is two relayed messages. With `--rate`, each peer instead
//! sends an offer at that pace (when one of its `window` slots is free, else
//! the offer is skipped and counted): a load that leaves the server idle most
//! of the time, whose round trips show its latency rather than its queues.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::client::{self, format_counts, Incoming, Server, Table, Ws};
use crate::cpu::{own_cpu_seconds, ProcessTree, Switches};
use crate::stats::{percentile, push_u64, round, seed_from_clock, Rng};
use crate::view::View;

#[derive(Args, Debug, Clone)]
pub struct RelayArgs {
    /// Server base URL, e.g. ws://127.0.0.1:8081 (peers join {url}/ws/{topic}).
    /// Repeat it for the servers of a cluster: the peers of each topic
    /// alternate between them.
    #[arg(long, required = true)]
    url: Vec<String>,
    /// With several servers: each topic's peers all join one of them, the
    /// topics alternating, so that no relay leaves its server.
    #[arg(long)]
    whole_topics: bool,
    /// Number of topics.
    #[arg(long, default_value_t = 10)]
    topics: usize,
    /// Peers per topic (at least 2).
    #[arg(long, default_value_t = 4)]
    peers: usize,
    /// Offers each peer keeps in flight.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Offers per second each peer sends, at most `window` in flight;
    /// 0: each answer is followed at once by the next offer.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Measured duration, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Load before the measured window, excluded from the results, in seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Size of the filler string carried in each offer's payload.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Server process whose CPU time (with its descendants) is measured;
    /// repeat it for several servers (their CPU is summed).
    #[arg(long)]
    server_pid: Vec<u32>,
    /// A Redis server whose CPU time is measured apart (cluster mode).
    #[arg(long)]
    redis_pid: Option<u32>,
    /// Runtime worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Topics connecting at the same time (peers of one topic connect in turn).
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Limit for connecting every peer and learning every topic's membership, in seconds.
    #[arg(long, default_value_t = 30.0)]
    setup_timeout: f64,
    /// An offer unanswered for this long is counted as a timeout and replaced.
    #[arg(long, default_value_t = 5000)]
    offer_timeout_ms: u64,
}

const PHASE_WARMUP: u8 = 0;
const PHASE_MEASURE: u8 = 1;
const PHASE_DRAIN: u8 = 2;

/// State shared by every peer task and the coordinator.
struct Shared {
    phase: AtomicU8,
    /// Peers that know every other peer of their topic.
    ready: AtomicUsize,
}

/// Counters of one peer. Fields named `*_measured` and the latencies only
/// cover the measured window.
#[derive(Default)]
struct PeerStats {
    rtts_us: Vec<u32>,
    round_trips_total: u64,
    errors_measured: HashMap<String, u64>,
    errors_total: u64,
    timeouts_measured: u64,
    /// Paced offers not sent because every slot was busy.
    skipped_measured: u64,
    stale_answers: u64,
    bad_messages: u64,
    disconnect: Option<String>,
}

#[derive(Clone, Copy)]
struct Slot {
    busy: bool,
    seq: u64,
    next_seq: u64,
    sent: Instant,
}

struct Peer {
    index_str: String,
    self_id: String,
    peers_per_topic: usize,
    /// Other peers of the topic, and the prebuilt start of an offer to each
    /// (everything up to the sequence number of the `msgId`).
    known: Vec<String>,
    offer_prefixes: Vec<String>,
    filler: Arc<str>,
    slots: Vec<Slot>,
    rng: Rng,
    shared: Arc<Shared>,
    started: bool,
    ready_reported: bool,
    offer_timeout: Duration,
    /// With `--rate`: the time between two offers, and when the next is due.
    pace: Option<Duration>,
    next_due: Instant,
    out: Vec<Message>,
    stats: PeerStats,
}

impl Peer {
    fn add_peer(&mut self, id: &str) {
        if id == self.self_id || self.known.iter().any(|k| k == id) {
            return;
        }
        let mut prefix = String::with_capacity(64 + id.len() + self.filler.len());
        prefix.push_str(r#"{"type":"offer","to":""#);
        prefix.push_str(id);
        prefix.push_str(r#"","payload":{"sdp":""#);
        prefix.push_str(&self.filler);
        prefix.push_str(r#""},"msgId":""#);
        prefix.push_str(&self.index_str);
        prefix.push('-');
        self.known.push(id.to_owned());
        self.offer_prefixes.push(prefix);
    }

    fn remove_peer(&mut self, id: &str) {
        if let Some(pos) = self.known.iter().position(|k| k == id) {
            self.known.swap_remove(pos);
            self.offer_prefixes.swap_remove(pos);
        }
    }

    fn report_ready(&mut self) {
        if !self.ready_reported && self.known.len() + 1 >= self.peers_per_topic {
            self.ready_reported = true;
            self.shared.ready.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The sequence number of one of our own `msgId`s.
    fn own_seq(&self, msg_id: &str) -> Option<u64> {
        let (who, seq) = msg_id.rsplit_once('-')?;
        if who != self.index_str {
            return None;
        }
        seq.parse().ok()
    }

    /// Sends a new offer from `slot` to a random peer, if there is one.
    fn send_offer(&mut self, slot: usize, now: Instant) {
        if self.offer_prefixes.is_empty() {
            return;
        }
        let target = self.rng.below(self.offer_prefixes.len());
        let prefix = &self.offer_prefixes[target];
        let step = self.slots.len() as u64;
        let s = &mut self.slots[slot];
        s.busy = true;
        s.seq = s.next_seq;
        s.next_seq += step;
        s.sent = now;
        let mut text = String::with_capacity(prefix.len() + 24);
        text.push_str(prefix);
        push_u64(&mut text, s.seq);
        text.push_str("\"}");
        self.out.push(Message::text(text));
    }

    fn fill_idle(&mut self, now: Instant) {
        if !self.started
            || self.pace.is_some()
            || self.shared.phase.load(Ordering::Relaxed) >= PHASE_DRAIN
        {
            return;
        }
        for slot in 0..self.slots.len() {
            if !self.slots[slot].busy {
                self.send_offer(slot, now);
            }
        }
    }

    /// Replaces offers that were never answered.
    fn check_timeouts(&mut self, now: Instant) {
        let phase = self.shared.phase.load(Ordering::Relaxed);
        for slot in 0..self.slots.len() {
            let s = self.slots[slot];
            if s.busy && now.saturating_duration_since(s.sent) >= self.offer_timeout {
                self.slots[slot].busy = false;
                if phase == PHASE_MEASURE {
                    self.stats.timeouts_measured += 1;
                }
                if phase < PHASE_DRAIN && self.pace.is_none() {
                    self.send_offer(slot, now);
                }
            }
        }
    }

    /// Frees the slot of an answered (or refused) offer and sends the next.
    /// Returns the round-trip time if `seq` was in flight.
    fn complete(&mut self, seq: u64, now: Instant) -> Option<Duration> {
        let slot = (seq % self.slots.len() as u64) as usize;
        let s = &mut self.slots[slot];
        if !s.busy || s.seq != seq {
            return None;
        }
        s.busy = false;
        let rtt = now.saturating_duration_since(s.sent);
        if self.shared.phase.load(Ordering::Relaxed) < PHASE_DRAIN && self.pace.is_none() {
            self.send_offer(slot, now);
        }
        Some(rtt)
    }

    /// With `--rate`: the offer due now, from a free slot, and when the
    /// next is due (never more than one interval behind, so a late wake-up
    /// sends no burst).
    fn paced_offer(&mut self, now: Instant) {
        let Some(pace) = self.pace else {
            return;
        };
        self.next_due = (self.next_due + pace).max(now);
        if self.shared.phase.load(Ordering::Relaxed) >= PHASE_DRAIN {
            return;
        }
        match self.slots.iter().position(|s| !s.busy) {
            Some(slot) => self.send_offer(slot, now),
            None if self.shared.phase.load(Ordering::Relaxed) == PHASE_MEASURE => {
                self.stats.skipped_measured += 1;
            }
            None => {}
        }
    }

    fn handle(&mut self, msg: Message, now: Instant) {
        match msg {
            Message::Text(text) => self.handle_text(&text, now),
            // Pings are answered by the protocol layer; closes end the stream.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
            Message::Binary(_) => self.stats.bad_messages += 1,
        }
    }

    fn handle_text(&mut self, text: &str, now: Instant) {
        let Ok(msg) = serde_json::from_str::<Incoming>(text) else {
            self.stats.bad_messages += 1;
            return;
        };
        match msg.kind {
            "offer" => {
                let Some(from) = msg.from else {
                    self.stats.bad_messages += 1;
                    return;
                };
                // Borrowed strings hold no quote, backslash or control
                // character, so they go between quotes as they are.
                let id_len = msg.msg_id.map_or(0, str::len);
                let mut text = String::with_capacity(72 + from.len() + id_len);
                text.push_str(r#"{"type":"answer","to":""#);
                text.push_str(from);
                text.push_str(r#"","payload":{"ok":true}"#);
                if let Some(id) = msg.msg_id {
                    text.push_str(r#","msgId":""#);
                    text.push_str(id);
                    text.push('"');
                }
                text.push('}');
                self.out.push(Message::text(text));
            }
            "answer" => {
                let rtt = msg
                    .msg_id
                    .and_then(|id| self.own_seq(id))
                    .and_then(|seq| self.complete(seq, now));
                match rtt {
                    Some(rtt) => {
                        self.stats.round_trips_total += 1;
                        if self.shared.phase.load(Ordering::Relaxed) == PHASE_MEASURE {
                            let us = rtt.as_micros().min(u32::MAX as u128) as u32;
                            self.stats.rtts_us.push(us);
                        }
                    }
                    None => self.stats.stale_answers += 1,
                }
            }
            "error" => {
                self.stats.errors_total += 1;
                if self.shared.phase.load(Ordering::Relaxed) == PHASE_MEASURE {
                    let code = msg.code.unwrap_or("unknown");
                    match self.stats.errors_measured.get_mut(code) {
                        Some(n) => *n += 1,
                        None => {
                            self.stats.errors_measured.insert(code.to_owned(), 1);
                        }
                    }
                }
                // A refused offer of ours will never be answered: move on.
                if let Some(seq) = msg.msg_id.and_then(|id| self.own_seq(id)) {
                    self.complete(seq, now);
                }
            }
            "peer-joined" => {
                if let Some(id) = msg.peer_id {
                    self.add_peer(id);
                    self.report_ready();
                    self.fill_idle(now);
                }
            }
            "peer-left" => {
                if let Some(id) = msg.peer_id {
                    self.remove_peer(id);
                }
            }
            "peer-list" => {
                for p in msg.peers.unwrap_or_default() {
                    self.add_peer(p.id);
                }
                self.report_ready();
            }
            "welcome" | "pong" => {}
            _ => self.stats.bad_messages += 1,
        }
    }
}

/// Queues every pending message and writes them with one flush.
async fn send_pending(ws: &mut Ws, out: &mut Vec<Message>) -> Result<(), WsError> {
    for msg in out.drain(..) {
        ws.feed(msg).await?;
    }
    ws.flush().await
}

fn describe_end(item: Option<Result<Message, WsError>>) -> String {
    client::stream_end(item, "during the run").detail
}

/// One connection: reads and writes in the same task, batching the replies
/// to everything already received into a single flush.
async fn peer_task(
    mut peer: Peer,
    mut ws: Ws,
    mut start: watch::Receiver<bool>,
    mut close: oneshot::Receiver<()>,
) -> PeerStats {
    // Setup: learn the rest of the topic, then wait for the common start.
    peer.report_ready();
    loop {
        enum Setup {
            Stop,
            Start,
            Item(Option<Result<Message, WsError>>),
        }
        let event = tokio::select! {
            biased;
            _ = &mut close => Setup::Stop,
            started = start.wait_for(|s| *s) => {
                if started.is_ok() { Setup::Start } else { Setup::Stop }
            }
            item = ws.next() => Setup::Item(item),
        };
        match event {
            Setup::Stop => return shut_down(peer, ws, true).await,
            Setup::Start => break,
            Setup::Item(Some(Ok(msg))) => {
                peer.handle(msg, Instant::now());
                if let Err(err) = send_pending(&mut ws, &mut peer.out).await {
                    peer.stats.disconnect = Some(err.to_string());
                    return peer.stats;
                }
            }
            Setup::Item(other) => {
                peer.stats.disconnect = Some(describe_end(other));
                return peer.stats;
            }
        }
    }

    peer.started = true;
    if let Some(pace) = peer.pace {
        // Peers start spread over one interval.
        let offset = pace.mul_f64(peer.rng.below(1000) as f64 / 1000.0);
        peer.next_due = Instant::now() + offset;
    }
    peer.fill_idle(Instant::now());
    if let Err(err) = send_pending(&mut ws, &mut peer.out).await {
        peer.stats.disconnect = Some(err.to_string());
        return peer.stats;
    }

    let tick_period =
        (peer.offer_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let tick = tokio::time::sleep(tick_period);
    tokio::pin!(tick);
    let paced = tokio::time::sleep_until(peer.next_due.into());
    tokio::pin!(paced);
    let mut open = true;
    'conn: loop {
        tokio::select! {
            biased;
            item = ws.next() => {
                let now = Instant::now();
                // Everything already buffered is handled before writing.
                let mut next = Some(item);
                while let Some(item) = next {
                    match item {
                        Some(Ok(msg)) => peer.handle(msg, now),
                        other => {
                            peer.stats.disconnect = Some(describe_end(other));
                            open = false;
                            break 'conn;
                        }
                    }
                    next = ws.next().now_or_never();
                }
            }
            _ = &mut tick => {
                let now = Instant::now();
                peer.check_timeouts(now);
                tick.as_mut().reset((now + tick_period).into());
            }
            () = &mut paced, if peer.pace.is_some() => {
                peer.paced_offer(Instant::now());
                paced.as_mut().reset(peer.next_due.into());
            }
            _ = &mut close => break 'conn,
        }
        if let Err(err) = send_pending(&mut ws, &mut peer.out).await {
            peer.stats.disconnect = Some(err.to_string());
            open = false;
            break;
        }
    }
    shut_down(peer, ws, open).await
}

/// Sends a close frame and waits (briefly) for the server's.
async fn shut_down(peer: Peer, mut ws: Ws, open: bool) -> PeerStats {
    if open {
        client::close(&mut ws, Duration::from_secs(2)).await;
    }
    peer.stats
}

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    url: String,
    topics: usize,
    peers: usize,
    connections: usize,
    window: usize,
    rate_per_peer: f64,
    payload_bytes: usize,
    threads: usize,
    warmup_s: f64,
    duration_s: f64,
    round_trips: u64,
    round_trips_per_s: f64,
    relays: u64,
    relays_per_s: f64,
    rtt_p50_us: u32,
    rtt_p90_us: u32,
    rtt_p99_us: u32,
    rtt_max_us: u32,
    rtt_mean_us: f64,
    errors: BTreeMap<String, u64>,
    errors_total: u64,
    timeouts: u64,
    skipped: u64,
    stale_answers: u64,
    bad_messages: u64,
    disconnects: usize,
    server_pid: Option<u32>,
    server_processes: Option<usize>,
    server_cpu_s: Option<f64>,
    server_cpu_share: Option<f64>,
    server_cpu_us_per_relay: Option<f64>,
    /// The server's voluntary context switches (a process going to sleep,
    /// to be woken) per 1,000 relays: how many relays a wake-up carries.
    server_sleeps_per_1k_relays: Option<f64>,
    /// The server's involuntary context switches (a runnable process
    /// preempted for another) per 1,000 relays.
    server_preemptions_per_1k_relays: Option<f64>,
    redis_cpu_share: Option<f64>,
    redis_cpu_us_per_relay: Option<f64>,
    client_cpu_s: f64,
    client_cpu_share: f64,
    client_cpu_us_per_relay: Option<f64>,
}

fn validate(args: &RelayArgs) -> Result<(), String> {
    if args.topics == 0 {
        return Err("--topics must be at least 1".into());
    }
    if args.peers < 2 {
        return Err("--peers must be at least 2".into());
    }
    if args.window == 0 {
        return Err("--window must be at least 1".into());
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        return Err("--rate must not be negative".into());
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err("--duration must be positive".into());
    }
    if !(args.warmup >= 0.0 && args.warmup.is_finite()) {
        return Err("--warmup must not be negative".into());
    }
    if !(args.setup_timeout > 0.0 && args.setup_timeout.is_finite()) {
        return Err("--setup-timeout must be positive".into());
    }
    if args.connect_concurrency == 0 {
        return Err("--connect-concurrency must be at least 1".into());
    }
    if args.offer_timeout_ms == 0 {
        return Err("--offer-timeout-ms must be at least 1".into());
    }
    Ok(())
}

type PeerHandle = (JoinHandle<PeerStats>, oneshot::Sender<()>);

pub async fn run(args: RelayArgs) -> Result<(), String> {
    validate(&args)?;
    let mut servers = Vec::with_capacity(args.url.len());
    for url in &args.url {
        servers.push(Server::resolve(url).await?);
    }
    let base = servers
        .iter()
        .map(|s| s.base.as_str())
        .collect::<Vec<_>>()
        .join(" ");

    let seed = seed_from_clock();
    let run_id = format!("{:08x}", seed as u32);
    let total = args.topics * args.peers;
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(PHASE_WARMUP),
        ready: AtomicUsize::new(0),
    });
    let filler: Arc<str> = (0..args.payload_bytes)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect::<String>()
        .into();
    let (start_tx, start_rx) = watch::channel(false);
    let setup_deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.setup_timeout);

    // Peers of one topic join one after another, so each sees the previous
    // ones in its peer-list even on a server whose join is not atomic;
    // topics connect in parallel, up to the concurrency bound.
    let limit = Arc::new(Semaphore::new(args.connect_concurrency));
    let mut topic_tasks: JoinSet<Result<Vec<PeerHandle>, String>> = JoinSet::new();
    for t in 0..args.topics {
        let limit = Arc::clone(&limit);
        let topic = client::topic_name(&run_id, t);
        let urls: Vec<_> = servers
            .iter()
            .map(|server| (server.addr, server.topic_url(&topic)))
            .collect();
        let shared = Arc::clone(&shared);
        let filler = Arc::clone(&filler);
        let start_rx = start_rx.clone();
        let whole_topics = args.whole_topics;
        let (peers, window, rate, offer_timeout) = (
            args.peers,
            args.window,
            args.rate,
            Duration::from_millis(args.offer_timeout_ms),
        );
        topic_tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.map_err(|e| e.to_string())?;
            let mut handles = Vec::with_capacity(peers);
            for p in 0..peers {
                let index = t * peers + p;
                let (addr, url) = &urls[if whole_topics { t } else { p } % urls.len()];
                let mut view = View::default();
                let ws = client::join(*addr, url, &mut view)
                    .await
                    .map_err(|e| format!("{url}: {e}"))?;
                let self_id = view.self_id().unwrap_or_default().to_owned();
                let now = Instant::now();
                let mut peer = Peer {
                    index_str: index.to_string(),
                    self_id,
                    peers_per_topic: peers,
                    known: Vec::with_capacity(peers),
                    offer_prefixes: Vec::with_capacity(peers),
                    filler: Arc::clone(&filler),
                    slots: (0..window)
                        .map(|w| Slot {
                            busy: false,
                            seq: 0,
                            next_seq: w as u64,
                            sent: now,
                        })
                        .collect(),
                    rng: Rng::new(seed ^ (index as u64).wrapping_mul(0x2545_f491_4f6c_dd1d)),
                    shared: Arc::clone(&shared),
                    started: false,
                    ready_reported: false,
                    offer_timeout,
                    pace: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)),
                    next_due: now,
                    out: Vec::with_capacity(window * 2),
                    stats: PeerStats::default(),
                };
                for id in view.members() {
                    peer.add_peer(id);
                }
                let (close_tx, close_rx) = oneshot::channel();
                let handle = tokio::spawn(peer_task(peer, ws, start_rx.clone(), close_rx));
                handles.push((handle, close_tx));
            }
            Ok(handles)
        });
    }

    let mut peers: Vec<PeerHandle> = Vec::with_capacity(total);
    let setup = async {
        while let Some(joined) = topic_tasks.join_next().await {
            peers.extend(joined.map_err(|e| e.to_string())??);
        }
        while shared.ready.load(Ordering::Relaxed) < total {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout_at(setup_deadline, setup).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(format!("setup failed: {err}")),
        Err(_) => {
            return Err(format!(
            "setup timed out after {} s: {} of {total} peers connected, {} know their whole topic",
            args.setup_timeout,
            peers.len(),
            shared.ready.load(Ordering::Relaxed)
        ))
        }
    }

    let mut server = Vec::with_capacity(args.server_pid.len());
    for pid in &args.server_pid {
        server.push(ProcessTree::discover(*pid)?);
    }
    let server = (!server.is_empty()).then_some(server);
    let redis = match args.redis_pid {
        Some(pid) => Some(ProcessTree::discover(pid)?),
        None => None,
    };
    let cpu = |trees: &Vec<ProcessTree>| trees.iter().map(ProcessTree::cpu_seconds).sum::<f64>();
    let switches =
        |trees: &Vec<ProcessTree>| trees.iter().map(ProcessTree::switches).sum::<Switches>();

    let _ = start_tx.send(true);
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;

    shared.phase.store(PHASE_MEASURE, Ordering::Relaxed);
    let t0 = Instant::now();
    let server_cpu0 = server.as_ref().map(cpu);
    let server_switches0 = server.as_ref().map(switches);
    let redis_cpu0 = redis.as_ref().map(ProcessTree::cpu_seconds);
    let client_cpu0 = own_cpu_seconds();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    shared.phase.store(PHASE_DRAIN, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let server_cpu1 = server.as_ref().map(cpu);
    let server_switches1 = server.as_ref().map(switches);
    let redis_cpu1 = redis.as_ref().map(ProcessTree::cpu_seconds);
    let client_cpu1 = own_cpu_seconds();

    // Let the round trips in flight finish before anyone leaves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut handles = Vec::with_capacity(peers.len());
    for (handle, close_tx) in peers {
        let _ = close_tx.send(());
        handles.push(handle);
    }
    let mut all: Vec<PeerStats> = Vec::with_capacity(handles.len());
    let mut lost = 0usize;
    for handle in handles {
        match tokio::time::timeout(Duration::from_secs(5), handle).await {
            Ok(Ok(stats)) => all.push(stats),
            _ => lost += 1,
        }
    }

    let mut rtts: Vec<u32> = Vec::with_capacity(all.iter().map(|s| s.rtts_us.len()).sum());
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut errors_total, mut timeouts, mut stale, mut bad, mut disconnects) = (0, 0, 0, 0, lost);
    let mut skipped = 0;
    let mut first_disconnect = None;
    for s in &mut all {
        rtts.append(&mut s.rtts_us);
        for (code, n) in s.errors_measured.drain() {
            *errors.entry(code).or_default() += n;
        }
        errors_total += s.errors_total;
        timeouts += s.timeouts_measured;
        skipped += s.skipped_measured;
        stale += s.stale_answers;
        bad += s.bad_messages;
        if let Some(reason) = s.disconnect.take() {
            disconnects += 1;
            first_disconnect.get_or_insert(reason);
        }
    }
    rtts.sort_unstable();
    let round_trips = rtts.len() as u64;
    let relays = round_trips * 2;
    let mean = if rtts.is_empty() {
        0.0
    } else {
        rtts.iter().map(|v| f64::from(*v)).sum::<f64>() / rtts.len() as f64
    };
    let per_relay = |cpu_s: f64| (relays > 0).then(|| round(cpu_s * 1e6 / relays as f64, 3));
    let server_cpu = match (server_cpu0, server_cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let client_cpu = client_cpu1 - client_cpu0;
    let server_switches = server_switches0
        .zip(server_switches1)
        .map(|(a, b)| b.since(a));
    let per_1k_relays = |n: u64| (relays > 0).then(|| round(n as f64 * 1000.0 / relays as f64, 2));
    let redis_cpu = redis_cpu0.zip(redis_cpu1).map(|(a, b)| b - a);

    let report = Report {
        scenario: "relay",
        url: base,
        topics: args.topics,
        peers: args.peers,
        connections: total,
        window: args.window,
        rate_per_peer: args.rate,
        payload_bytes: args.payload_bytes,
        threads: args.threads,
        warmup_s: args.warmup,
        duration_s: round(elapsed, 3),
        round_trips,
        round_trips_per_s: round(round_trips as f64 / elapsed, 1),
        relays,
        relays_per_s: round(relays as f64 / elapsed, 1),
        rtt_p50_us: percentile(&rtts, 50.0),
        rtt_p90_us: percentile(&rtts, 90.0),
        rtt_p99_us: percentile(&rtts, 99.0),
        rtt_max_us: rtts.last().copied().unwrap_or(0),
        rtt_mean_us: round(mean, 1),
        errors,
        errors_total,
        timeouts,
        skipped,
        stale_answers: stale,
        bad_messages: bad,
        disconnects,
        server_pid: args.server_pid.first().copied(),
        server_processes: server
            .as_ref()
            .map(|trees| trees.iter().map(ProcessTree::process_count).sum()),
        server_cpu_s: server_cpu.map(|c| round(c, 3)),
        server_cpu_share: server_cpu.map(|c| round(c / elapsed, 3)),
        server_cpu_us_per_relay: server_cpu.and_then(per_relay),
        server_sleeps_per_1k_relays: server_switches.and_then(|s| per_1k_relays(s.voluntary)),
        server_preemptions_per_1k_relays: server_switches
            .and_then(|s| per_1k_relays(s.involuntary)),
        redis_cpu_share: redis_cpu.map(|c| round(c / elapsed, 3)),
        redis_cpu_us_per_relay: redis_cpu.and_then(per_relay),
        client_cpu_s: round(client_cpu, 3),
        client_cpu_share: round(client_cpu / elapsed, 3),
        client_cpu_us_per_relay: per_relay(client_cpu),
    };
    client::emit(&report, &summary(&report, first_disconnect.as_deref()))
}

fn summary(r: &Report, first_disconnect: Option<&str>) -> Table {
    let mut t = Table::default();
    let mut line = |label: &str, value: String| t.line(label, value);
    line(
        "scenario",
        format!(
            "relay {}  topics={} peers={} window={} rate={}/s payload={}B threads={}",
            r.url, r.topics, r.peers, r.window, r.rate_per_peer, r.payload_bytes, r.threads
        ),
    );
    line(
        "measured",
        format!("{:.2} s after {} s warmup", r.duration_s, r.warmup_s),
    );
    line(
        "round trips",
        format!("{} ({:.0}/s)", r.round_trips, r.round_trips_per_s),
    );
    line("relays", format!("{} ({:.0}/s)", r.relays, r.relays_per_s));
    line(
        "rtt us",
        format!(
            "p50 {}  p90 {}  p99 {}  max {}  mean {:.0}",
            r.rtt_p50_us, r.rtt_p90_us, r.rtt_p99_us, r.rtt_max_us, r.rtt_mean_us
        ),
    );
    let errors = format_counts(&r.errors);
    line(
        "errors",
        format!(
            "{errors}  (whole run {}; timeouts {}, stale {}, bad {}, disconnects {})",
            r.errors_total, r.timeouts, r.stale_answers, r.bad_messages, r.disconnects
        ),
    );
    if let Some(reason) = first_disconnect {
        line("disconnect", reason.to_owned());
    }
    let fmt_us = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    if let (Some(cpu), Some(share)) = (r.server_cpu_s, r.server_cpu_share) {
        line(
            "server cpu",
            format!(
                "{cpu:.2} s ({:.1}% of a core), {} us/relay  [pid {}, {} process(es)]",
                share * 100.0,
                fmt_us(r.server_cpu_us_per_relay),
                r.server_pid.unwrap_or(0),
                r.server_processes.unwrap_or(0)
            ),
        );
    }
    if let (Some(sleeps), Some(preemptions)) = (
        r.server_sleeps_per_1k_relays,
        r.server_preemptions_per_1k_relays,
    ) {
        line(
            "server switches",
            format!("{sleeps:.2} sleeps, {preemptions:.2} preemptions per 1,000 relays"),
        );
    }
    if let Some(share) = r.redis_cpu_share {
        line(
            "redis cpu",
            format!(
                "{:.1}% of a core, {} us/relay",
                share * 100.0,
                fmt_us(r.redis_cpu_us_per_relay)
            ),
        );
    }
    line(
        "client cpu",
        format!(
            "{:.2} s ({:.1}% of a core), {} us/relay",
            r.client_cpu_s,
            r.client_cpu_share * 100.0,
            fmt_us(r.client_cpu_us_per_relay)
        ),
    );
    if r.client_cpu_share > 0.9 * r.threads as f64 {
        line(
            "warning",
            "the load generator is near saturation; results may understate the server".into(),
        );
    }
    t
}

//! The `broadcast` scenario: one sender and many receivers in one topic.
//!
//! The sender delivers the same copies twice, at the same number of rounds
//! per second: first as relays (one `offer` to each receiver per round),
//! then as broadcasts (one `broadcast` per round, which the server copies to
//! every receiver). The server's CPU per delivered copy in each phase, less
//! what it spends holding the idle connections, shows what a broadcast saves
//! over sending the same message to each peer.
//!
//! Every receiver checks that each phase's messages come once and in the
//! order sent; the sender counts the errors it gets (`dropped` with its
//! `missed` count, `rate_limited`, ...).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, count, format_counts, lock, Failure, Incoming, Server, Table};
use crate::cpu::{own_cpu_seconds, ProcessTree};
use crate::stats::{micros, round, seed_from_clock, spread};
use crate::view::View;

#[derive(Args, Debug, Clone)]
pub struct BroadcastArgs {
    /// Server base URL, e.g. ws://127.0.0.1:8081.
    #[arg(long)]
    url: String,
    /// Peers that receive; one more peer sends.
    #[arg(long, default_value_t = 999)]
    receivers: usize,
    /// Rounds per second in each phase; at most the server's broadcast rate
    /// (20 by default) or broadcasts are refused.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds of each phase.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// The phases to run, in this order (a server without broadcast can
    /// still run `relay`).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = PHASES)]
    phases: Vec<Phase>,
    /// Seconds of idle connections measured before the phases.
    #[arg(long, default_value_t = 1.0)]
    idle: f64,
    /// Size of the filler string carried in each message's payload.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Peers joining at the same time.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Server process whose CPU time (with its descendants) is measured.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Runtime worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// Time allowed after a phase's last round for its copies to arrive.
const DRAIN: Duration = Duration::from_secs(10);
/// Time allowed for all the peers to join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

const PHASES: [Phase; 2] = [Phase::Relay, Phase::Broadcast];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Phase {
    Relay,
    Broadcast,
}

impl Phase {
    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Broadcast => "broadcast",
        }
    }

    /// The message type a receiver gets, and the `msgId` prefix.
    fn of(kind: &str, msg_id: &str) -> Option<(Self, u32)> {
        let phase = match kind {
            "offer" => Self::Relay,
            "broadcast" => Self::Broadcast,
            _ => return None,
        };
        let n = msg_id.strip_prefix(&phase.name()[..1])?.parse().ok()?;
        Some((phase, n))
    }
}

/// What the sender and the receivers share about one phase.
struct Board {
    t0: Instant,
    /// When each round was sent, in microseconds after `t0` (0: not yet).
    sent_at: Vec<AtomicU64>,
    /// Per round, the latest arrival at any receiver, in microseconds after
    /// the round was sent.
    last_us: Vec<AtomicU32>,
    delivered: AtomicU64,
}

impl Board {
    fn new(rounds: usize, t0: Instant) -> Self {
        Self {
            t0,
            sent_at: (0..rounds).map(|_| AtomicU64::new(0)).collect(),
            last_us: (0..rounds).map(|_| AtomicU32::new(0)).collect(),
            delivered: AtomicU64::new(0),
        }
    }

    fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }
}

/// One receiver's account of one phase.
#[derive(Default)]
struct Tally {
    next: u32,
    received: u64,
    gaps: u64,
    late: u64,
    latency_us: Vec<u32>,
}

impl Tally {
    fn take(&mut self, n: u32, board: &Board) {
        self.received += 1;
        if n < self.next {
            self.late += 1; // a repeat, or one that came after a later one
        } else {
            self.gaps += u64::from(n - self.next);
            self.next = n + 1;
        }
        let Some(sent) = board
            .sent_at
            .get(n as usize)
            .map(|s| s.load(Ordering::Acquire))
        else {
            return;
        };
        let us = board.now_us().saturating_sub(sent).min(u64::from(u32::MAX)) as u32;
        self.latency_us.push(us);
        board.last_us[n as usize].fetch_max(us, Ordering::Relaxed);
        board.delivered.fetch_add(1, Ordering::Release);
    }
}

#[derive(Default)]
struct Receivers {
    tallies: [Vec<Tally>; 2],
    ended: BTreeMap<String, u64>,
    other: u64,
}

/// The fields of what the sender gets that the scenario counts.
#[derive(Deserialize)]
struct SenderMessage<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    code: Option<&'a str>,
    #[serde(default)]
    missed: Option<u64>,
    #[serde(default, rename = "msgId")]
    msg_id: Option<&'a str>,
}

/// The `msgId` of the ping that ends a phase; a server that does not know
/// `ping` (the Go design) answers it with an error that carries it.
const SYNC_ID: &str = "sync";

#[derive(Default)]
struct SenderErrors {
    codes: BTreeMap<String, u64>,
    missed: u64,
}

#[derive(Serialize)]
struct PhaseReport {
    rounds: usize,
    copies_expected: u64,
    copies_delivered: u64,
    /// Copies that never came (gaps in a receiver's sequence).
    missing: u64,
    /// Copies that came twice or after a later one.
    out_of_order: u64,
    latency_p50_us: u32,
    latency_p99_us: u32,
    latency_max_us: u32,
    /// Per round, until its last receiver had it.
    round_p50_us: u32,
    round_p99_us: u32,
    elapsed_s: f64,
    server_cpu_s: Option<f64>,
    /// Server CPU per delivered copy, less the idle connections' share.
    server_cpu_us_per_copy: Option<f64>,
    sender_errors: BTreeMap<String, u64>,
    missed: u64,
}

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    url: String,
    topic: String,
    receivers: usize,
    rate: f64,
    duration_s: f64,
    payload_bytes: usize,
    threads: usize,
    joined: usize,
    join_failures: BTreeMap<String, u64>,
    join_p50_us: u32,
    join_p99_us: u32,
    join_max_us: u32,
    /// Server CPU per second while every peer was connected and idle.
    idle_server_cpu_s_per_s: Option<f64>,
    relay: Option<PhaseReport>,
    broadcast: Option<PhaseReport>,
    /// Broadcast's server CPU per copy over the relay's.
    cpu_per_copy_ratio: Option<f64>,
    disconnected: u64,
    disconnects: BTreeMap<String, u64>,
    /// Messages receivers got that are neither relays nor broadcasts nor
    /// presence.
    unexpected_messages: u64,
    server_pid: Option<u32>,
    client_cpu_s: f64,
}

fn validate(args: &BroadcastArgs) -> Result<(), String> {
    if args.receivers == 0 {
        return Err("--receivers must be at least 1".into());
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        return Err("--rate must be positive".into());
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err("--duration must be positive".into());
    }
    if !(args.idle >= 0.0 && args.idle.is_finite()) {
        return Err("--idle must not be negative".into());
    }
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if args.phases.is_empty() || args.phases.len() > 2 || args.phases.first() == args.phases.get(1)
    {
        return Err("--phases takes relay, broadcast or both, once each".into());
    }
    Ok(())
}

type Stop = watch::Receiver<bool>;

/// Reads one receiver's messages until `stop`, tallying each phase.
async fn receive(
    mut ws: client::Ws,
    boards: Arc<[Board; 2]>,
    mut stop: Stop,
) -> (Vec<Tally>, Option<Failure>, u64) {
    let mut tallies: Vec<Tally> = PHASES.iter().map(|_| Tally::default()).collect();
    let mut other = 0;
    loop {
        let text = tokio::select! {
            _ = client::stopped(&mut stop) => return (tallies, None, other),
            text = client::next_text(&mut ws, "during the run") => text,
        };
        let text = match text {
            Ok(text) => text,
            Err(failure) => return (tallies, Some(failure), other),
        };
        let Ok(msg) = serde_json::from_str::<Incoming>(&text) else {
            other += 1;
            continue;
        };
        match Phase::of(msg.kind, msg.msg_id.unwrap_or("")) {
            Some((phase, n)) => tallies[phase.index()].take(n, &boards[phase.index()]),
            None if matches!(msg.kind, "peer-joined" | "peer-left") => {}
            None => other += 1,
        }
    }
}

pub async fn run(args: BroadcastArgs) -> Result<(), String> {
    validate(&args)?;
    let nofile = client::raise_nofile_limit();
    if (args.receivers as u64) + 33 > nofile {
        return Err(format!(
            "{} receivers need more open files than the limit of {nofile}",
            args.receivers
        ));
    }
    let server = Server::resolve(&args.url).await?;
    let run_id = format!("{:08x}", seed_from_clock() as u32);
    let topic = client::topic_name(&run_id, 0);
    let url = Arc::<str>::from(server.topic_url(&topic));
    let addr = server.addr;
    let tree = match args.server_pid {
        Some(pid) => Some(ProcessTree::discover(pid)?),
        None => None,
    };
    let server_cpu = || tree.as_ref().map(ProcessTree::cpu_seconds);
    let client_cpu0 = own_cpu_seconds();
    let rounds = (args.rate * args.duration).round().max(1.0) as usize;
    let t0 = Instant::now();
    let boards = Arc::new(PHASES.map(|_| Board::new(rounds, t0)));

    // The receivers join, then the sender, whose peer-list names them all.
    let limit = Arc::new(Semaphore::new(args.concurrency));
    let mut joins = JoinSet::new();
    for _ in 0..args.receivers {
        let (url, limit) = (Arc::clone(&url), Arc::clone(&limit));
        joins.spawn(async move {
            let _permit = limit.acquire().await;
            let start = Instant::now();
            let mut view = View::default();
            let joined = tokio::time::timeout(JOIN_TIMEOUT, client::join(addr, &url, &mut view))
                .await
                .unwrap_or_else(|_| Err(Failure::timeout("before peer-list")));
            joined.map(|ws| (ws, micros(start.elapsed())))
        });
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut receivers = JoinSet::new();
    let mut join_failures = BTreeMap::new();
    let mut join_us = Vec::with_capacity(args.receivers);
    let mut first_failure = None;
    while let Some(joined) = joins.join_next().await {
        match joined.map_err(|e| format!("join task: {e}"))? {
            Ok((ws, us)) => {
                join_us.push(us);
                receivers.spawn(receive(ws, Arc::clone(&boards), stop_rx.clone()));
            }
            Err(failure) => {
                count(&mut join_failures, &failure.kind);
                first_failure.get_or_insert(failure.detail);
            }
        }
    }
    let joined = join_us.len();
    let mut view = View::default();
    let ws = client::join(addr, &url, &mut view)
        .await
        .map_err(|f| format!("the sender could not join: {f}"))?;
    let targets: Vec<String> = view.members().map(str::to_owned).collect();
    if targets.len() != joined {
        return Err(format!(
            "the sender's peer-list has {} peers, {joined} joined",
            targets.len()
        ));
    }
    let (mut sink, mut stream) = ws.split();
    let errors = Arc::new(Mutex::new(SenderErrors::default()));
    let (pongs_tx, mut pongs) = watch::channel(0u32);
    let listener = {
        let errors = Arc::clone(&errors);
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(m) = serde_json::from_str::<SenderMessage>(&text) else {
                    continue;
                };
                let sync = m.msg_id == Some(SYNC_ID);
                match m.kind {
                    "pong" | "error" if sync => pongs_tx.send_modify(|n| *n += 1),
                    "error" => {
                        let mut errors = lock(&errors);
                        count(&mut errors.codes, m.code.unwrap_or("unknown"));
                        errors.missed += m.missed.unwrap_or(0);
                    }
                    _ => {}
                }
            }
        })
    };

    let idle_start = (Instant::now(), server_cpu());
    tokio::time::sleep(Duration::from_secs_f64(args.idle)).await;
    let idle_rate = match (idle_start.1, server_cpu()) {
        (Some(a), Some(b)) if args.idle > 0.0 => {
            Some((b - a) / idle_start.0.elapsed().as_secs_f64())
        }
        (Some(_), Some(_)) => Some(0.0),
        _ => None,
    };

    let filler = "x".repeat(args.payload_bytes);
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let mut reports = Vec::new();
    for &phase in &args.phases {
        let board = &boards[phase.index()];
        *lock(&errors) = SenderErrors::default();
        let (start, cpu0) = (Instant::now(), server_cpu());
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for n in 0..rounds {
            tick.tick().await;
            board.sent_at[n].store(board.now_us().max(1), Ordering::Release);
            let sent = match phase {
                Phase::Relay => {
                    let mut result = Ok(());
                    for to in &targets {
                        let text = format!(
                            r#"{{"type":"offer","to":"{to}","payload":{{"sdp":"{filler}"}},"msgId":"r{n}"}}"#
                        );
                        result = sink.feed(Message::text(text)).await;
                        if result.is_err() {
                            break;
                        }
                    }
                    match result {
                        Ok(()) => sink.flush().await,
                        err => err,
                    }
                }
                Phase::Broadcast => {
                    let text = format!(
                        r#"{{"type":"broadcast","payload":{{"sdp":"{filler}"}},"msgId":"b{n}"}}"#
                    );
                    sink.send(Message::text(text)).await
                }
            };
            sent.map_err(|e| format!("the sender's connection failed: {e}"))?;
        }
        let expected = (rounds * joined) as u64;
        let drained = tokio::time::Instant::now() + DRAIN;
        while board.delivered.load(Ordering::Acquire) < expected
            && tokio::time::Instant::now() < drained
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = match (cpu0, server_cpu()) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        // Errors about this phase come before the pong of a ping sent now.
        let seen = *pongs.borrow_and_update();
        sink.send(Message::text(format!(
            r#"{{"type":"ping","msgId":"{SYNC_ID}"}}"#
        )))
        .await
        .map_err(|e| format!("the sender's connection failed: {e}"))?;
        tokio::time::timeout(DRAIN, pongs.wait_for(|n| *n > seen))
            .await
            .map_err(|_| "the sender got no pong".to_owned())?
            .map_err(|_| "the sender's connection ended".to_owned())?;
        let errors = std::mem::take(&mut *lock(&errors));
        reports.push((phase, elapsed, cpu, errors.codes, errors.missed));
    }

    let _ = stop_tx.send(true);
    let mut gathered = Receivers::default();
    while let Some(done) = receivers.join_next().await {
        let Ok((tallies, failure, other)) = done else {
            continue;
        };
        gathered.other += other;
        if let Some(failure) = failure {
            count(&mut gathered.ended, &failure.kind);
        }
        for (phase, tally) in tallies.into_iter().enumerate() {
            gathered.tallies[phase].push(tally);
        }
    }
    listener.abort();
    let _ = sink.close().await;
    let client_cpu = own_cpu_seconds() - client_cpu0;

    let (mut relay, mut broadcast) = (None, None);
    for (phase, elapsed, cpu, codes, missed) in reports {
        let tallies = std::mem::take(&mut gathered.tallies[phase.index()]);
        let board = &boards[phase.index()];
        let mut latency: Vec<u32> = tallies
            .iter()
            .flat_map(|t| t.latency_us.iter().copied())
            .collect();
        let (l50, l99, lmax) = spread(&mut latency);
        let mut per_round: Vec<u32> = board
            .last_us
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let (r50, r99, _) = spread(&mut per_round);
        let delivered: u64 = tallies.iter().map(|t| t.received).sum();
        // A receiver that stopped short of the last round missed the rest.
        let missing = tallies
            .iter()
            .map(|t| t.gaps + (rounds as u64).saturating_sub(u64::from(t.next)))
            .sum();
        let per_copy = match (cpu, idle_rate) {
            (Some(cpu), Some(idle)) if delivered > 0 => Some(round(
                (cpu - idle * elapsed).max(0.0) / delivered as f64 * 1e6,
                3,
            )),
            _ => None,
        };
        let report = PhaseReport {
            rounds,
            copies_expected: (rounds * joined) as u64,
            copies_delivered: delivered,
            missing,
            out_of_order: tallies.iter().map(|t| t.late).sum(),
            latency_p50_us: l50,
            latency_p99_us: l99,
            latency_max_us: lmax,
            round_p50_us: r50,
            round_p99_us: r99,
            elapsed_s: round(elapsed, 3),
            server_cpu_s: cpu.map(|c| round(c, 3)),
            server_cpu_us_per_copy: per_copy,
            sender_errors: codes,
            missed,
        };
        match phase {
            Phase::Relay => relay = Some(report),
            Phase::Broadcast => broadcast = Some(report),
        }
    }
    let (j50, j99, jmax) = spread(&mut join_us);
    let per_copy = |p: &Option<PhaseReport>| p.as_ref().and_then(|p| p.server_cpu_us_per_copy);
    let ratio = match (per_copy(&broadcast), per_copy(&relay)) {
        (Some(b), Some(r)) if r > 0.0 => Some(round(b / r, 3)),
        _ => None,
    };
    let report = Report {
        scenario: "broadcast",
        url: server.base,
        topic,
        receivers: args.receivers,
        rate: args.rate,
        duration_s: args.duration,
        payload_bytes: args.payload_bytes,
        threads: args.threads,
        joined,
        join_failures,
        join_p50_us: j50,
        join_p99_us: j99,
        join_max_us: jmax,
        idle_server_cpu_s_per_s: idle_rate.map(|r| round(r, 4)),
        relay,
        broadcast,
        cpu_per_copy_ratio: ratio,
        disconnected: gathered.ended.values().sum(),
        disconnects: gathered.ended,
        unexpected_messages: gathered.other,
        server_pid: args.server_pid,
        client_cpu_s: round(client_cpu, 3),
    };
    client::emit(&report, &summary(&report, first_failure.as_deref()))
}

fn phase_line(p: &PhaseReport) -> String {
    let cpu = p
        .server_cpu_us_per_copy
        .map_or_else(|| "-".to_owned(), |c| format!("{c:.3} us"));
    format!(
        "{} of {} copies ({} missing, {} out of order); server cpu per copy {cpu}; \
         latency us p50 {} p99 {} max {}; round p99 {} us; errors {} (missed {})",
        p.copies_delivered,
        p.copies_expected,
        p.missing,
        p.out_of_order,
        p.latency_p50_us,
        p.latency_p99_us,
        p.latency_max_us,
        p.round_p99_us,
        format_counts(&p.sender_errors),
        p.missed
    )
}

fn summary(r: &Report, first_failure: Option<&str>) -> Table {
    let mut t = Table::default();
    t.line(
        "scenario",
        format!(
            "broadcast {}  receivers={} rate={}/s duration={} s payload={} B",
            r.url, r.receivers, r.rate, r.duration_s, r.payload_bytes
        ),
    );
    t.line(
        "joined",
        format!(
            "{} of {}; failures {}",
            r.joined,
            r.receivers,
            format_counts(&r.join_failures)
        ),
    );
    if let Some(detail) = first_failure {
        t.line("first", detail);
    }
    t.join_latency(r.join_p50_us, r.join_p99_us, r.join_max_us);
    for (name, phase) in [("relay", &r.relay), ("broadcast", &r.broadcast)] {
        if let Some(phase) = phase {
            t.line(name, phase_line(phase));
        }
    }
    if let Some(ratio) = r.cpu_per_copy_ratio {
        t.line(
            "cpu ratio",
            format!("{ratio:.3} (broadcast per copy / relay per copy)"),
        );
    }
    if let Some(idle) = r.idle_server_cpu_s_per_s {
        t.line(
            "idle cpu",
            format!("{idle:.4} s/s with every peer connected"),
        );
    }
    t.line(
        "disconnects",
        format!(
            "{}  ({}); unexpected messages {}",
            r.disconnected,
            format_counts(&r.disconnects),
            r.unexpected_messages
        ),
    );
    t.line("client cpu", format!("{:.2} s", r.client_cpu_s));
    t
}

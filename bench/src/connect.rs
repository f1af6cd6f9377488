//! The `connect` scenario: opens many connections, holds them, and measures
//! how fast the server admits them and how much memory each one costs it.
//!
//! Each connection is done when it has received `welcome` and `peer-list`.
//! Connections use the raw client of `rawws`: after the join they keep only
//! a socket and a frame header's worth of state, answer the server's pings,
//! and discard everything else.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::client::{self, count, format_counts, lock, Failure, Incoming, Server, Table};
use crate::cpu::{own_cpu_seconds, own_rss_kib, ProcessTree};
use crate::rawws::{self, Event, FrameError, FrameReader, OP_CLOSE, OP_PONG};
use crate::stats::{micros, round, seed_from_clock, spread, Rng};

#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Server base URL, e.g. ws://127.0.0.1:8081.
    #[arg(long)]
    url: String,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Connections joining at the same time.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Topics the connections are spread over (connection i joins topic i % T).
    #[arg(long, default_value_t = 100)]
    topics: usize,
    /// Server process whose memory and CPU (with its descendants) are measured.
    #[arg(long)]
    server_pid: Option<u32>,
    /// A Redis server whose CPU time while connecting is measured apart
    /// (cluster mode: every join is a Redis call).
    #[arg(long)]
    redis_pid: Option<u32>,
    /// Seconds to keep every connection open after the measurement.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Hold every connection until standard input ends instead, for a
    /// caller that measures while they are held.
    #[arg(long)]
    hold_until_eof: bool,
    /// Local addresses to connect from, cycling 127.0.0.1 ..= 127.0.0.K
    /// (each gives about 28k ports towards one server port).
    #[arg(long, default_value_t = 1)]
    source_ips: u8,
    /// A connection not joined this many seconds after its TCP connect
    /// started is counted as failed.
    #[arg(long, default_value_t = 30.0)]
    join_timeout: f64,
    /// Runtime worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// Seconds between the last join and the memory reading.
const SETTLE: Duration = Duration::from_secs(1);

/// Largest `peer-list` accepted while joining.
const MAX_JOIN_MESSAGE: usize = 16 << 20;

struct Shared {
    t0: Instant,
    /// Set before the stop signal goes out. Readers check it before
    /// counting: a watch wake-up can reach a task after a neighbour has
    /// already seen the stop and closed, and its `peer-left` must not count.
    stopping: AtomicBool,
    joined: AtomicUsize,
    failed: AtomicUsize,
    /// Nanoseconds from `t0` to the last join.
    last_join_ns: AtomicU64,
    join_us: Mutex<Vec<u32>>,
    failures: Mutex<BTreeMap<String, u64>>,
    first_failure: Mutex<Option<String>>,
    /// How connections ended while they were held.
    hold_ends: Mutex<BTreeMap<String, u64>>,
    hold_messages: Mutex<BTreeMap<String, u64>>,
    pongs: AtomicU64,
}

impl Shared {
    fn fail(&self, failure: Failure) {
        count(&mut lock(&self.failures), &failure.kind);
        lock(&self.first_failure).get_or_insert(failure.detail);
        self.failed.fetch_add(1, Ordering::Release);
    }

    fn hold_end(&self, kind: &str) {
        count(&mut lock(&self.hold_ends), kind);
    }
}

struct Plan {
    server: Server,
    requests: Vec<Arc<[u8]>>,
    source_ips: u8,
    join_timeout: Duration,
}

/// Progress of a join through `welcome` and `peer-list`.
#[derive(Default)]
struct JoinState {
    welcome: bool,
    list: bool,
    failure: Option<Failure>,
}

impl JoinState {
    fn done(&self) -> bool {
        self.welcome && self.list
    }

    fn on_text(&mut self, text: &[u8]) {
        let Ok(msg) = serde_json::from_slice::<Incoming>(text) else {
            self.failure.get_or_insert_with(|| {
                Failure::new("bad_message", String::from_utf8_lossy(text).into_owned())
            });
            return;
        };
        match msg.kind {
            "welcome" => self.welcome = true,
            "peer-list" => self.list = true,
            "error" => {
                let code = msg.code.unwrap_or("unknown");
                let text = String::from_utf8_lossy(text);
                self.failure.get_or_insert_with(|| {
                    Failure::new(format!("error_{code}"), format!("error: {text}"))
                });
            }
            _ => {}
        }
    }
}

/// Handles the server's frames; pongs and close replies go into `out`,
/// the server's close code into `closed`.
fn on_event(
    event: Event<'_>,
    join: &mut JoinState,
    out: &mut Vec<u8>,
    mask: [u8; 4],
    messages: &mut Held,
    closed: &mut Option<Option<u16>>,
) {
    match event {
        // What follows the peer-list in the same read is already held.
        Event::Text(text) if join.done() => messages.add(rawws::message_type(text)),
        Event::Text(text) => join.on_text(text),
        Event::Skipped(prefix) => messages.add(rawws::message_type(prefix)),
        Event::Ping(payload) => rawws::client_frame(OP_PONG, payload, mask, out),
        Event::Pong => {}
        Event::Close(code) => {
            if closed.is_none() {
                let echo = code.map(u16::to_be_bytes);
                rawws::client_frame(OP_CLOSE, echo.as_ref().map_or(&[], |c| &c[..]), mask, out);
                *closed = Some(code);
            }
        }
    }
}

/// Messages received while held, by type, without allocating.
#[derive(Default, Debug)]
struct Held([u32; HELD_KINDS.len()]);

const HELD_KINDS: [&str; 4] = ["peer-joined", "peer-left", "error", "other"];

impl Held {
    fn add(&mut self, kind: Option<&str>) {
        let last = HELD_KINDS.len() - 1;
        let i = HELD_KINDS[..last]
            .iter()
            .position(|k| Some(*k) == kind)
            .unwrap_or(last);
        self.0[i] += 1;
    }

    fn add_to(&self, map: &mut BTreeMap<String, u64>) {
        for (kind, n) in HELD_KINDS.iter().zip(self.0) {
            if n > 0 {
                *map.entry((*kind).to_owned()).or_default() += u64::from(n);
            }
        }
    }
}

/// One connection's protocol state: the frame parser, the join's
/// progress, and the frames to send back.
struct Wire {
    reader: FrameReader,
    join: JoinState,
    out: Vec<u8>,
    mask: [u8; 4],
    messages: Held,
    closed: Option<Option<u16>>,
}

impl Wire {
    fn feed(&mut self, data: &[u8]) -> Result<(), FrameError> {
        let Self {
            reader,
            join,
            out,
            mask,
            messages,
            closed,
        } = self;
        reader.feed(data, &mut |e| {
            on_event(e, join, out, *mask, messages, closed)
        })
    }

    /// Sends the pongs and close replies queued so far.
    async fn flush(&mut self, stream: &TcpStream) -> Result<bool, Failure> {
        if self.out.is_empty() {
            return Ok(false);
        }
        let written = rawws::write_all(stream, &self.out).await;
        self.out.clear();
        written.map_err(|e| Failure::io("write", &e))?;
        Ok(true)
    }
}

/// Opens connection `index` and reads up to its `peer-list`.
async fn join(plan: &Plan, index: usize, mask: [u8; 4]) -> Result<(TcpStream, Wire), Failure> {
    let source = (plan.source_ips > 1)
        .then(|| Ipv4Addr::new(127, 0, 0, 1 + (index % usize::from(plan.source_ips)) as u8));
    let stream = rawws::open(plan.server.addr, source)
        .await
        .map_err(|e| Failure::io("connect", &e))?;
    let request = &plan.requests[index % plan.requests.len()];
    rawws::write_all(&stream, request)
        .await
        .map_err(|e| Failure::io("write", &e))?;

    let mut head: Vec<u8> = Vec::with_capacity(256);
    let body_start = loop {
        let got = rawws::read_with(&stream, |data| {
            head.extend_from_slice(data);
            rawws::parse_response(&head)
        })
        .await
        .map_err(|e| Failure::io("read", &e))?;
        match got {
            None => return Err(Failure::new("eof", "closed during the upgrade")),
            Some(Err(err)) => return Err(Failure::new("bad_response", err)),
            Some(Ok(None)) => {}
            Some(Ok(Some((101, len)))) => break len,
            Some(Ok(Some((status, _)))) => {
                return Err(Failure::new(
                    format!("http_{status}"),
                    format!("upgrade refused: HTTP {status}"),
                ))
            }
        }
    };

    let mut wire = Wire {
        reader: FrameReader::new(true, MAX_JOIN_MESSAGE),
        join: JoinState::default(),
        out: Vec::new(),
        mask,
        messages: Held::default(),
        closed: None,
    };
    let mut result = wire.feed(&head[body_start..]);
    drop(head);
    loop {
        if let Err(err) = result {
            return Err(Failure::new("protocol", err.to_string()));
        }
        wire.flush(&stream).await?;
        if let Some(failure) = wire.join.failure.take() {
            return Err(failure);
        }
        if let Some(code) = wire.closed {
            return Err(Failure::closed(code, "before peer-list"));
        }
        if wire.join.done() {
            break;
        }
        let got = rawws::read_with(&stream, |data| wire.feed(data))
            .await
            .map_err(|e| Failure::io("read", &e))?;
        match got {
            Some(r) => result = r,
            None => return Err(Failure::new("eof", "closed before peer-list")),
        }
    }
    wire.reader.discard_messages();
    Ok((stream, wire))
}

/// Keeps a joined connection open until `stop`, then closes it.
async fn hold(stream: TcpStream, mut wire: Wire, shared: &Shared, mut stop: watch::Receiver<bool>) {
    let end = loop {
        tokio::select! {
            biased;
            () = client::stopped(&mut stop) => break None,
            got = rawws::read_with(&stream, |data| {
                if shared.stopping.load(Ordering::SeqCst) {
                    return Ok(false);
                }
                wire.feed(data).map(|()| true)
            }) => {
                match got {
                    Ok(Some(Ok(true))) => {}
                    Ok(Some(Ok(false))) => break None,
                    Ok(Some(Err(err))) => break Some(Failure::new("protocol", err.to_string())),
                    Ok(None) => break Some(Failure::new("eof", "")),
                    Err(err) => break Some(Failure::io("read", &err)),
                }
                match wire.flush(&stream).await {
                    Ok(true) if wire.closed.is_none() => {
                        shared.pongs.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(failure) => break Some(failure),
                }
                if let Some(code) = wire.closed {
                    break Some(Failure::closed(code, "while held"));
                }
            }
        }
    };
    wire.messages.add_to(&mut lock(&shared.hold_messages));
    if let Some(failure) = end {
        shared.hold_end(&failure.kind);
        return;
    }
    // Our close frame, then wait briefly for the server to end the stream.
    rawws::client_frame(OP_CLOSE, &1000u16.to_be_bytes(), wire.mask, &mut wire.out);
    if wire.flush(&stream).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(Some(())) = rawws::read_with(&stream, |_| ()).await {}
        })
        .await;
    }
}

async fn connection(
    index: usize,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    mask: [u8; 4],
) {
    let Ok(permit) = limit.acquire().await else {
        return;
    };
    let start = Instant::now();
    let joined = tokio::time::timeout(plan.join_timeout, join(&plan, index, mask)).await;
    drop(permit);
    let (stream, wire) = match joined {
        Ok(Ok(joined)) => joined,
        Ok(Err(failure)) => return shared.fail(failure),
        Err(_) => return shared.fail(Failure::timeout("before peer-list")),
    };
    lock(&shared.join_us).push(micros(start.elapsed()));
    let ns = shared.t0.elapsed().as_nanos() as u64;
    shared.last_join_ns.fetch_max(ns, Ordering::Relaxed);
    shared.joined.fetch_add(1, Ordering::Release);
    hold(stream, wire, &shared, stop).await;
}

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    url: String,
    connections: usize,
    concurrency: usize,
    topics: usize,
    source_ips: u8,
    threads: usize,
    joined: usize,
    failed: usize,
    failures: BTreeMap<String, u64>,
    connect_s: f64,
    connections_per_s: f64,
    join_p50_us: u32,
    join_p99_us: u32,
    join_max_us: u32,
    hold_s: f64,
    closed_while_held: BTreeMap<String, u64>,
    messages_while_held: BTreeMap<String, u64>,
    pongs_sent: u64,
    server_pid: Option<u32>,
    server_processes: Option<usize>,
    rss_baseline_kib: Option<u64>,
    rss_total_kib: Option<u64>,
    rss_per_connection_bytes: Option<f64>,
    server_cpu_s: Option<f64>,
    server_cpu_us_per_connection: Option<f64>,
    redis_cpu_s: Option<f64>,
    redis_cpu_us_per_connection: Option<f64>,
    client_cpu_s: f64,
    client_rss_kib: u64,
    client_nofile_limit: u64,
}

fn validate(args: &ConnectArgs) -> Result<(), String> {
    if args.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if args.topics == 0 {
        return Err("--topics must be at least 1".into());
    }
    if !(args.hold >= 0.0 && args.hold.is_finite()) {
        return Err("--hold must not be negative".into());
    }
    if !(args.join_timeout > 0.0 && args.join_timeout.is_finite()) {
        return Err("--join-timeout must be positive".into());
    }
    if args.source_ips == 0 || args.source_ips > 254 {
        return Err("--source-ips must be between 1 and 254".into());
    }
    Ok(())
}

pub async fn run(args: ConnectArgs) -> Result<(), String> {
    validate(&args)?;
    let nofile = client::raise_nofile_limit();
    // A few descriptors for the runtime, stdio and /proc reads.
    if (args.connections as u64) + 32 > nofile {
        return Err(format!(
            "{} connections need more open files than the limit of {nofile} (raise `ulimit -Hn`)",
            args.connections
        ));
    }
    let server = Server::resolve(&args.url).await?;
    let seed = seed_from_clock();
    let run_id = format!("{:08x}", seed as u32);
    let requests = (0..args.topics)
        .map(|t| {
            let path = format!("/ws/{}", client::topic_name(&run_id, t));
            rawws::upgrade_request(&server.authority, &path).into()
        })
        .collect();
    let plan = Arc::new(Plan {
        server,
        requests,
        source_ips: args.source_ips,
        join_timeout: Duration::from_secs_f64(args.join_timeout),
    });

    let tree = match args.server_pid {
        Some(pid) => Some(ProcessTree::discover(pid)?),
        None => None,
    };
    let rss_baseline = tree.as_ref().map(ProcessTree::rss_kib);
    let server_cpu0 = tree.as_ref().map(ProcessTree::cpu_seconds);
    let redis = match args.redis_pid {
        Some(pid) => Some(ProcessTree::discover(pid)?),
        None => None,
    };
    let redis_cpu0 = redis.as_ref().map(ProcessTree::cpu_seconds);
    let client_cpu0 = own_cpu_seconds();

    let shared = Arc::new(Shared {
        t0: Instant::now(),
        stopping: AtomicBool::new(false),
        joined: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        last_join_ns: AtomicU64::new(0),
        join_us: Mutex::new(Vec::with_capacity(args.connections)),
        failures: Mutex::new(BTreeMap::new()),
        first_failure: Mutex::new(None),
        hold_ends: Mutex::new(BTreeMap::new()),
        hold_messages: Mutex::new(BTreeMap::new()),
        pongs: AtomicU64::new(0),
    });
    let limit = Arc::new(Semaphore::new(args.concurrency));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut rng = Rng::new(seed);
    let mut tasks = JoinSet::new();
    for index in 0..args.connections {
        let mask = (rng.next_u64() as u32).to_ne_bytes();
        tasks.spawn(connection(
            index,
            Arc::clone(&plan),
            Arc::clone(&shared),
            Arc::clone(&limit),
            stop_rx.clone(),
            mask,
        ));
    }
    drop(stop_rx);

    // Every connection either joins or fails within its join timeout.
    while shared.joined.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire)
        < args.connections
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let server_cpu1 = tree.as_ref().map(ProcessTree::cpu_seconds);
    let redis_cpu = redis_cpu0
        .zip(redis.as_ref().map(ProcessTree::cpu_seconds))
        .map(|(a, b)| b - a);
    let client_cpu = own_cpu_seconds() - client_cpu0;
    let joined = shared.joined.load(Ordering::Acquire);
    let failed = shared.failed.load(Ordering::Acquire);
    let connect_s = shared.last_join_ns.load(Ordering::Relaxed) as f64 / 1e9;

    tokio::time::sleep(SETTLE).await;
    // Find the tree again: a worker may have been started since.
    let tree = match args.server_pid {
        Some(pid) => Some(ProcessTree::discover(pid)?),
        None => None,
    };
    let rss_total = tree.as_ref().map(ProcessTree::rss_kib);
    let client_rss = own_rss_kib();

    let held = Instant::now();
    if args.hold_until_eof {
        eprintln!("holding {joined} connections until the input ends");
        let (ended, end) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = ended.send(());
        });
        let _ = end.await;
    } else {
        tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    }
    let hold_s = held.elapsed().as_secs_f64();
    shared.stopping.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    let closing = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), closing)
        .await
        .is_err()
    {
        eprintln!("warning: some connections did not close within 10 s");
    }

    let (p50, p99, max) = spread(&mut lock(&shared.join_us));
    let server_cpu = match (server_cpu0, server_cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let rss_per_connection = match (rss_baseline, rss_total) {
        (Some(base), Some(total)) if joined > 0 => Some(round(
            (total as f64 - base as f64) * 1024.0 / joined as f64,
            1,
        )),
        _ => None,
    };
    let report = Report {
        scenario: "connect",
        url: plan.server.base.clone(),
        connections: args.connections,
        concurrency: args.concurrency,
        topics: args.topics,
        source_ips: args.source_ips,
        threads: args.threads,
        joined,
        failed,
        failures: lock(&shared.failures).clone(),
        connect_s: round(connect_s, 3),
        connections_per_s: if connect_s > 0.0 {
            round(joined as f64 / connect_s, 1)
        } else {
            0.0
        },
        join_p50_us: p50,
        join_p99_us: p99,
        join_max_us: max,
        hold_s: round(hold_s, 3),
        closed_while_held: lock(&shared.hold_ends).clone(),
        messages_while_held: lock(&shared.hold_messages).clone(),
        pongs_sent: shared.pongs.load(Ordering::Relaxed),
        server_pid: args.server_pid,
        server_processes: tree.as_ref().map(ProcessTree::process_count),
        rss_baseline_kib: rss_baseline,
        rss_total_kib: rss_total,
        rss_per_connection_bytes: rss_per_connection,
        server_cpu_s: server_cpu.map(|c| round(c, 3)),
        server_cpu_us_per_connection: server_cpu
            .filter(|_| joined > 0)
            .map(|c| round(c * 1e6 / joined as f64, 1)),
        redis_cpu_s: redis_cpu.map(|c| round(c, 3)),
        redis_cpu_us_per_connection: redis_cpu
            .filter(|_| joined > 0)
            .map(|c| round(c * 1e6 / joined as f64, 1)),
        client_cpu_s: round(client_cpu, 3),
        client_rss_kib: client_rss,
        client_nofile_limit: nofile,
    };
    let first_failure = lock(&shared.first_failure).clone();
    client::emit(&report, &summary(&report, first_failure.as_deref()))
}

fn summary(r: &Report, first_failure: Option<&str>) -> Table {
    let mut t = Table::default();
    t.line(
        "scenario",
        format!(
            "connect {}  connections={} concurrency={} topics={} source-ips={}",
            r.url, r.connections, r.concurrency, r.topics, r.source_ips
        ),
    );
    t.line(
        "joined",
        format!(
            "{} of {} in {:.3} s ({:.0}/s)",
            r.joined, r.connections, r.connect_s, r.connections_per_s
        ),
    );
    t.join_latency(r.join_p50_us, r.join_p99_us, r.join_max_us);
    t.line(
        "failures",
        format!("{}  ({})", r.failed, format_counts(&r.failures)),
    );
    if let Some(detail) = first_failure {
        t.line("first", detail);
    }
    t.line(
        "while held",
        format!(
            "closed: {}; messages {}; {} pongs (held {} s after the reading)",
            format_counts(&r.closed_while_held),
            format_counts(&r.messages_while_held),
            r.pongs_sent,
            r.hold_s
        ),
    );
    if let (Some(base), Some(total)) = (r.rss_baseline_kib, r.rss_total_kib) {
        t.line(
            "server rss",
            format!(
                "{total} KiB held, {base} KiB before: {:.0} B/connection  [pid {}, {} process(es)]",
                r.rss_per_connection_bytes.unwrap_or(0.0),
                r.server_pid.unwrap_or(0),
                r.server_processes.unwrap_or(0)
            ),
        );
    }
    if matches!(r.rss_per_connection_bytes, Some(b) if b <= 0.0) && r.joined > 0 {
        t.line(
            "warning",
            "server memory did not grow: it keeps what earlier connections used; \
             measure memory on a freshly started server",
        );
    }
    let cpus = [
        ("server cpu", r.server_cpu_s, r.server_cpu_us_per_connection),
        ("redis cpu", r.redis_cpu_s, r.redis_cpu_us_per_connection),
    ];
    for (label, cpu, per) in cpus {
        if let Some(cpu) = cpu {
            let per = per.unwrap_or(0.0);
            t.line(
                label,
                format!("{cpu:.2} s while connecting, {per:.1} us/connection"),
            );
        }
    }
    t.line(
        "client",
        format!(
            "{:.2} s cpu, {} KiB rss, open-file limit {}",
            r.client_cpu_s, r.client_rss_kib, r.client_nofile_limit
        ),
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_state_follows_messages() {
        let mut s = JoinState::default();
        s.on_text(br#"{"type":"welcome","selfId":"A"}"#);
        assert!(s.welcome && !s.list);
        s.on_text(br#"{"type":"peer-list","peers":[]}"#);
        assert!(s.list && s.failure.is_none());
        let mut full = JoinState::default();
        full.on_text(br#"{"type":"error","code":"server_full","message":"x"}"#);
        assert_eq!(full.failure.unwrap().kind, "error_server_full");
        let mut bad = JoinState::default();
        bad.on_text(b"not json");
        assert_eq!(bad.failure.unwrap().kind, "bad_message");
    }

    #[test]
    fn counts_messages_after_the_peer_list() {
        let mut join = JoinState::default();
        let (mut out, mut held, mut closed) = (Vec::new(), Held::default(), None);
        for text in [
            &br#"{"type":"welcome","selfId":"A"}"#[..],
            br#"{"type":"peer-joined","peerId":"B"}"#,
            br#"{"type":"peer-list","peers":[]}"#,
            br#"{"type":"peer-joined","peerId":"C"}"#,
        ] {
            on_event(
                Event::Text(text),
                &mut join,
                &mut out,
                [0; 4],
                &mut held,
                &mut closed,
            );
        }
        assert!(join.done());
        let mut counts = BTreeMap::new();
        held.add_to(&mut counts);
        assert_eq!(client::format_counts(&counts), "peer-joined=1");
    }

    #[test]
    fn answers_pings_and_closes() {
        let mut join = JoinState::default();
        let mut out = Vec::new();
        let (mut held, mut closed) = (Held::default(), None);
        let mask = [0; 4];
        let mut on = |e: Event<'_>, out: &mut Vec<u8>| {
            on_event(e, &mut join, out, mask, &mut held, &mut closed);
        };
        on(Event::Ping(b"p"), &mut out);
        assert_eq!(out, [0x8a, 0x81, 0, 0, 0, 0, b'p']);
        out.clear();
        on(
            Event::Skipped(br#"{"type":"peer-joined","peerId":"0"#),
            &mut out,
        );
        on(Event::Skipped(br#"{"type":"peer-left"}"#), &mut out);
        on(Event::Skipped(b"[1]"), &mut out);
        on(Event::Close(Some(4008)), &mut out);
        assert_eq!(out, [0x88, 0x82, 0, 0, 0, 0, 0x0f, 0xa8]);
        assert_eq!(closed, Some(Some(4008)));
        let mut counts = BTreeMap::new();
        held.add_to(&mut counts);
        assert_eq!(
            client::format_counts(&counts),
            "other=1 peer-joined=1 peer-left=1"
        );
    }
}

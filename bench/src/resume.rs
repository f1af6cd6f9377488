//! The `resume` scenario: sessions that survive their connections
//! (PROTOCOL.md section 5, "Resume").
//!
//! Each pair is one topic with a receiver, a resumable session whose
//! connection is cut at random, and a sender, never cut, that relays a
//! numbered `offer` to it every `--interval-ms`. A cut is either a reset
//! (the receiver's socket sends RST, and it reconnects after a random gap)
//! or a blackhole (it stops reading its socket, which the kernel keeps
//! open, and reconnects after a random wait: before the server's ping
//! timeout the resume takes the old connection over, with close 4011;
//! after it, the server has found the connection dead by ping and
//! suspended the session itself). Every reconnection resumes with
//! `seen`, the number of messages read since the last `welcome`.
//!
//! At the end every sender sends a last `answer` and every receiver reads
//! until it; then each relay must have arrived exactly once: `lost` and
//! `duplicated` must both be 0, no resume may be refused, and the sender
//! must have seen no presence event for its receiver.
//!
//! Then `--suspended` sessions are opened and reset in batches, so that
//! they pile up suspended while few connections exist at once; the growth
//! of the server's memory divided by their number is what a suspended
//! session costs. They are all resumed (each must be honoured) and the
//! growth is measured again, as connected sessions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{
    self, close_code, count, format_counts, merge_counts, Errors, Failure, Server, Table, Ws,
};
use crate::cpu::ProcessTree;
use crate::stats::{micros, round, seed_from_clock, spread, Rng};

#[derive(Args, Debug, Clone)]
pub struct ResumeArgs {
    /// Server base URL, e.g. ws://127.0.0.1:8081. Repeat it for the
    /// servers of a cluster: every connection picks one at random.
    #[arg(long, required = true)]
    url: Vec<String>,
    /// Sender/receiver pairs, one topic each.
    #[arg(long, default_value_t = 20)]
    pairs: usize,
    /// Seconds of relaying and cutting.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Each sender relays one message every this many milliseconds.
    #[arg(long, default_value_t = 5)]
    interval_ms: u64,
    /// A receiver's connection is cut after a random 0..=2x this many
    /// milliseconds of being connected.
    #[arg(long, default_value_t = 500)]
    cut_every_ms: u64,
    /// Share of cuts that blackhole the connection instead of resetting it.
    #[arg(long, default_value_t = 0.3)]
    blackhole_fraction: f64,
    /// After a reset, the receiver reconnects after a random 0..=this many
    /// milliseconds.
    #[arg(long, default_value_t = 200)]
    gap_max_ms: u64,
    /// After a blackhole, the receiver reconnects after a random 0..=this
    /// many milliseconds; make it longer than the server's ping interval
    /// plus ping timeout for some to be found dead by ping.
    #[arg(long, default_value_t = 3000)]
    blackhole_max_ms: u64,
    /// Sessions suspended at the end to measure what one costs (0: skip).
    #[arg(long, default_value_t = 2000)]
    suspended: usize,
    /// A connection, resume or final delivery that takes longer than this
    /// many seconds counts as an error.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Server process whose memory (with its descendants) is measured.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Runtime worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// Sessions opened (then reset) at once in the memory phase.
const BATCH: usize = 100;
/// Peers per topic in the memory phase.
const PER_TOPIC: usize = 10;
/// Limit for a blackholed connection to be ended by the server after the
/// resume that replaced it.
const STALE_LIMIT: Duration = Duration::from_secs(10);
/// The `msgId` of a sender's last relay.
const END: &str = "end";

/// What the server sends, as far as this scenario looks.
#[derive(Deserialize)]
struct Msg<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default, rename = "msgId")]
    msg_id: Option<&'a str>,
    #[serde(default, rename = "selfId")]
    self_id: Option<&'a str>,
    #[serde(default, rename = "resumeToken")]
    resume_token: Option<&'a str>,
    #[serde(default)]
    resumed: Option<bool>,
    #[serde(default)]
    code: Option<&'a str>,
}

fn parse(text: &str) -> Result<Msg<'_>, Failure> {
    serde_json::from_str(text)
        .map_err(|e| Failure::new("bad_message", format!("bad message {text}: {e}")))
}

/// One resumable session as its client knows it (its connection apart).
struct Session {
    self_id: String,
    token: String,
    /// Text messages read since the latest `welcome`.
    seen: u64,
}

/// The first text message of a connection, which must be `welcome`.
async fn welcome(ws: &mut Ws) -> Result<(String, String, Option<bool>), Failure> {
    let text = client::next_text(ws, "before welcome").await?;
    let msg = parse(&text)?;
    if msg.kind == "error" {
        let code = msg.code.unwrap_or("unknown");
        return Err(Failure::new(format!("error_{code}"), text.as_str()));
    }
    let (Some(id), Some(token)) = (msg.self_id, msg.resume_token) else {
        return Err(Failure::new(
            "no_token",
            format!("not a resumable welcome: {text}"),
        ));
    };
    Ok((id.to_owned(), token.to_owned(), msg.resumed))
}

impl Session {
    /// Joins `url` as a new resumable session; reads `welcome` and
    /// `peer-list`.
    async fn join(addr: SocketAddr, url: &str) -> Result<(Self, Ws), Failure> {
        let mut ws = client::open(addr, &format!("{url}?resumable=1")).await?;
        let (self_id, token, _) = welcome(&mut ws).await?;
        let mut session = Self {
            self_id,
            token,
            seen: 0,
        };
        loop {
            let text = session.next(&mut ws).await?;
            if parse(&text)?.kind == "peer-list" {
                return Ok((session, ws));
            }
        }
    }

    /// The next text message on `ws`, counted in `seen`.
    async fn next(&mut self, ws: &mut Ws) -> Result<String, Failure> {
        let text = client::next_text(ws, "in session").await?;
        self.seen += 1;
        Ok(text.as_str().to_owned())
    }

    /// Resumes on a new connection to `url`. A resume that is not honoured
    /// is an error.
    async fn resume(&mut self, addr: SocketAddr, url: &str) -> Result<Ws, Failure> {
        let query = format!("{url}?resumable=1&resume={}&seen={}", self.token, self.seen);
        let mut ws = client::open(addr, &query).await?;
        let (self_id, token, resumed) = welcome(&mut ws).await?;
        if resumed != Some(true) || self_id != self.self_id {
            return Err(Failure::new(
                "not_resumed",
                format!(
                    "resume of {} answered with {self_id}, resumed {resumed:?}",
                    self.self_id
                ),
            ));
        }
        self.token = token;
        self.seen = 0;
        Ok(ws)
    }
}

/// Ends `ws` with a TCP reset: no close frame, no FIN.
fn reset(ws: Ws) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let fd = ws.get_ref().as_raw_fd();
    // SAFETY: setsockopt reads the struct we hand it, on a socket we own.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(ws);
}

/// What happened to a blackholed connection after its resume: `taken_over`
/// (closed with 4011), `found_dead` (the server had ended it without a
/// close frame, after its ping timeout), or something else.
async fn stale_end(mut ws: Ws) -> String {
    let end = tokio::time::timeout(STALE_LIMIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break close_code(frame.as_ref()),
                Some(Ok(_)) => {}
                _ => break None,
            }
        }
    })
    .await;
    match end {
        Ok(Some(4011)) => "taken_over".into(),
        Ok(Some(code)) => format!("closed_{code}"),
        Ok(None) => "found_dead".into(),
        Err(_) => "still_open".into(),
    }
}

struct Config {
    servers: Vec<Server>,
    run_id: String,
    interval: Duration,
    cut_every_ms: u64,
    blackhole_fraction: f64,
    gap_max_ms: u64,
    blackhole_max_ms: u64,
    timeout: Duration,
}

impl Config {
    fn pick(&self, rng: &mut Rng, topic: &str) -> (SocketAddr, String) {
        let server = &self.servers[rng.below(self.servers.len())];
        (server.addr, server.topic_url(topic))
    }
}

/// What one receiver saw.
#[derive(Default)]
struct ReceiverStats {
    /// Distinct relays that arrived.
    unique: u64,
    duplicated: u64,
    resets: u64,
    blackholes: u64,
    resumes: u64,
    /// Resumes on another server than the connection before (in cluster
    /// mode, another node: the session moved).
    moved: u64,
    resume_us: Vec<u32>,
    /// How each blackholed connection ended.
    stale: BTreeMap<String, u64>,
    /// Presence events other than its sender's one `peer-joined`.
    presence: u64,
    finished: bool,
    errors: Errors,
}

/// A receiver's bookkeeping of the numbered relays.
#[derive(Default)]
struct Tally {
    /// The next number expected.
    next: u64,
    stats: ReceiverStats,
    joined: bool,
}

impl Tally {
    /// One message read; true once the sender's last relay came.
    fn read(&mut self, text: &str) -> Result<bool, Failure> {
        let msg = parse(text)?;
        match msg.kind {
            "offer" => {
                let n: u64 = msg.msg_id.and_then(|id| id.parse().ok()).ok_or_else(|| {
                    Failure::new("bad_message", format!("offer without a number: {text}"))
                })?;
                if n < self.next {
                    self.stats.duplicated += 1;
                } else {
                    // A gap is a loss; the totals count it at the end.
                    self.stats.unique += 1;
                    self.next = n + 1;
                }
            }
            "answer" if msg.msg_id == Some(END) => return Ok(true),
            "peer-joined" if !self.joined => self.joined = true,
            "peer-joined" | "peer-left" | "peer-list" => self.stats.presence += 1,
            "error" => {
                let code = msg.code.unwrap_or("unknown");
                return Err(Failure::new(format!("error_{code}"), text));
            }
            _ => {}
        }
        Ok(false)
    }
}

/// The receiver of one pair: reads, is cut, resumes, until its sender's
/// last relay arrives. Sends its peer id on `ready` once joined. Returns
/// its connection, still open so that its sender sees no leave.
async fn receiver(
    cfg: Arc<Config>,
    topic: String,
    ready: oneshot::Sender<String>,
    mut stop: watch::Receiver<bool>,
    seed: u64,
) -> (ReceiverStats, Option<Ws>) {
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    let (addr, url) = cfg.pick(&mut rng, &topic);
    let mut at = addr;
    let (mut session, mut ws) = match Session::join(addr, &url).await {
        Ok((session, ws)) => (session, Some(ws)),
        Err(failure) => {
            tally.stats.errors.add(failure);
            return (tally.stats, None);
        }
    };
    let _ = ready.send(session.self_id.clone());
    let mut stale = JoinSet::new();
    let mut final_deadline: Option<Instant> = None;
    loop {
        let connected = rng.below(2 * cfg.cut_every_ms as usize + 1) as u64;
        let cut = tokio::time::sleep(Duration::from_millis(connected));
        tokio::pin!(cut);
        let cut_now = loop {
            let stopping = final_deadline.is_some();
            let deadline = final_deadline.unwrap_or_else(|| Instant::now() + cfg.timeout);
            tokio::select! {
                biased;
                () = client::stopped(&mut stop), if !stopping => {
                    final_deadline = Some(Instant::now() + cfg.timeout);
                }
                () = &mut cut, if !stopping => break true,
                () = tokio::time::sleep_until(deadline.into()), if stopping => {
                    tally.stats.errors.add(Failure::timeout("waiting for the last relay"));
                    break false;
                }
                text = session.next(ws.as_mut().expect("connected")) => match text.and_then(|text| tally.read(&text)) {
                    Ok(false) => {}
                    Ok(true) => {
                        tally.stats.finished = true;
                        break false;
                    }
                    Err(failure) => {
                        tally.stats.errors.add(failure);
                        break false;
                    }
                },
            }
        };
        if !cut_now {
            break;
        }
        let old = ws.take().expect("connected");
        let blackhole = rng.unit() < cfg.blackhole_fraction;
        let (held, wait) = if blackhole {
            tally.stats.blackholes += 1;
            (Some(old), cfg.blackhole_max_ms)
        } else {
            tally.stats.resets += 1;
            reset(old);
            (None, cfg.gap_max_ms)
        };
        tokio::time::sleep(Duration::from_millis(rng.below(wait as usize + 1) as u64)).await;
        let (addr, url) = cfg.pick(&mut rng, &topic);
        let started = Instant::now();
        let resumed = tokio::time::timeout(cfg.timeout, session.resume(addr, &url)).await;
        match resumed {
            Ok(Ok(new)) => {
                tally.stats.resumes += 1;
                tally.stats.moved += u64::from(addr != at);
                at = addr;
                tally.stats.resume_us.push(micros(started.elapsed()));
                ws = Some(new);
            }
            Ok(Err(failure)) => {
                tally.stats.errors.add(failure);
                break;
            }
            Err(_) => {
                tally.stats.errors.add(Failure::timeout("resuming"));
                break;
            }
        }
        if let Some(held) = held {
            stale.spawn(stale_end(held));
        }
    }
    while let Some(end) = stale.join_next().await {
        if let Ok(end) = end {
            count(&mut tally.stats.stale, &end);
        }
    }
    (tally.stats, ws)
}

/// What one sender saw.
#[derive(Default)]
struct SenderStats {
    sent: u64,
    /// Relays the server answered `dropped` (a full queue).
    dropped: u64,
    /// Presence events after its `peer-list`: its receiver must never
    /// seem to leave or join.
    presence: u64,
    errors: Errors,
}

impl SenderStats {
    /// One message from the server.
    fn read(&mut self, text: &str) {
        match parse(text) {
            Ok(msg) => match msg.kind {
                "peer-joined" | "peer-left" => self.presence += 1,
                "error" if msg.code == Some("dropped") => self.dropped += 1,
                "error" => {
                    let code = msg.code.unwrap_or("unknown");
                    self.errors.add(Failure::new(format!("error_{code}"), text));
                }
                _ => {}
            },
            Err(failure) => self.errors.add(failure),
        }
    }
}

/// What the sender's connection gave: a message, or its end.
fn relay(kind: &str, to: &str, msg_id: &str) -> Message {
    Message::text(format!(
        r#"{{"type":"{kind}","to":"{to}","payload":{{}},"msgId":"{msg_id}"}}"#
    ))
}

/// The sender of one pair: relays a numbered `offer` to `target` every
/// interval until `stop`, then the last `answer`, then reads until its
/// receiver is done.
async fn sender(
    cfg: Arc<Config>,
    topic: String,
    target: String,
    mut stop: watch::Receiver<bool>,
    done: oneshot::Receiver<()>,
    seed: u64,
) -> SenderStats {
    let mut rng = Rng::new(seed);
    let mut stats = SenderStats::default();
    let (addr, url) = cfg.pick(&mut rng, &topic);
    let mut view = crate::view::View::default();
    let mut ws = match client::join(addr, &url, &mut view).await {
        Ok(ws) => ws,
        Err(failure) => {
            stats.errors.add(failure);
            return stats;
        }
    };
    if !view.members().any(|id| id == target) {
        stats.errors.add(Failure::new(
            "target_missing",
            "the receiver is not in peer-list",
        ));
    }
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(done);
    // After `stop`, the last relay; then pings are answered and late
    // errors counted until the receiver is done.
    let mut ending = false;
    loop {
        let send = tokio::select! {
            biased;
            () = client::stopped(&mut stop), if !ending => {
                ending = true;
                relay("answer", &target, END)
            }
            _ = &mut done, if ending => break,
            got = client::next_text(&mut ws, "sending") => {
                match got {
                    Ok(text) => stats.read(&text),
                    Err(failure) => {
                        stats.errors.add(failure);
                        return stats;
                    }
                }
                continue;
            }
            _ = tick.tick(), if !ending => {
                stats.sent += 1;
                relay("offer", &target, &(stats.sent - 1).to_string())
            }
        };
        if let Err(err) = ws.send(send).await {
            stats.errors.add(Failure::new("send", err.to_string()));
            return stats;
        }
    }
    client::close(&mut ws, Duration::from_secs(2)).await;
    stats
}

/// One pair: the receiver joins, then the sender.
async fn pair(
    cfg: Arc<Config>,
    index: usize,
    stop: watch::Receiver<bool>,
    seed: u64,
) -> (SenderStats, ReceiverStats) {
    let topic = client::topic_name(&cfg.run_id, index);
    let (ready, target) = oneshot::channel();
    let receiving = tokio::spawn(receiver(
        Arc::clone(&cfg),
        topic.clone(),
        ready,
        stop.clone(),
        seed,
    ));
    let (finished, done) = oneshot::channel();
    let sending = match target.await {
        Ok(target) => Some(tokio::spawn(sender(
            cfg,
            topic,
            target,
            stop,
            done,
            seed ^ 0x5eed,
        ))),
        Err(_) => None,
    };
    let (received, ws) = receiving.await.unwrap_or_default();
    let _ = finished.send(());
    let sent = match sending {
        Some(task) => task.await.unwrap_or_default(),
        None => SenderStats::default(),
    };
    if let Some(mut ws) = ws {
        client::close(&mut ws, Duration::from_secs(2)).await;
    }
    (sent, received)
}

/// The sum of every sample of `name` in the server's `/metrics`.
async fn metric(server: &Server, name: &str) -> Result<f64, String> {
    let mut tcp = TcpStream::connect(server.addr)
        .await
        .map_err(|e| format!("metrics: {e}"))?;
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.authority
    );
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("metrics: {e}"))?;
    let mut body = String::new();
    tcp.read_to_string(&mut body)
        .await
        .map_err(|e| format!("metrics: {e}"))?;
    let samples = body.lines().filter_map(|line| {
        let rest = line.strip_prefix(name)?;
        let rest = rest.strip_prefix(|c| c == ' ' || c == '{')?;
        rest.rsplit(' ').next()?.parse::<f64>().ok()
    });
    Ok(samples.sum())
}

/// Waits until the server counts at least `n` suspended sessions.
async fn suspended_at_least(server: &Server, n: usize, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let now = metric(server, "signaling_sessions_suspended").await?;
        if now >= n as f64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{now} sessions suspended after {limit:?}, not {n}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The memory phase's figures.
#[derive(Serialize, Default)]
struct Memory {
    sessions: usize,
    rss_baseline_kib: u64,
    rss_suspended_kib: u64,
    rss_resumed_kib: u64,
    bytes_per_suspended: f64,
    bytes_per_connected: f64,
    resumed: usize,
}

/// Opens `n` resumable sessions in batches, resets each batch once it is
/// joined, and measures the server's memory with all of them suspended,
/// then with all of them resumed.
async fn memory(cfg: &Config, n: usize, tree: &ProcessTree) -> Result<Memory, String> {
    let server = &cfg.servers[0];
    let base = metric(server, "signaling_sessions_suspended").await? as usize;
    let before = tree.rss_kib();
    let mut held: Vec<(String, Session)> = Vec::with_capacity(n);
    while held.len() < n {
        let mut batch = JoinSet::new();
        for i in held.len()..(held.len() + BATCH).min(n) {
            let url = server.topic_url(&format!("mem-{}-{}", cfg.run_id, i / PER_TOPIC));
            let addr = server.addr;
            batch.spawn(async move {
                let joined = Session::join(addr, &url).await;
                joined.map(|(session, ws)| (url, session, ws))
            });
        }
        while let Some(joined) = batch.join_next().await {
            let (url, session, ws) = joined.map_err(|e| e.to_string())?.map_err(|f| f.detail)?;
            reset(ws);
            held.push((url, session));
        }
        suspended_at_least(server, base + held.len(), cfg.timeout).await?;
    }
    let suspended = tree.rss_kib();
    let mut resumed = Vec::with_capacity(n);
    for chunk in held.chunks_mut(BATCH) {
        let mut batch = JoinSet::new();
        for (url, session) in chunk.iter_mut() {
            let url = url.clone();
            let mut session = std::mem::replace(
                session,
                Session {
                    self_id: String::new(),
                    token: String::new(),
                    seen: 0,
                },
            );
            let addr = server.addr;
            batch.spawn(async move { session.resume(addr, &url).await });
        }
        while let Some(done) = batch.join_next().await {
            resumed.push(done.map_err(|e| e.to_string())?.map_err(|f| f.detail)?);
        }
    }
    let connected = tree.rss_kib();
    let per = |kib: u64| (kib.saturating_sub(before) * 1024) as f64 / n as f64;
    let report = Memory {
        sessions: n,
        rss_baseline_kib: before,
        rss_suspended_kib: suspended,
        rss_resumed_kib: connected,
        bytes_per_suspended: round(per(suspended), 1),
        bytes_per_connected: round(per(connected), 1),
        resumed: resumed.len(),
    };
    for mut ws in resumed {
        client::close(&mut ws, Duration::from_millis(500)).await;
    }
    Ok(report)
}

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    url: Vec<String>,
    pairs: usize,
    duration_s: f64,
    interval_ms: u64,
    relays_sent: u64,
    relays_received: u64,
    lost: u64,
    duplicated: u64,
    dropped: u64,
    resets: u64,
    blackholes: u64,
    resumes: u64,
    resumes_moved: u64,
    resume_p50_us: u32,
    resume_p99_us: u32,
    resume_max_us: u32,
    blackholes_ended: BTreeMap<String, u64>,
    presence_seen_by_senders: u64,
    presence_seen_by_receivers: u64,
    unfinished: usize,
    errors: BTreeMap<String, u64>,
    errors_total: u64,
    first_error: Option<String>,
    memory: Option<Memory>,
    server_pid: Option<u32>,
}

pub async fn run(args: ResumeArgs) -> Result<(), String> {
    let mut servers = Vec::with_capacity(args.url.len());
    for url in &args.url {
        servers.push(Server::resolve(url).await?);
    }
    let tree = match args.server_pid {
        Some(pid) => Some(ProcessTree::discover(pid)?),
        None => None,
    };
    let seed = seed_from_clock();
    let cfg = Arc::new(Config {
        servers,
        run_id: format!("{:08x}", seed as u32),
        interval: Duration::from_millis(args.interval_ms.max(1)),
        cut_every_ms: args.cut_every_ms,
        blackhole_fraction: args.blackhole_fraction,
        gap_max_ms: args.gap_max_ms,
        blackhole_max_ms: args.blackhole_max_ms,
        timeout: Duration::from_secs_f64(args.timeout),
    });
    let (stop_tx, stop) = watch::channel(false);
    let mut pairs = JoinSet::new();
    for index in 0..args.pairs {
        let seed = seed.wrapping_add(index as u64 * 0x9e37_79b9);
        pairs.spawn(pair(Arc::clone(&cfg), index, stop.clone(), seed));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let _ = stop_tx.send(true);
    let elapsed = started.elapsed().as_secs_f64();

    let mut sent = SenderStats::default();
    let mut received = ReceiverStats::default();
    let mut lost = 0;
    let mut unfinished = 0;
    while let Some(done) = pairs.join_next().await {
        let (s, r) = done.map_err(|e| e.to_string())?;
        lost += s.sent.saturating_sub(s.dropped + r.unique);
        unfinished += usize::from(!r.finished);
        sent.sent += s.sent;
        sent.dropped += s.dropped;
        sent.presence += s.presence;
        sent.errors.merge(s.errors);
        received.unique += r.unique;
        received.duplicated += r.duplicated;
        received.resets += r.resets;
        received.blackholes += r.blackholes;
        received.resumes += r.resumes;
        received.moved += r.moved;
        received.resume_us.extend(r.resume_us);
        received.presence += r.presence;
        merge_counts(&mut received.stale, r.stale);
        received.errors.merge(r.errors);
    }
    let memory = match (&tree, args.suspended) {
        (Some(tree), n) if n > 0 => Some(memory(&cfg, n, tree).await?),
        _ => None,
    };
    let mut errors = sent.errors;
    errors.merge(received.errors);
    let (p50, p99, max) = spread(&mut received.resume_us);
    let report = Report {
        scenario: "resume",
        url: args.url.clone(),
        pairs: args.pairs,
        duration_s: round(elapsed, 3),
        interval_ms: args.interval_ms,
        relays_sent: sent.sent,
        relays_received: received.unique,
        lost,
        duplicated: received.duplicated,
        dropped: sent.dropped,
        resets: received.resets,
        blackholes: received.blackholes,
        resumes: received.resumes,
        resumes_moved: received.moved,
        resume_p50_us: p50,
        resume_p99_us: p99,
        resume_max_us: max,
        blackholes_ended: received.stale,
        presence_seen_by_senders: sent.presence,
        presence_seen_by_receivers: received.presence,
        unfinished,
        errors_total: errors.counts.values().sum(),
        errors: errors.counts,
        first_error: errors.first,
        memory,
        server_pid: args.server_pid,
    };
    let mut table = Table::default();
    table.line(
        "relays",
        format!(
            "{} sent, {} received, {} lost, {} duplicated, {} dropped",
            report.relays_sent,
            report.relays_received,
            report.lost,
            report.duplicated,
            report.dropped
        ),
    );
    table.line(
        "cuts",
        format!(
            "{} resets, {} blackholes ({}), {} resumes ({} on another server)",
            report.resets,
            report.blackholes,
            format_counts(&report.blackholes_ended),
            report.resumes,
            report.resumes_moved
        ),
    );
    table.line("resume us", format!("p50 {p50}  p99 {p99}  max {max}"));
    table.line(
        "presence",
        format!(
            "{} seen by senders, {} by receivers",
            report.presence_seen_by_senders, report.presence_seen_by_receivers
        ),
    );
    if let Some(m) = &report.memory {
        table.line(
            "memory",
            format!(
                "{} B per suspended session, {} B per connected one ({} of {} resumed)",
                m.bytes_per_suspended, m.bytes_per_connected, m.resumed, m.sessions
            ),
        );
    }
    table.line("errors", format_counts(&report.errors));
    if let Some(first) = &report.first_error {
        table.line("first error", first);
    }
    client::emit(&report, &table)
}

//! The `churn` scenario: clients join and leave topics as fast as they can
//! while one long-lived observer per topic tracks its view.
//!
//! Each client loop joins a random topic, stays a random time, and leaves,
//! with a close frame or (a fraction of the time) by dropping the TCP
//! connection without one. When the churn is over, every observer's view
//! must be empty of churned peers (`ghosts` counts the ids left behind).
//! Then a fresh set of peers joins every topic at once and, once everything
//! has been delivered, every view is compared with the true membership.
//!
//! With `--updates`, metadata is checked too. Every peer joins with a
//! [`Stamp`] as its metadata and each churn client sends that many
//! `update-metadata` during each stay, so every `peer-updated` a view gets
//! must carry the next stamp of the one it holds. At the end, the metadata
//! each observer held for a churn client when it left must be that client's
//! last (for a dropped connection, one of its own stamps: what was sent
//! right before the drop may be lost, and is counted), and while the fresh
//! peers join, the observers and half of the fresh peers update theirs:
//! every view must end with every member's last metadata.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{
    self, count, format_counts, lock, Errors, Failure, Incoming, Server, Table, Ws,
};
use crate::cpu::{own_cpu_seconds, ProcessTree};
use crate::stats::{micros, round, seed_from_clock, spread, Rng};
use crate::tracker::{self, Control, Tracked};
use crate::view::{add_violations, Stamp, View};

#[derive(Args, Debug, Clone)]
pub struct ChurnArgs {
    /// Server base URL, e.g. ws://127.0.0.1:8081. Repeat it for the
    /// servers of a cluster: each join picks one at random.
    #[arg(long, required = true)]
    url: Vec<String>,
    /// Seconds of churn.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Concurrent client loops.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Topics the clients pick from at random.
    #[arg(long, default_value_t = 10)]
    topics: usize,
    /// A joined client stays a random 0..=this many milliseconds.
    #[arg(long, default_value_t = 50)]
    stay_max_ms: u64,
    /// Share of leaves that drop the TCP connection without a close frame.
    #[arg(long, default_value_t = 0.1)]
    drop_fraction: f64,
    /// Fresh peers per topic for the final consistency check.
    #[arg(long, default_value_t = 5)]
    check_peers: usize,
    /// Metadata updates each churn client sends during each stay, at random
    /// moments of it; peers then join with metadata, and the final check
    /// has the observers and half of the fresh peers send as many while
    /// the fresh peers join. 0 (the default) sends no metadata at all, as
    /// the seed's protocol has no `update-metadata`.
    #[arg(long, default_value_t = 0)]
    updates: u32,
    /// A join that takes longer than this many seconds counts as an error.
    #[arg(long, default_value_t = 10.0)]
    join_timeout: f64,
    /// Server process whose CPU time (with its descendants) is measured.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Runtime worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// Wait after the churn before looking for ghosts.
const QUIET: Duration = Duration::from_secs(1);
/// Limit for every check peer to answer the sync ping.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra wait after the sync, for servers whose answer to the ping can
/// overtake presence events already queued (the seed answers it with an
/// error written directly, not through the peer's queue).
const AFTER_SYNC: Duration = Duration::from_millis(200);

/// What one client loop did.
#[derive(Default)]
struct ClientStats {
    joins: u64,
    leaves_close: u64,
    leaves_drop: u64,
    join_us: Vec<u32>,
    updates_sent: u64,
    errors: Errors,
}

impl ClientStats {
    fn error(&mut self, failure: Failure) {
        self.errors.add(failure);
    }
}

/// Ids of the peers connected right now, as far as the clients know.
type Live = Arc<Mutex<HashSet<String>>>;

/// A churn client's stay that ended, with `--updates`: the observer of its
/// topic must have seen it join and leave, holding its last metadata when
/// it left if it left with a close frame, else that or one of its earlier
/// stamps (the updates sent right before a dropped connection may be lost).
struct Departure {
    topic: usize,
    id: String,
    metadata: String,
    closed: bool,
}

type Departures = Arc<Mutex<Vec<Departure>>>;

struct Config {
    /// Each server's address and its url of every topic.
    servers: Vec<(SocketAddr, Vec<String>)>,
    stay_max_ms: u64,
    drop_fraction: f64,
    join_timeout: Duration,
    /// `--updates`: updates per stay (0: no metadata at all).
    updates: u32,
}

/// One client loop: join, stay, leave, until `deadline`. Client `index`
/// tags its `n`-th stay's metadata `c{index}.{n}`.
async fn client_loop(
    cfg: Arc<Config>,
    live: Live,
    departures: Departures,
    deadline: Instant,
    index: usize,
    seed: u64,
) -> ClientStats {
    let mut rng = Rng::new(seed);
    let mut stats = ClientStats::default();
    let mut stays = 0u64;
    while Instant::now() < deadline {
        let (addr, urls) = &cfg.servers[rng.below(cfg.servers.len())];
        let topic = rng.below(urls.len());
        let mut stamp = (cfg.updates > 0).then(|| Stamp::new(format!("c{index}.{stays}")));
        stays += 1;
        let url = match &stamp {
            Some(stamp) => client::with_metadata(&urls[topic], &stamp.text()),
            None => urls[topic].clone(),
        };
        let mut view = View::default();
        let start = Instant::now();
        let mut ws = match tokio::time::timeout(
            cfg.join_timeout,
            client::join(*addr, &url, &mut view),
        )
        .await
        {
            Ok(Ok(ws)) => ws,
            Ok(Err(failure)) => {
                stats.error(failure);
                // Do not spin on a server that refuses everything.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err(_) => {
                stats.error(Failure::timeout("joining"));
                continue;
            }
        };
        stats.joins += 1;
        stats.join_us.push(micros(start.elapsed()));
        let self_id = view.self_id().unwrap_or_default().to_owned();
        lock(&live).insert(self_id.clone());

        // Stay, reading (and discarding) whatever the server sends, and
        // sending the updates at their moments.
        let stay = Duration::from_millis(rng.below(cfg.stay_max_ms as usize + 1) as u64);
        let stay_start = tokio::time::Instant::now();
        let mut moments: Vec<tokio::time::Instant> = (0..cfg.updates)
            .map(|_| stay_start + stay.mul_f64(rng.unit()))
            .collect();
        // Latest first: the next moment is the last one.
        moments.sort_unstable_by(|a, b| b.cmp(a));
        let stay_end = stay_start + stay;
        let timer = tokio::time::sleep_until(moments.last().copied().unwrap_or(stay_end));
        tokio::pin!(timer);
        let mut open = true;
        while open {
            tokio::select! {
                () = &mut timer => {
                    let (Some(_), Some(stamp)) = (moments.pop(), stamp.as_mut()) else {
                        break;
                    };
                    stamp.advance();
                    let update = client::update_metadata(&stamp.text());
                    if let Err(err) = ws.send(Message::text(update)).await {
                        stats.error(Failure::new("ws_error", format!("update-metadata: {err}")));
                        open = false;
                    } else {
                        stats.updates_sent += 1;
                    }
                    timer.as_mut().reset(moments.last().copied().unwrap_or(stay_end));
                }
                item = ws.next() => match item {
                    Some(Ok(Message::Text(text))) => {
                        if let Ok(msg) = serde_json::from_str::<Incoming>(&text) {
                            if msg.kind == "error" {
                                let code = msg.code.unwrap_or("unknown");
                                stats.error(Failure::new(format!("error_{code}"), text.as_str()));
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    other => {
                        stats.error(client::stream_end(other, "while staying"));
                        open = false;
                    }
                }
            }
        }
        let mut closed = false;
        if open {
            if rng.unit() < cfg.drop_fraction {
                // Abnormal disconnect: the socket goes away without a close frame.
                drop(ws);
                stats.leaves_drop += 1;
            } else if client::close(&mut ws, Duration::from_secs(2)).await {
                stats.leaves_close += 1;
                closed = true;
            } else {
                stats.error(Failure::timeout("waiting for the server's close"));
            }
        }
        lock(&live).remove(&self_id);
        if let Some(stamp) = stamp {
            lock(&departures).push(Departure {
                topic,
                id: self_id,
                metadata: stamp.text(),
                closed,
            });
        }
    }
    stats
}

/// A tracked peer and the topic it is in.
struct Member {
    topic: usize,
    state: Arc<Tracked>,
}

/// How many updates of the stamp `last` are missing from `held`, when
/// `held` is an earlier stamp of the same peer.
fn lost_updates(held: Option<&str>, last: &str) -> Option<u64> {
    let held: Stamp = serde_json::from_str(held?).ok()?;
    let last: Stamp = serde_json::from_str(last).ok()?;
    (held.tag == last.tag && held.seq < last.seq).then(|| last.seq - held.seq)
}

/// Joins `topic` as a peer whose view is tracked, on the `n`-th server
/// (round robin). With `--updates`, it joins with the stamp `tag`, and an
/// observer's view keeps the metadata of every peer that leaves.
async fn join_tracked(
    cfg: &Config,
    topic: usize,
    n: usize,
    tag: String,
    observer: bool,
) -> Result<(Ws, Arc<Tracked>), Failure> {
    let mut view = View::default();
    let (addr, urls) = &cfg.servers[n % cfg.servers.len()];
    let stamp = (cfg.updates > 0).then(|| Stamp::new(tag));
    let url = match &stamp {
        Some(stamp) => {
            if observer {
                view.keep_departed();
            }
            client::with_metadata(&urls[topic], &stamp.text())
        }
        None => urls[topic].clone(),
    };
    let ws = tokio::time::timeout(cfg.join_timeout, client::join(*addr, &url, &mut view))
        .await
        .map_err(|_| Failure::timeout("joining"))??;
    Ok((ws, Arc::new(Tracked::with_stamp(view, stamp))))
}

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    url: String,
    clients: usize,
    topics: usize,
    stay_max_ms: u64,
    drop_fraction: f64,
    threads: usize,
    duration_s: f64,
    joins: u64,
    joins_per_s: f64,
    join_p50_us: u32,
    join_p99_us: u32,
    join_max_us: u32,
    leaves_close: u64,
    leaves_drop: u64,
    errors: BTreeMap<String, u64>,
    errors_total: u64,
    impossible_events: BTreeMap<String, u64>,
    observer_disconnects: usize,
    ghosts: usize,
    check_peers: usize,
    check_join_failures: BTreeMap<String, u64>,
    views_checked: usize,
    inconsistent_views: usize,
    missing_entries: usize,
    extra_entries: usize,
    sync_unanswered: usize,
    sync_answered_by_error: usize,
    updates: u32,
    updates_sent: u64,
    check_updates_sent: u64,
    updates_received: u64,
    updates_unsettled: usize,
    stale_metadata: usize,
    stale_at_leave: usize,
    updates_lost_at_drop: u64,
    leaves_unseen: usize,
    server_pid: Option<u32>,
    server_cpu_s: Option<f64>,
    server_cpu_us_per_join: Option<f64>,
    client_cpu_s: f64,
}

fn validate(args: &ChurnArgs) -> Result<(), String> {
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err("--duration must be positive".into());
    }
    if args.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    if args.topics == 0 {
        return Err("--topics must be at least 1".into());
    }
    if !(0.0..=1.0).contains(&args.drop_fraction) {
        return Err("--drop-fraction must be between 0 and 1".into());
    }
    if !(args.join_timeout > 0.0 && args.join_timeout.is_finite()) {
        return Err("--join-timeout must be positive".into());
    }
    Ok(())
}

pub async fn run(args: ChurnArgs) -> Result<(), String> {
    validate(&args)?;
    let seed = seed_from_clock();
    let run_id = format!("{:08x}", seed as u32);
    let mut servers = Vec::with_capacity(args.url.len());
    for url in &args.url {
        let server = Server::resolve(url).await?;
        let urls = (0..args.topics)
            .map(|t| server.topic_url(&client::topic_name(&run_id, t)))
            .collect();
        servers.push((server.addr, urls));
    }
    let base = args.url.join(" ");
    let cfg = Arc::new(Config {
        servers,
        stay_max_ms: args.stay_max_ms,
        drop_fraction: args.drop_fraction,
        join_timeout: Duration::from_secs_f64(args.join_timeout),
        updates: args.updates,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (sync_tx, sync_rx) = watch::channel(0u64);
    let ctl = Control {
        stop: stop_rx,
        sync: sync_rx,
    };
    let mut trackers = JoinSet::new();

    // One observer per topic, there before the churn starts.
    let mut observers = Vec::with_capacity(args.topics);
    for t in 0..args.topics {
        let (ws, state) = join_tracked(&cfg, t, t, format!("o{t}"), true)
            .await
            .map_err(|f| format!("observer of topic {t} could not join: {f}"))?;
        let who = format!("observer of topic {t}");
        trackers.spawn(tracker::track(
            ws,
            Arc::clone(&state),
            ctl.clone(),
            None,
            who,
        ));
        observers.push(Member { topic: t, state });
    }
    let live: Live = Arc::new(Mutex::new(
        observers.iter().filter_map(|o| o.state.self_id()).collect(),
    ));

    let tree = match args.server_pid {
        Some(pid) => Some(ProcessTree::discover(pid)?),
        None => None,
    };
    let server_cpu0 = tree.as_ref().map(ProcessTree::cpu_seconds);
    let client_cpu0 = own_cpu_seconds();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(args.duration);
    let mut rng = Rng::new(seed);
    let departures: Departures = Arc::default();
    let mut clients = JoinSet::new();
    for index in 0..args.clients {
        clients.spawn(client_loop(
            Arc::clone(&cfg),
            Arc::clone(&live),
            Arc::clone(&departures),
            deadline,
            index,
            rng.next_u64(),
        ));
    }
    let mut stats = ClientStats::default();
    while let Some(done) = clients.join_next().await {
        let s = done.map_err(|e| e.to_string())?;
        stats.joins += s.joins;
        stats.leaves_close += s.leaves_close;
        stats.leaves_drop += s.leaves_drop;
        stats.join_us.extend(s.join_us);
        stats.updates_sent += s.updates_sent;
        stats.errors.merge(s.errors);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let server_cpu = match (server_cpu0, tree.as_ref().map(ProcessTree::cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let client_cpu = own_cpu_seconds() - client_cpu0;

    // Ghosts: ids an observer still holds that are not connected.
    tokio::time::sleep(QUIET).await;
    let mut ghost_examples = Vec::new();
    let ghosts = {
        let live = lock(&live);
        let mut ghosts = 0;
        for (t, o) in observers.iter().enumerate() {
            for id in o.state.view().members() {
                if !live.contains(id) {
                    ghosts += 1;
                    if ghost_examples.len() < 5 {
                        ghost_examples.push(format!("{id} (topic {t})"));
                    }
                }
            }
        }
        ghosts
    };

    // Consistency: K fresh peers per topic join at once (while, with
    // `--updates`, the observers and every other fresh peer update their
    // metadata).
    let updates = u64::from(args.updates);
    let check = Arc::new(Mutex::new(Vec::new()));
    let check_failures = Arc::new(Mutex::new(BTreeMap::new()));
    let started = Arc::new(AtomicUsize::new(0));
    let mut joins = JoinSet::new();
    for t in 0..args.topics {
        for k in 0..args.check_peers {
            let (cfg, ctl) = (Arc::clone(&cfg), ctl.clone());
            let (check, fails) = (Arc::clone(&check), Arc::clone(&check_failures));
            let started = Arc::clone(&started);
            joins.spawn(async move {
                match join_tracked(&cfg, t, t + k + 1, format!("k{t}.{k}"), false).await {
                    Ok((ws, state)) => {
                        let member = Member {
                            topic: t,
                            state: Arc::clone(&state),
                        };
                        if updates > 0 && k % 2 == 0 {
                            state.request_updates(updates);
                        }
                        lock(&check).push(member);
                        started.fetch_add(1, Ordering::Release);
                        let who = format!("check peer {k} of topic {t}");
                        tracker::track(ws, state, ctl, None, who).await;
                    }
                    Err(f) => {
                        count(&mut lock(&fails), &f.kind);
                        started.fetch_add(1, Ordering::Release);
                    }
                }
            });
        }
    }
    if updates > 0 {
        for o in &observers {
            o.state.request_updates(updates);
        }
    }
    let wanted = args.topics * args.check_peers;
    while started.load(Ordering::Acquire) < wanted {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let members: Vec<(usize, Arc<Tracked>)> = observers
        .iter()
        .chain(lock(&check).iter())
        .map(|m| (m.topic, Arc::clone(&m.state)))
        .collect();
    // Every update was taken by the server (the ping after it came back)
    // before any peer sends the sync ping.
    let settle_deadline = Instant::now() + SYNC_TIMEOUT;
    while Instant::now() < settle_deadline
        && members
            .iter()
            .any(|(_, s)| s.is_open() && !s.updates_settled())
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let updates_unsettled = members
        .iter()
        .filter(|(_, s)| s.is_open() && !s.updates_settled())
        .count();

    // Everything queued before the ping is delivered before its answer.
    let _ = sync_tx.send(1);
    let sync_deadline = Instant::now() + SYNC_TIMEOUT;
    while Instant::now() < sync_deadline
        && members.iter().any(|(_, s)| s.is_open() && s.synced() < 1)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(AFTER_SYNC).await;
    let sync_unanswered = members
        .iter()
        .filter(|(_, s)| s.is_open() && s.synced() < 1)
        .count();
    let sync_by_error = members.iter().filter(|(_, s)| s.sync_by_error()).count();

    // Each open member's id and metadata, by topic.
    let mut membership: Vec<HashMap<String, Option<String>>> = vec![HashMap::new(); args.topics];
    for (t, s) in &members {
        if let (true, Some(id)) = (s.is_open(), s.self_id()) {
            membership[*t].insert(id, s.metadata());
        }
    }
    let (mut views_checked, mut inconsistent, mut missing, mut extra) = (0, 0, 0, 0);
    let mut stale_metadata = 0;
    for (t, s) in members.iter().filter(|(_, s)| s.is_open()) {
        let truth: HashSet<&str> = membership[*t].keys().map(String::as_str).collect();
        let view = s.view();
        let diff = view.compare(&truth);
        // The seed's metadata is not ours to check: only with --updates.
        let stale = if updates > 0 {
            let metadata: HashMap<&str, Option<&str>> = membership[*t]
                .iter()
                .map(|(id, m)| (id.as_str(), m.as_deref()))
                .collect();
            view.stale_metadata(&metadata)
        } else {
            0
        };
        views_checked += 1;
        if !diff.is_exact() || stale > 0 {
            inconsistent += 1;
        }
        missing += diff.missing;
        extra += diff.extra;
        stale_metadata += stale;
    }

    // Every churn client's stay, as its topic's observer saw it.
    let (mut stale_at_leave, mut leaves_unseen, mut lost_at_drop) = (0, 0, 0);
    let mut leave_examples = Vec::new();
    for d in lock(&departures).iter() {
        let observer = &observers[d.topic].state;
        if !observer.is_open() {
            continue;
        }
        let view = observer.view();
        let problem = match view.departed(&d.id) {
            None if view.metadata(&d.id).is_none() => {
                leaves_unseen += 1;
                "never seen"
            }
            // Still in the view: a ghost, counted as one.
            None => continue,
            Some(held) if held != Some(d.metadata.as_str()) => {
                match lost_updates(held, &d.metadata) {
                    // Dropping the connection may lose what was sent last.
                    Some(lost) if !d.closed => {
                        lost_at_drop += lost;
                        continue;
                    }
                    _ => {
                        stale_at_leave += 1;
                        "stale at its leave"
                    }
                }
            }
            Some(_) => continue,
        };
        if leave_examples.len() < 5 {
            leave_examples.push(format!("{} (topic {}) {problem}", d.id, d.topic));
        }
    }

    let observer_ends: Vec<String> = observers.iter().filter_map(|o| o.state.ended()).collect();
    let tracker_errors: u64 = members.iter().map(|(_, s)| s.errors()).sum();
    if tracker_errors > 0 {
        stats
            .errors
            .counts
            .insert("observer_error_messages".into(), tracker_errors);
    }

    let _ = stop_tx.send(true);
    let closing = async {
        while joins.join_next().await.is_some() {}
        while trackers.join_next().await.is_some() {}
    };
    if tokio::time::timeout(Duration::from_secs(10), closing)
        .await
        .is_err()
    {
        eprintln!("warning: some peers did not close within 10 s");
    }
    // Impossible events are counted over the whole run, closing included:
    // a peer-left for an id a peer never learned shows up when others leave.
    let mut impossible = BTreeMap::new();
    let mut updates_received = 0;
    for (_, s) in &members {
        let view = s.view();
        add_violations(&mut impossible, &view);
        updates_received += view.updates();
    }

    let (p50, p99, max) = spread(&mut stats.join_us);
    let report = Report {
        scenario: "churn",
        url: base,
        clients: args.clients,
        topics: args.topics,
        stay_max_ms: args.stay_max_ms,
        drop_fraction: args.drop_fraction,
        threads: args.threads,
        duration_s: round(elapsed, 3),
        joins: stats.joins,
        joins_per_s: round(stats.joins as f64 / elapsed, 1),
        join_p50_us: p50,
        join_p99_us: p99,
        join_max_us: max,
        leaves_close: stats.leaves_close,
        leaves_drop: stats.leaves_drop,
        errors_total: stats.errors.counts.values().sum(),
        errors: stats.errors.counts,
        impossible_events: impossible,
        observer_disconnects: observer_ends.len(),
        ghosts,
        check_peers: args.check_peers,
        check_join_failures: lock(&check_failures).clone(),
        views_checked,
        inconsistent_views: inconsistent,
        missing_entries: missing,
        extra_entries: extra,
        sync_unanswered,
        sync_answered_by_error: sync_by_error,
        updates: args.updates,
        updates_sent: stats.updates_sent,
        check_updates_sent: members.iter().map(|(_, s)| s.updates_sent()).sum(),
        updates_received,
        updates_unsettled,
        stale_metadata,
        stale_at_leave,
        updates_lost_at_drop: lost_at_drop,
        leaves_unseen,
        server_pid: args.server_pid,
        server_cpu_s: server_cpu.map(|c| round(c, 3)),
        server_cpu_us_per_join: server_cpu
            .filter(|_| stats.joins > 0)
            .map(|c| round(c * 1e6 / stats.joins as f64, 1)),
        client_cpu_s: round(client_cpu, 3),
    };
    let mut notes = Vec::new();
    if let Some(e) = &stats.errors.first {
        notes.push(("first error", e.clone()));
    }
    if !ghost_examples.is_empty() {
        notes.push(("ghosts e.g.", ghost_examples.join(", ")));
    }
    if !leave_examples.is_empty() {
        notes.push(("leaves e.g.", leave_examples.join(", ")));
    }
    if !observer_ends.is_empty() {
        notes.push(("observers", format!("ended: {}", observer_ends.join(", "))));
    }
    client::emit(&report, &summary(&report, &notes))
}

fn summary(r: &Report, notes: &[(&str, String)]) -> Table {
    let mut t = Table::default();
    t.line(
        "scenario",
        format!(
            "churn {}  clients={} topics={} stay<={}ms drop={}",
            r.url, r.clients, r.topics, r.stay_max_ms, r.drop_fraction
        ),
    );
    t.line(
        "joins",
        format!(
            "{} in {:.2} s ({:.0}/s); left {} with close, {} dropped",
            r.joins, r.duration_s, r.joins_per_s, r.leaves_close, r.leaves_drop
        ),
    );
    t.join_latency(r.join_p50_us, r.join_p99_us, r.join_max_us);
    t.line(
        "errors",
        format!("{}  ({})", r.errors_total, format_counts(&r.errors)),
    );
    t.line(
        "impossible",
        format!(
            "{}  (observer disconnects {})",
            format_counts(&r.impossible_events),
            r.observer_disconnects
        ),
    );
    t.line("ghosts", r.ghosts);
    t.line(
        "consistency",
        format!(
            "{} of {} views inconsistent ({} missing, {} extra); check join failures: {}",
            r.inconsistent_views,
            r.views_checked,
            r.missing_entries,
            r.extra_entries,
            format_counts(&r.check_join_failures)
        ),
    );
    if r.updates > 0 {
        t.line(
            "metadata",
            format!(
                "{} updates sent (+{} in the check), {} received; stale: {} at the end, \
                 {} at a leave; {} lost by dropped connections; {} leaves unseen, \
                 {} peers unsettled",
                r.updates_sent,
                r.check_updates_sent,
                r.updates_received,
                r.stale_metadata,
                r.stale_at_leave,
                r.updates_lost_at_drop,
                r.leaves_unseen,
                r.updates_unsettled
            ),
        );
    }
    if r.sync_unanswered > 0 || r.sync_answered_by_error > 0 {
        t.line(
            "sync",
            format!(
                "{} unanswered, {} answered with an error (no app-level ping)",
                r.sync_unanswered, r.sync_answered_by_error
            ),
        );
    }
    for (label, note) in notes {
        t.line(label, note);
    }
    if let Some(cpu) = r.server_cpu_s {
        t.line(
            "server cpu",
            format!(
                "{cpu:.2} s, {:.1} us/join",
                r.server_cpu_us_per_join.unwrap_or(0.0)
            ),
        );
    }
    t.line("client cpu", format!("{:.2} s", r.client_cpu_s));
    let bad = r.ghosts
        + r.inconsistent_views
        + r.stale_at_leave
        + r.leaves_unseen
        + r.impossible_events.values().sum::<u64>() as usize;
    if bad > 0 {
        t.line("FAIL", "presence is not exact on this server (see above)");
    }
    t
}

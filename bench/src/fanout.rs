//! The `fanout` scenario: many peers join one topic at once; how long until
//! every peer knows every other one?
//!
//! Each peer tracks its view and is complete when the view holds N - 1 ids.
//! The run ends when every peer is complete (or has failed or been
//! disconnected), or at `--timeout`; then each connected peer's view is
//! compared with the ids of all the peers still connected.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::client::{self, count, format_counts, lock, Failure, Server, Table};
use crate::cpu::{own_cpu_seconds, ProcessTree};
use crate::stats::{micros, round, seed_from_clock, spread};
use crate::tracker::{self, Control, Goal, Tracked};
use crate::view::{add_violations, View};

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Server base URL, e.g. ws://127.0.0.1:8081.
    #[arg(long)]
    url: String,
    /// Peers joining the topic.
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// Topic name (default: a fresh one per run).
    #[arg(long)]
    topic: Option<String>,
    /// Peers joining at the same time.
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    /// Seconds from the first connect after which incomplete views are
    /// reported as they are.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Server process whose CPU time (with its descendants) is measured.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Runtime worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

#[derive(Default)]
struct Joins {
    latency_us: Vec<u32>,
    failures: BTreeMap<String, u64>,
    first_failure: Option<String>,
}

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    url: String,
    topic: String,
    peers: usize,
    concurrency: usize,
    threads: usize,
    timeout_s: f64,
    timed_out: bool,
    joined: usize,
    join_failures: BTreeMap<String, u64>,
    join_p50_us: u32,
    join_p99_us: u32,
    join_max_us: u32,
    /// Seconds from the first connect until every view was complete.
    all_complete_s: Option<f64>,
    complete: usize,
    complete_p50_ms: f64,
    complete_p99_ms: f64,
    complete_max_ms: f64,
    views_checked: usize,
    exact_views: usize,
    incomplete_views: usize,
    missing_entries: usize,
    extra_entries: usize,
    disconnected: usize,
    disconnects: BTreeMap<String, u64>,
    impossible_events: BTreeMap<String, u64>,
    error_messages: u64,
    server_pid: Option<u32>,
    server_cpu_s: Option<f64>,
    client_cpu_s: f64,
}

fn validate(args: &FanoutArgs) -> Result<(), String> {
    if args.peers < 2 {
        return Err("--peers must be at least 2".into());
    }
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        return Err("--timeout must be positive".into());
    }
    if matches!(&args.topic, Some(t) if t.is_empty() || t.contains('/')) {
        return Err("--topic must be a non-empty path segment".into());
    }
    Ok(())
}

pub async fn run(args: FanoutArgs) -> Result<(), String> {
    validate(&args)?;
    let nofile = client::raise_nofile_limit();
    if (args.peers as u64) + 32 > nofile {
        return Err(format!(
            "{} peers need more open files than the limit of {nofile}",
            args.peers
        ));
    }
    let server = Server::resolve(&args.url).await?;
    let topic = args.topic.clone().unwrap_or_else(|| {
        let run_id = format!("{:08x}", seed_from_clock() as u32);
        client::topic_name(&run_id, 0)
    });
    let url = Arc::<str>::from(server.topic_url(&topic));
    let addr = server.addr;
    let tree = match args.server_pid {
        Some(pid) => Some(ProcessTree::discover(pid)?),
        None => None,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let (_sync_tx, sync_rx) = watch::channel(0u64);
    let ctl = Control {
        stop: stop_rx,
        sync: sync_rx,
    };
    let reached = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let joins = Arc::new(Mutex::new(Joins::default()));
    let states: Vec<Arc<Tracked>> = (0..args.peers).map(|_| Arc::default()).collect();
    let limit = Arc::new(Semaphore::new(args.concurrency));
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.timeout);

    let server_cpu0 = tree.as_ref().map(ProcessTree::cpu_seconds);
    let client_cpu0 = own_cpu_seconds();
    let t0 = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, slot) in states.iter().enumerate() {
        let (url, ctl, limit) = (Arc::clone(&url), ctl.clone(), Arc::clone(&limit));
        let (joins, slot) = (Arc::clone(&joins), Arc::clone(slot));
        let goal = Goal {
            size: args.peers - 1,
            t0,
            reached: Arc::clone(&reached),
            finished: Arc::clone(&finished),
        };
        tasks.spawn(async move {
            let Ok(permit) = limit.acquire().await else {
                return;
            };
            let start = Instant::now();
            let mut view = View::default();
            let joined = tokio::time::timeout_at(deadline, client::join(addr, &url, &mut view))
                .await
                .unwrap_or_else(|_| Err(Failure::timeout("before peer-list")));
            drop(permit);
            let ws = match joined {
                Ok(ws) => ws,
                Err(failure) => {
                    let mut j = lock(&joins);
                    count(&mut j.failures, &failure.kind);
                    j.first_failure.get_or_insert(failure.detail);
                    goal.finished.fetch_add(1, Ordering::Release);
                    return;
                }
            };
            lock(&joins).latency_us.push(micros(start.elapsed()));
            *slot.view() = view;
            tracker::track(ws, slot, ctl, Some(goal), format!("peer {i}")).await;
        });
    }
    // A join cut short by the deadline is reported as a timeout.
    let timed_out = loop {
        if finished.load(Ordering::Acquire) >= args.peers {
            break false;
        }
        if tokio::time::Instant::now() >= deadline {
            break true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let all_complete = (reached.load(Ordering::Relaxed) == args.peers)
        .then(|| states.iter().filter_map(|s| s.reached()).max())
        .flatten();
    let server_cpu = match (server_cpu0, tree.as_ref().map(ProcessTree::cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let client_cpu = own_cpu_seconds() - client_cpu0;

    // Views are read while every peer is still connected.
    let connected: Vec<&Arc<Tracked>> = states
        .iter()
        .filter(|s| s.is_open() && s.view().has_list())
        .collect();
    let ids: Vec<String> = connected.iter().filter_map(|s| s.self_id()).collect();
    let truth: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let (mut exact, mut missing, mut extra) = (0, 0, 0);
    for s in &connected {
        let diff = s.view().compare(&truth);
        if diff.is_exact() {
            exact += 1;
        }
        missing += diff.missing;
        extra += diff.extra;
    }
    let mut disconnects = BTreeMap::new();
    let mut complete_us = Vec::new();
    let mut error_messages = 0;
    for s in &states {
        if let Some(kind) = s.ended() {
            count(&mut disconnects, &kind);
        }
        complete_us.extend(s.reached().map(micros));
        error_messages += s.errors();
    }

    let _ = stop_tx.send(true);
    let closing = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), closing)
        .await
        .is_err()
    {
        eprintln!("warning: some peers did not close within 10 s");
    }
    // Impossible events are counted over the whole run, closing included.
    let mut impossible = BTreeMap::new();
    for s in &states {
        add_violations(&mut impossible, &s.view());
    }

    let mut joins = std::mem::take(&mut *lock(&joins));
    let (j50, j99, jmax) = spread(&mut joins.latency_us);
    let complete = complete_us.len();
    let (c50, c99, cmax) = spread(&mut complete_us);
    let ms = |us: u32| round(f64::from(us) / 1e3, 3);
    let report = Report {
        scenario: "fanout",
        url: server.base,
        topic,
        peers: args.peers,
        concurrency: args.concurrency,
        threads: args.threads,
        timeout_s: args.timeout,
        timed_out,
        joined: joins.latency_us.len(),
        join_failures: joins.failures,
        join_p50_us: j50,
        join_p99_us: j99,
        join_max_us: jmax,
        all_complete_s: all_complete.map(|d| round(d.as_secs_f64(), 3)),
        complete,
        complete_p50_ms: ms(c50),
        complete_p99_ms: ms(c99),
        complete_max_ms: ms(cmax),
        views_checked: connected.len(),
        exact_views: exact,
        incomplete_views: connected.len() - exact,
        missing_entries: missing,
        extra_entries: extra,
        disconnected: disconnects.values().sum::<u64>() as usize,
        disconnects,
        impossible_events: impossible,
        error_messages,
        server_pid: args.server_pid,
        server_cpu_s: server_cpu.map(|c| round(c, 3)),
        client_cpu_s: round(client_cpu, 3),
    };
    client::emit(&report, &summary(&report, joins.first_failure.as_deref()))
}

fn summary(r: &Report, first_failure: Option<&str>) -> Table {
    let mut t = Table::default();
    t.line(
        "scenario",
        format!(
            "fanout {}  peers={} concurrency={} topic={}",
            r.url, r.peers, r.concurrency, r.topic
        ),
    );
    t.line(
        "joined",
        format!(
            "{} of {}; failures {}",
            r.joined,
            r.peers,
            format_counts(&r.join_failures)
        ),
    );
    if let Some(detail) = first_failure {
        t.line("first", detail);
    }
    t.join_latency(r.join_p50_us, r.join_p99_us, r.join_max_us);
    let all = match r.all_complete_s {
        Some(s) => format!("all complete after {s:.3} s"),
        None if r.timed_out => format!("NOT all complete after the {} s timeout", r.timeout_s),
        None => "not all complete (peers failed or were disconnected)".to_owned(),
    };
    t.line(
        "complete",
        format!(
            "{} of {}: {all}; per peer ms p50 {:.1}  p99 {:.1}  max {:.1}",
            r.complete, r.peers, r.complete_p50_ms, r.complete_p99_ms, r.complete_max_ms
        ),
    );
    t.line(
        "views",
        format!(
            "{} exact, {} incomplete of {} connected ({} missing, {} extra entries)",
            r.exact_views, r.incomplete_views, r.views_checked, r.missing_entries, r.extra_entries
        ),
    );
    t.line(
        "disconnects",
        format!("{}  ({})", r.disconnected, format_counts(&r.disconnects)),
    );
    t.line(
        "impossible",
        format!(
            "{}  (error messages {})",
            format_counts(&r.impossible_events),
            r.error_messages
        ),
    );
    if let Some(cpu) = r.server_cpu_s {
        t.line("server cpu", format!("{cpu:.2} s"));
    }
    t.line("client cpu", format!("{:.2} s", r.client_cpu_s));
    t
}

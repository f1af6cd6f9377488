//! Counters and gauges of every worker, in one table that all of a server's
//! processes map, so that any worker can answer `/metrics` with exact sums.
//!
//! The table is an array of 64-bit cells: one row per worker, one cell per
//! (metric, label value). A worker writes only its own row and the
//! supervisor only the per-worker status cells (`up`, `restarts`), so a
//! cell has one writer and is updated with plain relaxed loads and stores
//! (no locked instruction on the hot path); readers in other processes see
//! every store whole because the cells are aligned atomics. A row outlives
//! the process that wrote it: a restarted worker carries on from its
//! predecessor's counters, so the sums never go backwards.
//!
//! The supervisor creates the table in a `memfd` and passes the descriptor
//! to every worker it spawns; a lone engine (the tests) uses a heap table.

use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

use crate::wire::message::ErrorCode;
use crate::wire::reason::LeaveReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// A Prometheus histogram: `values` are the buckets' upper bounds in
    /// seconds (`le`), the last `+Inf`; one more cell holds the sum, in
    /// microseconds. Buckets are kept apart and summed when rendered.
    Histogram,
}

/// One metric: a name, and the values of its one label (none: `&[""]`).
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub label: &'static str,
    pub values: &'static [&'static str],
    /// Exposed per worker (a `worker` label) instead of summed.
    pub per_worker: bool,
    /// The cells hold the value times this (microseconds for seconds);
    /// rendered divided by it.
    pub scale: u64,
}

impl Family {
    /// A family without labels, one sample per worker.
    const fn per_worker(name: &'static str, help: &'static str, kind: Kind, scale: u64) -> Self {
        Self {
            name,
            help,
            kind,
            label: "",
            values: NONE,
            per_worker: true,
            scale,
        }
    }

    /// Cells of the family in a row.
    const fn cells(&self) -> usize {
        match self.kind {
            Kind::Histogram => self.values.len() + 1,
            _ => self.values.len(),
        }
    }
}

const NONE: &[&str] = &[""];

/// Peers leave for these reasons, in [`LeaveReason`] order.
pub const LEAVE_REASONS: &[&str] = &leave_reasons();

const fn leave_reasons() -> [&'static str; LeaveReason::ALL.len()] {
    let mut names = [""; LeaveReason::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = LeaveReason::ALL[i].as_str();
        i += 1;
    }
    names
}

/// Error codes, in [`ErrorCode`] order.
pub const ERROR_CODES: &[&str] = &error_codes();

const fn error_codes() -> [&'static str; ErrorCode::ALL.len()] {
    let mut names = [""; ErrorCode::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = ErrorCode::ALL[i].code();
        i += 1;
    }
    names
}

/// Why a connection did not become a peer: a timeout, the HTTP status it
/// was answered with, or the error it was refused with after the upgrade.
pub const HANDSHAKE_FAILURES: &[&str] = &[
    "timeout",
    "400",
    "403",
    "404",
    "405",
    "414",
    "426",
    "431",
    "503",
    "505",
    "unauthorized",
    "topic_full",
    "server_full",
    "invalid_topic",
    "invalid_metadata",
];

/// What became of a connection sent to (or received from) another worker.
pub const HANDOFF_RESULTS: &[&str] = &["sent", "failed", "received", "refused"];

/// What became of a webhook event, per URL: `sent` (its batch was answered
/// 2xx), `overflow` (that URL's queue was full),
/// `expired` (not delivered within the retry time).
pub const WEBHOOK_EVENT_RESULTS: &[&str] = &["sent", "overflow", "expired"];

/// What became of a webhook request: answered 2xx (`ok`), or not (another
/// status, an error, a timeout: `failed`, then retried).
pub const WEBHOOK_REQUEST_RESULTS: &[&str] = &["ok", "failed"];

/// What became of a copy of a broadcast (the first two of
/// [`RELAY_RESULTS`], so `relay::DELIVERED` and `relay::DROPPED` index it).
pub const BROADCAST_RESULTS: &[&str] = &["delivered", "dropped"];

/// What became of a relayed message.
/// `forwarded`: published to the target's node (cluster mode), which
/// counts the delivery.
pub const RELAY_RESULTS: &[&str] = &["delivered", "dropped", "target_not_found", "forwarded"];

/// What became of a resume: `resumed`; `forged` (a token this server did
/// not make, or for another topic); `used` (the token of an earlier
/// resume); `gone` (the session ended, or resumes are off);
/// `unreplayable` (`seen` missing, or what the client missed is no longer
/// kept: the session ends and the client starts afresh).
pub const RESUME_RESULTS: &[&str] = &["resumed", "forged", "used", "gone", "unreplayable"];

/// Buckets of the latency histograms (joins, queue waits), in seconds.
pub const LATENCY_BUCKETS: &[&str] = &[
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    "2.5", "+Inf",
];
/// The same bounds in microseconds (`+Inf` left out).
const LATENCY_BOUNDS_US: &[u64] = &[
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000,
];
const MICROS: u64 = 1_000_000;

pub const FAMILIES: &[Family] = &[
    Family::per_worker(
        "signaling_worker_up",
        "1 while the worker process runs, 0 once it has exited.",
        Kind::Gauge,
        1,
    ),
    Family::per_worker(
        "signaling_worker_restarts_total",
        "Times the worker was restarted after it died.",
        Kind::Counter,
        1,
    ),
    Family::per_worker(
        "signaling_worker_connections",
        "WebSocket connections held by the worker, closing ones included.",
        Kind::Gauge,
        1,
    ),
    Family::per_worker(
        "signaling_worker_cluster_connected",
        "Cluster mode: 1 while the worker is connected to Redis and subscribed.",
        Kind::Gauge,
        1,
    ),
    Family {
        name: "signaling_connections",
        help: "WebSocket connections open, closing ones included.",
        kind: Kind::Gauge,
        label: "",
        values: NONE,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_peers",
        help: "Peers joined to a topic.",
        kind: Kind::Gauge,
        label: "",
        values: NONE,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_topics",
        help: "Topics with at least one peer.",
        kind: Kind::Gauge,
        label: "",
        values: NONE,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_peers_joined_total",
        help: "Peers that joined a topic.",
        kind: Kind::Counter,
        label: "",
        values: NONE,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_peers_left_total",
        help: "Peers that left their topic, by reason.",
        kind: Kind::Counter,
        label: "reason",
        values: LEAVE_REASONS,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_relays_total",
        help: "Offers, answers and ICE candidates relayed, by result.",
        kind: Kind::Counter,
        label: "result",
        values: RELAY_RESULTS,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_errors_total",
        help: "Error messages sent to clients, by code.",
        kind: Kind::Counter,
        label: "code",
        values: ERROR_CODES,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_handshake_failures_total",
        help: "Connections that did not become peers, by HTTP status or reason.",
        kind: Kind::Counter,
        label: "reason",
        values: HANDSHAKE_FAILURES,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_handoffs_total",
        help: "Connections handed between workers to their topic's owner, by result.",
        kind: Kind::Counter,
        label: "result",
        values: HANDOFF_RESULTS,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_received_bytes_total",
        help: "Bytes received on WebSocket connections after the upgrade.",
        kind: Kind::Counter,
        label: "",
        values: NONE,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_sent_bytes_total",
        help: "Bytes handed to WebSocket connections' sockets after the upgrade.",
        kind: Kind::Counter,
        label: "",
        values: NONE,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_cluster_disconnects_total",
        help: "Cluster mode: times a worker lost its connection to Redis.",
        kind: Kind::Counter,
        label: "",
        values: NONE,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_sessions_suspended",
        help: "Resumable sessions whose connection is lost, waiting for a resume.",
        kind: Kind::Gauge,
        label: "",
        values: NONE,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_resumes_total",
        help: "Resume requests, by result.",
        kind: Kind::Counter,
        label: "result",
        values: RESUME_RESULTS,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_join_seconds",
        help: "Seconds from a connection's accept to its welcome (resumes included).",
        kind: Kind::Histogram,
        label: "le",
        values: LATENCY_BUCKETS,
        per_worker: false,
        scale: MICROS,
    },
    Family {
        name: "signaling_queue_wait_seconds",
        help: "Seconds a backed-up peer's queue waited, from its socket refusing more bytes to \
               the queue being written (messages written at once are not counted).",
        kind: Kind::Histogram,
        label: "le",
        values: LATENCY_BUCKETS,
        per_worker: false,
        scale: MICROS,
    },
    Family::per_worker(
        "process_cpu_seconds_total",
        "User and system CPU time the worker process spent, in seconds.",
        Kind::Counter,
        MICROS,
    ),
    Family::per_worker(
        "process_resident_memory_bytes",
        "Resident memory of the worker process, in bytes.",
        Kind::Gauge,
        1,
    ),
    Family::per_worker(
        "process_open_fds",
        "Open file descriptors of the worker process.",
        Kind::Gauge,
        1,
    ),
    Family::per_worker(
        "process_max_fds",
        "The worker process's limit of open file descriptors.",
        Kind::Gauge,
        1,
    ),
    Family {
        name: "signaling_broadcast_copies_total",
        help: "Copies of peers' broadcasts for local peers: delivered, or dropped (the \
               target's queue was full).",
        kind: Kind::Counter,
        label: "result",
        values: BROADCAST_RESULTS,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_webhook_events_total",
        help: "Webhook events, per URL, by result.",
        kind: Kind::Counter,
        label: "result",
        values: WEBHOOK_EVENT_RESULTS,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_webhook_requests_total",
        help: "Webhook requests (batches of events), by result.",
        kind: Kind::Counter,
        label: "result",
        values: WEBHOOK_REQUEST_RESULTS,
        per_worker: false,
        scale: 1,
    },
    Family {
        name: "signaling_webhook_queued",
        help: "Webhook events waiting to be sent (every URL's).",
        kind: Kind::Gauge,
        label: "",
        values: NONE,
        per_worker: false,
        scale: 1,
    },
];

/// Indexes into [`FAMILIES`].
pub mod family {
    pub const UP: usize = 0;
    pub const RESTARTS: usize = 1;
    pub const WORKER_CONNECTIONS: usize = 2;
    pub const CLUSTER_CONNECTED: usize = 3;
    pub const CONNECTIONS: usize = 4;
    pub const PEERS: usize = 5;
    pub const TOPICS: usize = 6;
    pub const JOINED: usize = 7;
    pub const LEFT: usize = 8;
    pub const RELAYS: usize = 9;
    pub const ERRORS: usize = 10;
    pub const HANDSHAKE_FAILURES: usize = 11;
    pub const HANDOFFS: usize = 12;
    pub const RECEIVED_BYTES: usize = 13;
    pub const SENT_BYTES: usize = 14;
    pub const CLUSTER_DISCONNECTS: usize = 15;
    pub const SESSIONS_SUSPENDED: usize = 16;
    pub const RESUMES: usize = 17;
    pub const JOIN_SECONDS: usize = 18;
    pub const QUEUE_WAIT_SECONDS: usize = 19;
    pub const PROCESS_CPU: usize = 20;
    pub const PROCESS_RSS: usize = 21;
    pub const PROCESS_FDS: usize = 22;
    pub const PROCESS_MAX_FDS: usize = 23;
    pub const BROADCAST_COPIES: usize = 24;
    pub const WEBHOOK_EVENTS: usize = 25;
    pub const WEBHOOK_REQUESTS: usize = 26;
    pub const WEBHOOK_QUEUED: usize = 27;
}

/// Resume results, as indexes into [`RESUME_RESULTS`].
pub mod resume {
    pub const RESUMED: usize = 0;
    pub const FORGED: usize = 1;
    pub const USED: usize = 2;
    pub const GONE: usize = 3;
    pub const UNREPLAYABLE: usize = 4;
}

/// Relay results, as indexes into [`RELAY_RESULTS`].
pub mod relay {
    pub const DELIVERED: usize = 0;
    pub const DROPPED: usize = 1;
    pub const TARGET_NOT_FOUND: usize = 2;
    pub const FORWARDED: usize = 3;
}

const fn family_offsets() -> [usize; FAMILIES.len() + 1] {
    let mut offsets = [0; FAMILIES.len() + 1];
    let mut i = 0;
    while i < FAMILIES.len() {
        offsets[i + 1] = offsets[i] + FAMILIES[i].cells();
        i += 1;
    }
    offsets
}

const OFFSETS: [usize; FAMILIES.len() + 1] = family_offsets();
/// Cells of one worker's row, padded to whole cache lines so that two
/// workers never write the same line.
pub const ROW: usize = OFFSETS[FAMILIES.len()].div_ceil(8) * 8;

/// The cell of `family`'s `value`-th label value.
pub const fn cell(family: usize, value: usize) -> usize {
    OFFSETS[family] + value
}

/// The index of `label` among a family's `values`; `None` for a label it
/// does not have (the caller raises: a typo must not land in some bucket).
pub fn value_index(values: &[&str], label: &str) -> Option<usize> {
    values.iter().position(|v| *v == label)
}

enum Backing {
    Heap(#[allow(dead_code)] Box<[AtomicU64]>),
    Mapped(#[allow(dead_code)] MmapRaw),
}

/// Every worker's row.
pub struct Table {
    cells: NonNull<AtomicU64>,
    workers: usize,
    _backing: Backing,
}

// SAFETY: the cells are atomics, shared only through `&`.
unsafe impl Send for Table {}
unsafe impl Sync for Table {}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("workers", &self.workers)
            .finish()
    }
}

impl Table {
    /// Bytes a table of `workers` rows takes.
    pub fn size(workers: usize) -> usize {
        workers * ROW * 8
    }

    /// A table in this process only.
    pub fn local(workers: usize) -> Self {
        let mut cells: Box<[AtomicU64]> = (0..workers.max(1) * ROW)
            .map(|_| AtomicU64::new(0))
            .collect();
        Self {
            cells: NonNull::new(cells.as_mut_ptr()).expect("boxes are not null"),
            workers: workers.max(1),
            _backing: Backing::Heap(cells),
        }
    }

    /// Maps the table of `workers` rows shared through `file` (at least
    /// [`Table::size`] bytes, zeroed when new).
    pub fn map(file: &File, workers: usize) -> io::Result<Self> {
        let size = Self::size(workers);
        if workers == 0 || file.metadata()?.len() < size as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the metrics table is smaller than its rows",
            ));
        }
        let map = MmapOptions::new().len(size).map_raw(file)?;
        let cells = NonNull::new(map.as_mut_ptr().cast::<AtomicU64>()).expect("maps are not null");
        Ok(Self {
            cells,
            workers,
            _backing: Backing::Mapped(map),
        })
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    fn at(&self, worker: usize, cell: usize) -> &AtomicU64 {
        assert!(worker < self.workers && cell < ROW);
        // SAFETY: in bounds (checked above) of memory that lives as long as
        // `self`, page-aligned, and only ever accessed as atomics.
        unsafe { &*self.cells.as_ptr().add(worker * ROW + cell) }
    }

    pub fn get(&self, worker: usize, cell: usize) -> u64 {
        self.at(worker, cell).load(Ordering::Relaxed)
    }

    /// Marks a worker started (`up`) or gone: a gone worker holds no
    /// connections, so its gauges are zeroed.
    pub fn set_up(&self, worker: usize, up: bool) {
        self.at(worker, cell(family::UP, 0))
            .store(u64::from(up), Ordering::Relaxed);
        if !up {
            for family in [
                family::WORKER_CONNECTIONS,
                family::CLUSTER_CONNECTED,
                family::CONNECTIONS,
                family::PEERS,
                family::TOPICS,
                family::SESSIONS_SUSPENDED,
                family::PROCESS_RSS,
                family::PROCESS_FDS,
            ] {
                self.at(worker, cell(family, 0)).store(0, Ordering::Relaxed);
            }
        }
    }

    pub fn count_restart(&self, worker: usize) {
        let restarts = self.at(worker, cell(family::RESTARTS, 0));
        restarts.store(restarts.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// A handle on row `worker`, for its one writer.
    pub fn recorder(self: &Arc<Self>, worker: usize) -> Recorder {
        assert!(worker < self.workers);
        Recorder {
            table: Arc::clone(self),
            worker,
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every family:
    /// summed over the workers, or one sample per worker.
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        for (index, family) in FAMILIES.iter().enumerate() {
            let kind = match family.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(text, "# HELP {} {}", family.name, family.help);
            let _ = writeln!(text, "# TYPE {} {kind}", family.name);
            let sum = |cell: usize| -> u64 { (0..self.workers).map(|w| self.get(w, cell)).sum() };
            if family.kind == Kind::Histogram {
                let mut count = 0;
                for (value_index, bound) in family.values.iter().enumerate() {
                    count += sum(cell(index, value_index));
                    let _ = writeln!(text, "{}_bucket{{le=\"{bound}\"}} {count}", family.name);
                }
                let total = sum(cell(index, family.values.len()));
                let _ = writeln!(text, "{}_sum {}", family.name, scaled(total, family.scale));
                let _ = writeln!(text, "{}_count {count}", family.name);
                continue;
            }
            for (value_index, value) in family.values.iter().enumerate() {
                let cell = cell(index, value_index);
                if family.per_worker {
                    for worker in 0..self.workers {
                        let sample = scaled(self.get(worker, cell), family.scale);
                        let _ = writeln!(text, "{}{{worker=\"{worker}\"}} {sample}", family.name);
                    }
                    continue;
                }
                let total = scaled(sum(cell), family.scale);
                if family.label.is_empty() {
                    let _ = writeln!(text, "{} {total}", family.name);
                } else {
                    let _ = writeln!(
                        text,
                        "{}{{{}=\"{value}\"}} {total}",
                        family.name, family.label
                    );
                }
            }
        }
        text
    }
}

/// A cell's value as exposed: `value / scale`, as an integer when whole.
fn scaled(value: u64, scale: u64) -> String {
    if scale == 1 {
        value.to_string()
    } else {
        format!("{}", value as f64 / scale as f64)
    }
}

/// The writer of one worker's row.
#[derive(Debug, Clone)]
pub struct Recorder {
    table: Arc<Table>,
    worker: usize,
}

impl Default for Recorder {
    fn default() -> Self {
        Arc::new(Table::local(1)).recorder(0)
    }
}

impl Recorder {
    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    /// Adds `n` to a cell of this row (its only writer: no locked add).
    #[inline]
    pub fn add(&self, cell: usize, n: u64) {
        let slot = self.table.at(self.worker, cell);
        slot.store(
            slot.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    #[inline]
    pub fn set(&self, cell: usize, value: u64) {
        self.table
            .at(self.worker, cell)
            .store(value, Ordering::Relaxed);
    }

    pub fn get(&self, cell: usize) -> u64 {
        self.table.get(self.worker, cell)
    }

    /// Counts one join that took `waited` (see [`family::JOIN_SECONDS`]).
    pub fn observe_join(&self, waited: std::time::Duration) {
        self.observe(family::JOIN_SECONDS, waited);
    }

    /// Counts `value` in histogram `family` (one of [`LATENCY_BUCKETS`]).
    pub fn observe(&self, family: usize, value: std::time::Duration) {
        debug_assert_eq!(FAMILIES[family].kind, Kind::Histogram);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.add(cell(family, bucket), 1);
        self.add(cell(family, LATENCY_BUCKETS.len()), micros);
    }

    /// This process's CPU time, resident memory and descriptors, from
    /// `/proc/self` (Linux; elsewhere nothing is recorded).
    pub fn sample_process(&self) {
        if let Some(sample) = process::sample() {
            self.set(cell(family::PROCESS_CPU, 0), sample.cpu_micros);
            self.set(cell(family::PROCESS_RSS, 0), sample.rss_bytes);
            self.set(cell(family::PROCESS_FDS, 0), sample.open_fds);
            self.set(cell(family::PROCESS_MAX_FDS, 0), sample.max_fds);
        }
    }
}

/// The figures Prometheus' own clients export as `process_*`, read from
/// `/proc/self` as they read them.
mod process {
    use std::fs;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// How long a count of open descriptors made by listing them stands.
    const LISTING_KEPT: Duration = Duration::from_secs(15);

    /// The last count made by listing, and when.
    static LISTED: Mutex<Option<(Instant, u64)>> = Mutex::new(None);

    /// The descriptors open: the size Linux 6.2 and later gives
    /// `/proc/self/fd`, or else the number of its entries. Listing them
    /// costs about 3 µs each (55 ms for a worker's 17,000), so a listed
    /// count is kept for `LISTING_KEPT`.
    pub fn open_fds() -> Option<u64> {
        let size = fs::metadata("/proc/self/fd").ok()?.len();
        if size > 0 {
            return Some(size);
        }
        let mut listed = LISTED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, count)) = *listed {
            if at.elapsed() < LISTING_KEPT {
                return Some(count);
            }
        }
        // The listing's own descriptor is among the entries.
        let count = (fs::read_dir("/proc/self/fd").ok()?.count() as u64).saturating_sub(1);
        *listed = Some((Instant::now(), count));
        Some(count)
    }

    pub struct Sample {
        pub cpu_micros: u64,
        pub rss_bytes: u64,
        pub open_fds: u64,
        pub max_fds: u64,
    }

    pub fn sample() -> Option<Sample> {
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let (ticks, page) = (u64::try_from(ticks).ok()?, u64::try_from(page).ok()?);
        let stat = fs::read_to_string("/proc/self/stat").ok()?;
        // The fields after the command, which is in parentheses and may
        // hold spaces: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        let statm = fs::read_to_string("/proc/self/statm").ok()?;
        let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        let open_fds = open_fds()?;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a valid rlimit to write into.
        let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            limit.rlim_cur
        } else {
            0
        };
        Some(Sample {
            cpu_micros: (utime + stime) * 1_000_000 / ticks.max(1),
            rss_bytes: resident * page,
            open_fds,
            max_fds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn label_values_follow_the_enums() {
        for (index, reason) in LeaveReason::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, index);
            assert_eq!(LEAVE_REASONS[index], reason.as_str());
        }
        for (index, code) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(code as usize, index);
            assert_eq!(ERROR_CODES[index], code.code());
        }
    }

    #[test]
    fn open_descriptors_are_counted() {
        let listed = || std::fs::read_dir("/proc/self/fd").unwrap().count() as u64 - 1;
        let files: Vec<_> = (0..50)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let during = process::open_fds().unwrap();
        // Other test threads open and close files too.
        assert!(during >= 50);
        assert!(
            during.abs_diff(listed()) <= 8,
            "{during} against {}",
            listed()
        );
        drop(files);
    }

    #[test]
    fn rows_sum_and_survive_their_writer() {
        let mut file = tempfile_in_memory();
        file.set_len(Table::size(2) as u64).unwrap();
        let a = Arc::new(Table::map(&file, 2).unwrap());
        let b = Arc::new(Table::map(&file, 2).unwrap());
        let joined = cell(family::JOINED, 0);
        a.recorder(0).add(joined, 3);
        b.recorder(1).add(joined, 4);
        b.recorder(1).set(cell(family::CONNECTIONS, 0), 9);
        assert!(a.render().contains("\nsignaling_peers_joined_total 7\n"));
        assert!(a.render().contains("\nsignaling_connections 9\n"));
        a.set_up(1, false);
        let text = b.render();
        assert!(text.contains("\nsignaling_connections 0\n"));
        assert!(text.contains("\nsignaling_peers_joined_total 7\n"));
        assert!(text.contains("signaling_worker_up{worker=\"1\"} 0\n"));
        let _ = &mut file;
    }

    #[test]
    fn family_indexes_name_their_families() {
        let names = [
            (family::UP, "signaling_worker_up"),
            (
                family::CLUSTER_CONNECTED,
                "signaling_worker_cluster_connected",
            ),
            (family::CONNECTIONS, "signaling_connections"),
            (family::HANDOFFS, "signaling_handoffs_total"),
            (family::SENT_BYTES, "signaling_sent_bytes_total"),
            (
                family::CLUSTER_DISCONNECTS,
                "signaling_cluster_disconnects_total",
            ),
            (family::JOIN_SECONDS, "signaling_join_seconds"),
            (family::QUEUE_WAIT_SECONDS, "signaling_queue_wait_seconds"),
            (family::PROCESS_CPU, "process_cpu_seconds_total"),
            (family::PROCESS_RSS, "process_resident_memory_bytes"),
            (family::PROCESS_FDS, "process_open_fds"),
            (family::PROCESS_MAX_FDS, "process_max_fds"),
            (family::BROADCAST_COPIES, "signaling_broadcast_copies_total"),
            (family::WEBHOOK_EVENTS, "signaling_webhook_events_total"),
            (family::WEBHOOK_REQUESTS, "signaling_webhook_requests_total"),
            (family::WEBHOOK_QUEUED, "signaling_webhook_queued"),
        ];
        for (index, name) in names {
            assert_eq!(FAMILIES[index].name, name);
        }
        assert_eq!(FAMILIES.len(), family::WEBHOOK_QUEUED + 1);
    }

    #[test]
    fn histograms_are_cumulative_and_seconds_are_scaled() {
        let table = Arc::new(Table::local(2));
        let (a, b) = (table.recorder(0), table.recorder(1));
        a.observe_join(std::time::Duration::from_micros(300));
        b.observe_join(std::time::Duration::from_millis(3));
        b.observe_join(std::time::Duration::from_secs(10));
        b.set(cell(family::PROCESS_CPU, 0), 1_500_000);
        let text = table.render();
        assert!(text.contains("# TYPE signaling_join_seconds histogram\n"));
        assert!(text.contains("signaling_join_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("signaling_join_seconds_bucket{le=\"0.0025\"} 1\n"));
        assert!(text.contains("signaling_join_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("signaling_join_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("signaling_join_seconds_sum 10.0033\n"));
        assert!(text.contains("signaling_join_seconds_count 3\n"));
        assert!(text.contains("process_cpu_seconds_total{worker=\"1\"} 1.5\n"));
        assert!(text.contains("process_cpu_seconds_total{worker=\"0\"} 0\n"));
        a.sample_process();
        let rss = table.get(0, cell(family::PROCESS_RSS, 0));
        assert!(
            rss > 1024 * 1024,
            "this test process has more than 1 MiB: {rss}"
        );
        assert!(table.get(0, cell(family::PROCESS_FDS, 0)) >= 3);
    }

    #[test]
    fn unknown_labels_are_none() {
        assert_eq!(value_index(HANDSHAKE_FAILURES, "418"), None);
        assert_eq!(value_index(HANDSHAKE_FAILURES, "404"), Some(3));
    }

    #[test]
    fn a_short_file_is_refused() {
        let file = tempfile_in_memory();
        file.set_len(8).unwrap();
        assert!(Table::map(&file, 1).is_err());
    }

    fn tempfile_in_memory() -> File {
        let path = std::env::temp_dir().join(format!(
            "metrics-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}

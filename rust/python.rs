//! PyO3 glue: `signaling_sharded._native`.
//!
//! `Hub` wraps one worker's [`Engine`]. After the HTTP upgrade the worker
//! hands the socket's transport to `Hub.join`, which returns a `Peer`: an
//! asyncio protocol implemented here, which the worker installs with
//! `transport.set_protocol(peer)`. From then on the event loop calls
//! `Peer.data_received` directly, so a received chunk costs one call into
//! Rust and no Python bytecode; the engine's output is written to the
//! transports before that call returns.
//!
//! The engine's lock is released before any Python code runs: a
//! `transport.write` may call back into `Peer.pause_writing` at once.

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use rustc_hash::FxHashMap;

use crate::cluster::{self, ClusterOp};
use crate::engine::{Action, Config, Engine, Outbox, RateLimit, Refusal};
use crate::frame::{Event, Fault, Flow, FrameReader};
use crate::ice::IceServers;
use crate::message::{self, Inbound};
use crate::metrics::{self, cell, family, Table};
use crate::registry::PeerId;
use crate::request::{self, Reading};
use crate::topic_hash as hashing;

struct Core {
    engine: Engine<Py<PyAny>>,
    outbox: Outbox,
}

/// One worker's peers and topics.
#[pyclass(frozen, module = "signaling_sharded._native")]
pub struct Hub {
    core: Mutex<Core>,
    /// Called as `on_left(peer_id, topic, reason)` when a peer leaves.
    on_left: Py<PyAny>,
    /// Cluster mode: called with a list of work for Redis (see
    /// `cluster_op`), after each call that produced some.
    on_cluster: Option<Py<PyAny>>,
    /// What every node's inbox channel name starts with (cluster mode).
    channel_prefix: Vec<u8>,
}

/// A cluster operation as the Python side takes it: `("join", topic,
/// peer, metadata, snapshot)`, `("leave", topic, peer)` or `("publish",
/// command, offset)`: the encoded `PUBLISH` to the node's inbox, and where
/// the message starts in it when it is a relay (else -1).
fn cluster_op<'py>(
    py: Python<'py>,
    channel_prefix: &[u8],
    op: &ClusterOp,
) -> PyResult<Bound<'py, PyTuple>> {
    match op {
        ClusterOp::Join {
            topic,
            peer,
            metadata,
            snapshot,
        } => (
            intern!(py, "join"),
            &**topic,
            peer.as_str(),
            metadata.as_deref(),
            *snapshot,
        )
            .into_pyobject(py),
        ClusterOp::Leave { topic, peer } => {
            (intern!(py, "leave"), &**topic, peer.as_str()).into_pyobject(py)
        }
        ClusterOp::Publish { node, message } => {
            let (command, offset) = cluster::publish_command(channel_prefix, node, message);
            let relay = message.first() == Some(&cluster::RELAY);
            let offset = if relay { offset as isize } else { -1 };
            (intern!(py, "publish"), PyBytes::new(py, &command), offset).into_pyobject(py)
        }
    }
}

/// A socket operation decided under the lock, carried out after it.
enum Op<'py> {
    Write(Bound<'py, PyBytes>),
    Finish,
    Close,
    Abort,
}

fn seconds(value: f64, name: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            PyValueError::new_err(format!("{name} must be a positive number of seconds"))
        })
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic inside the engine poisons the lock; the state it left is
        // still the best there is, and the panic itself was reported.
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `step` on the engine, then performs what it decided.
    fn run<R>(
        &self,
        py: Python<'_>,
        step: impl FnOnce(&mut Engine<Py<PyAny>>, &mut Outbox) -> R,
    ) -> R {
        let mut left = Vec::new();
        let mut cluster_ops = None;
        let mut ops: Vec<(Bound<'_, PyAny>, Op<'_>)> = Vec::new();
        let result = {
            let mut guard = self.lock();
            let Core { engine, outbox } = &mut *guard;
            let result = step(engine, outbox);
            engine.record_gauges();
            if !outbox.is_empty() {
                let mut bytes: Vec<Option<Bound<'_, PyBytes>>> = vec![None; outbox.bufs.len()];
                let mut sent = 0;
                for &(conn, action) in &outbox.actions {
                    let Some(transport) = engine.transport(conn) else {
                        continue;
                    };
                    let op = match action {
                        Action::Write(index) => Op::Write({
                            sent += outbox.bufs[index].len() as u64;
                            bytes[index]
                                .get_or_insert_with(|| PyBytes::new(py, &outbox.bufs[index]))
                                .clone()
                        }),
                        Action::Finish => Op::Finish,
                        Action::Close => Op::Close,
                        Action::Abort => Op::Abort,
                    };
                    ops.push((transport.bind(py).clone(), op));
                }
                engine.metrics().add(cell(family::SENT_BYTES, 0), sent);
                left.extend(outbox.left.drain(..).map(|(peer, topic, reason)| {
                    (peer.as_str().to_owned(), topic.to_string(), reason.as_str())
                }));
                if !outbox.cluster.is_empty() {
                    let prefix = &self.channel_prefix;
                    let list = outbox.cluster.iter().map(|op| cluster_op(py, prefix, op));
                    cluster_ops = Some(list.collect::<PyResult<Vec<_>>>());
                }
                outbox.clear();
            }
            result
        };
        for (transport, op) in ops {
            let called = match op {
                Op::Write(data) => transport.call_method1(intern!(py, "write"), (data,)),
                Op::Finish => transport.call_method0(intern!(py, "write_eof")),
                Op::Close => transport.call_method0(intern!(py, "close")),
                Op::Abort => transport.call_method0(intern!(py, "abort")),
            };
            if let Err(err) = called {
                err.write_unraisable(py, Some(&transport));
            }
        }
        for (peer, topic, reason) in left {
            if let Err(err) = self.on_left.call1(py, (peer, topic, reason)) {
                err.write_unraisable(py, Some(self.on_left.bind(py)));
            }
        }
        if let (Some(ops), Some(on_cluster)) = (cluster_ops, &self.on_cluster) {
            let called = ops
                .and_then(|ops| PyList::new(py, ops))
                .and_then(|list| on_cluster.call1(py, (list,)));
            if let Err(err) = called {
                err.write_unraisable(py, Some(on_cluster.bind(py)));
            }
        }
        result
    }
}

#[pymethods]
impl Hub {
    #[new]
    #[pyo3(signature = (
        *,
        max_message_size,
        max_queue_bytes,
        ping_interval,
        ping_timeout,
        close_timeout,
        on_left,
        max_peers_per_topic = 1000,
        max_connections = 50_000,
        rate_limit = None,
        rate_burst = None,
        stun_uris = Vec::new(),
        turn_uris = Vec::new(),
        turn_secret = None,
        turn_ttl = 86_400,
        metrics = None,
        worker = 0,
        cluster_node = None,
        on_cluster = None,
        cluster_prefix = String::new(),
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        max_message_size: usize,
        max_queue_bytes: usize,
        ping_interval: f64,
        ping_timeout: f64,
        close_timeout: f64,
        on_left: Py<PyAny>,
        max_peers_per_topic: usize,
        max_connections: usize,
        rate_limit: Option<f64>,
        rate_burst: Option<f64>,
        stun_uris: Vec<String>,
        turn_uris: Vec<String>,
        turn_secret: Option<String>,
        turn_ttl: u64,
        metrics: Option<PyRef<'_, MetricsTable>>,
        worker: usize,
        cluster_node: Option<String>,
        on_cluster: Option<Py<PyAny>>,
        cluster_prefix: String,
    ) -> PyResult<Self> {
        if cluster_node.is_some() != on_cluster.is_some() {
            return Err(PyValueError::new_err(
                "cluster_node and on_cluster go together",
            ));
        }
        let table = match metrics {
            Some(table) => Arc::clone(&table.table),
            None => Arc::new(Table::local(worker + 1)),
        };
        if worker >= table.workers() {
            return Err(PyValueError::new_err(
                "worker is not a row of the metrics table",
            ));
        }
        if !turn_uris.is_empty() && turn_secret.is_none() {
            return Err(PyValueError::new_err("turn_uris need a turn_secret"));
        }
        let ice = IceServers {
            stun_uris,
            turn_uris,
            turn_secret: turn_secret.unwrap_or_default().into_bytes(),
            turn_ttl,
        };
        let rate_limit = match rate_limit {
            None => None,
            Some(per_second) if per_second > 0.0 && per_second.is_finite() => Some(RateLimit {
                per_second,
                burst: rate_burst.unwrap_or(per_second).max(1.0),
            }),
            Some(_) => return Err(PyValueError::new_err("rate_limit must be positive")),
        };
        let config = Config {
            max_message: max_message_size,
            max_queue: max_queue_bytes,
            ping_interval: seconds(ping_interval, "ping_interval")?,
            ping_timeout: seconds(ping_timeout, "ping_timeout")?,
            close_timeout: seconds(close_timeout, "close_timeout")?,
            max_peers_per_topic,
            max_connections,
            rate_limit,
            ice,
            cluster_node: cluster_node.map(Into::into),
        };
        Ok(Self {
            core: Mutex::new(Core {
                engine: Engine::with_metrics(config, table.recorder(worker)),
                outbox: Outbox::default(),
            }),
            on_left,
            on_cluster,
            channel_prefix: format!("{cluster_prefix}node:").into_bytes(),
        })
    }

    /// Adds the upgraded connection on `transport` to `topic`, writes its
    /// `welcome` and `peer-list` and tells the others; over a limit, writes
    /// the refusal instead (`Peer.refused` says which). The caller must then
    /// `transport.set_protocol()` the returned `Peer`.
    #[pyo3(signature = (transport, topic, metadata=None))]
    fn join(
        slf: &Bound<'_, Self>,
        transport: Py<PyAny>,
        topic: &str,
        metadata: Option<&str>,
    ) -> Peer {
        let py = slf.py();
        let (conn, joined) = slf.get().run(py, |engine, out| {
            let (conn, joined) = engine.join(transport, topic, metadata, Instant::now(), out);
            (conn, joined.map(|peer| peer.as_str().to_owned()))
        });
        let (peer_id, refused) = match joined {
            Ok(peer) => (Some(peer), None),
            Err(refusal) => (None, Some(refusal.as_str())),
        };
        Peer {
            hub: slf.clone().unbind(),
            conn,
            peer_id,
            refused,
        }
    }

    /// Takes the upgraded connection on `transport` only to refuse it with
    /// `reason` (`"unauthorized"`, `"invalid_topic"`, ...): the `error`,
    /// then the close code.
    fn refuse(slf: &Bound<'_, Self>, transport: Py<PyAny>, reason: &str) -> PyResult<Peer> {
        let Some(refusal) = Refusal::ALL.into_iter().find(|r| r.as_str() == reason) else {
            return Err(PyValueError::new_err(format!("unknown refusal {reason:?}")));
        };
        let py = slf.py();
        let conn = slf.get().run(py, |engine, out| {
            engine.refuse(transport, refusal, Instant::now(), out)
        });
        Ok(Peer {
            hub: slf.clone().unbind(),
            conn,
            peer_id: None,
            refused: Some(refusal.as_str()),
        })
    }

    /// Sends due pings, and closes peers whose ping or close timed out.
    fn tick(&self, py: Python<'_>) {
        self.run(py, |engine, out| engine.tick(Instant::now(), out));
    }

    /// Starts closing every peer with `code` (1001 when draining).
    fn close_all(&self, py: Python<'_>, code: u16, reason: &str) {
        self.run(py, |engine, out| {
            engine.close_all(code, reason, Instant::now(), out)
        });
    }

    /// Resets every connection still open.
    fn abort_all(&self, py: Python<'_>) {
        self.run(py, |engine, out| engine.abort_all(out));
    }

    /// Connections held, closing ones included.
    fn connection_count(&self) -> usize {
        self.lock().engine.connection_count()
    }

    fn peer_count(&self) -> usize {
        self.lock().engine.peer_count()
    }

    fn topic_count(&self) -> usize {
        self.lock().engine.topic_count()
    }

    /// Counts a connection that did not become a peer, by HTTP status or
    /// reason (`"timeout"`, `"404"`, `"unauthorized"`, ...).
    fn count_handshake_failure(&self, reason: &str) {
        self.count(
            family::HANDSHAKE_FAILURES,
            metrics::HANDSHAKE_FAILURES,
            reason,
        );
    }

    /// Counts a hand-off between workers: `"sent"`, `"failed"`,
    /// `"received"` or `"refused"`.
    fn count_handoff(&self, result: &str) {
        self.count(family::HANDOFFS, metrics::HANDOFF_RESULTS, result);
    }

    /// Cluster mode: messages from this node's inbox, in order.
    fn deliver(&self, py: Python<'_>, messages: Vec<Bound<'_, PyBytes>>) {
        self.run(py, |engine, out| {
            let now = Instant::now();
            for message in &messages {
                engine.deliver(message.as_bytes(), now, out);
            }
        });
    }

    /// Cluster mode: the other nodes' members of `topic` at `version`, as
    /// `(peer, node, metadata)`; `None` when Redis could not be asked.
    #[pyo3(signature = (topic, version=None, members=None))]
    fn snapshot(
        &self,
        py: Python<'_>,
        topic: &str,
        version: Option<u64>,
        members: Option<Vec<(String, String, Option<String>)>>,
    ) {
        let snapshot = version.zip(members).map(|(version, members)| {
            let members: FxHashMap<_, _> = members
                .into_iter()
                .filter_map(|(peer, node, metadata)| {
                    let metadata = metadata.filter(|text| !text.is_empty());
                    let remote = cluster::RemotePeer {
                        node: node.into(),
                        metadata: metadata.map(Into::into),
                    };
                    Some((PeerId::parse(&peer)?, remote))
                })
                .collect();
            (version, members)
        });
        self.run(py, |engine, out| {
            engine.snapshot(topic, snapshot, Instant::now(), out)
        });
    }

    /// Cluster mode: stop holding the connections waiting for `topic`'s
    /// snapshot; greet them with what is known.
    fn greet_waiting(&self, py: Python<'_>, topic: &str) {
        self.run(py, |engine, out| {
            engine.greet_waiting(topic, Instant::now(), out)
        });
    }

    /// Cluster mode: a relay this node published reached nobody
    /// (`unreachable`), or could not be published.
    fn undeliverable(&self, py: Python<'_>, message: &[u8], unreachable: bool) {
        self.run(py, |engine, out| {
            engine.undeliverable(message, unreachable, Instant::now(), out)
        });
    }

    /// Cluster mode: every followed topic with its local peers (and those
    /// about to join), as `(topic, [(peer, metadata)])`.
    #[allow(clippy::type_complexity)]
    fn local_members(&self) -> Vec<(String, Vec<(String, Option<String>)>)> {
        let core = self.lock();
        core.engine
            .local_members()
            .into_iter()
            .map(|(topic, peers)| {
                let peers = peers
                    .into_iter()
                    .map(|(peer, metadata)| (peer.as_str().to_owned(), metadata.map(Into::into)))
                    .collect();
                (topic.to_string(), peers)
            })
            .collect()
    }

    /// Cluster mode: hold presence events until each topic's snapshot.
    fn begin_resync(&self) {
        self.lock().engine.begin_resync();
    }

    /// Cluster mode: the other nodes holding members of this node's topics.
    fn remote_nodes(&self) -> Vec<String> {
        let core = self.lock();
        core.engine
            .remote_nodes()
            .iter()
            .map(|node| node.to_string())
            .collect()
    }

    /// Cluster mode: whether this worker is linked to Redis (a metric);
    /// losing the link is counted unless `lost` is false (a shutdown).
    #[pyo3(signature = (connected, lost=true))]
    fn set_cluster_connected(&self, connected: bool, lost: bool) {
        let core = self.lock();
        let metrics = core.engine.metrics();
        let gauge = cell(family::CLUSTER_CONNECTED, 0);
        if !connected && lost && metrics.get(gauge) == 1 {
            metrics.add(cell(family::CLUSTER_DISCONNECTS, 0), 1);
        }
        metrics.set(gauge, u64::from(connected));
    }

    /// Every worker's metrics in the Prometheus text format.
    fn metrics_text(&self) -> String {
        let table = Arc::clone(self.lock().engine.metrics().table());
        table.render()
    }
}

impl Hub {
    fn count(&self, family: usize, values: &[&str], label: &str) {
        let engine = &self.lock().engine;
        engine
            .metrics()
            .add(cell(family, metrics::value_index(values, label)), 1);
    }
}

/// The metrics table every process of a server maps (a `memfd` made by the
/// supervisor): one row per worker.
#[pyclass(frozen, module = "signaling_sharded._native")]
pub struct MetricsTable {
    table: Arc<Table>,
}

#[pymethods]
impl MetricsTable {
    /// Maps the table of `workers` rows in the file open as `fd`, which
    /// stays the caller's to close.
    #[new]
    fn new(fd: i32, workers: usize) -> PyResult<Self> {
        // SAFETY: the caller keeps `fd` open for the call; ManuallyDrop
        // leaves it open afterwards.
        let file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
        let table = Table::map(&file, workers)?;
        Ok(Self {
            table: Arc::new(table),
        })
    }

    /// Bytes a table of `workers` rows needs.
    #[staticmethod]
    fn size(workers: usize) -> usize {
        Table::size(workers)
    }

    /// Marks worker `worker` running or gone (its gauges drop to zero).
    fn set_up(&self, worker: usize, up: bool) -> PyResult<()> {
        self.check(worker)?;
        self.table.set_up(worker, up);
        Ok(())
    }

    fn count_restart(&self, worker: usize) -> PyResult<()> {
        self.check(worker)?;
        self.table.count_restart(worker);
        Ok(())
    }

    fn render(&self) -> String {
        self.table.render()
    }
}

impl MetricsTable {
    fn check(&self, worker: usize) -> PyResult<()> {
        if worker < self.table.workers() {
            Ok(())
        } else {
            Err(PyValueError::new_err("no such worker"))
        }
    }
}

/// The asyncio protocol of an upgraded connection.
#[pyclass(frozen, module = "signaling_sharded._native")]
pub struct Peer {
    hub: Py<Hub>,
    conn: u64,
    /// The peer's id, or None for a refused connection.
    #[pyo3(get)]
    peer_id: Option<String>,
    /// Why the connection was refused (the error code), or None.
    #[pyo3(get)]
    refused: Option<&'static str>,
}

#[pymethods]
impl Peer {
    fn connection_made(&self, _transport: &Bound<'_, PyAny>) {}

    fn data_received(&self, py: Python<'_>, data: &[u8]) {
        let conn = self.conn;
        self.hub.get().run(py, |engine, out| {
            engine.receive(conn, data, Instant::now(), out)
        });
    }

    /// Returns false so that the transport closes itself.
    fn eof_received(&self, py: Python<'_>) -> bool {
        let conn = self.conn;
        self.hub.get().run(py, |engine, out| engine.eof(conn, out));
        false
    }

    #[pyo3(signature = (_exc=None))]
    fn connection_lost(&self, py: Python<'_>, _exc: Option<&Bound<'_, PyAny>>) {
        let conn = self.conn;
        self.hub
            .get()
            .run(py, |engine, out| engine.release(conn, out));
    }

    fn pause_writing(&self) {
        self.hub.get().lock().engine.pause(self.conn);
    }

    fn resume_writing(&self, py: Python<'_>) {
        let conn = self.conn;
        self.hub
            .get()
            .run(py, |engine, out| engine.resume(conn, out));
    }
}

/// The stable 64-bit hash of a topic (SipHash-1-3, fixed key).
#[pyfunction]
fn topic_hash(topic: &str) -> u64 {
    hashing::topic_hash(topic)
}

/// The index of the worker that owns `topic` among `workers` workers.
#[pyfunction]
fn topic_owner(topic: &str, workers: u32) -> u32 {
    hashing::owner(topic, workers)
}

/// The request that opened a connection, as read by [`request::read`].
#[pyclass(frozen, get_all, module = "signaling_sharded._native")]
pub struct Request {
    /// Bytes of the head; what follows is the connection's.
    head_length: usize,
    /// 0 when the request may be served; else the HTTP status to answer
    /// with, its `reason` and the `headers` it requires.
    status: u16,
    reason: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    method: String,
    /// The target's path in origin form, without the query.
    path: String,
    authorization: Option<String>,
    origin: Option<String>,
    /// A request to `/ws/{topic}`.
    joins: bool,
    /// The topic it joins, when valid.
    topic: Option<String>,
    /// `"invalid_topic"` or `"invalid_metadata"`: a valid upgrade whose
    /// parameters are not, upgraded only to be refused (`Hub.refuse`).
    invalid: Option<&'static str>,
    metadata: Option<String>,
    token: Option<String>,
    /// The `Sec-WebSocket-Accept` value of a valid upgrade.
    accept: Option<String>,
}

impl Request {
    fn new(head_length: usize, refusal: request::Refusal) -> Self {
        Self {
            head_length,
            status: refusal.status,
            reason: refusal.reason,
            headers: refusal.headers.to_vec(),
            method: String::new(),
            path: String::new(),
            authorization: None,
            origin: None,
            joins: false,
            topic: None,
            invalid: None,
            metadata: None,
            token: None,
            accept: None,
        }
    }
}

/// Reads the requests of one worker's connections, with its Origin
/// allow-list.
#[pyclass(frozen, module = "signaling_sharded._native")]
pub struct RequestReader {
    origins: Option<Vec<String>>,
}

#[pymethods]
impl RequestReader {
    /// `origins`: the allowed `Origin` values; None allows any.
    #[new]
    #[pyo3(signature = (origins=None))]
    fn new(origins: Option<Vec<String>>) -> Self {
        Self { origins }
    }

    /// The request at the start of `data` (everything read from the
    /// connection so far), or None while its head is incomplete.
    fn read(&self, data: &[u8]) -> Option<Request> {
        let read = match request::read(data, self.origins.as_deref()) {
            Reading::Incomplete => return None,
            Reading::Refused(refusal) => return Some(Request::new(data.len(), refusal)),
            Reading::Request(read) => read,
        };
        let mut answer = Request::new(read.head_len, request::Refusal::OK);
        answer.method = read.method.to_owned();
        answer.path = read.path.to_owned();
        answer.authorization = read.authorization.map(str::to_owned);
        answer.origin = read.origin.map(str::to_owned);
        let Some(join) = read.join else {
            return Some(answer);
        };
        answer.joins = true;
        match join.handshake {
            Ok(accept) => answer.accept = Some(accept),
            Err(refusal) => {
                answer.status = refusal.status;
                answer.reason = refusal.reason;
                answer.headers = refusal.headers.to_vec();
            }
        }
        match join.params {
            Ok(params) => {
                answer.topic = Some(params.topic);
                answer.metadata = params.metadata;
                answer.token = params.token;
            }
            Err(request::Invalid::Topic) => answer.invalid = Some(Refusal::InvalidTopic.as_str()),
            Err(request::Invalid::Metadata) => {
                answer.invalid = Some(Refusal::InvalidMetadata.as_str())
            }
        }
        Some(answer)
    }
}

/// Events as `(kind, value)` pairs, and the close code of a fault.
type FrameEvents<'py> = (Vec<(&'static str, Bound<'py, PyAny>)>, Option<u16>);

/// The events a server reads from `data`, a stream of client frames, and
/// the close code of the fault that stopped it, if any. Exposed for tests
/// (property and differential tests from Python); the server itself never
/// calls it.
#[pyfunction]
fn frame_events<'py>(
    py: Python<'py>,
    data: &[u8],
    max_message: usize,
) -> PyResult<FrameEvents<'py>> {
    let mut events = Vec::new();
    let mut failure = None;
    let mut scratch = Vec::new();
    let result = FrameReader::default().feed(data, max_message, &mut scratch, |event| {
        let converted = match event {
            Event::Text(text) => ("text", text.into_pyobject(py).map(Bound::into_any)),
            Event::Binary => ("binary", Ok(py.None().into_bound(py))),
            Event::Ping(payload) => ("ping", Ok(PyBytes::new(py, payload).into_any())),
            Event::Pong => ("pong", Ok(py.None().into_bound(py))),
            Event::Close(code) => ("close", code.into_pyobject(py).map(Bound::into_any)),
        };
        match converted {
            (kind, Ok(value)) => events.push((kind, value)),
            (_, Err(err)) => failure = Some(err),
        }
        Flow::Continue
    });
    if let Some(err) = failure {
        return Err(err.into());
    }
    Ok((events, result.err().map(Fault::close_code)))
}

/// How the server answers one client text message: `("relay", type)`,
/// `("ping", None)` or `("error", code)`, with the `msgId` it would echo.
/// Exposed for tests.
#[pyfunction]
fn message_answer(text: &str) -> (&'static str, Option<&'static str>, Option<String>) {
    match message::parse_inbound(text) {
        Ok(Inbound::Relay { kind, msg_id, .. }) => (
            "relay",
            Some(kind.name()),
            msg_id.map(|raw| raw.get().to_owned()),
        ),
        Ok(Inbound::Ping { msg_id }) => ("ping", None, msg_id.map(|raw| raw.get().to_owned())),
        Err(rejected) => (
            "error",
            Some(rejected.code.code()),
            rejected.msg_id.map(|raw| raw.get().to_owned()),
        ),
    }
}

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Hub>()?;
    m.add_class::<Peer>()?;
    m.add_class::<MetricsTable>()?;
    m.add_function(wrap_pyfunction!(topic_hash, m)?)?;
    m.add_function(wrap_pyfunction!(topic_owner, m)?)?;
    m.add_class::<RequestReader>()?;
    m.add_class::<Request>()?;
    m.add("MAX_REQUEST_HEAD", request::MAX_HEAD)?;
    m.add("MAX_METADATA_BYTES", request::MAX_METADATA)?;
    m.add_function(wrap_pyfunction!(frame_events, m)?)?;
    m.add_function(wrap_pyfunction!(message_answer, m)?)?;
    Ok(())
}

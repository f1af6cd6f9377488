//! `Hub`: one worker's engine, and the carrying out of what it decides.
//!
//! After the HTTP upgrade the worker hands the socket's transport to
//! `Hub.join`, which returns a [`Peer`]; the worker installs it with
//! `transport.set_protocol(peer)`. Every call into the engine fills an
//! outbox under the lock; the callbacks it asks for are made after the
//! lock is released, and so are the writes and closes ([`writes`]), or,
//! once the worker has asked for it (`Hub.defer_writes`), at the end of
//! the event loop's iteration: what the peers' messages of one iteration
//! send a connection then goes out in one write.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyList;
use rustc_hash::FxHashMap;
use serde_json::value::RawValue;

use super::cluster::{self, PublishOp};
use super::config::Settings;
use super::metrics::MetricsTable;
use super::peer::Peer;
use super::redis::{redis_ready, Pace, RedisProtocol, RedisWrite, Role};
use super::writes::{perform, Op, Pending};
use super::{call, now};
use crate::engine::cluster::ClusterOp;
use crate::engine::publish::Publisher;
use crate::engine::{Engine, JoinRequest, MemberChange, Missing, Outbox, Part, Refusal};
use crate::metrics::{self as counters, cell, family, Table};
use crate::wire::cluster::RemotePeer;
use crate::wire::peer_id::PeerId;

pub(super) struct Core {
    pub(super) engine: Engine<Py<PyAny>>,
    outbox: Outbox,
    /// The socket work decided and not yet carried out.
    pending: Pending,
    /// Whether `pending` has a flush scheduled.
    pub(super) flush_due: bool,
    /// Cluster mode: the writes to Redis' writer connection, and its
    /// transport while attached (`Hub.attach_redis`); each attachment has
    /// the next generation.
    pub(super) publisher: Publisher,
    pub(super) redis: Option<Py<PyAny>>,
    pub(super) redis_generation: u64,
    /// How far apart the attachment's writes are kept, if at all.
    pub(super) pace: Option<Pace>,
    /// Whether `pace`'s timer is set to write what waits.
    pub(super) redis_timer: bool,
}

/// One worker's peers and topics.
#[pyclass(frozen, module = "signaling_sharded._native")]
pub struct Hub {
    core: Mutex<Core>,
    /// Called as `on_left(peer_id, topic, reason)` when a peer leaves.
    on_left: Py<PyAny>,
    /// Called as `on_joined(peer_id, topic, metadata JSON or None)` when a
    /// peer joins (not when a session resumes): before `on_left` is for
    /// that peer. `on_updated`, the same, when a peer's metadata changes.
    on_joined: Option<Py<PyAny>>,
    on_updated: Option<Py<PyAny>>,
    /// Called as `on_session(peer_id, topic, event)` when a resumable
    /// session is `"suspended"` or `"resumed"`, or `"joined"` (a resume
    /// another node could not honour started a new session).
    on_session: Option<Py<PyAny>>,
    /// Cluster mode: called with a list of operations for Redis, after
    /// each call that produced some.
    on_cluster: Option<Py<PyAny>>,
    /// What every node's inbox channel name starts with (cluster mode).
    channel_prefix: Vec<u8>,
    /// The event loop's `call_soon`, and this hub's `flush` it is called
    /// with when socket work starts waiting; unset, it is done after each
    /// call.
    pub(super) call_soon: OnceLock<(Py<PyAny>, Py<PyAny>)>,
}

impl Hub {
    pub(super) fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic inside the engine poisons the lock; the state it left is
        // still the best there is, and the panic itself was reported.
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `step` on the engine, then performs what it decided.
    pub(super) fn run<R>(
        &self,
        py: Python<'_>,
        step: impl FnOnce(&mut Engine<Py<PyAny>>, &mut Outbox) -> R,
    ) -> R {
        let mut joined = Vec::new();
        let mut updated = Vec::new();
        let mut left = Vec::new();
        let mut sessions = Vec::new();
        let mut cluster_ops = None;
        // Attached to Redis: the work after the first that is not a publish.
        let mut later = Vec::new();
        let mut ops = Vec::new();
        let mut redis_write = RedisWrite::Nothing;
        let mut schedule = None;
        // Whether the pending work was taken for an early flush.
        let mut flushed = false;
        let result = {
            let mut guard = self.lock();
            let core = &mut *guard;
            let result = step(&mut core.engine, &mut core.outbox);
            let Core {
                engine,
                outbox,
                pending,
                publisher,
                redis_timer,
                ..
            } = core;
            engine.record_gauges();
            pending.gather(py, engine, outbox);
            if core.redis.is_some() {
                for op in outbox.cluster.drain(..) {
                    if later.is_empty() {
                        later.extend(publisher.offer(op));
                    } else {
                        later.push(op);
                    }
                }
            }
            // (Bytes may have joined a buffer gathered by an earlier call.)
            match self.call_soon.get() {
                _ if pending.is_empty() && !redis_ready(publisher, *redis_timer) => {}
                // A connection sent more than its transport's mark is
                // written now, so that the transport can pause it.
                Some(_) if engine.flush_now() => {
                    ops = pending.take(py, engine, outbox);
                    redis_write = core.take_redis(py, true);
                    flushed = true;
                }
                Some(scheduler) if !core.flush_due => {
                    core.flush_due = true;
                    schedule = Some(scheduler);
                }
                Some(_) => {}
                None => {
                    ops = pending.take(py, engine, outbox);
                    redis_write = core.take_redis(py, true);
                }
            }
            let outbox = &mut core.outbox;
            if !outbox.is_empty() {
                if self.on_joined.is_some() {
                    joined = member_events(&mut outbox.joined);
                }
                if self.on_updated.is_some() {
                    updated = member_events(&mut outbox.updated);
                }
                left.extend(outbox.left.drain(..).map(|(peer, topic, reason)| {
                    (peer.as_str().to_owned(), topic.to_string(), reason.as_str())
                }));
                sessions.extend(outbox.sessions.drain(..).map(|(peer, topic, event)| {
                    (peer.as_str().to_owned(), topic.to_string(), event.as_str())
                }));
                if !outbox.cluster.is_empty() {
                    cluster_ops = Some(self.to_python(py, &outbox.cluster));
                }
                outbox.clear_events();
            }
            result
        };
        if let Some(scheduler) = schedule {
            self.schedule_flush(py, scheduler);
        }
        self.write_redis(py, redis_write);
        self.perform(py, ops, flushed);
        call_each(py, self.on_joined.as_ref(), joined);
        call_each(py, self.on_updated.as_ref(), updated);
        for left in left {
            call(py, &self.on_left, left);
        }
        if let Some(on_session) = &self.on_session {
            for session in sessions {
                call(py, on_session, session);
            }
        }
        if let Some(ops) = cluster_ops {
            self.call_on_cluster(py, ops);
        }
        if !later.is_empty() {
            self.submit_later(py, later);
        }
        result
    }

    pub(super) fn schedule_flush(
        &self,
        py: Python<'_>,
        (call_soon, flush): &(Py<PyAny>, Py<PyAny>),
    ) {
        if let Err(err) = call_soon.call1(py, (flush,)) {
            // Not scheduled (the loop is closed): flush now.
            err.write_unraisable(py, Some(call_soon.bind(py)));
            self.flush(py);
        }
    }

    fn call_on_cluster(&self, py: Python<'_>, ops: PyResult<Vec<Bound<'_, PyAny>>>) {
        let Some(on_cluster) = &self.on_cluster else {
            return;
        };
        let called = ops
            .and_then(|ops| PyList::new(py, ops))
            .and_then(|list| on_cluster.call1(py, (list,)));
        if let Err(err) = called {
            err.write_unraisable(py, Some(on_cluster.bind(py)));
        }
    }

    /// The cluster work of a call that came after its first operation
    /// that is not a publish, in order: the server encodes that one (it
    /// writes it with `Hub.redis_write`), and the publishes after it wait
    /// for it.
    fn submit_later(&self, py: Python<'_>, ops: Vec<ClusterOp>) {
        let is_publish = |op: &ClusterOp| matches!(op, ClusterOp::Publish { .. });
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            let mut server: Vec<ClusterOp> = Vec::new();
            while let Some(op) = ops.next_if(|op| !is_publish(op)) {
                server.push(op);
            }
            if !server.is_empty() {
                self.call_on_cluster(py, self.to_python(py, &server));
            }
            let mut publishes: Vec<ClusterOp> = Vec::new();
            while let Some(op) = ops.next_if(is_publish) {
                publishes.push(op);
            }
            if publishes.is_empty() {
                continue;
            }
            let mut core = self.lock();
            if core.redis.is_none() {
                // Detached meanwhile: the server refuses them.
                drop(core);
                self.call_on_cluster(py, self.to_python(py, &publishes));
                continue;
            }
            for op in publishes {
                let taken = core.publisher.offer(op).is_none();
                debug_assert!(taken, "only publishes are offered here");
            }
            self.redis_due(py, core);
        }
    }

    fn to_python<'py>(
        &self,
        py: Python<'py>,
        ops: &[ClusterOp],
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let prefix = &self.channel_prefix;
        ops.iter()
            .map(|op| cluster::to_python(py, prefix, op))
            .collect()
    }

    /// Relays that did not arrive: no subscriber (`unreachable`), or not
    /// published.
    pub(super) fn undeliverable_all(&self, py: Python<'_>, relays: &[Vec<u8>], unreachable: bool) {
        if relays.is_empty() {
            return;
        }
        self.run(py, |engine, out| {
            for message in relays {
                engine.undeliverable(message, unreachable, Instant::now(), out);
            }
        });
    }

    /// Messages from this node's inbox, in order.
    pub(super) fn deliver_all(&self, py: Python<'_>, messages: &[&[u8]]) {
        if messages.is_empty() {
            return;
        }
        self.run(py, |engine, out| {
            let now = now();
            for message in messages {
                engine.deliver(message, now, out);
            }
        });
    }

    /// Carries out socket work taken from `pending`; with deferred writes,
    /// tells the engine it is done when some was, or when all of it was
    /// taken (`flushed`: even if nothing was left to do, the connections
    /// it was for being gone).
    fn perform(&self, py: Python<'_>, ops: Vec<(Bound<'_, PyAny>, Op<'_>)>, flushed: bool) {
        let done = flushed || !ops.is_empty();
        perform(py, ops);
        if done && self.call_soon.get().is_some() {
            self.lock().engine.written(Instant::now());
        }
    }

    fn count(&self, family: usize, values: &[&str], label: &str) -> PyResult<()> {
        self.count_n(family, values, label, 1)
    }

    fn count_n(&self, family: usize, values: &[&str], label: &str, n: u64) -> PyResult<()> {
        let Some(value) = counters::value_index(values, label) else {
            let known = values.join(", ");
            return Err(PyValueError::new_err(format!(
                "unknown label {label:?}; one of {known}"
            )));
        };
        self.lock().engine.metrics().add(cell(family, value), n);
        Ok(())
    }
}

#[pymethods]
impl Hub {
    /// A hub with the settings of `config` (the server's `Config`, read
    /// once, by attribute). `metrics` is the server's shared table and
    /// `worker` this worker's row in it; in cluster mode, `cluster_node`
    /// names this node and `on_cluster` takes its work for Redis.
    #[new]
    #[pyo3(signature = (
        config, on_left, *, on_session=None, metrics=None, worker=0, cluster_node=None,
        on_cluster=None, on_joined=None, on_updated=None,
    ))]
    // Python's keyword arguments: each is named at the call.
    #[allow(clippy::too_many_arguments)]
    fn new(
        config: Settings,
        on_left: Py<PyAny>,
        on_session: Option<Py<PyAny>>,
        metrics: Option<PyRef<'_, MetricsTable>>,
        worker: usize,
        cluster_node: Option<String>,
        on_cluster: Option<Py<PyAny>>,
        on_joined: Option<Py<PyAny>>,
        on_updated: Option<Py<PyAny>>,
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
        let engine_config = config.engine_config(cluster_node)?;
        let channel_prefix = format!("{}node:", config.redis_prefix).into_bytes();
        Ok(Self {
            core: Mutex::new(Core {
                engine: Engine::with_metrics(engine_config, table.recorder(worker)),
                outbox: Outbox::default(),
                pending: Pending::default(),
                flush_due: false,
                publisher: Publisher::new(channel_prefix.clone()),
                redis: None,
                redis_generation: 0,
                pace: None,
                redis_timer: false,
            }),
            on_left,
            on_joined,
            on_updated,
            on_session,
            on_cluster,
            channel_prefix,
            call_soon: OnceLock::new(),
        })
    }

    /// Adds the upgraded connection on `transport` to `topic`, writes its
    /// `welcome` and `peer-list` and tells the others; over a limit, writes
    /// the refusal instead (`Peer.refused` says which). With `resume` (a
    /// token) and `seen`, it takes the session over if it can be
    /// (`Peer.resumed`). `waited`: seconds since the connection was
    /// accepted, where the join latency counts from. `head` (the 101
    /// response) is written first, in the same write as `welcome`. The
    /// caller must then `transport.set_protocol()` the returned `Peer`.
    // Python's keyword arguments: each is named at the call.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (
        transport, topic, metadata=None, *, resumable=false, resume=None, seen=None, waited=0.0,
        metadata_locked=false, head=b"".as_slice(),
    ))]
    fn join(
        slf: &Bound<'_, Self>,
        transport: Py<PyAny>,
        topic: &str,
        metadata: Option<&str>,
        resumable: bool,
        resume: Option<&str>,
        seen: Option<u64>,
        waited: f64,
        metadata_locked: bool,
        head: &[u8],
    ) -> Peer {
        let py = slf.py();
        let waited = Duration::try_from_secs_f64(waited).unwrap_or_default();
        let request = JoinRequest {
            topic,
            metadata,
            resumable,
            resume: resume.map(|token| (token, seen)),
            metadata_locked,
            accepted: Instant::now().checked_sub(waited),
            head,
        };
        let (conn, joined) = slf.get().run(py, |engine, out| {
            let (conn, joined) = engine.join(transport, request, now(), out);
            (conn, joined.map(|j| (j.peer, j.resumed)))
        });
        let (id, resumed, refusal) = match joined {
            Ok((peer, resumed)) => (Some(peer), resumed, None),
            Err(refusal) => (None, false, Some(refusal)),
        };
        Peer {
            hub: slf.clone().unbind(),
            conn,
            id,
            resumed,
            refusal,
        }
    }

    /// Takes the upgraded connection on `transport` only to refuse it with
    /// `reason` (`"unauthorized"`, `"invalid_topic"`, ...): `head` (the 101
    /// response), the `error`, then the close code.
    #[pyo3(signature = (transport, reason, *, head=b"".as_slice()))]
    fn refuse(
        slf: &Bound<'_, Self>,
        transport: Py<PyAny>,
        reason: &str,
        head: &[u8],
    ) -> PyResult<Peer> {
        let Some(refusal) = Refusal::ALL.into_iter().find(|r| r.as_str() == reason) else {
            return Err(PyValueError::new_err(format!("unknown refusal {reason:?}")));
        };
        let py = slf.py();
        let conn = slf.get().run(py, |engine, out| {
            engine.refuse(transport, refusal, head, Instant::now(), out)
        });
        Ok(Peer {
            hub: slf.clone().unbind(),
            conn,
            id: None,
            resumed: false,
            refusal: Some(refusal),
        })
    }

    /// From now on, socket work waits for the end of the event loop's
    /// iteration: `call_soon(hub.flush)` is called when the first waits.
    /// `high_water`: the transports' high-water mark in bytes, which a
    /// connection's waiting bytes count against.
    fn defer_writes(
        slf: &Bound<'_, Self>,
        call_soon: Py<PyAny>,
        high_water: usize,
    ) -> PyResult<()> {
        let flush = slf.getattr(intern!(slf.py(), "flush"))?.unbind();
        let hub = slf.get();
        hub.call_soon
            .set((call_soon, flush))
            .map_err(|_| PyValueError::new_err("writes are already deferred"))?;
        hub.lock().engine.defer_writes(high_water);
        Ok(())
    }

    /// Carries out the socket work waiting since the last flush.
    fn flush(&self, py: Python<'_>) {
        let (ops, redis) = {
            let mut guard = self.lock();
            let core = &mut *guard;
            core.flush_due = false;
            let ops = core.pending.take(py, &core.engine, &mut core.outbox);
            (ops, core.take_redis(py, true))
        };
        self.write_redis(py, redis);
        self.perform(py, ops, true);
    }

    /// Cluster mode: writes what waits for Redis (the pause is over).
    pub(super) fn flush_redis(&self, py: Python<'_>) {
        let write = {
            let mut core = self.lock();
            core.redis_timer = false;
            core.take_redis(py, false)
        };
        self.write_redis(py, write);
    }

    /// Sends due pings, and closes peers whose ping or close timed out,
    /// among part `part` of `parts` of the connections (see
    /// `Engine::tick_part`); the process metrics are sampled with part 0.
    #[pyo3(signature = (part = 0, parts = 1))]
    fn tick(&self, py: Python<'_>, part: u64, parts: u64) {
        self.run(py, |engine, out| {
            let now = now();
            let part = Part::new(part, parts);
            engine.tick_part(now.instant, part, out);
            engine.tick_migrations(now, part, out);
            engine.tick_doubts(now.instant, out);
            if part.is_first() {
                engine.metrics().sample_process();
            }
        });
    }

    /// Starts closing every peer with `code` (1001 when draining).
    fn close_all(&self, py: Python<'_>, code: u16, reason: &str) {
        self.run(py, |engine, out| {
            engine.close_all(code, reason, Instant::now(), out)
        });
        self.flush(py);
    }

    /// Resets every connection still open.
    fn abort_all(&self, py: Python<'_>) {
        self.run(py, |engine, out| engine.abort_all(out));
        self.flush(py);
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

    /// Counts a connection that did not become a peer: `"timeout"`, the
    /// HTTP status it was answered (`"404"`), or the error it was refused
    /// with (`"unauthorized"`). An unknown label raises ValueError.
    fn count_handshake_failure(&self, reason: &str) -> PyResult<()> {
        let values = counters::HANDSHAKE_FAILURES;
        self.count(family::HANDSHAKE_FAILURES, values, reason)
    }

    /// Counts a hand-off between workers: `"sent"`, `"failed"`,
    /// `"received"` or `"refused"`. An unknown label raises ValueError.
    fn count_handoff(&self, result: &str) -> PyResult<()> {
        self.count(family::HANDOFFS, counters::HANDOFF_RESULTS, result)
    }

    /// Counts `n` webhook events: `"sent"`, `"overflow"` or `"expired"`.
    /// An unknown label raises ValueError.
    fn count_webhook_events(&self, result: &str, n: u64) -> PyResult<()> {
        let values = counters::WEBHOOK_EVENT_RESULTS;
        self.count_n(family::WEBHOOK_EVENTS, values, result, n)
    }

    /// Counts a webhook request: `"ok"` or `"failed"`. An unknown label
    /// raises ValueError.
    fn count_webhook_request(&self, result: &str) -> PyResult<()> {
        let values = counters::WEBHOOK_REQUEST_RESULTS;
        self.count(family::WEBHOOK_REQUESTS, values, result)
    }

    /// Sets how many webhook events wait to be sent from this worker.
    fn set_webhook_queued(&self, queued: u64) {
        let metrics = self.lock();
        metrics
            .engine
            .metrics()
            .set(cell(family::WEBHOOK_QUEUED, 0), queued);
    }

    /// Cluster mode: from now on the publishes go to Redis on `transport`,
    /// the writer connection, whose protocol the caller sets to the one
    /// returned; the server writes its own commands with `redis_write`.
    /// It gets their replies with `on_replies(raw, errors)`: the replies,
    /// RESP, whole and in order, and the error texts Redis answered
    /// publishes with. `on_lost(exc)` is the transport's `connection_lost`.
    ///
    /// `pause`: seconds that writes to Redis are kept apart, with
    /// `call_later` (the event loop's) to write those that wait; a write
    /// after a quiet spell that long goes at once. 0: none wait.
    #[pyo3(signature = (transport, on_replies, on_lost, pause = 0.0, call_later = None))]
    fn attach_redis(
        slf: &Bound<'_, Self>,
        transport: Py<PyAny>,
        on_replies: Py<PyAny>,
        on_lost: Py<PyAny>,
        pause: f64,
        call_later: Option<Py<PyAny>>,
    ) -> PyResult<RedisProtocol> {
        let py = slf.py();
        let pause = Duration::try_from_secs_f64(pause)
            .map_err(|_| PyValueError::new_err("pause must be a number of seconds, 0 or more"))?;
        let pace = match call_later {
            _ if pause.is_zero() => None,
            Some(call_later) => Some(Pace {
                pause,
                call_later,
                flush_redis: slf.getattr(intern!(py, "flush_redis"))?.unbind(),
            }),
            None => return Err(PyValueError::new_err("a pause needs call_later")),
        };
        let generation = {
            let mut core = slf.get().lock();
            core.redis_generation += 1;
            core.redis = Some(transport.clone_ref(py));
            core.pace = pace;
            core.redis_generation
        };
        Ok(RedisProtocol {
            hub: slf.clone().unbind(),
            transport,
            on_lost,
            role: Role::Writer {
                generation,
                on_replies,
            },
        })
    }

    /// Cluster mode: the writer connection is gone. The relays it had not
    /// written or seen answered are `dropped` to their senders; the work
    /// after goes to `on_cluster` again.
    fn detach_redis(&self, py: Python<'_>) {
        let generation = self.lock().redis_generation;
        self.writer_lost(py, generation);
    }

    /// Cluster mode: writes `data`, encoded commands with `replies` replies,
    /// to the writer after what was published before; False if detached.
    fn redis_write(&self, py: Python<'_>, data: Vec<u8>, replies: u32) -> bool {
        let mut core = self.lock();
        if core.redis.is_none() {
            return false;
        }
        core.publisher.raw(data, replies);
        self.redis_due(py, core);
        true
    }

    /// Cluster mode: whether anything waits to be written to the writer or
    /// answered on it.
    fn redis_busy(&self) -> bool {
        self.lock().publisher.busy()
    }

    /// Cluster mode: seconds since the writer last made progress while
    /// replies are awaited; 0.0 when none is.
    fn redis_stalled(&self) -> f64 {
        self.lock().publisher.stalled(Instant::now())
    }

    /// Cluster mode: the protocol of the inbox connection on `transport`
    /// (subscribed to this node's inbox), which the caller sets. Messages
    /// go to the engine, except those whose first byte is in `server_kinds`:
    /// those and every other reply go to `on_other(reply)`, RESP, whole, in
    /// order with the messages. `on_lost(exc)` is its `connection_lost`.
    fn inbox(
        slf: &Bound<'_, Self>,
        transport: Py<PyAny>,
        on_other: Py<PyAny>,
        on_lost: Py<PyAny>,
        server_kinds: Vec<u8>,
    ) -> RedisProtocol {
        RedisProtocol {
            hub: slf.clone().unbind(),
            transport,
            on_lost,
            role: Role::Inbox {
                on_other,
                server_kinds,
                stream: Default::default(),
            },
        }
    }

    /// Cluster mode: whether the resume asked for connection `conn`
    /// (`AskOp`) reached the session's node; if not, it starts afresh.
    fn asked(&self, py: Python<'_>, conn: u64, reached: bool) {
        self.run(py, |engine, out| engine.asked(conn, reached, now(), out));
    }

    /// Cluster mode: Redis did not move `peer` (`MoveOp`): its session ends.
    fn move_failed(&self, py: Python<'_>, peer: &str) {
        let Some(peer) = PeerId::parse(peer) else {
            return;
        };
        self.run(py, |engine, out| {
            engine.move_failed(&peer, Instant::now(), out)
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
                    let remote = RemotePeer {
                        node: node.into(),
                        metadata: metadata.map(Into::into),
                    };
                    Some((PeerId::parse(&peer)?, remote))
                })
                .collect();
            (version, members)
        });
        self.run(py, |engine, out| {
            engine.snapshot(topic, snapshot, now(), out)
        });
    }

    /// Cluster mode: stop holding the connections waiting for `topic`'s
    /// snapshot; greet them with what is known.
    fn greet_waiting(&self, py: Python<'_>, topic: &str) {
        self.run(py, |engine, out| engine.greet_waiting(topic, now(), out));
    }

    /// Cluster mode: the relay that `op` published reached nobody
    /// (`unreachable`), or could not be published.
    fn undeliverable(&self, py: Python<'_>, op: PyRef<'_, PublishOp>, unreachable: bool) {
        let Some(message) = op.relay(py) else {
            return;
        };
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

    /// Cluster mode: hold presence events until each topic's snapshot;
    /// `forgot`: Redis lost its data (members missing from the snapshots
    /// are doubted for a while before they are told as left).
    #[pyo3(signature = (forgot = false))]
    fn begin_resync(&self, forgot: bool) {
        self.lock().engine.begin_resync(forgot);
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

    /// Admin API: this worker's topics and their peer counts.
    fn admin_topics(&self) -> Vec<(String, usize)> {
        self.lock().engine.topic_counts()
    }

    /// Admin API: the peers of `topic` here, oldest first, as `(id,
    /// metadata JSON or None, since in Unix milliseconds, suspended)`;
    /// None if it has none here.
    fn admin_peers(&self, topic: &str) -> Option<Vec<AdminPeer>> {
        let views = self.lock().engine.peer_views(topic)?;
        let views = views.into_iter().map(|v| {
            let metadata = v.metadata.map(String::from);
            (v.id.as_str().to_owned(), metadata, v.since_ms, v.suspended)
        });
        Some(views.collect())
    }

    /// Admin API: removes `peer` from `topic` (`kicked`, close 4010);
    /// None when done, else what is missing: `"topic"` or `"peer"`.
    fn kick(&self, py: Python<'_>, topic: &str, peer: &str) -> Option<&'static str> {
        let Some(peer) = PeerId::parse(peer) else {
            return Some(missing(Missing::Peer));
        };
        let done = self.run(py, |engine, out| {
            engine.kick(topic, &peer, Instant::now(), out)
        });
        done.err().map(missing)
    }

    /// Admin API: sends a `server-message` with `payload` (JSON text) to
    /// `to`, or to every peer of `topic`; how many it reached, or what is
    /// missing (`"topic"`, `"peer"`; `"payload"`: not JSON).
    #[pyo3(signature = (topic, payload, to=None))]
    fn server_message(
        &self,
        py: Python<'_>,
        topic: &str,
        payload: &str,
        to: Option<&str>,
    ) -> (usize, Option<&'static str>) {
        let Ok(payload) = serde_json::from_str::<&RawValue>(payload) else {
            return (0, Some("payload"));
        };
        let to = match to.map(PeerId::parse) {
            Some(None) => return (0, Some(missing(Missing::Peer))),
            Some(Some(peer)) => Some(peer),
            None => None,
        };
        let sent = self.run(py, |engine, out| {
            engine.server_message(topic, to.as_ref(), payload, Instant::now(), out)
        });
        match sent {
            Ok(reached) => (reached, None),
            Err(what) => (0, Some(missing(what))),
        }
    }

    /// Every worker's metrics in the Prometheus text format.
    fn metrics_text(&self) -> String {
        let table = Arc::clone(self.lock().engine.metrics().table());
        table.render()
    }
}

/// A join or metadata change as `on_joined` and `on_updated` get it: peer
/// id, topic, metadata JSON.
type MemberEvent = (String, String, Option<String>);

/// The Outbox's `joined` or `updated`, taken out for Python.
fn member_events(events: &mut Vec<MemberChange>) -> Vec<MemberEvent> {
    let events = events.drain(..).map(|(peer, topic, metadata)| {
        let metadata = metadata.map(String::from);
        (peer.as_str().to_owned(), topic.to_string(), metadata)
    });
    events.collect()
}

/// Calls `callback` (if any) with each event; what it raises is reported
/// as unraisable.
fn call_each(py: Python<'_>, callback: Option<&Py<PyAny>>, events: Vec<MemberEvent>) {
    let Some(callback) = callback else {
        return;
    };
    for event in events {
        call(py, callback, event);
    }
}

/// A peer as `Hub.admin_peers` gives it: id, metadata JSON, since (Unix
/// milliseconds), suspended.
type AdminPeer = (String, Option<String>, u64, bool);

/// The name of what an admin request found missing.
fn missing(what: Missing) -> &'static str {
    match what {
        Missing::Topic => "topic",
        Missing::Peer => "peer",
    }
}

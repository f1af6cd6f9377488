//! The asyncio protocols of the cluster's two hot Redis connections, once
//! the server has set them up (`Hub.attach_redis`, `Hub.inbox`): uvloop
//! calls their `data_received` straight into Rust, so a relay between
//! nodes runs no Python bytecode on either node.
//!
//! - the writer's ([`Role::Writer`]): the replies of publishes are read
//!   here ([`crate::engine::publish`]); those of the server's own commands
//!   go back to it whole, in order;
//! - the inbox's ([`Role::Inbox`]), subscribed to this node's inbox:
//!   messages go to the engine; the rest (the subscription's confirmation,
//!   the admin API's messages, by their first byte) to the server, whole,
//!   in order.
//!
//! And the hub's side of the writer: when what waits for it is written
//! (at the end of the event loop's iteration, or, with a pause, by a timer
//! about that long after the last write), and what its loss drops.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::call;
use super::hub::{Core, Hub};
use super::writes::{perform, Op};
use crate::engine::publish::{Publisher, Replies, Reply};
use crate::wire::resp::{self, Stream};

/// The protocol of the writer or the inbox connection, made by
/// `Hub.attach_redis` or `Hub.inbox`.
#[pyclass(frozen, module = "signaling_sharded._native")]
pub struct RedisProtocol {
    pub(super) hub: Py<Hub>,
    pub(super) transport: Py<PyAny>,
    /// The transport's `connection_lost`, passed on.
    pub(super) on_lost: Py<PyAny>,
    pub(super) role: Role,
}

pub(super) enum Role {
    Writer {
        /// Which attachment this is: replies that reach a detached one
        /// are dropped.
        generation: u64,
        /// Called as `on_replies(raw, errors)`: the replies of the
        /// server's commands (RESP, whole, in order) and the error texts
        /// of publishes.
        on_replies: Py<PyAny>,
    },
    Inbox {
        /// Called with each reply (RESP, whole) that is not a message for
        /// the engine, in order with the messages.
        on_other: Py<PyAny>,
        /// The first bytes of the messages that go to `on_other`.
        server_kinds: Vec<u8>,
        /// The inbox's bytes, cut into replies.
        stream: Mutex<Stream>,
    },
}

#[pymethods]
impl RedisProtocol {
    fn connection_made(&self, _transport: &Bound<'_, PyAny>) {}

    fn data_received(&self, py: Python<'_>, data: &[u8]) {
        let read = match &self.role {
            Role::Writer {
                generation,
                on_replies,
            } => self.replies(py, *generation, on_replies, data),
            Role::Inbox {
                on_other,
                server_kinds,
                stream,
            } => self.messages(py, on_other, server_kinds, stream, data),
        };
        if read.is_err() {
            abort(py, &self.transport);
        }
    }

    /// Returns false so that the transport closes itself.
    fn eof_received(&self) -> bool {
        false
    }

    /// A writer's loss detaches it at once: what is published from here
    /// on goes to the server, which refuses it until it reconnects.
    #[pyo3(signature = (exc=None))]
    fn connection_lost(&self, py: Python<'_>, exc: Option<Bound<'_, PyAny>>) {
        if let Role::Writer { generation, .. } = &self.role {
            self.hub.get().writer_lost(py, *generation);
        }
        call(py, &self.on_lost, (exc,));
    }

    fn pause_writing(&self) {}

    fn resume_writing(&self) {}
}

impl RedisProtocol {
    /// The writer's replies, in order.
    fn replies(
        &self,
        py: Python<'_>,
        generation: u64,
        on_replies: &Py<PyAny>,
        data: &[u8],
    ) -> Result<(), resp::Malformed> {
        let hub = self.hub.get();
        let read = hub.writer_read(generation, data);
        for reply in &read.replies {
            match reply {
                Reply::Raw(raw) => {
                    let raw = PyBytes::new(py, raw);
                    let errors: [&str; 0] = [];
                    call(py, on_replies, (raw, errors));
                }
                Reply::Unreachable(relays) => hub.undeliverable_all(py, relays, true),
                Reply::Failed(error, relays) => {
                    call(py, on_replies, (PyBytes::new(py, b""), [error]));
                    hub.undeliverable_all(py, relays, false);
                }
            }
        }
        if read.malformed {
            return Err(resp::Malformed);
        }
        Ok(())
    }

    /// The inbox's messages and other replies, in order: the messages for
    /// the engine in batches between the others.
    fn messages(
        &self,
        py: Python<'_>,
        on_other: &Py<PyAny>,
        server_kinds: &[u8],
        stream: &Mutex<Stream>,
        data: &[u8],
    ) -> Result<(), resp::Malformed> {
        let hub = self.hub.get();
        let mut batch = Batch::default();
        let read = lock(stream).feed(data, |reply| {
            match resp::bulk_strings(reply).as_deref() {
                Some([b"message", _channel, data])
                    if !data.first().is_some_and(|kind| server_kinds.contains(kind)) =>
                {
                    batch.push(data);
                }
                _ => {
                    batch.deliver(py, hub);
                    call(py, on_other, (PyBytes::new(py, reply),));
                }
            }
            Ok(())
        });
        batch.deliver(py, hub);
        read
    }
}

/// Messages for the engine, copied out of the stream's buffer.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Batch {
    fn push(&mut self, message: &[u8]) {
        self.bytes.extend_from_slice(message);
        self.ends.push(self.bytes.len());
    }

    fn deliver(&mut self, py: Python<'_>, hub: &Hub) {
        if self.ends.is_empty() {
            return;
        }
        let mut start = 0;
        let messages: Vec<&[u8]> = self
            .ends
            .iter()
            .map(|&end| {
                let message = &self.bytes[start..end];
                start = end;
                message
            })
            .collect();
        hub.deliver_all(py, &messages);
        self.bytes.clear();
        self.ends.clear();
    }
}

fn lock(stream: &Mutex<Stream>) -> std::sync::MutexGuard<'_, Stream> {
    stream
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A connection that sent what is not RESP (or replies nothing asked
/// for) is reset: the server reconnects.
fn abort(py: Python<'_>, transport: &Py<PyAny>) {
    perform(py, vec![(transport.bind(py).clone(), Op::Abort)]);
}

// --- the hub's side of the writer -------------------------------------

/// Cluster mode: writes to Redis about `pause` apart (see
/// `Publisher::wait`), those that wait written by
/// `call_later(seconds, hub.flush_redis)`.
pub(super) struct Pace {
    pub(super) pause: Duration,
    pub(super) call_later: Py<PyAny>,
    pub(super) flush_redis: Py<PyAny>,
}

/// What to do about the writes waiting for Redis' writer connection.
pub(super) enum RedisWrite {
    Nothing,
    /// Write these bytes to this transport.
    Now(Py<PyAny>, Vec<u8>),
    /// Call `call_later(seconds, flush_redis)`.
    Later(Py<PyAny>, Py<PyAny>, f64),
}

impl Core {
    /// The writes for Redis waiting, if any (and attached): now, or
    /// (`paced`, and the pace asks for it) by a timer.
    pub(super) fn take_redis(&mut self, py: Python<'_>, paced: bool) -> RedisWrite {
        if !self.publisher.has_writes() {
            return RedisWrite::Nothing;
        }
        let Some(transport) = &self.redis else {
            return RedisWrite::Nothing;
        };
        let now = Instant::now();
        if let (true, Some(pace)) = (paced, &self.pace) {
            if let Some(wait) = self.publisher.wait(now, pace.pause) {
                if self.redis_timer {
                    return RedisWrite::Nothing;
                }
                self.redis_timer = true;
                let call_later = pace.call_later.clone_ref(py);
                let flush_redis = pace.flush_redis.clone_ref(py);
                return RedisWrite::Later(call_later, flush_redis, wait.as_secs_f64());
            }
        }
        RedisWrite::Now(transport.clone_ref(py), self.publisher.take(now))
    }
}

/// Whether writes for Redis wait that no timer (`timer`) takes care of.
pub(super) fn redis_ready(publisher: &Publisher, timer: bool) -> bool {
    publisher.has_writes() && (!timer || publisher.full())
}

impl Hub {
    pub(super) fn write_redis(&self, py: Python<'_>, write: RedisWrite) {
        match write {
            RedisWrite::Nothing => {}
            RedisWrite::Now(transport, data) => {
                let data = PyBytes::new(py, &data);
                perform(py, vec![(transport.into_bound(py), Op::Write(data))]);
            }
            RedisWrite::Later(call_later, flush_redis, seconds) => {
                if let Err(err) = call_later.call1(py, (seconds, flush_redis)) {
                    // Not scheduled (the loop is closed): write now.
                    err.write_unraisable(py, Some(call_later.bind(py)));
                    self.flush_redis(py);
                }
            }
        }
    }

    /// After writes for Redis were added under `core`: they are written
    /// at the flush, or now if writes are not deferred.
    pub(super) fn redis_due(&self, py: Python<'_>, mut core: MutexGuard<'_, Core>) {
        match self.call_soon.get() {
            _ if !redis_ready(&core.publisher, core.redis_timer) => {}
            Some(scheduler) if !core.flush_due => {
                core.flush_due = true;
                drop(core);
                self.schedule_flush(py, scheduler);
            }
            Some(_) => {}
            None => {
                let write = core.take_redis(py, true);
                drop(core);
                self.write_redis(py, write);
            }
        }
    }

    /// The writer's bytes `data` of attachment `generation` read: the
    /// replies in order, for the caller to carry out. Those of an
    /// attachment detached since are dropped.
    pub(super) fn writer_read(&self, generation: u64, data: &[u8]) -> Replies {
        let mut core = self.lock();
        if core.redis.is_none() || core.redis_generation != generation {
            return Replies::default();
        }
        core.publisher.read(data, Instant::now())
    }

    /// Detaches the writer of attachment `generation` if it still is:
    /// its connection is gone, and what it had on its way did not arrive.
    pub(super) fn writer_lost(&self, py: Python<'_>, generation: u64) {
        let relays = {
            let mut core = self.lock();
            if core.redis.is_none() || core.redis_generation != generation {
                return;
            }
            core.redis = None;
            core.redis_generation += 1;
            // A timer still set fires all the same: at worst it writes the
            // next attachment's work early, which harms no one.
            core.redis_timer = false;
            core.pace = None;
            core.publisher.abandon()
        };
        self.undeliverable_all(py, &relays, false);
    }
}

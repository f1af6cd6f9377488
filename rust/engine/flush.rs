//! Writes that wait for the caller's flush.
//!
//! By default the caller carries out each call's outbox when the call
//! returns. A caller that gathers the writes of many calls (an event loop
//! iteration's) and makes them at once, each connection's in one write,
//! says so with [`Engine::defer_writes`] and calls [`Engine::written`]
//! after each flush. Until then the bytes wait in the outbox, where the
//! transport's high-water mark cannot see them: the engine counts them
//! instead, and once a connection has been sent more than the mark since
//! the last flush, [`Engine::flush_now`] asks the caller to flush at the
//! end of the call, so that the transport pauses, and the connection's
//! queue takes over under `max_queue`, as it would without the wait.

use std::time::Instant;

use super::conn::Conn;
use super::Engine;

/// What waits for the caller's flush.
#[derive(Debug, Default)]
pub(super) struct Flush {
    /// The bytes a connection may be sent between two flushes; `None`:
    /// the caller writes after every call.
    mark: Option<usize>,
    /// Connections sent bytes since the last flush.
    conns: Vec<u64>,
    /// Whether one of them was sent more than the mark.
    over: bool,
    /// When the connections greeted since the last flush were accepted:
    /// their join is counted once their welcome is written.
    joins: Vec<Instant>,
}

impl Flush {
    /// Counts `len` bytes put in the outbox for connection `conn` (`c`).
    pub(super) fn count<W>(&mut self, conn: u64, c: &mut Conn<W>, len: usize) {
        let Some(mark) = self.mark else {
            return;
        };
        if c.unflushed == 0 && len > 0 {
            self.conns.push(conn);
        }
        // Saturating: the count only has to tell that the mark is passed.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        c.unflushed = c.unflushed.saturating_add(len);
        self.over |= c.unflushed as usize > mark;
    }

    /// Whether a join accepted at `accepted` is counted at the flush
    /// (it is kept till then) rather than now.
    pub(super) fn defers_join(&mut self, accepted: Instant) -> bool {
        if self.mark.is_some() {
            self.joins.push(accepted);
        }
        self.mark.is_some()
    }
}

impl<W> Engine<W> {
    /// From now on the caller flushes the outbox when it chooses, at the
    /// latest when [`Engine::flush_now`] says so, and calls
    /// [`Engine::written`] after each flush; `mark` is its transports'
    /// high-water mark in bytes.
    pub fn defer_writes(&mut self, mark: usize) {
        self.flush.mark = Some(mark);
    }

    /// Whether a connection was sent more than the mark since the last
    /// flush: the caller flushes before it waits for more input.
    pub fn flush_now(&self) -> bool {
        self.flush.over
    }

    /// The caller has written everything the outbox asked for: the joins
    /// greeted meanwhile are counted, and the mark counts afresh.
    pub fn written(&mut self, now: Instant) {
        for accepted in self.flush.joins.drain(..) {
            self.metrics
                .observe_join(now.saturating_duration_since(accepted));
        }
        for conn in self.flush.conns.drain(..) {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.unflushed = 0;
            }
        }
        self.flush.over = false;
    }
}

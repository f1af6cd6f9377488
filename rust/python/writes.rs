//! The socket work the engine decides, carried out once the lock is
//! released: after each call, or (`Hub.defer_writes`) gathered over an
//! event loop iteration and made at its end, the writes in a row to one
//! connection joined into one.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rustc_hash::FxHashMap;

use crate::engine::{Action, Engine, Outbox};
use crate::metrics::{cell, family};

/// Socket work decided and not yet carried out. The bytes it writes stay
/// in the outbox (`Outbox::bufs`), where later calls may still append to a
/// connection's open buffer, until [`Pending::take`].
#[derive(Default)]
pub(super) struct Pending {
    /// Each connection's index in `transports`.
    slots: FxHashMap<u64, u32>,
    /// Each connection, and its transport taken with its first action: by
    /// the flush its record may be gone (a suspended session taken over by
    /// a resume), and the reset it was due still is.
    conns: Vec<u64>,
    transports: Vec<Py<PyAny>>,
    /// The actions, in the order decided, each with its connection's slot.
    actions: Vec<(u32, Action)>,
}

/// A socket operation, carried out after the lock is released.
pub(super) enum Op<'py> {
    Write(Bound<'py, PyBytes>),
    Finish,
    Close,
    Abort,
}

impl Pending {
    pub(super) fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// Moves the outbox's actions here, with their connections'
    /// transports; those of a connection already gone are dropped.
    pub(super) fn gather(
        &mut self,
        py: Python<'_>,
        engine: &Engine<Py<PyAny>>,
        outbox: &mut Outbox,
    ) {
        for (conn, action) in outbox.actions.drain(..) {
            let slot = match self.slots.get(&conn) {
                Some(&slot) => slot,
                None => {
                    let Some(transport) = engine.transport(conn) else {
                        continue;
                    };
                    let slot = self.transports.len() as u32;
                    self.transports.push(transport.clone_ref(py));
                    self.conns.push(conn);
                    self.slots.insert(conn, slot);
                    slot
                }
            };
            self.actions.push((slot, action));
        }
    }

    /// The operations gathered, connection by connection in the order each
    /// first came, each connection's in the order decided: writes in a row
    /// become one (a buffer written alone is passed as it is, once for
    /// every connection it goes to). A connection whose record has lost its
    /// transport since (its socket was lost) is only closed or reset, as it
    /// was due to be: a closed transport takes no write. The outbox forgets
    /// its writes.
    pub(super) fn take<'py>(
        &mut self,
        py: Python<'py>,
        engine: &Engine<Py<PyAny>>,
        outbox: &mut Outbox,
    ) -> Vec<(Bound<'py, PyAny>, Op<'py>)> {
        // Stable: each connection's actions keep their order.
        self.actions.sort_by_key(|&(slot, _)| slot);
        let transports: Vec<Bound<'py, PyAny>> = self
            .transports
            .drain(..)
            .map(|transport| transport.into_bound(py))
            .collect();
        let mut ops = Vec::with_capacity(transports.len());
        let mut shared: Vec<Option<Bound<'py, PyBytes>>> = vec![None; outbox.bufs.len()];
        let mut sent = 0;
        let alive: Vec<bool> = self
            .conns
            .drain(..)
            .map(|conn| engine.transport(conn).is_some())
            .collect();
        let mut rest = self.actions.as_slice();
        while let Some((&(slot, first), _)) = rest.split_first() {
            let transport = &transports[slot as usize];
            let alive = alive[slot as usize];
            let Action::Write(index) = first else {
                let op = match first {
                    Action::Finish if alive => Some(Op::Finish),
                    Action::Close => Some(Op::Close),
                    Action::Abort => Some(Op::Abort),
                    _ => None,
                };
                if let Some(op) = op {
                    ops.push((transport.clone(), op));
                }
                rest = &rest[1..];
                continue;
            };
            let run = rest
                .iter()
                .take_while(|&&(s, a)| s == slot && matches!(a, Action::Write(_)))
                .count();
            if !alive {
                rest = &rest[run..];
                continue;
            }
            let data = if run == 1 {
                sent += outbox.bufs[index].len() as u64;
                shared[index]
                    .get_or_insert_with(|| PyBytes::new(py, &outbox.bufs[index]))
                    .clone()
            } else {
                let bufs: Vec<&[u8]> = rest[..run]
                    .iter()
                    .filter_map(|(_, a)| match a {
                        Action::Write(i) => Some(outbox.bufs[*i].as_slice()),
                        _ => None,
                    })
                    .collect();
                let joined = bufs.concat();
                sent += joined.len() as u64;
                PyBytes::new(py, &joined)
            };
            ops.push((transport.clone(), Op::Write(data)));
            rest = &rest[run..];
        }
        // WebSocket bytes only: the heads written are left out.
        let heads: u64 = outbox
            .heads
            .iter()
            .filter(|&&(conn, _)| engine.transport(conn).is_some())
            .map(|&(_, len)| len)
            .sum();
        let sent = sent.saturating_sub(heads);
        engine.metrics().add(cell(family::SENT_BYTES, 0), sent);
        self.actions.clear();
        self.slots.clear();
        outbox.clear_writes();
        ops
    }
}

/// Carries out socket work; what a transport raises is reported as
/// unraisable.
pub(super) fn perform(py: Python<'_>, ops: Vec<(Bound<'_, PyAny>, Op<'_>)>) {
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
}

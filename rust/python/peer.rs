//! `Peer`: the asyncio protocol of an upgraded connection.

use std::time::Instant;

use pyo3::prelude::*;

use super::hub::Hub;
use crate::engine::Refusal;
use crate::wire::peer_id::PeerId;

#[pyclass(frozen, module = "signaling_sharded._native")]
pub struct Peer {
    pub(super) hub: Py<Hub>,
    pub(super) conn: u64,
    /// The peer's id, or None for a refused connection. Kept as is and made
    /// a `str` when asked (once, to log the join): one of these lives as
    /// long as its connection, and a `String` would cost each idle peer a
    /// heap block.
    pub(super) id: Option<PeerId>,
    /// Whether it resumed a session (the peer id is the session's).
    #[pyo3(get)]
    pub(super) resumed: bool,
    pub(super) refusal: Option<Refusal>,
}

#[pymethods]
impl Peer {
    /// The peer's id, or None for a refused connection.
    #[getter]
    fn peer_id(&self) -> Option<&str> {
        self.id.as_ref().map(PeerId::as_str)
    }

    /// Why the connection was refused (the error code), or None.
    #[getter]
    fn refused(&self) -> Option<&'static str> {
        self.refusal.map(Refusal::as_str)
    }

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
        self.hub
            .get()
            .run(py, |engine, out| engine.eof(conn, Instant::now(), out));
        false
    }

    #[pyo3(signature = (_exc=None))]
    fn connection_lost(&self, py: Python<'_>, _exc: Option<&Bound<'_, PyAny>>) {
        let conn = self.conn;
        self.hub
            .get()
            .run(py, |engine, out| engine.release(conn, Instant::now(), out));
    }

    fn pause_writing(&self) {
        self.hub
            .get()
            .lock()
            .engine
            .pause(self.conn, Instant::now());
    }

    fn resume_writing(&self, py: Python<'_>) {
        let conn = self.conn;
        self.hub
            .get()
            .run(py, |engine, out| engine.resume(conn, Instant::now(), out));
    }
}

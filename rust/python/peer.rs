//! `Peer`: the asyncio protocol of an upgraded connection.

use std::time::Instant;

use pyo3::prelude::*;

use super::hub::Hub;

#[pyclass(frozen, module = "signaling_sharded._native")]
pub struct Peer {
    pub(super) hub: Py<Hub>,
    pub(super) conn: u64,
    /// The peer's id, or None for a refused connection.
    #[pyo3(get)]
    pub(super) peer_id: Option<String>,
    /// Whether it resumed a session (the peer id is the session's).
    #[pyo3(get)]
    pub(super) resumed: bool,
    /// Why the connection was refused (the error code), or None.
    #[pyo3(get)]
    pub(super) refused: Option<&'static str>,
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

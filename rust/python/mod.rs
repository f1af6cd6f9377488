//! The PyO3 seam: `signaling_sharded._native`.
//!
//! - [`hub`]: `Hub` wraps one worker's [`Engine`](crate::engine::Engine);
//!   the server's settings cross once, when it is made ([`config`]);
//! - [`peer`]: `Peer`, the asyncio protocol of an upgraded connection,
//!   which uvloop calls straight into: a received chunk costs one call
//!   into Rust and no Python bytecode;
//! - [`request`]: `RequestReader`, the one reader of request heads;
//! - [`metrics`]: `MetricsTable`, the table every process of a server maps;
//! - [`cluster`]: the work for Redis, as typed operations;
//! - [`redis`]: the protocols of the cluster's writer and inbox connections;
//! - `testing` (feature `test-hooks`, off in released wheels): the frame
//!   and message parsers, exposed for property tests.
//!
//! The engine's lock is released before any Python code runs: a
//! `transport.write` may call back into `Peer.pause_writing` at once.

use std::time::{Instant, SystemTime};

use pyo3::prelude::*;

use crate::engine::Now;
use crate::topic_hash as hashing;
use crate::wire;

mod cluster;
mod config;
mod hub;
mod metrics;
mod peer;
mod redis;
mod request;
#[cfg(feature = "test-hooks")]
mod testing;
mod writes;

/// Calls `callback` with `args`; what it raises is reported as unraisable.
fn call<'py>(py: Python<'py>, callback: &Py<PyAny>, args: impl pyo3::call::PyCallArgs<'py>) {
    if let Err(err) = callback.call1(py, args) {
        err.write_unraisable(py, Some(callback.bind(py)));
    }
}

/// The clocks, read once per call into the engine (which reads none).
fn now() -> Now {
    Now {
        instant: Instant::now(),
        wall: SystemTime::now(),
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

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<hub::Hub>()?;
    m.add_class::<peer::Peer>()?;
    m.add_class::<metrics::MetricsTable>()?;
    m.add_class::<request::RequestReader>()?;
    m.add_class::<request::Request>()?;
    m.add_class::<cluster::JoinOp>()?;
    m.add_class::<cluster::LeaveOp>()?;
    m.add_class::<cluster::UpdateOp>()?;
    m.add_class::<cluster::PublishOp>()?;
    m.add_class::<cluster::AskOp>()?;
    m.add_class::<cluster::MoveOp>()?;
    m.add_class::<redis::RedisProtocol>()?;
    m.add_function(wrap_pyfunction!(topic_hash, m)?)?;
    m.add_function(wrap_pyfunction!(request::query_values, m)?)?;
    m.add_function(wrap_pyfunction!(topic_owner, m)?)?;
    m.add("MAX_REQUEST_HEAD", wire::request::MAX_HEAD)?;
    m.add("MAX_METADATA_BYTES", wire::request::MAX_METADATA)?;
    let codes = pyo3::types::PyDict::new(m.py());
    for (name, code) in wire::close::ALL {
        codes.set_item(name, code)?;
    }
    m.add("CLOSE_CODES", codes)?;
    #[cfg(feature = "test-hooks")]
    testing::register(m)?;
    Ok(())
}

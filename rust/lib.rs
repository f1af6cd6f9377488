//! The Rust core of signaling-sharded.
//!
//! Pure modules, tested by `cargo test` without Python:
//! - [`frame`]: WebSocket frames of an open connection (RFC 6455);
//! - [`message`]: the protocol's JSON messages, parsed and written;
//! - [`ice`]: the ICE servers and TURN credentials of `welcome`;
//! - [`registry`]: topics and their peers;
//! - [`cluster`]: remote members of topics, and the messages between nodes;
//! - [`engine`]: one worker's connections and the relay hot path;
//! - [`metrics`]: every worker's counters, in one table all of them map;
//! - [`request`]: the HTTP request that opens a connection, read once for
//!   routing and upgrade;
//! - [`topic_hash`]: the stable topic hash that shards topics over workers.
//!
//! `python` (feature `python`, on in the maturin build) is the thin PyO3
//! glue that exposes them as `signaling_sharded._native`; it builds for
//! Linux only.

pub mod cluster;
pub mod engine;
pub mod frame;
pub mod ice;
pub mod message;
pub mod metrics;
pub mod registry;
pub mod request;
pub mod topic_hash;

// The Python package is Linux-only: the server relies on memfd, abstract Unix
// sockets, SOCK_SEQPACKET and SCM_RIGHTS between its processes. Say so at
// build time rather than ship an extension that cannot serve. The pure core
// above builds and tests anywhere.
#[cfg(all(feature = "python", not(target_os = "linux")))]
compile_error!(
    "signaling-sharded's Python extension (feature `python`) builds for Linux only: \
     the server needs memfd, abstract Unix sockets and SOCK_SEQPACKET. \
     The pure Rust core (no features) builds on any platform."
);

#[cfg(all(feature = "python", target_os = "linux"))]
mod python;

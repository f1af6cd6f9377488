//! The Rust core of signaling-sharded, in three layers, each depending
//! only on the ones below it:
//!
//! - [`python`] (feature `python`, on in the maturin build): the PyO3 seam
//!   that exposes the core as `signaling_sharded._native`;
//! - [`engine`]: one worker's connections, topics, relays and limits,
//!   sans-I/O (cluster mode a module of its own);
//! - [`wire`]: the protocol's codecs, stateless: the request, frames,
//!   messages, close codes, peer ids, the cluster's messages.
//!
//! Beside them, [`metrics`] (every worker's counters, in one table all of
//! them map) and [`topic_hash`] (the stable hash that shards topics over
//! workers). Everything but `python` is tested by `cargo test` without
//! Python; `python` builds for Linux only.

pub mod engine;
pub mod metrics;
pub mod topic_hash;
pub mod wire;

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

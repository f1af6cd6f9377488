//! The protocol's codecs, stateless: what crosses a socket and how it is
//! read and written. Nothing here knows of connections or topics.
//!
//! - [`request`]: the HTTP request that opens a connection, read once for
//!   routing and upgrade;
//! - [`frame`]: WebSocket frames of an open connection (RFC 6455);
//! - [`message`]: the protocol's JSON messages, parsed and written;
//! - [`close`]: the close codes;
//! - [`peer_id`]: peer ids (ULIDs);
//! - [`reason`]: why a peer leaves its topic;
//! - [`resume`]: resume tokens;
//! - [`ice`]: the ICE servers and TURN credentials of `welcome`;
//! - [`cluster`]: the messages nodes send each other through Redis;
//! - [`migrate`]: those that move a resumable session between nodes;
//! - [`resp`]: the Redis protocol of the cluster's hot connections.

pub mod close;
pub mod cluster;
pub mod frame;
pub mod ice;
pub mod message;
pub mod migrate;
pub mod peer_id;
pub mod reason;
pub mod request;
pub mod resp;
pub mod resume;

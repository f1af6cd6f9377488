//! What an engine is configured with.

use std::sync::Arc;
use std::time::Duration;

use crate::wire::ice::IceServers;

#[derive(Debug, Clone)]
pub struct Config {
    /// Largest message (all fragments) a client may send; over it, 1009.
    pub max_message: usize,
    /// Bytes a connection may have queued while its transport is full.
    pub max_queue: usize,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// How long a closing connection may take to finish the close
    /// handshake before it is aborted.
    pub close_timeout: Duration,
    /// Peers a topic may hold; the next joiner is refused with 4009.
    pub max_peers_per_topic: usize,
    /// Connections this engine may hold (closing ones included); the next
    /// is refused with 4029.
    pub max_connections: usize,
    /// Messages per second each connection may send; `None` for no limit.
    pub rate_limit: Option<RateLimit>,
    /// STUN and TURN servers announced in `welcome`.
    pub ice: IceServers,
    /// This worker's node name in cluster mode; `None`: one machine.
    pub cluster_node: Option<Arc<str>>,
    /// How long a resumable session outlives its connection; `None`: no
    /// resumable sessions.
    pub resume_window: Option<Duration>,
    /// The key of resume tokens.
    pub resume_secret: Vec<u8>,
    /// Broadcasts (PROTOCOL.md section 9); `None`: refused (`forbidden`).
    pub broadcast: Option<BroadcastLimits>,
    /// Unicast types relayed like `offer` besides the three
    /// (`--relay-type`).
    pub relay_types: Vec<&'static str>,
}

/// How much one peer may broadcast: messages of at most `max_size` bytes,
/// at `rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BroadcastLimits {
    pub max_size: usize,
    pub rate: RateLimit,
}

/// A token bucket: `per_second` messages a second on average, bursts of up
/// to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

/// The settings of the engine's own tests; the server's defaults are the
/// Python `Config`'s, which cross the seam whole.
impl Default for Config {
    fn default() -> Self {
        Self {
            max_message: 64 * 1024,
            max_queue: 1024 * 1024,
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            max_peers_per_topic: 1000,
            max_connections: 50_000,
            rate_limit: None,
            ice: IceServers::default(),
            cluster_node: None,
            resume_window: Some(Duration::from_secs(30)),
            resume_secret: b"engine tests".to_vec(),
            broadcast: Some(BroadcastLimits {
                max_size: 16 * 1024,
                rate: RateLimit {
                    per_second: 20.0,
                    burst: 40.0,
                },
            }),
            relay_types: Vec::new(),
        }
    }
}

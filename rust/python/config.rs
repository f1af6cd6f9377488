//! The server's settings, as they cross the seam: once, when a `Hub` is
//! made, read by name from the Python `Config` (whose defaults are the
//! only ones; `--help` shows them).

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::engine::{BroadcastLimits, Config, RateLimit};
use crate::wire::ice::IceServers;
use crate::wire::message::RESERVED_TYPES;

/// The attributes of the Python `Config` that the engine needs.
#[derive(FromPyObject)]
pub struct Settings {
    max_message_size: usize,
    max_queue_bytes: usize,
    ping_interval: f64,
    ping_timeout: f64,
    close_timeout: f64,
    max_peers_per_topic: usize,
    max_connections: usize,
    rate_limit: Option<f64>,
    rate_burst: Option<f64>,
    stun_uris: Vec<String>,
    turn_uris: Vec<String>,
    turn_secret: Option<String>,
    turn_ttl: u64,
    pub(super) redis_prefix: String,
    /// Seconds a resumable session outlives its connection; 0: none.
    resume_window: f64,
    /// The key of resume tokens; the supervisor draws one at start if
    /// none is configured.
    resume_secret: Option<String>,
    /// Broadcasts: on, their largest size, and their rate per peer.
    broadcast: bool,
    max_broadcast_size: usize,
    broadcast_rate: f64,
    broadcast_burst: Option<f64>,
    /// Unicast types relayed like `offer` besides the three.
    relay_types: Vec<String>,
}

fn seconds(value: f64, name: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            PyValueError::new_err(format!("{name} must be a positive number of seconds"))
        })
}

impl Settings {
    /// The engine's configuration; `cluster_node` in cluster mode.
    pub(super) fn engine_config(&self, cluster_node: Option<String>) -> PyResult<Config> {
        if !self.turn_uris.is_empty() && self.turn_secret.is_none() {
            return Err(PyValueError::new_err("turn_uris need a turn_secret"));
        }
        let rate_limit = match self.rate_limit {
            None => None,
            Some(per_second) if per_second > 0.0 && per_second.is_finite() => Some(RateLimit {
                per_second,
                burst: self.rate_burst.unwrap_or(per_second).max(1.0),
            }),
            Some(_) => return Err(PyValueError::new_err("rate_limit must be positive")),
        };
        if !(self.broadcast_rate > 0.0 && self.broadcast_rate.is_finite()) {
            return Err(PyValueError::new_err("broadcast_rate must be positive"));
        }
        let broadcast = self.broadcast.then(|| BroadcastLimits {
            max_size: self.max_broadcast_size,
            rate: RateLimit {
                per_second: self.broadcast_rate,
                burst: self
                    .broadcast_burst
                    .unwrap_or(2.0 * self.broadcast_rate)
                    .max(1.0),
            },
        });
        if let Some(reserved) = self
            .relay_types
            .iter()
            .find(|name| RESERVED_TYPES.contains(&name.as_str()))
        {
            return Err(PyValueError::new_err(format!(
                "relay type {reserved:?} is already a message type"
            )));
        }
        // The engine borrows the names for as long as the process runs.
        let relay_types = self
            .relay_types
            .iter()
            .map(|name| &*Box::leak(name.clone().into_boxed_str()))
            .collect();
        Ok(Config {
            max_message: self.max_message_size,
            max_queue: self.max_queue_bytes,
            ping_interval: seconds(self.ping_interval, "ping_interval")?,
            ping_timeout: seconds(self.ping_timeout, "ping_timeout")?,
            close_timeout: seconds(self.close_timeout, "close_timeout")?,
            max_peers_per_topic: self.max_peers_per_topic,
            max_connections: self.max_connections,
            rate_limit,
            ice: IceServers {
                stun_uris: self.stun_uris.clone(),
                turn_uris: self.turn_uris.clone(),
                turn_secret: self.turn_secret.clone().unwrap_or_default().into_bytes(),
                turn_ttl: self.turn_ttl,
            },
            cluster_node: cluster_node.map(Into::into),
            resume_window: if self.resume_window == 0.0 {
                None
            } else {
                Some(seconds(self.resume_window, "resume_window")?)
            },
            resume_secret: self.resume_secret.clone().unwrap_or_default().into_bytes(),
            broadcast,
            relay_types,
        })
    }
}

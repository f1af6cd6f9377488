//! The WebSocket close codes the server sends (PROTOCOL.md section 5),
//! defined once: the engine, the Python side and the clients' tests take
//! them from here.

pub const NORMAL: u16 = 1000;
/// The server drains (SIGTERM): reconnect, preferably elsewhere.
pub const GOING_AWAY: u16 = 1001;
pub const PROTOCOL_ERROR: u16 = 1002;
pub const INVALID_UTF8: u16 = 1007;
/// Too much sent before `welcome` (cluster mode).
pub const POLICY: u16 = 1008;
/// A message over the size limit, or of too many frames.
pub const TOO_BIG: u16 = 1009;
pub const UNAUTHORIZED: u16 = 4001;
/// The peer could not keep up with what it is sent, or kept sending over
/// the rate limit.
pub const SLOW_CONSUMER: u16 = 4008;
pub const TOPIC_FULL: u16 = 4009;
/// Removed through the admin API.
pub const KICKED: u16 = 4010;
/// The session was resumed on a newer connection.
pub const REPLACED: u16 = 4011;
pub const SERVER_FULL: u16 = 4029;
/// The upgrade's topic or metadata is invalid.
pub const BAD_REQUEST: u16 = 4400;

/// Every code, by the name the Python side gives it.
pub const ALL: &[(&str, u16)] = &[
    ("NORMAL", NORMAL),
    ("GOING_AWAY", GOING_AWAY),
    ("PROTOCOL_ERROR", PROTOCOL_ERROR),
    ("INVALID_UTF8", INVALID_UTF8),
    ("POLICY", POLICY),
    ("TOO_BIG", TOO_BIG),
    ("UNAUTHORIZED", UNAUTHORIZED),
    ("SLOW_CONSUMER", SLOW_CONSUMER),
    ("TOPIC_FULL", TOPIC_FULL),
    ("KICKED", KICKED),
    ("REPLACED", REPLACED),
    ("SERVER_FULL", SERVER_FULL),
    ("BAD_REQUEST", BAD_REQUEST),
];

//! Why a peer leaves its topic: one name per reason, used in the logs, the
//! metrics and (for webhooks) on the wire.

/// Why a peer left its topic: logged by the caller and counted in the
/// metrics under the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    Closed,
    Disconnected,
    PingTimeout,
    SlowConsumer,
    RateAbuse,
    ProtocolError,
    Shutdown,
    /// A suspended session's resume window ran out.
    Expired,
    /// Removed through the admin API.
    Kicked,
}

impl LeaveReason {
    /// Every reason, in declaration order (`reason as usize` indexes it).
    pub const ALL: [Self; 9] = [
        Self::Closed,
        Self::Disconnected,
        Self::PingTimeout,
        Self::SlowConsumer,
        Self::RateAbuse,
        Self::ProtocolError,
        Self::Shutdown,
        Self::Expired,
        Self::Kicked,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Disconnected => "disconnected",
            Self::PingTimeout => "ping_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::RateAbuse => "rate_abuse",
            Self::ProtocolError => "protocol_error",
            Self::Shutdown => "shutdown",
            Self::Expired => "expired",
            Self::Kicked => "kicked",
        }
    }
}

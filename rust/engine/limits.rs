//! Who may join, and how fast a connection may send.

use std::time::{Duration, Instant};

use super::config::RateLimit;
use super::Engine;
use crate::wire::close;
use crate::wire::message::ErrorCode;

/// Rate-limit violations within [`ABUSE_WINDOW`] that disconnect a peer.
pub const ABUSE_LIMIT: u32 = 10;
pub const ABUSE_WINDOW: Duration = Duration::from_secs(10);

/// Why a connection is not admitted as a peer; it is sent the error, then
/// the close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unauthorized,
    TopicFull,
    ServerFull,
    InvalidTopic,
    InvalidMetadata,
}

impl Refusal {
    pub const ALL: [Self; 5] = [
        Self::Unauthorized,
        Self::TopicFull,
        Self::ServerFull,
        Self::InvalidTopic,
        Self::InvalidMetadata,
    ];

    pub fn error(self) -> ErrorCode {
        match self {
            Self::Unauthorized => ErrorCode::Unauthorized,
            Self::TopicFull => ErrorCode::TopicFull,
            Self::ServerFull => ErrorCode::ServerFull,
            Self::InvalidTopic => ErrorCode::InvalidTopic,
            Self::InvalidMetadata => ErrorCode::InvalidMetadata,
        }
    }

    pub fn close_code(self) -> u16 {
        match self {
            Self::Unauthorized => close::UNAUTHORIZED,
            Self::TopicFull => close::TOPIC_FULL,
            Self::ServerFull => close::SERVER_FULL,
            Self::InvalidTopic | Self::InvalidMetadata => close::BAD_REQUEST,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.error().code()
    }
}

/// What the rate limit says of one more frame.
pub(super) enum Admission {
    Yes,
    Limited,
    Abusive,
}

/// A connection's token bucket and its recent violations.
#[derive(Debug)]
pub(super) struct Bucket {
    /// Tokens left, as of `refilled`.
    tokens: f64,
    refilled: Instant,
    /// Violations since `violations_since`.
    violations: u32,
    violations_since: Instant,
}

impl Bucket {
    pub(super) fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            refilled: now,
            violations: 0,
            violations_since: now,
        }
    }

    /// Takes a token, refilled at `limit` for the time elapsed; false if
    /// there is none.
    fn take(&mut self, limit: RateLimit, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.per_second).min(limit.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        false
    }
}

impl<W> Engine<W> {
    /// Takes a token from `conn`'s bucket, refilled for the time elapsed.
    pub(super) fn admit(&mut self, conn: u64, now: Instant) -> Admission {
        let Some(limit) = self.config.rate_limit else {
            return Admission::Yes;
        };
        let Some(bucket) = self
            .conns
            .get_mut(&conn)
            .and_then(|c| c.bucket.as_deref_mut())
        else {
            return Admission::Yes;
        };
        if bucket.take(limit, now) {
            return Admission::Yes;
        }
        if now.saturating_duration_since(bucket.violations_since) > ABUSE_WINDOW {
            bucket.violations = 0;
            bucket.violations_since = now;
        }
        bucket.violations += 1;
        if bucket.violations >= ABUSE_LIMIT {
            Admission::Abusive
        } else {
            Admission::Limited
        }
    }

    /// Takes a token from `conn`'s broadcast bucket (full at its first
    /// broadcast); false if it has none left.
    pub(super) fn admit_broadcast(&mut self, conn: u64, limit: RateLimit, now: Instant) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        c.broadcasts
            .get_or_insert_with(|| Box::new(Bucket::full(limit.burst, now)))
            .take(limit, now)
    }
}

//! Peer ids: ULIDs (26 characters of Crockford base32), as the server
//! gives them out and as clients name their targets.

use ulid::Ulid;

/// A peer id: a ULID in its 26-character Crockford base32 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; ulid::ULID_LEN]);

impl PeerId {
    pub fn from_ulid(id: Ulid) -> Self {
        let mut text = [0; ulid::ULID_LEN];
        id.array_to_str(&mut text);
        Self(text)
    }

    /// The id a client wrote, if it has the shape of one.
    pub fn parse(text: &str) -> Option<Self> {
        text.as_bytes().try_into().ok().map(Self)
    }

    /// When it was made: the ULID's milliseconds since the Unix epoch.
    pub fn millis(&self) -> u64 {
        Ulid::from_string(self.as_str()).map_or(0, |id| id.timestamp_ms())
    }

    pub fn as_str(&self) -> &str {
        // Crockford base32 is ASCII, and `parse` only keeps what was a str.
        std::str::from_utf8(&self.0).expect("peer ids are ASCII")
    }
}

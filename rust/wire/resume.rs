//! Resume tokens (PROTOCOL.md section 5): opaque to the client, single-use,
//! bound to a topic and a peer, unforgeable.
//!
//! A token is the base64url (no padding) of the peer id (26 bytes), the
//! session's resume count (4 bytes, big-endian: the token of the n-th
//! resume is the only valid one, so each is good once) and the first 16
//! bytes of HMAC-SHA1(secret, topic, 0, peer id, count). Nothing is stored
//! per token: the server checks the MAC and the count against the session.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

use crate::wire::peer_id::PeerId;

const ID: usize = ulid::ULID_LEN;
const MAC: usize = 16;

fn mac(secret: &[u8], topic: &str, peer: &PeerId, count: u32) -> Hmac<Sha1> {
    let mut mac = <Hmac<Sha1> as KeyInit>::new_from_slice(secret).expect("any key length");
    mac.update(topic.as_bytes());
    mac.update(&[0]);
    mac.update(peer.as_str().as_bytes());
    mac.update(&count.to_be_bytes());
    mac
}

/// The token of `peer`'s session in `topic` after `count` resumes.
pub fn token(secret: &[u8], topic: &str, peer: &PeerId, count: u32) -> String {
    let tag = mac(secret, topic, peer, count).finalize().into_bytes();
    let mut raw = Vec::with_capacity(ID + 4 + MAC);
    raw.extend_from_slice(peer.as_str().as_bytes());
    raw.extend_from_slice(&count.to_be_bytes());
    raw.extend_from_slice(&tag[..MAC]);
    BASE64.encode(raw)
}

/// The peer and resume count `token` names, if it was made with `secret`
/// for `topic`; `None` for anything else (forged, another topic, garbage).
/// The MAC is compared in constant time.
pub fn verify(secret: &[u8], topic: &str, token: &str) -> Option<(PeerId, u32)> {
    let raw = BASE64.decode(token).ok()?;
    if raw.len() != ID + 4 + MAC {
        return None;
    }
    let peer = PeerId::parse(std::str::from_utf8(&raw[..ID]).ok()?)?;
    let count = u32::from_be_bytes(raw[ID..ID + 4].try_into().ok()?);
    mac(secret, topic, &peer, count)
        .verify_truncated_left(&raw[ID + 4..])
        .ok()?;
    Some((peer, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::cluster::testing::id;

    #[test]
    fn a_token_names_its_peer_and_count_and_nothing_else() {
        let (secret, peer) = (b"secret".as_slice(), id(7));
        let token = token(secret, "room", &peer, 3);
        assert_eq!(verify(secret, "room", &token), Some((peer, 3)));
        assert_eq!(verify(secret, "other", &token), None, "bound to its topic");
        assert_eq!(verify(b"another", "room", &token), None, "unforgeable");
        let mut forged = BASE64.decode(&token).unwrap();
        forged[ID + 3] ^= 1; // another count under the same MAC
        assert_eq!(verify(secret, "room", &BASE64.encode(forged)), None);
        for garbage in ["", "abc", "!!!!", &token[..token.len() - 1]] {
            assert_eq!(verify(secret, "room", garbage), None, "{garbage:?}");
        }
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    }
}

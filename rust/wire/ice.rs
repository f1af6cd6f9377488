//! ICE servers for `welcome` (PROTOCOL.md section 7).
//!
//! TURN credentials follow coturn's `use-auth-secret` scheme (the TURN REST
//! API draft, draft-uberti-behave-turn-rest-00): the username is
//! `expiry:peerId` with `expiry` a Unix time, and the credential is the
//! base64 of HMAC-SHA1(shared secret, username). The TURN server checks them
//! with the same secret, so no state is shared with it.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

/// The ICE servers to hand out; empty lists for none.
#[derive(Debug, Clone, Default)]
pub struct IceServers {
    pub stun_uris: Vec<String>,
    pub turn_uris: Vec<String>,
    pub turn_secret: Vec<u8>,
    /// Seconds a TURN credential stays valid.
    pub turn_ttl: u64,
}

impl IceServers {
    pub fn is_empty(&self) -> bool {
        self.stun_uris.is_empty() && self.turn_uris.is_empty()
    }

    /// `,"iceServers":[...]` for `peer` at Unix time `now`, to append to
    /// `welcome`; empty when none are configured.
    pub fn welcome_field(&self, peer: &str, now: u64) -> String {
        if self.is_empty() {
            return String::new();
        }
        let mut servers = Vec::new();
        if !self.stun_uris.is_empty() {
            servers.push(format!("{{\"urls\":{}}}", json(&self.stun_uris)));
        }
        if !self.turn_uris.is_empty() {
            let username = format!("{}:{peer}", now + self.turn_ttl);
            let credential = credential(&self.turn_secret, &username);
            servers.push(format!(
                "{{\"urls\":{},\"username\":{},\"credential\":{}}}",
                json(&self.turn_uris),
                json(&username),
                json(&credential)
            ));
        }
        format!(",\"iceServers\":[{}]", servers.join(","))
    }
}

/// base64(HMAC-SHA1(`secret`, `username`)).
pub fn credential(secret: &[u8], username: &str) -> String {
    let mut mac = <Hmac<Sha1> as KeyInit>::new_from_slice(secret).expect("any key length");
    mac.update(username.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

fn json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("strings serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_matches_a_known_value() {
        // HMAC-SHA1 test case 2 of RFC 2202, in base64.
        assert_eq!(
            credential(b"Jefe", "what do ya want for nothing?"),
            "7/zfauXrL6LSdBbV8YTfnCWafHk="
        );
    }

    #[test]
    fn welcome_field() {
        let none = IceServers::default();
        assert_eq!(none.welcome_field("P", 100), "");
        let ice = IceServers {
            stun_uris: vec!["stun:s.example:3478".into()],
            turn_uris: vec!["turn:t.example:3478".into(), "turns:t.example:5349".into()],
            turn_secret: b"Jefe".to_vec(),
            turn_ttl: 50,
        };
        let field = ice.welcome_field("P", 100);
        let expected = format!(
            ",\"iceServers\":[{{\"urls\":[\"stun:s.example:3478\"]}},{{\"urls\":[\"turn:t.example:3478\",\"turns:t.example:5349\"],\"username\":\"150:P\",\"credential\":\"{}\"}}]",
            credential(b"Jefe", "150:P")
        );
        assert_eq!(field, expected);
    }
}

//! A resumable session's memory of what it sent (PROTOCOL.md section 5).
//!
//! The server numbers the text messages it sends after each `welcome`
//! (`peer-list` is 1); a resuming client says how many arrived (`seen`) and
//! gets the rest again. So a session keeps the messages its client may not
//! have: everything since the last pong (a pong proves the client's
//! WebSocket read all that was sent before the ping it answers), and, while
//! suspended, everything sent to it since. What it keeps is bounded by the
//! queue bound; over it, a connected session forgets its oldest messages
//! (a resume from before them is not honoured), a suspended one ends.

use std::collections::VecDeque;

use super::migrate::Held;

#[derive(Debug, Default)]
pub(super) struct Session {
    /// Messages numbered since the latest `welcome`; the next is `sent + 1`.
    sent: u64,
    /// Resumes so far: the count in the current resume token.
    pub(super) resumes: u32,
    /// The messages the client may not have, oldest first, with numbers.
    kept: VecDeque<(u64, Box<[u8]>)>,
    bytes: usize,
    /// The number of the last message sent before the last ping.
    ping_mark: u64,
    /// The client asked to resume another session, which could not be: its
    /// `welcome` says `"resumed":false`.
    pub(super) refused: bool,
    /// Cluster mode, just moved here: relays held until the nodes that
    /// sent them to the old node have flushed (see `migrate.rs`).
    pub(super) held: Option<Box<Held>>,
}

/// What keeping one more message came to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Kept {
    Yes,
    /// Over the bound: the oldest were forgotten (connected), or nothing
    /// was kept and the session must end (suspended).
    Over,
}

impl Session {
    /// Numbers `frame` (one text frame) and keeps it, within `limit` bytes.
    pub(super) fn keep(&mut self, frame: &[u8], limit: usize, suspended: bool) -> Kept {
        if suspended && self.bytes + frame.len() > limit {
            return Kept::Over;
        }
        self.sent += 1;
        self.bytes += frame.len();
        self.kept.push_back((self.sent, frame.into()));
        let mut kept = Kept::Yes;
        while self.bytes > limit {
            let (_, old) = self.kept.pop_front().expect("over the bound: not empty");
            self.bytes -= old.len();
            kept = Kept::Over;
        }
        kept
    }

    /// A ping goes out: what was sent so far will be proven received by
    /// its pong.
    pub(super) fn pinged(&mut self) {
        self.ping_mark = self.sent;
    }

    /// The pong came: forget what the client is known to have.
    pub(super) fn ponged(&mut self) {
        while self.kept.front().is_some_and(|(n, _)| *n <= self.ping_mark) {
            let (_, old) = self.kept.pop_front().expect("checked");
            self.bytes -= old.len();
        }
    }

    /// The messages after the first `seen`, if they are all kept: what a
    /// resume replays. `None` when `seen` claims more than was sent, or the
    /// messages right after it are forgotten.
    pub(super) fn after(&self, seen: u64) -> Option<Vec<Box<[u8]>>> {
        if seen > self.sent {
            return None;
        }
        let first = self.kept.front().map_or(self.sent + 1, |(n, _)| *n);
        if seen + 1 < first {
            return None;
        }
        let replay = self.kept.iter().filter(|(n, _)| *n > seen);
        Some(replay.map(|(_, frame)| frame.clone()).collect())
    }

    /// A resume happened: numbering starts again after the new `welcome`
    /// (the replayed messages are kept again, numbered from 1, by the
    /// caller), and the next token is another.
    pub(super) fn restart(&mut self) {
        self.sent = 0;
        self.kept.clear();
        self.bytes = 0;
        self.ping_mark = 0;
        self.resumes += 1;
        self.refused = false;
    }

    /// Everything kept, oldest first, forgotten here.
    pub(super) fn take_kept(&mut self) -> Vec<Box<[u8]>> {
        self.bytes = 0;
        self.kept.drain(..).map(|(_, frame)| frame).collect()
    }

    /// Bytes kept: what the session costs beyond its connection.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(session: &Session, seen: u64) -> Option<Vec<Vec<u8>>> {
        session
            .after(seen)
            .map(|frames| frames.into_iter().map(Vec::from).collect())
    }

    #[test]
    fn what_the_client_may_not_have_is_replayed() {
        let mut s = Session::default();
        for n in 1..=5u8 {
            assert_eq!(s.keep(&[n], 100, false), Kept::Yes);
        }
        assert_eq!(frames(&s, 3), Some(vec![vec![4], vec![5]]));
        assert_eq!(frames(&s, 5), Some(vec![]));
        assert_eq!(frames(&s, 6), None, "more than was sent");
        s.pinged();
        s.keep(&[6], 100, false);
        s.ponged();
        assert_eq!(frames(&s, 5), Some(vec![vec![6]]));
        assert_eq!(
            frames(&s, 4),
            None,
            "5 is forgotten: the pong proved it arrived"
        );
    }

    #[test]
    fn the_bound() {
        let mut s = Session::default();
        s.keep(&[1; 6], 10, false);
        assert_eq!(
            s.keep(&[2; 6], 10, false),
            Kept::Over,
            "the oldest is forgotten"
        );
        assert_eq!(frames(&s, 1), Some(vec![vec![2; 6]]));
        assert_eq!(frames(&s, 0), None);
        assert_eq!(
            s.keep(&[3; 6], 10, true),
            Kept::Over,
            "suspended: nothing kept"
        );
        assert_eq!(s.bytes(), 6);
        s.restart();
        assert_eq!((s.resumes, s.bytes()), (1, 0));
        assert_eq!(frames(&s, 0), Some(vec![]));
    }
}

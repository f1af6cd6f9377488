//! RESP2, the Redis protocol, as far as the cluster's two hot connections
//! need it: a reply's extent in a stream (to hand replies over whole), the
//! integer a `PUBLISH` answers, the error text of a failed command, and
//! the arrays of bulk strings that a subscription's messages are.
//!
//! <https://redis.io/docs/latest/develop/reference/protocol-spec/>

/// What a connection sent that is not RESP2: the connection is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// Arrays nested deeper than this are refused rather than followed (the
/// cluster's replies nest two levels).
const MAX_DEPTH: usize = 16;

/// The length of the first whole reply at the start of `data`, or None
/// while it is still incomplete.
pub fn reply_len(data: &[u8]) -> Result<Option<usize>, Malformed> {
    Framer::default().next(data)
}

/// Finds where replies end in bytes that arrive in pieces, reading each
/// element once: a large reply that takes many reads is not read again
/// from its start at each.
#[derive(Debug, Default)]
struct Framer {
    /// Where the next element of the reply being read starts.
    at: usize,
    /// Elements still to read, one entry per array level being read.
    open: Vec<i64>,
}

impl Framer {
    /// The length of the reply at the start of `data`, or None while it is
    /// incomplete; until it returns one, every call must pass the same
    /// reply's bytes, with more after them.
    fn next(&mut self, data: &[u8]) -> Result<Option<usize>, Malformed> {
        loop {
            let mut at = self.at;
            let Some(end) = line_end(data, at) else {
                return Ok(None);
            };
            // An empty line has no type byte.
            let kind = *data.get(at).filter(|_| end > at).ok_or(Malformed)?;
            let line = &data[at + 1..end];
            at = end + 2;
            match kind {
                b'+' | b'-' | b':' => {}
                b'$' => {
                    let len = number(line)?;
                    if len >= 0 {
                        let len = usize::try_from(len).map_err(|_| Malformed)?;
                        let body_end = at.checked_add(len).ok_or(Malformed)?;
                        let end = body_end.checked_add(2).ok_or(Malformed)?;
                        if data.len() < end {
                            return Ok(None);
                        }
                        if &data[body_end..end] != b"\r\n" {
                            return Err(Malformed);
                        }
                        at = end;
                    } else if len != -1 {
                        return Err(Malformed);
                    }
                }
                b'*' => {
                    let len = number(line)?;
                    if len > 0 {
                        if self.open.len() == MAX_DEPTH {
                            return Err(Malformed);
                        }
                        // Counted as read once its elements are.
                        self.open.push(len);
                        self.at = at;
                        continue;
                    } else if len < -1 {
                        return Err(Malformed);
                    }
                }
                _ => return Err(Malformed),
            }
            // One element read: close the arrays it completes.
            self.at = at;
            loop {
                match self.open.last_mut() {
                    None => {
                        self.at = 0;
                        return Ok(Some(at));
                    }
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
    }
}

/// A connection's bytes as they arrive, cut into whole replies.
#[derive(Debug, Default)]
pub struct Stream {
    /// The start of a reply not yet whole.
    partial: Vec<u8>,
    framer: Framer,
}

impl Stream {
    /// Passes each whole reply that `data` completes to `each`, in order,
    /// until the bytes are not RESP or `each` fails (the connection is
    /// then unusable).
    pub fn feed(
        &mut self,
        data: &[u8],
        mut each: impl FnMut(&[u8]) -> Result<(), Malformed>,
    ) -> Result<(), Malformed> {
        if self.partial.is_empty() {
            // Most reads end with a whole reply: nothing is copied.
            let (used, read) = self.cut(data, &mut each);
            self.partial.extend_from_slice(&data[used..]);
            return read;
        }
        let mut buffer = std::mem::take(&mut self.partial);
        buffer.extend_from_slice(data);
        let (used, read) = self.cut(&buffer, &mut each);
        buffer.drain(..used);
        self.partial = buffer;
        read
    }

    fn cut(
        &mut self,
        data: &[u8],
        each: &mut impl FnMut(&[u8]) -> Result<(), Malformed>,
    ) -> (usize, Result<(), Malformed>) {
        let mut used = 0;
        loop {
            match self.framer.next(&data[used..]) {
                Ok(Some(len)) => {
                    let reply = &data[used..used + len];
                    used += len;
                    if let Err(malformed) = each(reply) {
                        return (used, Err(malformed));
                    }
                }
                Ok(None) => return (used, Ok(())),
                Err(malformed) => return (used, Err(malformed)),
            }
        }
    }

    /// Forgets what it holds (the connection is gone).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// The integer of a whole integer reply (`:3\r\n`).
pub fn integer(reply: &[u8]) -> Option<i64> {
    let line = reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?;
    number(line).ok()
}

/// The text of a whole error reply (`-READONLY ...\r\n`).
pub fn error(reply: &[u8]) -> Option<&str> {
    let line = reply.strip_prefix(b"-")?.strip_suffix(b"\r\n")?;
    std::str::from_utf8(line).ok()
}

/// The elements of a whole reply that is an array of bulk strings (as a
/// subscription's `message` is), or None if it is anything else.
pub fn bulk_strings(reply: &[u8]) -> Option<Vec<&[u8]>> {
    let end = line_end(reply, 0)?;
    if reply.first() != Some(&b'*') {
        return None;
    }
    let count = usize::try_from(number(reply.get(1..end)?).ok()?).ok()?;
    let mut at = end + 2;
    // Each element takes at least 4 bytes.
    let mut items = Vec::with_capacity(count.min(reply.len() / 4));
    for _ in 0..count {
        let end = line_end(reply, at)?;
        let len = usize::try_from(number(reply.get(at..end)?.strip_prefix(b"$")?).ok()?).ok()?;
        let start = end + 2;
        let stop = start.checked_add(len)?;
        items.push(reply.get(start..stop)?);
        at = stop.checked_add(2)?;
    }
    (at == reply.len()).then_some(items)
}

/// Writes `PUBLISH {channel_prefix}{node} <payload>`, the payload
/// `payload_len` bytes long and written by `payload`.
pub fn push_publish(
    out: &mut Vec<u8>,
    channel_prefix: &[u8],
    node: &str,
    payload_len: usize,
    payload: impl FnOnce(&mut Vec<u8>),
) {
    out.extend_from_slice(b"*3\r\n$7\r\nPUBLISH\r\n$");
    push_number(out, channel_prefix.len() + node.len());
    out.extend_from_slice(channel_prefix);
    out.extend_from_slice(node.as_bytes());
    out.extend_from_slice(b"\r\n$");
    push_number(out, payload_len);
    let start = out.len();
    payload(out);
    debug_assert_eq!(out.len() - start, payload_len, "the payload's length");
    out.extend_from_slice(b"\r\n");
}

fn push_number(out: &mut Vec<u8>, n: usize) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{n}\r\n");
}

/// Where the line starting at `from` ends (its CR).
fn line_end(data: &[u8], from: usize) -> Option<usize> {
    let rest = data.get(from..)?;
    rest.windows(2).position(|w| w == b"\r\n").map(|i| from + i)
}

fn number(line: &[u8]) -> Result<i64, Malformed> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or(Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_replies_are_found_in_a_stream() {
        let replies: [&[u8]; 8] = [
            b":0\r\n",
            b"+OK\r\n",
            b"-READONLY You can't write against a read only replica.\r\n",
            b"$-1\r\n",
            b"$5\r\nR\r\nxy\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n*0\r\n$2\r\nbc\r\n",
        ];
        for reply in replies {
            assert_eq!(reply_len(reply), Ok(Some(reply.len())), "{reply:?}");
            let mut two = reply.to_vec();
            two.extend_from_slice(b":7\r\n");
            assert_eq!(reply_len(&two), Ok(Some(reply.len())), "{reply:?}");
            for cut in 0..reply.len() {
                assert_eq!(reply_len(&reply[..cut]), Ok(None), "{reply:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn a_stream_cuts_replies_however_its_bytes_arrive() {
        let replies: [&[u8]; 4] = [
            b":0\r\n",
            b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n*0\r\n$2\r\nbc\r\n",
            b"$-1\r\n",
            b"$5\r\nR\r\nxy\r\n",
        ];
        let all = replies.concat();
        for piece in [1, 2, 3, 7, all.len()] {
            let mut stream = Stream::default();
            let mut got: Vec<Vec<u8>> = Vec::new();
            for chunk in all.chunks(piece) {
                let fed = stream.feed(chunk, |reply| {
                    got.push(reply.to_vec());
                    Ok(())
                });
                assert_eq!(fed, Ok(()));
            }
            assert_eq!(got, replies.map(<[u8]>::to_vec), "pieces of {piece}");
            assert!(stream.partial.is_empty());
        }
        // A failing reader stops it.
        let mut stream = Stream::default();
        let mut seen = 0;
        let fed = stream.feed(&all, |_| {
            seen += 1;
            if seen == 2 {
                Err(Malformed)
            } else {
                Ok(())
            }
        });
        assert_eq!((fed, seen), (Err(Malformed), 2));
    }

    #[test]
    fn what_is_not_resp_is_malformed() {
        for data in [
            &b"\r\n"[..],
            b"*1\r\n\r\n",
            b"$18446744073709551614\r\n",
            b"?x\r\n",
            b"$x\r\n",
            b"$-2\r\n",
            b"*-2\r\n",
            b"$1\r\nabc\r\n",
            b"%1\r\n",
        ] {
            assert_eq!(reply_len(data), Err(Malformed), "{data:?}");
        }
        let deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
        assert_eq!(reply_len(&deep), Err(Malformed));
        assert_eq!(reply_len(&b"*1\r\n".repeat(MAX_DEPTH)), Ok(None));
    }

    #[test]
    fn integers_errors_and_messages_are_read() {
        assert_eq!(integer(b":12\r\n"), Some(12));
        assert_eq!(integer(b"+12\r\n"), None);
        assert_eq!(error(b"-ERR no\r\n"), Some("ERR no"));
        assert_eq!(error(b":1\r\n"), None);
        let message = b"*3\r\n$7\r\nmessage\r\n$4\r\np:n1\r\n$5\r\nR\r\nxy\r\n";
        assert_eq!(
            bulk_strings(message),
            Some(vec![&b"message"[..], b"p:n1", b"R\r\nxy"])
        );
        assert_eq!(
            bulk_strings(b"*3\r\n$9\r\nsubscribe\r\n$4\r\np:n1\r\n:1\r\n"),
            None
        );
        assert_eq!(bulk_strings(b"*1\r\n$1\r\nab\r\n"), None);
        for hostile in [
            &b"*4611686018427387904\r\n"[..],
            b"*1\r\n$18446744073709551615\r\n",
            b"*1\r\n\r\n",
            b"\r\n",
            b"",
        ] {
            assert_eq!(bulk_strings(hostile), None, "{hostile:?}");
        }
    }

    proptest::proptest! {
        /// Whatever a connection sends, reading it ends without a panic,
        /// and a whole reply found lies within the bytes.
        #[test]
        fn any_bytes_are_read_without_panic(
            data in proptest::collection::vec(
                proptest::sample::select(b"*$:+-\r\n0123456789-x".to_vec()), 0..64
            ),
        ) {
            if let Ok(Some(len)) = reply_len(&data) {
                proptest::prop_assert!(len <= data.len());
                let _ = bulk_strings(&data[..len]);
            }
            let _ = (integer(&data), error(&data), bulk_strings(&data));
        }
    }

    #[test]
    fn publish_commands_are_resp() {
        let mut out = Vec::new();
        push_publish(&mut out, b"p:node:", "n1", 4, |o| {
            o.extend_from_slice(b"R\r\nx")
        });
        assert_eq!(
            out,
            b"*3\r\n$7\r\nPUBLISH\r\n$9\r\np:node:n1\r\n$4\r\nR\r\nx\r\n".to_vec()
        );
        assert_eq!(reply_len(&out), Ok(Some(out.len())));
    }
}

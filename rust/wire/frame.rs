//! WebSocket frames (RFC 6455) as the server side of an open connection sees
//! them: masked client frames in, unmasked server frames out.
//!
//! Frame headers are parsed and written by tungstenite's codec
//! (`FrameHeader`); this module adds what a server owes on top of it: the
//! RFC's rules for masking, reserved bits, control frames and fragmentation,
//! a message-size bound checked before a payload is buffered, UTF-8
//! validation of text, and close-frame validation. Every violation is a
//! [`Fault`] whose close code the caller sends before closing.

use std::io::Cursor;
use std::mem;

use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::wire::close;

/// Most frames one message may span; a message of more fails with
/// [`Fault::TooManyFrames`]. Browsers send every message in one frame, and
/// a library that fragments a 64 KiB message into 64-byte frames stays
/// within it; without it, empty continuation frames could hold a message
/// open for ever, each costing a header parse.
pub const MAX_FRAMES_PER_MESSAGE: usize = 1024;

/// A complete unit handed to the caller by [`FrameReader::feed`].
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole text message (all its fragments), valid UTF-8.
    Text(&'a str),
    /// A whole binary message; its contents are not kept.
    Binary,
    /// A ping; the caller answers with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong (or an unsolicited one: both only prove liveness).
    Pong,
    /// The client's close frame, with its (valid) status code if it had one.
    /// Nothing after it is read.
    Close(Option<u16>),
}

/// What the caller wants after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop reading: the rest of the input is discarded.
    Stop,
}

/// A violation of the protocol by the client; the connection must close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 1002: masking, reserved bits, opcodes, control frames, fragmentation.
    Protocol,
    /// 1007: a text message or close reason that is not UTF-8.
    InvalidUtf8,
    /// 1009: a message larger than the configured limit.
    TooBig,
    /// 1009: a message of more than [`MAX_FRAMES_PER_MESSAGE`] frames.
    TooManyFrames,
}

impl Fault {
    pub fn close_code(self) -> u16 {
        match self {
            Fault::Protocol => close::PROTOCOL_ERROR,
            Fault::InvalidUtf8 => close::INVALID_UTF8,
            Fault::TooBig | Fault::TooManyFrames => close::TOO_BIG,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Fault::Protocol => "protocol error",
            Fault::InvalidUtf8 => "invalid utf-8",
            Fault::TooBig => "message too big",
            Fault::TooManyFrames => "too many frames in one message",
        }
    }
}

/// Buffers above this capacity are released once empty, so that an idle
/// connection costs no more than its struct.
const KEEP_CAPACITY: usize = 4096;

/// The receiving half of one connection's frame layer.
///
/// Holds only what must survive between reads: the bytes of an incomplete
/// frame and the fragmented message being assembled. Both are empty (and
/// unallocated) for a connection whose frames arrive whole, and the reader
/// is then 32 bytes: every idle peer has one.
#[derive(Debug, Default)]
pub struct FrameReader {
    partial: Vec<u8>,
    fragments: Option<Box<Fragments>>,
}

/// A fragmented message so far (browsers do not fragment what they send;
/// other clients seldom do).
#[derive(Debug)]
struct Fragments {
    /// Binary messages are refused whole: their bytes are not kept.
    binary: bool,
    /// The text message's bytes.
    message: Vec<u8>,
    /// Its bytes, kept or not.
    assembled: usize,
    frames: usize,
}

impl FrameReader {
    /// Parses `data`, the next bytes read from the socket, calling
    /// `on_event` for every complete message and control frame in order.
    ///
    /// `scratch` is a buffer the caller lends for unmasking (one per thread
    /// is enough). Messages over `max_message` bytes fail with
    /// [`Fault::TooBig`] as soon as their header announces it, before the
    /// payload is buffered. After an `Err`, or after `on_event` returned
    /// [`Flow::Stop`] or a close frame was read, the reader must not be fed
    /// again.
    pub fn feed<F>(
        &mut self,
        data: &[u8],
        max_message: usize,
        scratch: &mut Vec<u8>,
        mut on_event: F,
    ) -> Result<(), Fault>
    where
        F: FnMut(Event<'_>) -> Flow,
    {
        if self.partial.is_empty() {
            let consumed = self.parse(data, max_message, scratch, &mut on_event)?;
            if let Some(consumed) = consumed {
                self.partial.extend_from_slice(&data[consumed..]);
            }
            return Ok(());
        }
        let mut buffered = mem::take(&mut self.partial);
        buffered.extend_from_slice(data);
        let result = self.parse(&buffered, max_message, scratch, &mut on_event);
        if let Ok(Some(consumed)) = result {
            buffered.drain(..consumed);
            if buffered.is_empty() && buffered.capacity() > KEEP_CAPACITY {
                buffered = Vec::new();
            }
            self.partial = buffered;
        }
        result.map(|_| ())
    }

    /// Parses whole frames from `buf`. Returns how many bytes were consumed
    /// when it ran out of input, or `None` when reading must stop.
    fn parse<F>(
        &mut self,
        buf: &[u8],
        max_message: usize,
        scratch: &mut Vec<u8>,
        on_event: &mut F,
    ) -> Result<Option<usize>, Fault>
    where
        F: FnMut(Event<'_>) -> Flow,
    {
        let mut pos = 0;
        loop {
            let mut cursor = Cursor::new(&buf[pos..]);
            let (header, length) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Ok(Some(pos)),
                Err(_) => return Err(Fault::Protocol),
            };
            let header_len = cursor.position() as usize;
            let mask = self.check_header(&header, length, max_message)?;
            let length = length as usize; // bounded by check_header
            let start = pos + header_len;
            if buf.len() - start < length {
                return Ok(Some(pos));
            }
            pos = start + length;
            scratch.clear();
            scratch.extend_from_slice(&buf[start..pos]);
            apply_mask(scratch, mask);
            if self.dispatch(&header, scratch, on_event)? == Flow::Stop {
                return Ok(None);
            }
        }
    }

    /// Applies the RFC's header rules; returns the masking key.
    fn check_header(
        &self,
        header: &FrameHeader,
        length: u64,
        max_message: usize,
    ) -> Result<[u8; 4], Fault> {
        // RFC 6455 section 5.2: the most significant bit of a 64-bit
        // length must be 0.
        if header.rsv1 || header.rsv2 || header.rsv3 || length >> 63 != 0 {
            return Err(Fault::Protocol);
        }
        let Some(mask) = header.mask else {
            return Err(Fault::Protocol);
        };
        match header.opcode {
            OpCode::Control(_) => {
                if !header.is_final || length > 125 {
                    return Err(Fault::Protocol);
                }
            }
            OpCode::Data(data) => {
                let continuation = matches!(data, Data::Continue);
                let (assembled, frames) = self
                    .fragments
                    .as_ref()
                    .map_or((0, 0), |f| (f.assembled, f.frames));
                if continuation != self.fragments.is_some() {
                    // A continuation with nothing to continue, or a new
                    // message while one is still being assembled.
                    return Err(Fault::Protocol);
                }
                if length.saturating_add(assembled as u64) > max_message as u64 {
                    return Err(Fault::TooBig);
                }
                if continuation && frames >= MAX_FRAMES_PER_MESSAGE {
                    return Err(Fault::TooManyFrames);
                }
            }
        }
        Ok(mask)
    }

    fn dispatch<F>(
        &mut self,
        header: &FrameHeader,
        payload: &[u8],
        on_event: &mut F,
    ) -> Result<Flow, Fault>
    where
        F: FnMut(Event<'_>) -> Flow,
    {
        match header.opcode {
            OpCode::Control(Control::Ping) => Ok(on_event(Event::Ping(payload))),
            OpCode::Control(Control::Pong) => Ok(on_event(Event::Pong)),
            OpCode::Control(Control::Close) => {
                let code = parse_close_payload(payload)?;
                on_event(Event::Close(code));
                Ok(Flow::Stop)
            }
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(Fault::Protocol)
            }
            OpCode::Data(Data::Text) if header.is_final => {
                let text = std::str::from_utf8(payload).map_err(|_| Fault::InvalidUtf8)?;
                Ok(on_event(Event::Text(text)))
            }
            OpCode::Data(Data::Binary) if header.is_final => Ok(on_event(Event::Binary)),
            OpCode::Data(kind @ (Data::Text | Data::Binary)) => {
                let binary = matches!(kind, Data::Binary);
                self.fragments = Some(Box::new(Fragments {
                    binary,
                    message: if binary { Vec::new() } else { payload.to_vec() },
                    assembled: payload.len(),
                    frames: 1,
                }));
                Ok(Flow::Continue)
            }
            OpCode::Data(Data::Continue) => {
                // check_header saw that a message is being assembled.
                let Some(mut fragments) = self.fragments.take() else {
                    return Err(Fault::Protocol);
                };
                fragments.assembled += payload.len();
                fragments.frames += 1;
                if !fragments.binary {
                    fragments.message.extend_from_slice(payload);
                }
                if !header.is_final {
                    self.fragments = Some(fragments);
                    return Ok(Flow::Continue);
                }
                if fragments.binary {
                    return Ok(on_event(Event::Binary));
                }
                let text =
                    std::str::from_utf8(&fragments.message).map_err(|_| Fault::InvalidUtf8)?;
                Ok(on_event(Event::Text(text)))
            }
        }
    }
}

/// Validates a close frame's payload: empty, or a 2-byte code a peer may
/// send followed by a UTF-8 reason.
fn parse_close_payload(payload: &[u8]) -> Result<Option<u16>, Fault> {
    match payload {
        [] => Ok(None),
        [_] => Err(Fault::Protocol),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            // tungstenite's table predates 1014 (Bad Gateway, in the IANA
            // registry of RFC 6455 close codes); a peer may send it.
            if !(CloseCode::from(code).is_allowed() || code == 1014) {
                return Err(Fault::Protocol);
            }
            std::str::from_utf8(reason).map_err(|_| Fault::InvalidUtf8)?;
            Ok(Some(code))
        }
    }
}

/// XORs `buf` with the 4-byte masking key, eight bytes at a time.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let bytes: &mut [u8; 8] = chunk.try_into().expect("chunks of eight");
        *bytes = (u64::from_ne_bytes(*bytes) ^ word).to_ne_bytes();
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        // The remainder starts at a multiple of 8, so of 4: the key restarts.
        *byte ^= mask[i & 3];
    }
}

fn write_header(out: &mut Vec<u8>, opcode: OpCode, length: usize) {
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: None,
    };
    header
        .format(length as u64, out)
        .expect("writing to a Vec cannot fail");
}

/// Appends one unmasked text frame whose payload is `parts` concatenated.
pub fn push_text(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let length = parts.iter().map(|part| part.len()).sum();
    out.reserve(length + 10);
    write_header(out, OpCode::Data(Data::Text), length);
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// Appends a close frame with `code` and a short `reason`.
pub fn push_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    write_header(out, OpCode::Control(Control::Close), 2 + reason.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
}

/// Appends a ping frame with an empty payload.
pub fn push_ping(out: &mut Vec<u8>) {
    write_header(out, OpCode::Control(Control::Ping), 0);
}

/// Appends the pong answering a ping with `payload` (at most 125 bytes, as
/// the reader guarantees).
pub fn push_pong(out: &mut Vec<u8>, payload: &[u8]) {
    write_header(out, OpCode::Control(Control::Pong), payload.len());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1024;

    /// Builds a masked client frame.
    fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        let mut body = payload.to_vec();
        apply_mask(&mut body, mask);
        out.extend_from_slice(&body);
        out
    }

    #[derive(Debug, PartialEq, Eq, Clone)]
    enum Owned {
        Text(String),
        Binary,
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>),
    }

    fn feed_all(reader: &mut FrameReader, chunks: &[&[u8]]) -> (Vec<Owned>, Result<(), Fault>) {
        let mut events = Vec::new();
        let mut scratch = Vec::new();
        for chunk in chunks {
            let result = reader.feed(chunk, MAX, &mut scratch, |event| {
                events.push(match event {
                    Event::Text(text) => Owned::Text(text.to_owned()),
                    Event::Binary => Owned::Binary,
                    Event::Ping(payload) => Owned::Ping(payload.to_vec()),
                    Event::Pong => Owned::Pong,
                    Event::Close(code) => Owned::Close(code),
                });
                Flow::Continue
            });
            if result.is_err() {
                return (events, result);
            }
        }
        (events, Ok(()))
    }

    fn feed_one(bytes: &[u8]) -> (Vec<Owned>, Result<(), Fault>) {
        feed_all(&mut FrameReader::default(), &[bytes])
    }

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    #[test]
    fn text_frame() {
        let (events, result) = feed_one(&client_frame(0x81, b"hello", KEY));
        assert_eq!(result, Ok(()));
        assert_eq!(events, vec![Owned::Text("hello".into())]);
    }

    #[test]
    fn fragments_with_interleaved_ping() {
        let mut bytes = client_frame(0x01, b"hel", KEY);
        bytes.extend(client_frame(0x89, b"p", KEY));
        bytes.extend(client_frame(0x80, b"lo", KEY));
        let (events, result) = feed_one(&bytes);
        assert_eq!(result, Ok(()));
        assert_eq!(
            events,
            vec![Owned::Ping(b"p".to_vec()), Owned::Text("hello".into())]
        );
    }

    #[test]
    fn violations() {
        let cases: Vec<(Vec<u8>, Fault)> = vec![
            // unmasked
            (vec![0x81, 0x01, b'a'], Fault::Protocol),
            // reserved bits
            (client_frame(0xC1, b"a", KEY), Fault::Protocol),
            // reserved opcodes
            (client_frame(0x83, b"a", KEY), Fault::Protocol),
            (client_frame(0x8B, b"", KEY), Fault::Protocol),
            // fragmented control frame
            (client_frame(0x09, b"", KEY), Fault::Protocol),
            // oversized control frame
            (client_frame(0x89, &[0; 126], KEY), Fault::Protocol),
            // continuation without a start
            (client_frame(0x80, b"a", KEY), Fault::Protocol),
            // invalid UTF-8
            (client_frame(0x81, &[0xff, 0xfe], KEY), Fault::InvalidUtf8),
            // too big
            (client_frame(0x81, &[b'a'; MAX + 1], KEY), Fault::TooBig),
            // close with a one-byte payload, a forbidden code, a bad reason
            (client_frame(0x88, &[3], KEY), Fault::Protocol),
            (
                client_frame(0x88, &1005u16.to_be_bytes(), KEY),
                Fault::Protocol,
            ),
            (
                client_frame(0x88, &[0x03, 0xe8, 0xff], KEY),
                Fault::InvalidUtf8,
            ),
        ];
        for (bytes, fault) in cases {
            assert_eq!(feed_one(&bytes).1, Err(fault), "{bytes:02x?}");
        }
        // a new message while a fragmented one is open
        let mut bytes = client_frame(0x01, b"a", KEY);
        bytes.extend(client_frame(0x81, b"b", KEY));
        assert_eq!(feed_one(&bytes).1, Err(Fault::Protocol));
        // fragments that add up to more than the limit, text or binary
        for first in [0x01, 0x02] {
            let mut bytes = client_frame(first, &[b'a'; MAX / 2 + 1], KEY);
            bytes.extend(client_frame(0x80, &[b'a'; MAX / 2], KEY));
            assert_eq!(feed_one(&bytes).1, Err(Fault::TooBig));
        }
    }

    #[test]
    fn oversized_header_fails_before_payload_arrives() {
        let frame = client_frame(0x81, &[b'a'; 70_000], KEY);
        assert_eq!(feed_one(&frame[..14]).1, Err(Fault::TooBig));
    }

    #[test]
    fn a_64_bit_length_with_its_top_bit_set_is_a_protocol_error() {
        let mut frame = vec![0x81, 0x80 | 127];
        frame.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
        frame.extend_from_slice(&KEY);
        assert_eq!(feed_one(&frame).1, Err(Fault::Protocol));
    }

    #[test]
    fn a_message_spans_at_most_max_frames() {
        let message = |frames: usize| {
            let mut bytes = client_frame(0x01, b"a", KEY);
            for _ in 2..frames {
                bytes.extend(client_frame(0x00, b"", KEY));
            }
            bytes.extend(client_frame(0x80, b"b", KEY));
            bytes
        };
        let (events, result) = feed_one(&message(MAX_FRAMES_PER_MESSAGE));
        assert_eq!(result, Ok(()));
        assert_eq!(events, vec![Owned::Text("ab".into())]);
        // The count starts again with the next message.
        let mut two = message(MAX_FRAMES_PER_MESSAGE);
        two.extend(message(MAX_FRAMES_PER_MESSAGE));
        assert_eq!(feed_one(&two).0.len(), 2);
        let over = message(MAX_FRAMES_PER_MESSAGE + 1);
        assert_eq!(feed_one(&over).1, Err(Fault::TooManyFrames));
        assert_eq!(Fault::TooManyFrames.close_code(), 1009);
    }

    #[test]
    fn close_stops_reading() {
        let mut bytes = client_frame(0x88, &1000u16.to_be_bytes(), KEY);
        bytes.extend(client_frame(0x81, b"after", KEY));
        let (events, result) = feed_one(&bytes);
        assert_eq!(result, Ok(()));
        assert_eq!(events, vec![Owned::Close(Some(1000))]);
    }

    #[test]
    fn binary_fragments_are_one_event() {
        let mut bytes = client_frame(0x02, b"ab", KEY);
        bytes.extend(client_frame(0x80, b"cd", KEY));
        bytes.extend(client_frame(0x81, b"t", KEY));
        let (events, result) = feed_one(&bytes);
        assert_eq!(result, Ok(()));
        assert_eq!(events, vec![Owned::Binary, Owned::Text("t".into())]);
    }

    #[test]
    fn server_frames_have_minimal_headers() {
        for (len, header_len) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut out = Vec::new();
            let body = vec![b'x'; len];
            push_text(&mut out, &[&body]);
            assert_eq!(out.len(), header_len + len);
            assert_eq!(out[0], 0x81);
        }
        let mut out = Vec::new();
        push_close(&mut out, 4008, "slow consumer");
        assert_eq!(&out[..4], &[0x88, 15, 0x0f, 0xa8]);
    }

    fn arb_message() -> impl Strategy<Value = (bool, Vec<u8>, Vec<usize>)> {
        // (is_text, payload, fragment split points)
        (
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..300),
            prop::collection::vec(0usize..300, 0..4),
        )
    }

    proptest! {
        /// Any sequence of valid messages, fragmented anyhow and delivered
        /// in chunks of any size, yields the same events as whole delivery.
        #[test]
        fn chunking_does_not_matter(
            messages in prop::collection::vec(arb_message(), 1..6),
            cut in prop::collection::vec(1usize..64, 1..20),
            key in any::<[u8; 4]>(),
        ) {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for (is_text, payload, splits) in &messages {
                let payload: Vec<u8> = if *is_text {
                    String::from_utf8_lossy(payload).into_owned().into_bytes()
                } else {
                    payload.clone()
                };
                let mut points: Vec<usize> =
                    splits.iter().map(|s| s % (payload.len() + 1)).collect();
                points.sort_unstable();
                points.dedup();
                let mut bounds = vec![0];
                bounds.extend(points.into_iter().filter(|&p| p > 0 && p < payload.len()));
                bounds.push(payload.len());
                let pieces: Vec<&[u8]> = bounds.windows(2).map(|w| &payload[w[0]..w[1]]).collect();
                for (i, piece) in pieces.iter().enumerate() {
                    let opcode = if i > 0 { 0 } else if *is_text { 1 } else { 2 };
                    let fin = if i + 1 == pieces.len() { 0x80 } else { 0 };
                    stream.extend(client_frame(fin | opcode, piece, key));
                }
                if payload.len() <= MAX {
                    expected.push(if *is_text {
                        Owned::Text(String::from_utf8(payload).unwrap())
                    } else {
                        Owned::Binary
                    });
                }
            }
            let mut chunks = Vec::new();
            let mut rest: &[u8] = &stream;
            let mut sizes = cut.iter().cycle();
            while !rest.is_empty() {
                let n = (*sizes.next().unwrap()).min(rest.len());
                chunks.push(&rest[..n]);
                rest = &rest[n..];
            }
            let (events, result) = feed_all(&mut FrameReader::default(), &chunks);
            prop_assert_eq!(result, Ok(()));
            prop_assert_eq!(events, expected);
        }

        /// Arbitrary bytes never panic: they give events, a fault, or wait.
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
            cut in 1usize..50,
        ) {
            let chunks: Vec<&[u8]> = bytes.chunks(cut).collect();
            let _ = feed_all(&mut FrameReader::default(), &chunks);
        }

        #[test]
        fn mask_is_an_involution(bytes in prop::collection::vec(any::<u8>(), 0..100), key in any::<[u8; 4]>()) {
            let mut masked = bytes.clone();
            apply_mask(&mut masked, key);
            for (i, (m, b)) in masked.iter().zip(&bytes).enumerate() {
                prop_assert_eq!(*m, b ^ key[i % 4]);
            }
            apply_mask(&mut masked, key);
            prop_assert_eq!(masked, bytes);
        }
    }
}

//! A minimal WebSocket client over a plain `TcpStream`, for connections that
//! mostly just stay open. It writes the upgrade request by hand and parses
//! server frames incrementally; the only state kept per connection is a
//! frame header and the current message when it is wanted. Reads go through
//! one scratch buffer per thread, so an idle connection costs no buffer.

use std::cell::RefCell;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

use tokio::net::{TcpSocket, TcpStream};

/// Any 16 bytes, base64; the server's `Sec-WebSocket-Accept` is not checked.
const KEY: &str = "c2lnbmFsaW5nLWJlbmNoIQ==";

/// Largest response head accepted before the `\r\n\r\n`.
const MAX_HEAD: usize = 16 * 1024;

pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The HTTP upgrade request for `path` (e.g. `/ws/topic`).
pub fn upgrade_request(authority: &str, path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Looks for the end of the response head in `buf`. Returns the status code
/// and the length of the head (the bytes after it are frames) once it is
/// complete, `None` while more is needed.
pub fn parse_response(buf: &[u8]) -> Result<Option<(u16, usize)>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err("response head too large".into());
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8")?;
    let status_line = head.lines().next().unwrap_or("");
    let mut parts = status_line.split_ascii_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => code.parse().ok(),
        _ => None,
    };
    let status = status.ok_or_else(|| format!("bad status line {status_line:?}"))?;
    Ok(Some((status, end + 4)))
}

/// A client frame (masked) with a payload of at most 125 bytes.
pub fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    debug_assert!(payload.len() <= 125);
    out.push(0x80 | opcode);
    out.push(0x80 | payload.len() as u8);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// What a server frame (or a whole message) amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole text message, when messages are kept.
    Text(&'a [u8]),
    /// A whole data message that was not kept, with its first bytes.
    Skipped(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    Close(Option<u16>),
}

#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    Masked,
    Reserved(u8),
    BadControl,
    BadContinuation,
    TooLarge,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Masked => f.write_str("masked server frame"),
            Self::Reserved(b) => write!(f, "reserved bits or opcode in {b:#04x}"),
            Self::BadControl => f.write_str("fragmented or oversized control frame"),
            Self::BadContinuation => f.write_str("bad continuation frame"),
            Self::TooLarge => f.write_str("message over the size limit"),
        }
    }
}

/// The `type` of a JSON message from its first bytes, when it comes first
/// (as the servers write it); `None` otherwise.
pub fn message_type(prefix: &[u8]) -> Option<&str> {
    let rest = prefix.strip_prefix(br#"{"type":""#)?;
    let end = rest.iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()
}

/// Parses server frames from a byte stream fed in arbitrary pieces.
pub struct FrameReader {
    head: [u8; 10],
    head_len: usize,
    in_frame: bool,
    opcode: u8,
    fin: bool,
    remaining: u64,
    control: [u8; 125],
    control_len: usize,
    /// Opcode of the data message in progress (0: none).
    message_op: u8,
    message: Vec<u8>,
    /// The first bytes of a message that is not kept.
    prefix: [u8; PREFIX],
    prefix_len: usize,
    keep: bool,
    limit: usize,
}

/// Bytes kept of a skipped message: enough for `{"type":"peer-joined"`.
const PREFIX: usize = 32;

fn head_total(head: &[u8]) -> usize {
    match head.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    }
}

impl FrameReader {
    /// `keep`: collect text messages up to `limit` bytes and report them
    /// whole; otherwise only their end is reported.
    pub fn new(keep: bool, limit: usize) -> Self {
        Self {
            head: [0; 10],
            head_len: 0,
            in_frame: false,
            opcode: 0,
            fin: false,
            remaining: 0,
            control: [0; 125],
            control_len: 0,
            message_op: 0,
            message: Vec::new(),
            prefix: [0; PREFIX],
            prefix_len: 0,
            keep,
            limit,
        }
    }

    /// Stops keeping messages and frees the message buffer.
    pub fn discard_messages(&mut self) {
        self.keep = false;
        self.message = Vec::new();
    }

    fn begin(&mut self) -> Result<(), FrameError> {
        let (b0, b1) = (self.head[0], self.head[1]);
        if b1 & 0x80 != 0 {
            return Err(FrameError::Masked);
        }
        if b0 & 0x70 != 0 {
            return Err(FrameError::Reserved(b0));
        }
        let len = match b1 & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&self.head[2..10]);
                u64::from_be_bytes(bytes)
            }
            n => u64::from(n),
        };
        self.opcode = b0 & 0x0f;
        self.fin = b0 & 0x80 != 0;
        self.remaining = len;
        self.control_len = 0;
        match self.opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !self.fin || len > 125 {
                    return Err(FrameError::BadControl);
                }
            }
            0 => {
                if self.message_op == 0 {
                    return Err(FrameError::BadContinuation);
                }
            }
            1 | 2 => {
                if self.message_op != 0 {
                    return Err(FrameError::BadContinuation);
                }
                self.message_op = self.opcode;
            }
            _ => return Err(FrameError::Reserved(b0)),
        }
        if self.keeps_payload() && self.message.len() as u64 + len > self.limit as u64 {
            return Err(FrameError::TooLarge);
        }
        self.in_frame = true;
        Ok(())
    }

    fn keeps_payload(&self) -> bool {
        self.keep && self.opcode < 8 && self.message_op == OP_TEXT
    }

    fn absorb(&mut self, chunk: &[u8]) {
        if self.opcode >= 8 {
            self.control[self.control_len..self.control_len + chunk.len()].copy_from_slice(chunk);
            self.control_len += chunk.len();
        } else if self.keeps_payload() {
            self.message.extend_from_slice(chunk);
        } else {
            let n = chunk.len().min(PREFIX - self.prefix_len);
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&chunk[..n]);
            self.prefix_len += n;
        }
    }

    fn finish(&mut self, on: &mut dyn FnMut(Event<'_>)) {
        let control = &self.control[..self.control_len];
        match self.opcode {
            OP_CLOSE => {
                let code =
                    (control.len() >= 2).then(|| u16::from_be_bytes([control[0], control[1]]));
                on(Event::Close(code));
            }
            OP_PING => on(Event::Ping(control)),
            OP_PONG => on(Event::Pong),
            _ if self.fin => {
                if self.keeps_payload() {
                    on(Event::Text(&self.message));
                    self.message.clear();
                } else {
                    on(Event::Skipped(&self.prefix[..self.prefix_len]));
                }
                self.message_op = 0;
                self.prefix_len = 0;
            }
            _ => {}
        }
    }

    /// Parses `data`, calling `on` for each complete frame or message.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        on: &mut dyn FnMut(Event<'_>),
    ) -> Result<(), FrameError> {
        loop {
            if !self.in_frame {
                while self.head_len < head_total(&self.head[..self.head_len]) {
                    let Some((&b, rest)) = data.split_first() else {
                        return Ok(());
                    };
                    self.head[self.head_len] = b;
                    self.head_len += 1;
                    data = rest;
                }
                self.begin()?;
            }
            let take = self.remaining.min(data.len() as u64) as usize;
            self.absorb(&data[..take]);
            data = &data[take..];
            self.remaining -= take as u64;
            if self.remaining > 0 {
                return Ok(());
            }
            self.in_frame = false;
            self.head_len = 0;
            self.finish(on);
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 64 * 1024]);
}

/// Waits for data on `stream` and hands it to `f` from the thread's scratch
/// buffer. `Ok(None)` at end of stream.
pub async fn read_with<R>(
    stream: &TcpStream,
    mut f: impl FnMut(&[u8]) -> R,
) -> io::Result<Option<R>> {
    loop {
        stream.readable().await?;
        let result = SCRATCH.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            match stream.try_read(&mut buf) {
                Ok(0) => Some(Ok(None)),
                Ok(n) => Some(Ok(Some(f(&buf[..n])))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => Some(Err(e)),
            }
        });
        if let Some(result) = result {
            return result;
        }
    }
}

/// Writes all of `bytes`.
pub async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Connects to `addr`, from `source` when given (any free port of it; the
/// port is picked at connect time so ports are shared across destinations).
pub async fn open(addr: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = match addr {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "source addresses need an IPv4 server address",
                    ))
                }
            };
            let one: libc::c_int = 1;
            // SAFETY: the fd is open and owned by `socket`; the option value
            // is a c_int that outlives the call.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            socket.bind(SocketAddr::new(ip.into(), 0))?;
            socket.connect(addr).await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 0xffff => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[derive(Debug, PartialEq)]
    enum Owned {
        Text(String),
        Skipped(Vec<u8>),
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>),
    }

    fn collect(reader: &mut FrameReader, data: &[u8], step: usize) -> Vec<Owned> {
        let mut events = Vec::new();
        for chunk in data.chunks(step) {
            reader
                .feed(chunk, &mut |e| {
                    events.push(match e {
                        Event::Text(t) => Owned::Text(String::from_utf8(t.to_vec()).unwrap()),
                        Event::Skipped(p) => Owned::Skipped(p.to_vec()),
                        Event::Ping(p) => Owned::Ping(p.to_vec()),
                        Event::Pong => Owned::Pong,
                        Event::Close(c) => Owned::Close(c),
                    })
                })
                .unwrap();
        }
        events
    }

    fn sample_stream() -> (Vec<u8>, String) {
        let big = "x".repeat(70_000);
        let mut data = server_frame(OP_TEXT, true, br#"{"type":"welcome"}"#);
        data.extend(server_frame(OP_TEXT, true, big.as_bytes()));
        data.extend(server_frame(OP_TEXT, false, b"ab"));
        data.extend(server_frame(OP_PING, true, b"hi"));
        data.extend(server_frame(0, false, b""));
        data.extend(server_frame(0, true, b"cd"));
        data.extend(server_frame(OP_TEXT, true, b""));
        data.extend(server_frame(OP_CLOSE, true, &[0x0f, 0xa8, b'x']));
        (data, big)
    }

    #[test]
    fn parses_frames_in_any_pieces() {
        let (data, big) = sample_stream();
        let expected = vec![
            Owned::Text(r#"{"type":"welcome"}"#.into()),
            Owned::Text(big),
            Owned::Ping(b"hi".to_vec()),
            Owned::Text("abcd".into()),
            Owned::Text(String::new()),
            Owned::Close(Some(4008)),
        ];
        for step in [1, 2, 3, 7, 100, 1 << 20] {
            let mut reader = FrameReader::new(true, 1 << 20);
            assert_eq!(collect(&mut reader, &data, step), expected, "step {step}");
        }
    }

    #[test]
    fn skips_messages_when_not_keeping() {
        let (data, _) = sample_stream();
        let mut reader = FrameReader::new(true, 1 << 20);
        reader.discard_messages();
        let events = collect(&mut reader, &data, 5);
        assert_eq!(
            events,
            vec![
                Owned::Skipped(br#"{"type":"welcome"}"#.to_vec()),
                Owned::Skipped(vec![b'x'; PREFIX]),
                Owned::Ping(b"hi".to_vec()),
                Owned::Skipped(b"abcd".to_vec()),
                Owned::Skipped(Vec::new()),
                Owned::Close(Some(4008)),
            ]
        );
        assert_eq!(reader.message.capacity(), 0);
    }

    #[test]
    fn reads_message_types() {
        assert_eq!(
            message_type(br#"{"type":"peer-joined","peerId":"01"#),
            Some("peer-joined")
        );
        assert_eq!(message_type(br#"{"type":"peer-left"}"#), Some("peer-left"));
        assert_eq!(message_type(br#"{"type":"averyveryverylongtyp"#), None);
        assert_eq!(message_type(br#"{"peerId":"x","type":"a"}"#), None);
    }

    #[test]
    fn rejects_bad_frames() {
        let feed = |bytes: &[u8]| FrameReader::new(true, 100).feed(bytes, &mut |_| {});
        assert_eq!(
            feed(&[0x81, 0x81, 0, 0, 0, 0, b'a']),
            Err(FrameError::Masked)
        );
        assert_eq!(feed(&[0x00, 0x00]), Err(FrameError::BadContinuation));
        assert_eq!(feed(&[0x09, 0x00]), Err(FrameError::BadControl));
        assert_eq!(feed(&[0x83, 0x00]), Err(FrameError::Reserved(0x83)));
        assert_eq!(feed(&[0xc1, 0x00]), Err(FrameError::Reserved(0xc1)));
        assert_eq!(
            feed(&server_frame(OP_TEXT, true, &[b'a'; 101])),
            Err(FrameError::TooLarge)
        );
        let mut two_starts = server_frame(OP_TEXT, false, b"a");
        two_starts.extend(server_frame(OP_TEXT, true, b"b"));
        assert_eq!(feed(&two_starts), Err(FrameError::BadContinuation));
    }

    #[test]
    fn masks_client_frames() {
        let mut out = Vec::new();
        client_frame(OP_CLOSE, &1000u16.to_be_bytes(), [1, 2, 3, 4], &mut out);
        assert_eq!(out, [0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xe8 ^ 2]);
    }

    #[test]
    fn parses_response_head() {
        let req = String::from_utf8(upgrade_request("127.0.0.1:8081", "/ws/t")).unwrap();
        assert!(req.starts_with("GET /ws/t HTTP/1.1\r\nHost: 127.0.0.1:8081\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
        let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00";
        assert_eq!(parse_response(&resp[..20]), Ok(None));
        assert_eq!(parse_response(resp), Ok(Some((101, resp.len() - 2))));
        assert_eq!(
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"),
            Ok(Some((503, 36)))
        );
        assert!(parse_response(b"nonsense\r\n\r\n").is_err());
        assert!(parse_response(&vec![b'a'; MAX_HEAD + 1]).is_err());
    }
}

//! `RequestReader`: the request heads of one worker's connections, read by
//! [`crate::wire::request::read`].

use pyo3::prelude::*;

use crate::engine::Refusal;
use crate::wire::request::{self, Invalid, Reading};

/// The request that opened a connection, as read by [`request::read`].
#[pyclass(frozen, get_all, module = "signaling_sharded._native")]
pub struct Request {
    /// Bytes of the head; what follows is the connection's.
    head_length: usize,
    /// 0 when the request may be served; else the HTTP status to answer
    /// with, its `reason` and the `headers` it requires.
    status: u16,
    reason: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    method: String,
    /// The target's path in origin form, without the query.
    path: String,
    authorization: Option<String>,
    origin: Option<String>,
    /// A request to `/ws/{topic}`.
    joins: bool,
    /// The topic it joins, when valid.
    topic: Option<String>,
    /// `"invalid_topic"` or `"invalid_metadata"`: a valid upgrade whose
    /// parameters are not, upgraded only to be refused (`Hub.refuse`).
    invalid: Option<&'static str>,
    metadata: Option<String>,
    token: Option<String>,
    /// `resumable=1`.
    resumable: bool,
    /// `resume`: a session's token, and `seen`.
    resume: Option<String>,
    seen: Option<u64>,
    /// The `Sec-WebSocket-Accept` value of a valid upgrade.
    accept: Option<String>,
}

impl Request {
    fn new(head_length: usize, refusal: request::Refusal) -> Self {
        Self {
            head_length,
            status: refusal.status,
            reason: refusal.reason,
            headers: refusal.headers.to_vec(),
            method: String::new(),
            path: String::new(),
            authorization: None,
            origin: None,
            joins: false,
            topic: None,
            invalid: None,
            metadata: None,
            token: None,
            resumable: false,
            resume: None,
            seen: None,
            accept: None,
        }
    }
}

/// Reads the requests of one worker's connections, with its Origin
/// allow-list.
#[pyclass(frozen, module = "signaling_sharded._native")]
pub struct RequestReader {
    origins: Option<Vec<String>>,
}

#[pymethods]
impl RequestReader {
    /// `origins`: the allowed `Origin` values; None allows any.
    #[new]
    #[pyo3(signature = (origins=None))]
    fn new(origins: Option<Vec<String>>) -> Self {
        Self { origins }
    }

    /// The request at the start of `data` (everything read from the
    /// connection so far), or None while its head is incomplete.
    fn read(&self, data: &[u8]) -> Option<Request> {
        let read = match request::read(data, self.origins.as_deref()) {
            Reading::Incomplete => return None,
            Reading::Refused(refusal) => return Some(Request::new(data.len(), refusal)),
            Reading::Request(read) => read,
        };
        let mut answer = Request::new(read.head_len, request::Refusal::OK);
        answer.method = read.method.to_owned();
        answer.path = read.path.to_owned();
        answer.authorization = read.authorization.map(str::to_owned);
        answer.origin = read.origin.map(str::to_owned);
        let Some(join) = read.join else {
            return Some(answer);
        };
        answer.joins = true;
        match join.handshake {
            Ok(accept) => answer.accept = Some(accept),
            Err(refusal) => {
                answer.status = refusal.status;
                answer.reason = refusal.reason;
                answer.headers = refusal.headers.to_vec();
            }
        }
        match join.params {
            Ok(params) => {
                answer.topic = Some(params.topic);
                answer.metadata = params.metadata;
                answer.token = params.token;
                answer.resumable = params.resumable;
                if let Some((token, seen)) = params.resume {
                    answer.resume = Some(token);
                    answer.seen = seen;
                }
            }
            Err(Invalid::Topic) => answer.invalid = Some(Refusal::InvalidTopic.as_str()),
            Err(Invalid::Metadata) => answer.invalid = Some(Refusal::InvalidMetadata.as_str()),
        }
        Some(answer)
    }
}

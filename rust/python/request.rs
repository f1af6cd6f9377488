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
    /// The target's query, without the `?`.
    query: String,
    /// `Content-Length`, when sent once as a number.
    content_length: Option<usize>,
    /// `Content-Length` sent but unusable (repeated, not a number, or with
    /// `Transfer-Encoding`).
    bad_length: bool,
    /// A request under `/admin/v1/topics/{topic}`: the path after the
    /// topic (`""`, `"/peers"`, ...); `topic` is the topic when valid,
    /// else `invalid` is `"invalid_topic"`.
    admin: Option<String>,
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
            query: String::new(),
            content_length: None,
            bad_length: false,
            admin: None,
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
        answer.query = read.query.to_owned();
        match read.content_length {
            Ok(length) => answer.content_length = length,
            Err(()) => answer.bad_length = true,
        }
        if let Some(admin) = read.admin {
            answer.admin = Some(admin.rest.to_owned());
            match admin.topic {
                Some(topic) => answer.topic = Some(topic),
                None => answer.invalid = Some(Refusal::InvalidTopic.as_str()),
            }
        }
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

/// The parameters of a query, percent-decoded (`+` as a space); the first
/// of a repeated name counts; None if an escape or the UTF-8 is invalid.
#[pyfunction]
pub fn query_values(query: &str) -> Option<std::collections::HashMap<String, String>> {
    let mut values = std::collections::HashMap::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = request::decode_query_value(name)?;
        let value = request::decode_query_value(value)?;
        values.entry(name).or_insert(value);
    }
    Some(values)
}

//! Test hooks (feature `test-hooks`: on in `make build`, off in released
//! wheels): the frame and message parsers, for the property and
//! differential tests that drive them from Python. The server never calls
//! them.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::wire::frame::{Event, Fault, Flow, FrameReader};
use crate::wire::message::{self, Inbound};

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(frame_events, m)?)?;
    m.add_function(wrap_pyfunction!(message_answer, m)?)?;
    Ok(())
}

/// Events as `(kind, value)` pairs, and the close code of a fault.
type FrameEvents<'py> = (Vec<(&'static str, Bound<'py, PyAny>)>, Option<u16>);

/// The events a server reads from `data`, a stream of client frames, and
/// the close code of the fault that stopped it, if any. Exposed for tests
/// (property and differential tests from Python); the server itself never
/// calls it.
#[pyfunction]
fn frame_events<'py>(
    py: Python<'py>,
    data: &[u8],
    max_message: usize,
) -> PyResult<FrameEvents<'py>> {
    let mut events = Vec::new();
    let mut failure = None;
    let mut scratch = Vec::new();
    let result = FrameReader::default().feed(data, max_message, &mut scratch, |event| {
        let converted = match event {
            Event::Text(text) => ("text", text.into_pyobject(py).map(Bound::into_any)),
            Event::Binary => ("binary", Ok(py.None().into_bound(py))),
            Event::Ping(payload) => ("ping", Ok(PyBytes::new(py, payload).into_any())),
            Event::Pong => ("pong", Ok(py.None().into_bound(py))),
            Event::Close(code) => ("close", code.into_pyobject(py).map(Bound::into_any)),
        };
        match converted {
            (kind, Ok(value)) => events.push((kind, value)),
            (_, Err(err)) => failure = Some(err),
        }
        Flow::Continue
    });
    if let Some(err) = failure {
        return Err(err.into());
    }
    Ok((events, result.err().map(Fault::close_code)))
}

/// How the server answers one client text message: `("relay", type)`,
/// `("ping", None)`, `("broadcast", None)`, `("update-metadata", None)` or
/// `("error", code)`, with the
/// `msgId` it would echo.
/// Exposed for tests.
#[pyfunction]
fn message_answer(text: &str) -> (&'static str, Option<&'static str>, Option<String>) {
    match message::parse_inbound(text) {
        Ok(Inbound::Relay { kind, msg_id, .. }) => (
            "relay",
            Some(kind.name()),
            msg_id.map(|raw| raw.get().to_owned()),
        ),
        Ok(Inbound::Ping { msg_id }) => ("ping", None, msg_id.map(|raw| raw.get().to_owned())),
        Ok(Inbound::Broadcast { msg_id, .. }) => {
            ("broadcast", None, msg_id.map(|raw| raw.get().to_owned()))
        }
        Ok(Inbound::UpdateMetadata { msg_id, .. }) => (
            "update-metadata",
            None,
            msg_id.map(|raw| raw.get().to_owned()),
        ),
        Err(rejected) => (
            "error",
            Some(rejected.code.code()),
            rejected.msg_id.map(|raw| raw.get().to_owned()),
        ),
    }
}

//! The work for Redis, as typed operations the server's cluster link
//! carries out in order (see `engine::cluster::ClusterOp`).

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::engine::cluster::ClusterOp;
use crate::wire::reason::LeaveReason;
use crate::wire::resp;

/// Add local peer `peer` to `topic`; with `snapshot`, the hub waits for the
/// topic's members (`Hub.snapshot`).
#[pyclass(frozen, get_all, module = "signaling_sharded._native")]
pub struct JoinOp {
    topic: String,
    peer: String,
    metadata: Option<String>,
    snapshot: bool,
}

/// The reason of a leave of a remote peer found gone with its node (and of
/// the peers of a node found dead, in webhooks).
pub const NODE_LOST: &str = "node_lost";

/// Replace the metadata of local peer `peer` of `topic` (None: none).
#[pyclass(frozen, get_all, module = "signaling_sharded._native")]
pub struct UpdateOp {
    topic: String,
    peer: String,
    metadata: Option<String>,
}

/// Remove `peer` from `topic`.
#[pyclass(frozen, get_all, module = "signaling_sharded._native")]
pub struct LeaveOp {
    topic: String,
    peer: String,
    /// Why it left (a `peers_left` reason), or `"node_lost"`: a remote
    /// peer whose node was found gone.
    reason: &'static str,
}

/// Publish `message` (a resume asked of another node, for connection
/// `conn`) to the node holding `peer` of `topic`; the hub learns whether it
/// arrived with `Hub.asked(conn, reached)`.
#[pyclass(frozen, get_all, module = "signaling_sharded._native")]
pub struct AskOp {
    topic: String,
    peer: String,
    conn: u64,
    message: Py<PyBytes>,
}

/// Move local peer `peer` of `topic` to node `to` (its connection `conn`
/// there); a move that could not be goes back with `Hub.move_failed(peer)`.
#[pyclass(frozen, get_all, module = "signaling_sharded._native")]
pub struct MoveOp {
    topic: String,
    peer: String,
    to: String,
    conn: u64,
}

/// The `PUBLISH` of a message to another node's inbox, encoded (RESP),
/// to write to Redis as is. A relay that reaches no one goes back to the
/// hub with `Hub.undeliverable(op, ...)`.
#[pyclass(frozen, module = "signaling_sharded._native")]
pub struct PublishOp {
    #[pyo3(get)]
    command: Py<PyBytes>,
    /// Where the relay's message starts in `command`, if it is a relay.
    relay_at: Option<usize>,
}

#[pymethods]
impl PublishOp {
    /// Whether this carries a relay (else a frame bounced to its sender).
    #[getter]
    fn is_relay(&self) -> bool {
        self.relay_at.is_some()
    }
}

impl PublishOp {
    /// The relay message inside the command, if this carries one.
    pub(super) fn relay<'a>(&'a self, py: Python<'a>) -> Option<&'a [u8]> {
        let command = self.command.bind(py).as_bytes();
        // The command ends with the CRLF after the message.
        self.relay_at.map(|at| &command[at..command.len() - 2])
    }
}

/// `op` as the Python side takes it; `channel_prefix` names the inboxes.
pub(super) fn to_python<'py>(
    py: Python<'py>,
    channel_prefix: &[u8],
    op: &ClusterOp,
) -> PyResult<Bound<'py, PyAny>> {
    let object = match op {
        ClusterOp::Join {
            topic,
            peer,
            metadata,
            snapshot,
        } => Bound::new(
            py,
            JoinOp {
                topic: topic.to_string(),
                peer: peer.as_str().to_owned(),
                metadata: metadata.as_deref().map(str::to_owned),
                snapshot: *snapshot,
            },
        )?
        .into_any(),
        ClusterOp::Update {
            topic,
            peer,
            metadata,
        } => Bound::new(
            py,
            UpdateOp {
                topic: topic.to_string(),
                peer: peer.as_str().to_owned(),
                metadata: metadata.as_deref().map(str::to_owned),
            },
        )?
        .into_any(),
        ClusterOp::Leave {
            topic,
            peer,
            reason,
        } => Bound::new(
            py,
            LeaveOp {
                topic: topic.to_string(),
                peer: peer.as_str().to_owned(),
                reason: reason.map_or(NODE_LOST, LeaveReason::as_str),
            },
        )?
        .into_any(),
        ClusterOp::Ask {
            topic,
            peer,
            conn,
            message,
        } => Bound::new(
            py,
            AskOp {
                topic: topic.to_string(),
                peer: peer.as_str().to_owned(),
                conn: *conn,
                message: PyBytes::new(py, message).unbind(),
            },
        )?
        .into_any(),
        ClusterOp::Move {
            topic,
            peer,
            to,
            conn,
        } => Bound::new(
            py,
            MoveOp {
                topic: topic.to_string(),
                peer: peer.as_str().to_owned(),
                to: to.to_string(),
                conn: *conn,
            },
        )?
        .into_any(),
        ClusterOp::Publish {
            node,
            message,
            relay,
        } => {
            let mut command = Vec::with_capacity(48 + channel_prefix.len() + message.len());
            resp::push_publish(&mut command, channel_prefix, node, message.len(), |out| {
                out.extend_from_slice(message);
            });
            // The command ends with the message and a CRLF.
            let offset = command.len() - 2 - message.len();
            let op = PublishOp {
                command: PyBytes::new(py, &command).unbind(),
                relay_at: relay.then_some(offset),
            };
            Bound::new(py, op)?.into_any()
        }
    };
    Ok(object)
}

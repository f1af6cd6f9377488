//! What a connection sends: frames read, the rate limit applied, and each
//! message answered or relayed to its target.

use std::mem;
use std::sync::Arc;
use std::time::Instant;

use serde_json::value::RawValue;

use super::conn::{Closing, Queued, State};
use super::limits::Admission;
use super::outbox::{Action, ClusterOp, Outbox};
use super::{Engine, LeaveReason};
use crate::metrics::{cell, family, relay};
use crate::wire::close;
use crate::wire::frame::{self, Event, Flow};
use crate::wire::message::{self, ErrorCode, Inbound, RelayKind};
use crate::wire::request::MAX_METADATA;

impl<W> Engine<W> {
    /// Parses what `conn` sent and acts on every frame in it.
    pub(super) fn feed(&mut self, conn: u64, data: &[u8], now: Instant, out: &mut Outbox) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.state != State::Open {
            return; // closing: the rest of the input is of no interest
        }
        c.awaiting_pong = false;
        let mut reader = mem::take(&mut c.reader);
        let mut scratch = mem::take(&mut self.scratch);
        let max_message = self.config.max_message;
        let result = reader.feed(data, max_message, &mut scratch, |event| {
            self.on_event(conn, event, now, out)
        });
        self.scratch = scratch;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.reader = reader;
        }
        if let Err(fault) = result {
            self.close(conn, Closing::fault(fault), now, out);
        }
        self.close_doomed(now, out);
    }

    fn on_event(&mut self, conn: u64, event: Event<'_>, now: Instant, out: &mut Outbox) -> Flow {
        if let Event::Close(code) = event {
            self.end(conn, LeaveReason::Closed, out);
            frame::push_close(out.private(conn), code.unwrap_or(close::NORMAL), "");
            out.act(conn, Action::Close);
            return Flow::Stop;
        }
        // Every frame but a close counts against the rate limit: control
        // frames cost as much to answer as messages.
        match self.admit(conn, now) {
            Admission::Yes => self.on_frame(conn, event, now, out),
            Admission::Limited => {
                // A message is told why it was dropped; a ping is not
                // answered, a pong is ignored.
                if let Event::Text(_) | Event::Binary = event {
                    let msg_id = match event {
                        Event::Text(text) => message::msg_id_of(text),
                        _ => None,
                    };
                    self.send_error(conn, ErrorCode::RateLimited, msg_id, out);
                }
            }
            Admission::Abusive => {
                self.close(conn, Closing::RATE_ABUSE, now, out);
                return Flow::Stop;
            }
        }
        // A must-deliver write may have doomed this very connection.
        match self.conns.get(&conn) {
            Some(c) if c.state == State::Open && !self.doomed.contains(&conn) => Flow::Continue,
            _ => Flow::Stop,
        }
    }

    /// Answers a message or control frame the rate limit admitted.
    fn on_frame(&mut self, conn: u64, event: Event<'_>, now: Instant, out: &mut Outbox) {
        match event {
            Event::Text(text) => self.on_text(conn, text, now, out),
            Event::Binary => self.send_error(conn, ErrorCode::UnsupportedFrame, None, out),
            Event::Ping(payload) => {
                let mut pong = Vec::with_capacity(2 + payload.len());
                frame::push_pong(&mut pong, payload);
                self.send_control(conn, &pong, out);
            }
            Event::Pong => {
                // Everything sent before the ping it answers has arrived.
                let session = self.conns.get_mut(&conn).and_then(|c| c.session.as_mut());
                if let Some(session) = session {
                    session.ponged();
                }
            }
            Event::Close(_) => {}
        }
    }

    fn on_text(&mut self, conn: u64, text: &str, now: Instant, out: &mut Outbox) {
        match message::parse_inbound_with(text, &self.config.relay_types) {
            Ok(Inbound::Relay {
                kind,
                to,
                payload,
                msg_id,
            }) => {
                let from = self
                    .registry
                    .member(conn)
                    .expect("open connections are members")
                    .peer;
                let Some(target) = self.registry.find_in_topic_of(conn, &to) else {
                    if let Some((node, to)) = self.remote_target(conn, &to) {
                        let relay = super::cluster::Forwarded {
                            node,
                            to,
                            from,
                            kind,
                            payload,
                            msg_id,
                        };
                        return self.forward(relay, now, out);
                    }
                    self.count_relay(relay::TARGET_NOT_FOUND);
                    return self.send_error(conn, ErrorCode::TargetNotFound, msg_id, out);
                };
                let held = self.hold_local_relay(target, from, kind, payload, msg_id);
                if let Some(Queued::Yes) = held {
                    return; // counted when it goes out
                }
                let delivered = held.unwrap_or_else(|| {
                    self.queue_or_write(target, out, |buf| {
                        message::push_relay(buf, kind, from.as_str(), payload, msg_id);
                    })
                });
                if let Queued::OverBound = delivered {
                    self.count_relay(relay::DROPPED);
                    self.send_error(conn, ErrorCode::Dropped, msg_id, out);
                } else {
                    self.count_relay(relay::DELIVERED);
                }
            }
            Ok(Inbound::Broadcast { payload, msg_id }) => {
                self.broadcast_from_peer(conn, text.len(), payload, msg_id, now, out);
            }
            Ok(Inbound::UpdateMetadata { metadata, msg_id }) => {
                self.update_metadata(conn, metadata, msg_id, out);
            }
            Ok(Inbound::Ping { msg_id }) => {
                let mut pong = Vec::new();
                message::push_pong_message(&mut pong, msg_id);
                self.send_must(conn, &pong, out);
            }
            Err(rejected) => self.send_error(conn, rejected.code, rejected.msg_id, out),
        }
    }

    /// A peer's `broadcast`, within its bounds: encoded once, written to
    /// every other local member (and, in cluster mode, published once to
    /// each other node holding members); the sender gets one `dropped`
    /// with the number of members that missed it (in cluster mode, once
    /// every node has answered).
    fn broadcast_from_peer(
        &mut self,
        conn: u64,
        size: usize,
        payload: Option<&RawValue>,
        msg_id: Option<&RawValue>,
        now: Instant,
        out: &mut Outbox,
    ) {
        let Some(limits) = self.config.broadcast else {
            return self.send_error(conn, ErrorCode::Forbidden, msg_id, out);
        };
        if size > limits.max_size {
            return self.send_error(conn, ErrorCode::InvalidMessage, msg_id, out);
        }
        if !self.admit_broadcast(conn, limits.rate, now) {
            return self.send_error(conn, ErrorCode::RateLimited, msg_id, out);
        }
        let member = self
            .registry
            .member(conn)
            .expect("open connections are members");
        let (from, topic) = (member.peer, Arc::clone(&member.topic));
        let mut frame = Vec::new();
        message::push_relay(
            &mut frame,
            RelayKind::Broadcast,
            from.as_str(),
            payload,
            msg_id,
        );
        let seq = self.broadcast_to_nodes(&topic, &frame, conn, msg_id, now, out);
        let (reached, missed) = self.broadcast_message(&topic, Some(conn), frame, out);
        self.count_broadcast(reached, missed);
        match seq {
            // The other nodes' answers complete the count.
            Some(seq) => self.add_missed(seq, missed),
            None => self.report_missed(conn, msg_id, missed, out),
        }
    }

    /// Tells the sender of a broadcast, if it is still here, how many
    /// members missed it (nothing if none did).
    pub(super) fn report_missed(
        &mut self,
        conn: u64,
        msg_id: Option<&RawValue>,
        missed: usize,
        out: &mut Outbox,
    ) {
        if missed == 0 || !self.conns.contains_key(&conn) {
            return;
        }
        self.count_error(ErrorCode::Dropped);
        let mut dropped = Vec::new();
        message::push_dropped_broadcast(&mut dropped, msg_id, missed);
        self.send_must(conn, &dropped, out);
    }

    /// A peer's `update-metadata`: its metadata is replaced, and every
    /// other peer of the topic must hear of it (`peer-updated`, in the
    /// exact-view stream: a slow consumer is disconnected).
    fn update_metadata(
        &mut self,
        conn: u64,
        metadata: &RawValue,
        msg_id: Option<&RawValue>,
        out: &mut Outbox,
    ) {
        if self.conns.get(&conn).is_some_and(|c| c.metadata_locked) {
            return self.send_error(conn, ErrorCode::Forbidden, msg_id, out);
        }
        let text = metadata.get();
        if text.len() > MAX_METADATA {
            return self.send_error(conn, ErrorCode::InvalidMetadata, msg_id, out);
        }
        let metadata = (text != "null").then(|| Box::from(text));
        let member = self
            .registry
            .set_metadata(conn, metadata.clone())
            .expect("open connections are members");
        let (peer, topic) = (member.peer, Arc::clone(&member.topic));
        let mut updated = Vec::new();
        message::push_peer_updated(&mut updated, peer.as_str(), metadata.as_deref());
        self.broadcast_local(&topic, Some(conn), updated, out);
        if self.cluster.is_some() {
            // The other nodes hear of it through Redis, in the topic's order.
            let (topic, metadata) = (Arc::clone(&topic), metadata.clone());
            out.cluster.push(ClusterOp::Update {
                topic,
                peer,
                metadata,
            });
        }
        out.updated.push((peer, topic, metadata));
    }

    pub(super) fn count_broadcast(&self, reached: usize, missed: usize) {
        let copies = family::BROADCAST_COPIES;
        self.metrics
            .add(cell(copies, relay::DELIVERED), reached as u64);
        self.metrics
            .add(cell(copies, relay::DROPPED), missed as u64);
    }

    pub(super) fn count_relay(&self, result: usize) {
        self.metrics.add(cell(family::RELAYS, result), 1);
    }
}

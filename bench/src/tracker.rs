//! A long-lived peer that keeps its view of the topic up to date, for the
//! scenarios that check presence (`churn`'s observers and checkers, every
//! `fanout` peer). Its state is shared so the coordinator can read the view
//! while the peer runs, and ask it to update its metadata.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{watch, Notify};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, lock, stream_end, Failure, Incoming, Ws};
use crate::view::{self, Stamp, View};

/// The `msgId` of the application-level ping that flushes everything the
/// server queued for a peer before it.
pub const SYNC_ID: &str = "sync";
/// The `msgId` of the ping a peer sends after a round of metadata updates:
/// its answer says the server has taken every update of the round.
pub const UPDATED_ID: &str = "updated";

/// What the coordinator can see of a running peer.
#[derive(Default)]
pub struct Tracked {
    view: Mutex<View>,
    /// The last sync round answered (0: none).
    synced: AtomicU64,
    /// The server answered the sync ping with an error (it has no
    /// application-level ping), not with a pong.
    sync_by_error: AtomicBool,
    /// Error messages received, other than the answer to a sync ping.
    errors: AtomicU64,
    /// How the server ended the connection, if it did.
    ended: Mutex<Option<Failure>>,
    /// When the view first reached the goal size.
    reached: Mutex<Option<Duration>>,
    /// The peer's own metadata, if it gave a stamp: the one it joined with,
    /// advanced by every update it sent.
    stamp: Mutex<Option<Stamp>>,
    /// Updates asked for and not sent yet; `wake` tells the peer.
    pending_updates: AtomicU64,
    wake: Notify,
    /// Rounds of updates asked for, and answered by the server (the ping
    /// after them came back).
    rounds_wanted: AtomicU64,
    rounds_done: AtomicU64,
    updates_sent: AtomicU64,
}

impl Tracked {
    /// A peer that joined with this view and `stamp` as its metadata
    /// (`None`: it joined without metadata).
    pub fn with_stamp(view: View, stamp: Option<Stamp>) -> Self {
        Self {
            view: Mutex::new(view),
            stamp: Mutex::new(stamp),
            ..Self::default()
        }
    }

    /// The peer's metadata as the others must see it (`None`: none).
    pub fn metadata(&self) -> Option<String> {
        lock(&self.stamp).as_ref().map(Stamp::text)
    }

    /// Asks the peer for one round of `n` metadata updates (none if it has
    /// no stamp), followed by a ping; see [`Tracked::updates_settled`].
    pub fn request_updates(&self, n: u64) {
        self.rounds_wanted.fetch_add(1, Ordering::AcqRel);
        self.pending_updates.fetch_add(n, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// Whether the server answered the ping after every round asked for.
    pub fn updates_settled(&self) -> bool {
        self.rounds_done.load(Ordering::Acquire) >= self.rounds_wanted.load(Ordering::Acquire)
    }

    pub fn updates_sent(&self) -> u64 {
        self.updates_sent.load(Ordering::Relaxed)
    }

    pub fn view(&self) -> MutexGuard<'_, View> {
        lock(&self.view)
    }

    pub fn self_id(&self) -> Option<String> {
        self.view().self_id().map(str::to_owned)
    }

    pub fn synced(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
    }

    pub fn sync_by_error(&self) -> bool {
        self.sync_by_error.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The kind of failure that ended the connection, if the server did.
    pub fn ended(&self) -> Option<String> {
        lock(&self.ended).as_ref().map(|f| f.kind.clone())
    }

    pub fn is_open(&self) -> bool {
        lock(&self.ended).is_none()
    }

    pub fn reached(&self) -> Option<Duration> {
        *lock(&self.reached)
    }
}

/// Signals from the coordinator, shared by every tracked peer.
#[derive(Clone)]
pub struct Control {
    /// Becomes true when peers should close.
    pub stop: watch::Receiver<bool>,
    /// Each new value asks for one sync ping.
    pub sync: watch::Receiver<u64>,
}

/// A view size to reach: when the view first holds `size` ids, the time
/// since `t0` is recorded and `reached` and `finished` count one more.
/// `finished` also counts a peer whose connection the server ends first.
pub struct Goal {
    pub size: usize,
    pub t0: Instant,
    pub reached: Arc<AtomicUsize>,
    pub finished: Arc<AtomicUsize>,
}

struct Runner {
    state: Arc<Tracked>,
    who: String,
    goal: Option<Goal>,
    goal_done: bool,
    sync_round: u64,
    /// For each ping sent after a round of updates and not answered yet,
    /// the rounds asked for when it was sent.
    unanswered_rounds: VecDeque<u64>,
}

impl Runner {
    fn check_goal(&mut self, len: usize) {
        let Some(goal) = &self.goal else { return };
        if !self.goal_done && len >= goal.size {
            self.goal_done = true;
            *lock(&self.state.reached) = Some(goal.t0.elapsed());
            goal.reached.fetch_add(1, Ordering::Relaxed);
            goal.finished.fetch_add(1, Ordering::Release);
        }
    }

    fn handle(&mut self, text: &str) {
        let Ok(msg) = serde_json::from_str::<Incoming>(text) else {
            self.state.errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match msg.kind {
            "pong" if msg.msg_id == Some(SYNC_ID) => {
                self.state.synced.store(self.sync_round, Ordering::Release);
            }
            "pong" if msg.msg_id == Some(UPDATED_ID) => {
                if let Some(rounds) = self.unanswered_rounds.pop_front() {
                    self.state.rounds_done.store(rounds, Ordering::Release);
                }
            }
            "error" if msg.msg_id == Some(SYNC_ID) => {
                self.state.sync_by_error.store(true, Ordering::Relaxed);
                self.state.synced.store(self.sync_round, Ordering::Release);
            }
            "error" => {
                self.state.errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                let mut view = self.state.view();
                let result = view.apply(&msg);
                let len = view.len();
                drop(view);
                if let Err(v) = result {
                    view::shout(&self.who, v, &msg);
                }
                self.check_goal(len);
            }
        }
    }

    /// Sends the updates asked for since the last round, each advancing
    /// the stamp, then the ping whose answer settles the round.
    async fn send_updates(&mut self, ws: &mut Ws) -> Result<(), Failure> {
        let rounds = self.state.rounds_wanted.load(Ordering::Acquire);
        let n = self.state.pending_updates.swap(0, Ordering::AcqRel);
        for _ in 0..n {
            let text = {
                let mut stamp = lock(&self.state.stamp);
                let Some(stamp) = stamp.as_mut() else { break };
                stamp.advance();
                stamp.text()
            };
            ws.send(Message::text(client::update_metadata(&text)))
                .await
                .map_err(|err| Failure::new("ws_error", format!("update-metadata: {err}")))?;
            self.state.updates_sent.fetch_add(1, Ordering::Relaxed);
        }
        let ping = format!(r#"{{"type":"ping","msgId":"{UPDATED_ID}"}}"#);
        ws.send(Message::text(ping))
            .await
            .map_err(|err| Failure::new("ws_error", format!("ping after updates: {err}")))?;
        self.unanswered_rounds.push_back(rounds);
        Ok(())
    }

    fn end(&mut self, failure: Failure) {
        let mut ended = lock(&self.state.ended);
        if ended.is_none() {
            *ended = Some(failure);
            if let (Some(goal), false) = (&self.goal, self.goal_done) {
                self.goal_done = true;
                goal.finished.fetch_add(1, Ordering::Release);
            }
        }
    }
}

/// Runs one joined peer until the coordinator stops it (then it closes
/// with a close frame) or the server ends the connection.
pub async fn track(
    mut ws: Ws,
    state: Arc<Tracked>,
    mut ctl: Control,
    goal: Option<Goal>,
    who: String,
) {
    let mut runner = Runner {
        state,
        who,
        goal,
        goal_done: false,
        sync_round: 0,
        unanswered_rounds: VecDeque::new(),
    };
    let state = Arc::clone(&runner.state);
    let len = state.view().len();
    runner.check_goal(len);
    ctl.sync.mark_unchanged();
    let mut sync_open = true;
    loop {
        tokio::select! {
            biased;
            () = client::stopped(&mut ctl.stop) => {
                client::close(&mut ws, Duration::from_secs(2)).await;
                return;
            }
            changed = ctl.sync.changed(), if sync_open => {
                if changed.is_err() {
                    sync_open = false;
                    continue;
                }
                runner.sync_round = *ctl.sync.borrow_and_update();
                let ping = format!(r#"{{"type":"ping","msgId":"{SYNC_ID}"}}"#);
                if let Err(err) = ws.send(Message::text(ping)).await {
                    runner.end(Failure::new("ws_error", format!("sync ping: {err}")));
                    return;
                }
            }
            () = state.wake.notified() => {
                if let Err(failure) = runner.send_updates(&mut ws).await {
                    runner.end(failure);
                    return;
                }
            }
            item = ws.next() => match item {
                Some(Ok(Message::Text(text))) => runner.handle(&text),
                Some(Ok(Message::Close(frame))) => {
                    let code = client::close_code(frame.as_ref());
                    runner.end(Failure::closed(code, "by the server"));
                }
                Some(Ok(_)) => {}
                other => {
                    runner.end(stream_end(other, "while tracking"));
                    return;
                }
            }
        }
    }
}

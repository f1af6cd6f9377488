//! A long-lived peer that keeps its view of the topic up to date, for the
//! scenarios that check presence (`churn`'s observers and checkers, every
//! `fanout` peer). Its state is shared so the coordinator can read the view
//! while the peer runs.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, stream_end, Failure, Incoming, Ws};
use crate::view::{self, View};

/// The `msgId` of the application-level ping that flushes everything the
/// server queued for a peer before it.
pub const SYNC_ID: &str = "sync";

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
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tracked {
    pub fn with_view(view: View) -> Self {
        Self {
            view: Mutex::new(view),
            ..Self::default()
        }
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
    };
    let len = runner.state.view().len();
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

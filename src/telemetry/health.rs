//! Liveness and readiness state, written by the pipeline and read by `/healthz` and `/readyz`.
//!
//! Alive means: neither the Kafka poll loop nor the coordinator loop has gone without a beat for
//! longer than `pipeline.liveness_timeout`. Each loop beats every
//! [`HEARTBEAT_EVERY`](crate::pipeline::deadline::HEARTBEAT_EVERY), and waits through
//! [`beating`], which keeps beating while a bounded wait (a drain, a commit, a revoke reply) is
//! within its bound: a loop paused for backpressure or draining is alive, a wedged one is not.
//! A loop that has not started yet (start-up) or has ended on purpose (shutdown) is not judged.
//!
//! Ready means: in the consumer group, not shutting down, the dead-letter topic is not refusing
//! letters for good, and writes have not been failing continuously for longer than
//! `pipeline.unready_after`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::pipeline::deadline::{DEFAULT_LIVENESS_TIMEOUT, HEARTBEAT_EVERY};

/// A loop whose heartbeat makes liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    /// The thread that polls the consumer's main queue and runs the rebalance callbacks.
    KafkaPoll,
    /// The partition coordinator (assignments, supervision, commits).
    Coordinator,
}

impl Loop {
    const ALL: [Loop; 2] = [Loop::KafkaPoll, Loop::Coordinator];

    fn describe(self) -> &'static str {
        match self {
            Loop::KafkaPoll => "the Kafka poll loop",
            Loop::Coordinator => "the coordinator loop",
        }
    }
}

/// A heartbeat's state: [`NOT_STARTED`], [`ENDED`], or 1 + milliseconds since the base instant.
const NOT_STARTED: u64 = 0;
const ENDED: u64 = u64::MAX;

pub struct Health {
    in_group: AtomicBool,
    shutting_down: AtomicBool,
    /// Batches whose writes are failing right now, and since when at least one has been with
    /// no failing batch going through.
    failing: Mutex<(usize, Option<Instant>)>,
    /// Batches whose dead letters the topic refuses permanently right now, and the last error.
    refused: Mutex<(usize, String)>,
    unready_after: Duration,
    /// The last beat of each loop of [`Loop::ALL`], on tokio's clock (which tests can pause).
    beats: [AtomicU64; 2],
    base: tokio::time::Instant,
    liveness_timeout: Duration,
}

impl Health {
    /// Readiness with `unready_after`, liveness with the default bound
    /// ([`DEFAULT_LIVENESS_TIMEOUT`]; see [`Health::with_liveness_timeout`]).
    pub fn new(unready_after: Duration) -> Self {
        Health {
            in_group: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            failing: Mutex::new((0, None)),
            refused: Mutex::new((0, String::new())),
            unready_after,
            beats: [AtomicU64::new(NOT_STARTED), AtomicU64::new(NOT_STARTED)],
            base: tokio::time::Instant::now(),
            liveness_timeout: DEFAULT_LIVENESS_TIMEOUT,
        }
    }

    /// `/healthz` fails once a loop has not beaten for longer than `bound`.
    pub fn with_liveness_timeout(mut self, bound: Duration) -> Self {
        self.liveness_timeout = bound;
        self
    }

    fn beat_of(&self, l: Loop) -> &AtomicU64 {
        &self.beats[Loop::ALL.iter().position(|x| *x == l).unwrap_or(0)]
    }

    /// `l` is running: its next beat is due within the liveness bound.
    pub fn beat(&self, l: Loop) {
        let ms = tokio::time::Instant::now()
            .saturating_duration_since(self.base)
            .as_millis();
        let at = u64::try_from(ms).unwrap_or(ENDED - 1).saturating_add(1);
        self.beat_of(l).store(at.min(ENDED - 1), Ordering::Release);
    }

    /// `l` ended on purpose (shutdown): its silence is no longer a sign of a wedge.
    pub fn loop_ended(&self, l: Loop) {
        self.beat_of(l).store(ENDED, Ordering::Release);
    }

    /// Why the process should be restarted (a loop has been silent for longer than the bound),
    /// or `None` when it is alive.
    pub fn not_alive_reason(&self) -> Option<String> {
        let now = tokio::time::Instant::now().saturating_duration_since(self.base);
        for l in Loop::ALL {
            let at = self.beat_of(l).load(Ordering::Acquire);
            if at == NOT_STARTED || at == ENDED {
                continue;
            }
            let silent = now.saturating_sub(Duration::from_millis(at - 1));
            if silent > self.liveness_timeout {
                return Some(format!(
                    "{} has not run for {}s (pipeline.liveness_timeout is {}s): it is wedged; \
                     restart the process",
                    l.describe(),
                    silent.as_secs(),
                    self.liveness_timeout.as_secs()
                ));
            }
        }
        None
    }

    pub fn set_in_group(&self, v: bool) {
        self.in_group.store(v, Ordering::Release);
    }

    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// A batch's write failed for the first time. Pair with [`Health::failure_ended`].
    pub fn failure_began(&self) {
        let mut f = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        f.0 += 1;
        f.1.get_or_insert_with(Instant::now);
    }

    /// A batch that was failing succeeded (`recovered`) or was abandoned. A success while other
    /// batches still fail starts their clock again: writes go through, so they are not failing
    /// continuously (a store that sheds some requests all the time keeps batches failing in
    /// overlapping turns, and the instance ready).
    pub fn failure_ended(&self, recovered: bool) {
        let mut f = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        f.0 = f.0.saturating_sub(1);
        if f.0 == 0 {
            f.1 = None;
        } else if recovered {
            f.1 = Some(Instant::now());
        }
    }

    /// A batch's dead letters were refused by a permanent error: not ready at once, since the
    /// partition cannot move until an operator acts. Pair with [`Health::refusal_ended`].
    pub fn refusal_began(&self, error: &str) {
        let mut r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        r.0 += 1;
        r.1 = error.to_owned();
    }

    /// A batch whose dead letters were refused got them acknowledged, or was abandoned.
    pub fn refusal_ended(&self) {
        let mut r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        r.0 = r.0.saturating_sub(1);
    }

    /// Why the instance is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Some("shutting down".into());
        }
        if !self.in_group.load(Ordering::Acquire) {
            return Some("not in the consumer group".into());
        }
        {
            let r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
            if r.0 > 0 {
                return Some(format!(
                    "the dead-letter topic refuses letters ({}): fix the topic or its ACLs",
                    r.1
                ));
            }
        }
        let since = self.failing.lock().unwrap_or_else(|e| e.into_inner()).1;
        match since.map(|s| s.elapsed()) {
            Some(d) if d > self.unready_after => {
                Some(format!("writes failing for {}s", d.as_secs()))
            }
            _ => None,
        }
    }
}

/// Awaits `fut` while beating for `l` every [`HEARTBEAT_EVERY`], for at most `bound`: a wait
/// that outlives its own bound stops the beats, so a call that hangs past its deadline turns
/// `/healthz` unhealthy once the liveness bound has passed too.
pub async fn beating<F: Future>(health: &Health, l: Loop, bound: Duration, fut: F) -> F::Output {
    let stop_at = tokio::time::Instant::now() + bound;
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return out,
            _ = tick.tick() => {
                if tokio::time::Instant::now() <= stop_at {
                    health.beat(l);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_loop_silent_for_longer_than_the_bound_is_not_alive() {
        let h = Health::new(Duration::ZERO).with_liveness_timeout(Duration::from_secs(10));
        assert_eq!(h.not_alive_reason(), None, "no loop started yet");
        h.beat(Loop::KafkaPoll);
        h.beat(Loop::Coordinator);
        tokio::time::advance(Duration::from_secs(9)).await;
        h.beat(Loop::KafkaPoll);
        assert_eq!(h.not_alive_reason(), None, "within the bound");
        tokio::time::advance(Duration::from_secs(2)).await;
        let why = h.not_alive_reason().expect("the coordinator went quiet");
        assert!(
            why.contains("coordinator loop has not run for 11s"),
            "{why}"
        );
        assert!(why.contains("liveness_timeout is 10s"), "{why}");
        h.beat(Loop::Coordinator);
        assert_eq!(h.not_alive_reason(), None, "beating again");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(h.not_alive_reason().unwrap().contains("Kafka poll loop"));
        h.loop_ended(Loop::KafkaPoll);
        h.loop_ended(Loop::Coordinator);
        assert_eq!(
            h.not_alive_reason(),
            None,
            "loops that ended are not judged"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_beats_within_its_bound_and_stops_beating_after_it() {
        let h = Arc::new(Health::new(Duration::ZERO).with_liveness_timeout(Duration::from_secs(5)));
        h.beat(Loop::Coordinator);
        // A drain of 40 s, bounded at 60 s: alive throughout.
        let waiting = {
            let h = h.clone();
            tokio::spawn(async move {
                beating(
                    &h,
                    Loop::Coordinator,
                    Duration::from_secs(60),
                    tokio::time::sleep(Duration::from_secs(40)),
                )
                .await
            })
        };
        for _ in 0..39 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(h.not_alive_reason(), None);
        }
        waiting.await.unwrap();
        // A wait that hangs past its 3 s bound: beats stop at 3 s, unhealthy after 3 + 5 s.
        let hung = {
            let h = h.clone();
            tokio::spawn(async move {
                beating(
                    &h,
                    Loop::Coordinator,
                    Duration::from_secs(3),
                    std::future::pending::<()>(),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(7500)).await;
        assert_eq!(
            h.not_alive_reason(),
            None,
            "within bound + liveness timeout"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            h.not_alive_reason().is_some(),
            "a hung wait stops the beats"
        );
        hung.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_follows_group_membership_failures_and_shutdown() {
        let unready_after = Duration::from_secs(60);
        let past_it = || tokio::time::advance(unready_after + Duration::from_secs(1));
        let h = Health::new(unready_after);
        assert!(h.not_ready_reason().unwrap().contains("group"));
        h.set_in_group(true);
        assert_eq!(h.not_ready_reason(), None);
        h.failure_began();
        h.failure_began();
        assert_eq!(h.not_ready_reason(), None, "not failing for long yet");
        past_it().await;
        assert!(h.not_ready_reason().unwrap().contains("failing"));
        h.failure_ended(false);
        assert!(
            h.not_ready_reason().is_some(),
            "one still failing, one abandoned"
        );
        // Batches failing in overlapping turns, one going through: not failing continuously.
        h.failure_began();
        h.failure_ended(true);
        assert_eq!(h.not_ready_reason(), None, "a write went through just now");
        past_it().await;
        assert!(h.not_ready_reason().is_some(), "nothing went through since");
        h.failure_ended(false);
        assert_eq!(h.not_ready_reason(), None);
        h.refusal_began("Broker: Topic authorization failed");
        assert!(h.not_ready_reason().unwrap().contains("authorization"));
        h.refusal_ended();
        assert_eq!(h.not_ready_reason(), None);
        h.set_shutting_down();
        assert_eq!(h.not_ready_reason().as_deref(), Some("shutting down"));
    }
}

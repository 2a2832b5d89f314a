//! Liveness and readiness state, written by the pipeline and read by `/healthz` and `/readyz`.
//!
//! Ready means: in the consumer group, not shutting down, the dead-letter topic is not refusing
//! letters for good, and writes have not been failing continuously for longer than
//! `pipeline.unready_after`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Health {
    in_group: AtomicBool,
    shutting_down: AtomicBool,
    /// Batches whose writes are failing right now, and since when at least one has been.
    failing: Mutex<(usize, Option<Instant>)>,
    /// Batches whose dead letters the topic refuses permanently right now, and the last error.
    refused: Mutex<(usize, String)>,
    unready_after: Duration,
}

impl Health {
    pub fn new(unready_after: Duration) -> Self {
        Health {
            in_group: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            failing: Mutex::new((0, None)),
            refused: Mutex::new((0, String::new())),
            unready_after,
        }
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

    /// A batch that was failing succeeded or was abandoned.
    pub fn failure_ended(&self) {
        let mut f = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        f.0 = f.0.saturating_sub(1);
        if f.0 == 0 {
            f.1 = None;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_group_membership_failures_and_shutdown() {
        let h = Health::new(Duration::ZERO);
        assert!(h.not_ready_reason().unwrap().contains("group"));
        h.set_in_group(true);
        assert_eq!(h.not_ready_reason(), None);
        h.failure_began();
        h.failure_began();
        std::thread::sleep(Duration::from_millis(2));
        assert!(h.not_ready_reason().unwrap().contains("failing"));
        h.failure_ended();
        assert!(h.not_ready_reason().is_some(), "one batch still failing");
        h.failure_ended();
        assert_eq!(h.not_ready_reason(), None);
        h.refusal_began("Broker: Topic authorization failed");
        assert!(h.not_ready_reason().unwrap().contains("authorization"));
        h.refusal_ended();
        assert_eq!(h.not_ready_reason(), None);
        h.set_shutting_down();
        assert_eq!(h.not_ready_reason().as_deref(), Some("shutting down"));
    }
}

//! Liveness and readiness state, written by the pipeline and read by `/healthz` and `/readyz`.
//!
//! Ready means: in the consumer group, not shutting down, and writes have not been failing
//! continuously for longer than `pipeline.unready_after`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Health {
    in_group: AtomicBool,
    shutting_down: AtomicBool,
    /// Batches whose writes are failing right now, and since when at least one has been.
    failing: Mutex<(usize, Option<Instant>)>,
    unready_after: Duration,
}

impl Health {
    pub fn new(unready_after: Duration) -> Self {
        Health {
            in_group: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            failing: Mutex::new((0, None)),
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

    /// Why the instance is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Some("shutting down".into());
        }
        if !self.in_group.load(Ordering::Acquire) {
            return Some("not in the consumer group".into());
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
        h.set_shutting_down();
        assert_eq!(h.not_ready_reason().as_deref(), Some("shutting down"));
    }
}

//! Deadlines: the one place that says how long each stop may take, and what happens when it is
//! reached.
//!
//! A stop (revoke or shutdown) has two instants:
//! - **abandon**: the configured timeout (`pipeline.revoke_timeout`, `pipeline.shutdown_timeout`)
//!   after the stop began. The stopping partitions' cancellation tokens fire: their batches stop
//!   retrying and are acknowledged as abandoned, so nothing at or after them is committed.
//! - **give up**: [`DRAIN_GRACE`] later. Partition tasks that have still not ended (they only
//!   await acknowledgements, which abandonment answers at once, so this is a safety net) are
//!   aborted; what they had made durable is still committed.
//!
//! Whoever waits on a stop from outside (the rebalance callback waiting for the coordinator)
//! waits until give up plus two commits (the periodic one in flight, then the revoke's own):
//! [`Deadlines::revoke_reply_wait`].
//!
//! Liveness is bounded here too: the Kafka poll loop and the coordinator loop beat every
//! [`HEARTBEAT_EVERY`], also while they wait on one of the bounded calls above (for as long as
//! its bound, not longer), and `/healthz` fails once a beat is older than
//! `pipeline.liveness_timeout` ([`DEFAULT_LIVENESS_TIMEOUT`]).

use std::time::Duration;

use tokio::time::Instant;

/// How long after the abandon instant a stopping partition task may take to end.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How long one synchronous commit or seek may take before it is treated as failed.
pub const KAFKA_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping static member with `kafka.leave_group_on_shutdown = "scale-down"` waits
/// for the Kubernetes API to say whether its pod is scaled away (see `crate::kubernetes`); past
/// it, the member leaves the group.
pub const KUBERNETES_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the run waits for the consumer to close after a fatal error (a fenced member
/// cannot leave the group, and librdkafka's close may never complete).
pub const FATAL_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How long `vault run` keeps retrying a transient failure to connect to ScyllaDB at start-up
/// before it exits with the error.
pub const STARTUP_CONNECT_PATIENCE: Duration = Duration::from_secs(60);

/// How long shutdown keeps re-sending a final commit the broker refuses during a rebalance.
pub const FINAL_COMMIT_RETRY: Duration = Duration::from_secs(5);

/// Each broker call of the group view (see `kafka::group_view`): short, because shutdown
/// waits for a view read under way before it closes the consumer.
pub const GROUP_VIEW_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a failing batch keeps its claim on the retry half of the in-flight memory at a
/// time (see `pipeline::batch::Batch::may_keep_retrying`): then, while partitions wait for
/// memory, it gives its memory back and its partition restarts, so that batches that keep
/// failing take turns rather than keep it for good.
pub const RETRY_HOLD_TURN: Duration = Duration::from_secs(60);

/// How often the Kafka poll loop and the coordinator loop beat (see
/// [`crate::telemetry::health`]), also while they wait.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// The default of `pipeline.liveness_timeout`: how old the last beat of a loop may be before
/// `/healthz` fails. Every wait of a loop beats up to its own bound, so a healthy loop is never
/// silent for more than about [`HEARTBEAT_EVERY`]; the default is still six times the longest
/// single Kafka call ([`KAFKA_CALL_TIMEOUT`]), so a slow machine is never restarted for being
/// slow.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);

/// The smallest `pipeline.liveness_timeout` accepted: a few beats, so one late beat never fails
/// the check.
pub const MIN_LIVENESS_TIMEOUT: Duration = Duration::from_secs(3);

/// The two instants of one stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop {
    /// Batches of the stopping partitions are cancelled (abandoned) here.
    pub abandon_at: Instant,
    /// Partition tasks still running are aborted here.
    pub give_up_at: Instant,
}

/// The configured stop timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    pub revoke_timeout: Duration,
    pub shutdown_timeout: Duration,
}

impl Deadlines {
    pub fn revoke(&self, now: Instant) -> Stop {
        stop(now, self.revoke_timeout)
    }

    pub fn shutdown(&self, now: Instant) -> Stop {
        stop(now, self.shutdown_timeout)
    }

    /// How long the rebalance callback waits for the coordinator to drain and commit revoked
    /// partitions: the whole revoke stop (counted from when the callback began to wait), then
    /// the periodic commit in flight and the revoke's own commit, each bounded.
    pub fn revoke_reply_wait(&self) -> Duration {
        self.revoke_timeout + DRAIN_GRACE + 2 * KAFKA_CALL_TIMEOUT
    }

    /// The longest shutdown's drain and final commits may take: the whole shutdown stop, the
    /// commit in flight, and the final commit re-sent for up to [`FINAL_COMMIT_RETRY`] (each
    /// try bounded).
    pub fn shutdown_wait(&self) -> Duration {
        self.shutdown_timeout + DRAIN_GRACE + FINAL_COMMIT_RETRY + 2 * KAFKA_CALL_TIMEOUT
    }
}

/// The longest the steps after shutdown's final commit may take, with `topics` subscribed:
/// reading the StatefulSet's scale ([`KUBERNETES_CALL_TIMEOUT`]), leaving the group (two Kafka
/// calls), a group-view read under way (four calls of [`GROUP_VIEW_CALL_TIMEOUT`] per topic)
/// and closing the consumer ([`KAFKA_CALL_TIMEOUT`]). With [`Deadlines::shutdown_wait`], what a
/// pod's termination grace period must cover for a stop to end in exit 0 rather than a kill
/// (deploy/k8s/statefulset.yaml); a kill there is harmless to the guarantee, as everything
/// durable is committed by then.
pub fn after_final_commit(topics: usize) -> Duration {
    KUBERNETES_CALL_TIMEOUT
        + 2 * KAFKA_CALL_TIMEOUT
        + 4 * GROUP_VIEW_CALL_TIMEOUT * u32::try_from(topics).unwrap_or(u32::MAX)
        + KAFKA_CALL_TIMEOUT
}

fn stop(now: Instant, timeout: Duration) -> Stop {
    let abandon_at = now + timeout;
    Stop {
        abandon_at,
        give_up_at: abandon_at + DRAIN_GRACE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callback_waits_longer_than_the_whole_revoke_stop() {
        let d = Deadlines {
            revoke_timeout: Duration::from_secs(20),
            shutdown_timeout: Duration::from_secs(30),
        };
        let now = Instant::now();
        let s = d.revoke(now);
        assert_eq!(s.abandon_at - now, Duration::from_secs(20));
        assert_eq!(s.give_up_at - s.abandon_at, DRAIN_GRACE);
        assert!(now + d.revoke_reply_wait() > s.give_up_at);
        assert_eq!(d.shutdown(now).abandon_at - now, Duration::from_secs(30));
    }
}

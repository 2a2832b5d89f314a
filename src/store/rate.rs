//! The write rate limit: at most `scylla.max_rows_per_second` event rows written per second by
//! this instance, across all persisters (for a cluster shared with other tenants).
//!
//! One owner. [`Bucket`] is the pure decision, a token bucket kept as one instant (when it is
//! full again; a GCRA): it holds one second's worth of rows, so a burst of that many goes at
//! once, and a request larger than that goes when the bucket is full and pays for the rest
//! afterwards (the next requests wait for it). So a request of any size passes eventually: the
//! limit never deadlocks. [`RowRate`] wraps the bucket for the persisters, who ask it before
//! each store write request (see `store::persister`), and exports
//! `vault_write_rate_limit_rows_per_second` and `vault_write_rate_limited_seconds_total`.
//!
//! Requests are served in order: the one at the head of the line waits for its rows while
//! holding the bucket (an async mutex, which is fair), and takes them only once they may go.
//! A wait that is dropped (its batch was cancelled or abandoned) therefore takes nothing. Rows
//! taken are held by an [`Admitted`] until the request is sent ([`Admitted::sent`], once it has
//! its write slot); rows admitted and then dropped unsent (the batch was cancelled while it
//! waited for a slot) are given back, as much of their cost as the bucket had not refilled
//! when they were dropped ([`Bucket::give_back`]), so that nobody is charged for rows that
//! were never written and nobody is let through on the debt of rows that were.
//!
//! Invariant kept: the limit only delays writes. It holds no write slot and no concurrency
//! permit while it waits, it never answers for the store, and a batch is acknowledged only when
//! the store acknowledges its rows, as without it; so what is committed does not change.
//!
//! Why not the `governor` crate: its clock is its own (`quanta`, or `std::time::Instant`), and
//! its waits are `futures-timer` delays, not tokio's, so neither follows tokio's paused clock
//! (`tokio::time::pause`): a test of the limit through it would have to sleep for real and hope.
//! (It also refuses outright a request larger than its burst, `InsufficientCapacity`, where a
//! batch's request must pass eventually.) Everything here reads [`tokio::time::Instant`] and
//! sleeps with [`tokio::time::sleep_until`], so the tests below and those of the persisters run
//! on the paused clock, exactly.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{Counter, IntGauge};
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;

/// What the bucket holds: one second's worth of rows.
pub const BURST: Duration = Duration::from_secs(1);

/// The token bucket, pure: told what is taken and when, it says when a request may go.
///
/// Its state is the instant it is full again once everything taken so far has been paid for
/// at the rate; how far that lies ahead of now is the bucket's debt. A request of `rows` costs
/// `rows / per_second` seconds, and may go once the debt plus its cost fits in [`BURST`], or,
/// for a request costing more than [`BURST`], once the debt is zero (the bucket is full).
#[derive(Debug, Clone)]
pub struct Bucket {
    per_second: u64,
    /// `None`: nothing taken yet, full.
    full_at: Option<Instant>,
    /// Everything given back so far ([`Bucket::give_back`]): each give-back moves the debt
    /// taken after it earlier by what it gave.
    given_back: Duration,
}

/// What a [`Bucket::take`] left: when its rows are refilled, as of that take.
#[derive(Debug, Clone, Copy)]
pub struct Taken {
    paid_at: Instant,
    /// The bucket's `given_back` at the take.
    given_back: Duration,
}

impl Bucket {
    /// A full bucket refilling at `per_second` rows per second (at least 1).
    pub fn new(per_second: u64) -> Bucket {
        Bucket {
            per_second: per_second.max(1),
            full_at: None,
            given_back: Duration::ZERO,
        }
    }

    pub fn per_second(&self) -> u64 {
        self.per_second
    }

    /// How long `rows` take to refill at the rate, rounded up to the nanosecond.
    pub fn cost(&self, rows: u64) -> Duration {
        let nanos = (u128::from(rows) * 1_000_000_000).div_ceil(u128::from(self.per_second));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The earliest instant, not before `now`, at which `rows` may go.
    pub fn ready_at(&self, rows: u64, now: Instant) -> Instant {
        let Some(full_at) = self.full_at else {
            return now;
        };
        // The debt the request may find: what the bucket holds beyond its cost.
        let allowed = BURST.saturating_sub(self.cost(rows));
        full_at
            .checked_sub(allowed)
            .map_or(now, |ready| ready.max(now))
    }

    /// Takes `rows` at `now` (at or after [`Bucket::ready_at`]); returns what a
    /// [`Bucket::give_back`] of them needs.
    pub fn take(&mut self, rows: u64, now: Instant) -> Taken {
        let from = self.full_at.map_or(now, |full_at| full_at.max(now));
        let paid_at = from + self.cost(rows);
        self.full_at = Some(paid_at);
        Taken {
            paid_at,
            given_back: self.given_back,
        }
    }

    /// Gives back, at `now`, rows of `cost` that were `taken` and dropped unsent at `dropped`
    /// (nothing has been taken since: every take settles what was dropped first): the part of
    /// their cost not refilled by then.
    ///
    /// The debt is paid in the order it was taken, so their cost was being refilled up to
    /// `paid_at`, moved earlier by what was given back since their take (rows given back ahead
    /// of them; counting those given back behind them too only gives back less). What lay ahead
    /// of `dropped`, at most `cost`, is theirs alone: rows taken after them keep their debt.
    pub fn give_back(&mut self, cost: Duration, taken: Taken, dropped: Instant, now: Instant) {
        let moved = self.given_back.saturating_sub(taken.given_back);
        let owed = taken
            .paid_at
            .checked_sub(moved)
            .map_or(Duration::ZERO, |paid_at| {
                paid_at.saturating_duration_since(dropped)
            })
            .min(cost);
        if let Some(full_at) = self.full_at {
            self.full_at = Some(full_at.checked_sub(owed).map_or(now, |t| t.max(now)));
            self.given_back += owed;
        }
    }
}

/// The instance's write rate limit, shared by every persister; unlimited when built with 0.
#[derive(Default)]
pub struct RowRate {
    /// 0: unlimited.
    per_second: u64,
    /// `None`: unlimited.
    bucket: Option<Mutex<Bucket>>,
    /// Rows admitted and dropped unsent, as (cost, their take, when dropped): given back by
    /// whoever holds the bucket next ([`RowRate::settle`]), since a drop cannot wait for the
    /// bucket's lock.
    unsent: std::sync::Mutex<Vec<(Duration, Taken, Instant)>>,
    /// Wakes the request at the head of the line when rows are given back.
    given_back: Notify,
    metrics: OnceLock<Metrics>,
}

struct Metrics {
    waited: Counter,
}

impl RowRate {
    /// At most `rows_per_second` rows a second; 0 is unlimited.
    pub fn new(rows_per_second: u64) -> RowRate {
        RowRate {
            per_second: rows_per_second,
            bucket: (rows_per_second > 0).then(|| Mutex::new(Bucket::new(rows_per_second))),
            ..RowRate::default()
        }
    }

    /// No limit.
    pub fn unlimited() -> RowRate {
        RowRate::default()
    }

    /// The limit in rows per second; 0 when unlimited.
    pub fn rows_per_second(&self) -> u64 {
        self.per_second
    }

    /// Exports the limit (0: unlimited) through `limit`, and the time write requests wait for
    /// it through `waited`, from now on.
    pub fn report_to(&self, limit: IntGauge, waited: Counter) {
        limit.set(i64::try_from(self.rows_per_second()).unwrap_or(i64::MAX));
        let _ = self.metrics.set(Metrics { waited });
    }

    /// Waits until `rows` may be written, and takes them. Unlimited: at once. The rows are
    /// charged once [`Admitted::sent`] is called; dropped before, they are given back.
    ///
    /// Cancellation-safe: a dropped wait has taken nothing, and the time it waited is counted.
    pub async fn admit(&self, rows: usize) -> Admitted<'_> {
        let Some(bucket) = &self.bucket else {
            return Admitted::nothing();
        };
        let rows = u64::try_from(rows).unwrap_or(u64::MAX);
        // At once when nobody is waiting and the bucket has the rows: nothing to count.
        if let Ok(mut b) = bucket.try_lock() {
            let now = Instant::now();
            self.settle(&mut b, now);
            if b.ready_at(rows, now) <= now {
                return self.admitted(&mut b, rows, now);
            }
        }
        let _waiting = Waiting {
            since: Instant::now(),
            metrics: self.metrics.get(),
        };
        let mut b = bucket.lock().await;
        loop {
            // Registered before the rows given back are read, so none is missed.
            let given_back = self.given_back.notified();
            tokio::pin!(given_back);
            given_back.as_mut().enable();
            let now = Instant::now();
            self.settle(&mut b, now);
            let ready = b.ready_at(rows, now);
            if ready <= now {
                return self.admitted(&mut b, rows, now);
            }
            tokio::select! {
                () = tokio::time::sleep_until(ready) => {}
                () = given_back => {}
            }
        }
    }

    fn admitted(&self, b: &mut Bucket, rows: u64, now: Instant) -> Admitted<'_> {
        let taken = b.take(rows, now);
        Admitted {
            rate: Some(self),
            cost: b.cost(rows),
            taken: Some(taken),
        }
    }

    /// Gives back the rows dropped unsent since the last holder of the bucket.
    fn settle(&self, b: &mut Bucket, now: Instant) {
        let unsent = std::mem::take(&mut *self.unsent.lock().unwrap_or_else(|e| e.into_inner()));
        for (cost, taken, dropped) in unsent {
            b.give_back(cost, taken, dropped, now);
        }
    }
}

/// Rows taken from the bucket for one write request: charged once [`Admitted::sent`] is
/// called, given back if dropped before (see the module doc).
#[must_use = "rows admitted and dropped unsent are given back: call `sent` once the request goes"]
pub struct Admitted<'a> {
    /// `None`: unlimited, or already sent.
    rate: Option<&'a RowRate>,
    cost: Duration,
    taken: Option<Taken>,
}

impl Admitted<'_> {
    fn nothing() -> Self {
        Admitted {
            rate: None,
            cost: Duration::ZERO,
            taken: None,
        }
    }

    /// The request is going: its rows stay charged.
    pub fn sent(mut self) {
        self.rate = None;
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if let (Some(rate), Some(taken)) = (self.rate.take(), self.taken) {
            rate.unsent.lock().unwrap_or_else(|e| e.into_inner()).push((
                self.cost,
                taken,
                Instant::now(),
            ));
            rate.given_back.notify_waiters();
        }
    }
}

/// Counts the time a write request waits for the rate, however the wait ends.
struct Waiting<'a> {
    since: Instant,
    metrics: Option<&'a Metrics>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.metrics {
            m.waited.inc_by(self.since.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Sends requests of these sizes one after another, each as soon as the bucket lets it, from
    /// `start`; returns when each went.
    fn schedule(bucket: &mut Bucket, start: Instant, sizes: &[u64]) -> Vec<(Instant, u64)> {
        let mut now = start;
        sizes
            .iter()
            .map(|&rows| {
                now = bucket.ready_at(rows, now);
                bucket.take(rows, now);
                (now, rows)
            })
            .collect()
    }

    #[test]
    fn a_full_bucket_lets_one_seconds_worth_through_at_once_then_paces_the_rest() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100);
        assert_eq!(b.cost(1), 10 * MS);
        let sent = schedule(&mut b, t0, &[60, 40, 1, 1, 50]);
        let at: Vec<Duration> = sent.iter().map(|(t, _)| *t - t0).collect();
        assert_eq!(
            at,
            [Duration::ZERO, Duration::ZERO, 10 * MS, 20 * MS, 520 * MS],
            "the burst (100 rows) at once, then one row per 10 ms"
        );
    }

    #[test]
    fn the_rate_holds_over_every_window() {
        let (rate, t0) = (250u64, Instant::now());
        let mut b = Bucket::new(rate);
        // Sizes from 1 to the rate, in an irregular order (a fixed LCG).
        let mut x = 7u64;
        let sizes: Vec<u64> = (0..400)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                1 + (x >> 33) % rate
            })
            .collect();
        let sent = schedule(&mut b, t0, &sizes);
        for i in 0..sent.len() {
            let mut rows = 0u128;
            for &(at, n) in &sent[i..] {
                rows += u128::from(n);
                let window = (at - sent[i].0).as_nanos();
                // rows ≤ rate × window + burst, in whole numbers.
                assert!(
                    rows * 1_000_000_000 <= u128::from(rate) * (window + 1_000_000_000),
                    "{rows} rows within {window} ns from request {i}"
                );
            }
        }
        let total: u64 = sizes.iter().sum();
        let took = sent.last().unwrap().0 - t0;
        let least = b.cost(total - rate);
        assert!(
            took >= least && took <= least + b.cost(rate),
            "{total} rows took {took:?}, at least {least:?}"
        );
    }

    #[test]
    fn a_request_larger_than_the_burst_passes_and_the_next_ones_pay_for_it() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10);
        // A full bucket lets it go at once: the burst is the request's size when that is larger.
        let sent = schedule(&mut b, t0, &[50, 1]);
        assert_eq!(sent[0].0, t0);
        assert_eq!(
            sent[1].0 - t0,
            Duration::from_millis(4100),
            "the next one waits for the 40 rows beyond the burst, then its own"
        );
        // After an empty bucket, it waits only until the bucket is full: never for ever.
        let mut b = Bucket::new(10);
        let sent = schedule(&mut b, t0, &[10, 1_000]);
        assert_eq!(sent[1].0 - t0, Duration::from_secs(1));
        let huge = Bucket::new(1).ready_at(u64::MAX, t0 + Duration::from_secs(5));
        assert_eq!(huge, t0 + Duration::from_secs(5), "no overflow");
    }

    #[test]
    fn rows_given_back_free_only_what_is_still_owed() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let cost = |rows| Bucket::new(100).cost(rows);
        // Given back at once: as if never taken.
        let mut b = Bucket::new(100);
        let a = b.take(100, t0);
        b.give_back(cost(100), a, t0, t0);
        assert_eq!(b.ready_at(100, t0), t0);
        // Half refilled already: half is given back, and the bucket is full again.
        let mut b = Bucket::new(100);
        let a = b.take(100, t0);
        b.give_back(cost(100), a, t0 + s / 2, t0 + s / 2);
        assert_eq!(b.ready_at(100, t0 + s / 2), t0 + s / 2);
        // Rows taken after them keep their debt: 50 rows queued behind the 100 given back.
        let mut b = Bucket::new(100);
        let a = b.take(100, t0);
        let ready = b.ready_at(50, t0);
        assert_eq!(ready, t0 + s / 2);
        b.take(50, ready);
        b.give_back(cost(100), a, ready, ready);
        // As if only the 50 had been taken, at t0 + 0.5 s: full again at t0 + 1 s.
        assert_eq!(b.ready_at(100, ready), t0 + s);
        // Paid off long ago: nothing is owed, so nothing is given back from later debt.
        let mut b = Bucket::new(100);
        let a = b.take(100, t0);
        b.take(10, t0 + 2 * s);
        let late = t0 + 2 * s + 50 * MS;
        b.give_back(cost(100), a, late, late);
        assert_eq!(b.ready_at(100, late), t0 + 2 * s + 100 * MS);
    }

    #[test]
    fn a_give_back_moves_the_debt_behind_it_so_a_later_one_gives_no_more_than_its_own() {
        let t0 = Instant::now();
        let cost = |rows| Bucket::new(100).cost(rows);
        let mut b = Bucket::new(100);
        // Two requests of 50 rows each take their rows at t0; the first is dropped at once.
        let first = b.take(50, t0);
        let second = b.take(50, t0);
        b.give_back(cost(50), first, t0, t0);
        // Others take 1 row at t0 and 50 at t0 + 0.4 s; the second is dropped at t0 + 0.45 s,
        // when 0.05 s of its refill is left (its refill moved 0.5 s earlier with the first's).
        b.take(1, t0);
        b.take(50, t0 + 400 * MS);
        b.give_back(cost(50), second, t0 + 450 * MS, t0 + 450 * MS);
        // Full again at t0 + 0.96 s: the 51 rows taken by others are still owed (0.9 s after
        // t0 had the dropped rows never been taken, so this errs on the slow side only).
        assert_eq!(b.ready_at(100, t0 + 450 * MS), t0 + 960 * MS);
    }

    #[test]
    fn what_is_owed_is_counted_when_the_rows_are_dropped_not_when_given_back() {
        let t0 = Instant::now();
        let cost = |rows| Bucket::new(100).cost(rows);
        let mut b = Bucket::new(100);
        b.take(50, t0);
        let ready = b.ready_at(100, t0);
        let dropped = b.take(100, ready); // Refilled from t0 + 0.5 s to t0 + 1.5 s.
        let later = b.ready_at(10, ready);
        b.take(10, later);
        // Dropped at t0 + 0.7 s with 0.8 s owed; given back, by the next request, at t0 + 1 s.
        b.give_back(cost(100), dropped, t0 + 700 * MS, t0 + 1000 * MS);
        // Had they never been taken the bucket would be full by t0 + 0.7 s.
        assert_eq!(b.ready_at(100, t0 + 1000 * MS), t0 + 1000 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn rows_admitted_and_dropped_unsent_are_given_back() {
        let rate = RowRate::new(100);
        let t0 = Instant::now();
        drop(rate.admit(100).await);
        rate.admit(100).await.sent();
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "the dropped rows cost nothing"
        );
        rate.admit(100).await.sent();
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(1),
            "sent rows are charged"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rows_given_back_let_the_request_at_the_head_of_the_line_go_at_once() {
        let rate = Arc::new(RowRate::new(100));
        let t0 = Instant::now();
        let held = rate.admit(100).await;
        let next = tokio::spawn({
            let rate = rate.clone();
            async move {
                rate.admit(100).await.sent();
                t0.elapsed()
            }
        });
        tokio::time::sleep(200 * MS).await;
        assert!(!next.is_finished(), "waits for the rows held");
        drop(held);
        assert_eq!(
            next.await.unwrap(),
            200 * MS,
            "woken when they are given back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let rate = RowRate::new(0);
        assert_eq!(rate.rows_per_second(), 0);
        let t0 = Instant::now();
        for _ in 0..1000 {
            rate.admit(1_000_000).await.sent();
        }
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(RowRate::unlimited().rows_per_second(), 0);
    }

    fn gauges() -> (IntGauge, Counter) {
        (
            IntGauge::new("limit", "l").unwrap(),
            Counter::new("waited", "w").unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_writers_share_the_rate_and_the_waits_are_counted() {
        let rate = Arc::new(RowRate::new(100));
        let (limit, waited) = gauges();
        rate.report_to(limit.clone(), waited.clone());
        assert_eq!(limit.get(), 100);
        let t0 = Instant::now();
        // 8 writers of 25 requests of 10 rows: 2,000 rows, the first 100 at once.
        let writers: Vec<_> = (0..8)
            .map(|_| {
                let rate = rate.clone();
                tokio::spawn(async move {
                    for _ in 0..25 {
                        rate.admit(10).await.sent();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let took = t0.elapsed();
        // (2,000 - 100) / 100 rows a second; each wait may end up to a millisecond late (tokio's
        // timer resolution), and a late start is not made up for.
        assert!(
            took >= Duration::from_secs(19) && took <= Duration::from_millis(19_200),
            "{took:?}"
        );
        assert!(
            waited.get() > 19.0,
            "summed over the writers: {}",
            waited.get()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_wait_takes_nothing_and_its_wait_is_counted() {
        let rate = Arc::new(RowRate::new(100));
        let (limit, waited) = gauges();
        rate.report_to(limit, waited.clone());
        rate.admit(100).await.sent(); // The burst: the bucket is empty.
        let t0 = Instant::now();
        let cancelled = tokio::spawn({
            let rate = rate.clone();
            async move { rate.admit(100).await.sent() }
        });
        tokio::time::sleep(500 * MS).await;
        assert!(!cancelled.is_finished(), "waits for a second's refill");
        cancelled.abort();
        assert!(cancelled.await.unwrap_err().is_cancelled());
        assert!((waited.get() - 0.5).abs() < 1e-9, "{}", waited.get());
        // Half a second refilled 50 rows, and the dropped wait took none of them.
        rate.admit(50).await.sent();
        assert_eq!(t0.elapsed(), 500 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_are_served_in_order_so_a_large_one_is_not_starved() {
        let rate = Arc::new(RowRate::new(10));
        rate.admit(10).await.sent();
        let t0 = Instant::now();
        let large = tokio::spawn({
            let rate = rate.clone();
            async move {
                rate.admit(30).await.sent();
                t0.elapsed()
            }
        });
        tokio::task::yield_now().await;
        // Small requests behind it wait for it, however many.
        let small: Vec<_> = (0..20)
            .map(|_| {
                let rate = rate.clone();
                tokio::spawn(async move {
                    rate.admit(1).await.sent();
                    t0.elapsed()
                })
            })
            .collect();
        let large = large.await.unwrap();
        assert_eq!(
            large,
            Duration::from_secs(1),
            "goes once the bucket is full"
        );
        for s in small {
            assert!(s.await.unwrap() > large);
        }
    }
}

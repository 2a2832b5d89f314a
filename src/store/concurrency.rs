//! Write concurrency: how many write requests to the database may be in flight at once, and
//! the permits that requests hold while they are.
//!
//! One owner. [`Controller`] is the pure decision, modelled on Vector's adaptive request
//! concurrency: it keeps an EWMA of the response time of successful requests (the baseline) and
//! its deviation, and at the end of each window of about one response time (at least
//! [`MIN_WINDOW`]; a window with back pressure in it ends at the first answer
//! [`BACK_PRESSURE_WINDOW`] or more into it) it does AIMD on the limit:
//! - a back-pressure answer in the window (a timeout, `Overloaded`) decreases the limit
//!   multiplicatively (× [`DECREASE_RATIO`]), unless its request was sent before the last
//!   decrease, which already answered it (one cut per generation of requests, as TCP does);
//! - so does a window whose mean response time rose above the baseline by more than
//!   [`RTT_DEVIATION_SCALE`] deviations (the database is queueing);
//! - a window in which the limit was reached, with no back pressure and a response time not
//!   above the baseline, increases it by one.
//!
//! The limit stays within `[min, max]` (`scylla.min_concurrent_requests`,
//! `scylla.max_concurrent_requests`) and starts at `max`; with `min == max` it is fixed
//! (`scylla.adaptive_concurrency = false`). [`Limiter`] wraps the controller with a semaphore
//! whose permits follow the limit, and exports `vault_write_concurrency_limit` and
//! `vault_write_requests_in_flight`.
//!
//! Invariant kept: the limiter only delays requests. A permit is taken before a request is sent
//! and given back when its answer ends it (the driver's own retries of it included) or when it
//! is cancelled; it never answers for the database, so a write is acknowledged only by the
//! database's answer, as without it.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::store::StoreError;

/// The factor a back-pressure window applies to the limit.
pub const DECREASE_RATIO: f64 = 0.9;
/// Weight of the newest window in the response-time baseline.
pub const EWMA_ALPHA: f64 = 0.4;
/// How many deviations above the baseline a window's response time may rise before it counts as
/// the database queueing.
pub const RTT_DEVIATION_SCALE: f64 = 2.5;
/// The shortest window: response-time decisions are made at most this often, and on enough
/// answers that a window's mean tells queueing from noise (back pressure closes a window
/// sooner, see [`BACK_PRESSURE_WINDOW`]). Measured against the stand-in on a
/// contended machine, 10 ms windows held so few answers that noise read as queueing often
/// enough to keep the limit at about half its maximum on a healthy node (0.78-0.80× the fixed
/// limit's throughput); at 50 ms, 0.94-1.02× in four runs. The price is a slower climb back,
/// one per window.
pub const MIN_WINDOW: Duration = Duration::from_millis(50);
/// How soon a window with back pressure in it may end: a timeout or `Overloaded` is a signal no
/// noise fakes, so it is acted on at the first answer this far into the window rather than at
/// the window's end. Such a short window does not move the response-time baseline.
pub const BACK_PRESSURE_WINDOW: Duration = Duration::from_millis(10);
/// Relative change of the response time that is measuring noise, not a change: the least
/// rise that counts as queueing, and the most a window may be above the baseline and still
/// count as steady.
pub const RTT_TOLERANCE: f64 = 0.01;

/// How a request ended, as the limiter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Written: its response time is a sample of the database's latency.
    Success,
    /// The database is struggling: a timeout (`WriteTimeout`, the request timeout) or
    /// `Overloaded`.
    BackPressure,
    /// Any other failure (a rejected row, a broken connection): no signal about load.
    Other,
}

impl Answer {
    /// The answer a store result gives.
    pub fn of<T>(result: &Result<T, StoreError>) -> Answer {
        match result {
            Ok(_) => Answer::Success,
            Err(e) => Answer::of_error(e),
        }
    }

    /// The answer a failed request gives.
    pub fn of_error(error: &StoreError) -> Answer {
        match error {
            StoreError::Timeout(_) | StoreError::Overloaded(_) => Answer::BackPressure,
            _ => Answer::Other,
        }
    }
}

/// A running mean of this window's response times.
#[derive(Debug, Default, Clone, Copy)]
struct Mean {
    sum: f64,
    count: u32,
}

impl Mean {
    fn add(&mut self, x: f64) {
        self.sum += x;
        self.count += 1;
    }

    fn get(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / f64::from(self.count))
    }
}

/// An exponentially weighted moving average with its variance.
#[derive(Debug, Default, Clone, Copy)]
struct Ewma {
    mean: Option<f64>,
    variance: f64,
}

impl Ewma {
    fn update(&mut self, x: f64) {
        match self.mean {
            None => self.mean = Some(x),
            Some(mean) => {
                let diff = x - mean;
                let step = EWMA_ALPHA * diff;
                self.mean = Some(mean + step);
                self.variance = (1.0 - EWMA_ALPHA) * (self.variance + diff * step);
            }
        }
    }

    fn deviation(&self) -> f64 {
        self.variance.sqrt()
    }
}

/// The limit's decision, pure: told about waits and answers, with the time they happened.
#[derive(Debug, Clone)]
pub struct Controller {
    min: usize,
    max: usize,
    limit: usize,
    /// A request found every permit taken (or took the last one) in this window.
    reached_limit: bool,
    back_pressure: bool,
    /// Response times of the successes of this window.
    current: Mean,
    /// The baseline: window means of earlier windows.
    past: Ewma,
    /// When this window began and when it ends; `None` before the first answer, which closes a
    /// window at once.
    window: Option<(Instant, Instant)>,
    /// When the limit was last cut: back pressure on a request sent before it was already
    /// answered by that cut (one cut per generation of requests).
    cut_at: Option<Instant>,
}

impl Controller {
    /// A limit within `[min, max]` that starts at `max`. `min == max` is a fixed limit.
    pub fn new(min: usize, max: usize) -> Controller {
        let max = max.max(1);
        let min = min.clamp(1, max);
        Controller {
            min,
            max,
            limit: max,
            reached_limit: false,
            back_pressure: false,
            current: Mean::default(),
            past: Ewma::default(),
            window: None,
            cut_at: None,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A request had to wait for a permit, or took the last one.
    pub fn limit_reached(&mut self) {
        self.reached_limit = true;
    }

    /// A request ended at `now` after `rtt` with `answer`. Returns the new limit when this
    /// answer closed a window that changed it.
    pub fn answered(&mut self, now: Instant, rtt: Duration, answer: Answer) -> Option<usize> {
        match answer {
            Answer::Success => self.current.add(rtt.as_secs_f64()),
            // A request sent before the last cut tells of the load before it: a burst of
            // timeouts of one generation cuts once, not once a window until they stop coming.
            Answer::BackPressure
                if self
                    .cut_at
                    .is_some_and(|cut| now.checked_sub(rtt).is_none_or(|sent| sent < cut)) => {}
            Answer::BackPressure => self.back_pressure = true,
            Answer::Other => {}
        }
        // The first answer closes the first window; back pressure closes one early.
        let mut early = false;
        if let Some((start, end)) = self.window {
            early = now < end;
            if early && !(self.back_pressure && now >= start + BACK_PRESSURE_WINDOW) {
                return None;
            }
        }
        let before = self.limit;
        let current = self.current.get();
        let past = self.past.mean;
        let deviation = RTT_DEVIATION_SCALE * self.past.deviation();
        let queueing = matches!((current, past),
            (Some(c), Some(p)) if c > p + deviation.max(p * RTT_TOLERANCE));
        let steady = match (current, past) {
            (Some(c), Some(p)) => c <= p * (1.0 + RTT_TOLERANCE),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if self.back_pressure || queueing {
            let decreased = (self.limit as f64 * DECREASE_RATIO) as usize;
            self.limit = decreased.clamp(self.min, self.limit.saturating_sub(1).max(self.min));
            self.cut_at = Some(now);
        } else if self.reached_limit && steady {
            self.limit = (self.limit + 1).min(self.max);
        }
        // A window closed early holds too few answers to move the baseline.
        if let (Some(c), false) = (current, early) {
            self.past.update(c);
        }
        let window = self
            .past
            .mean
            .map_or(MIN_WINDOW, Duration::from_secs_f64)
            .max(MIN_WINDOW);
        self.window = Some((now, now + window));
        self.current = Mean::default();
        self.reached_limit = false;
        self.back_pressure = false;
        (self.limit != before).then_some(self.limit)
    }
}

/// Permits for write requests, as many as the controller's limit.
pub struct Limiter {
    semaphore: Semaphore,
    state: Mutex<State>,
    gauges: OnceLock<Gauges>,
}

struct State {
    controller: Controller,
    /// Permits still to take out of circulation after a decrease (they were held when the
    /// limit fell): each is forgotten when its request ends instead of returning.
    debt: usize,
    in_flight: usize,
}

struct Gauges {
    limit: IntGauge,
    in_flight: IntGauge,
}

/// One request's right to be in flight. End it with [`Permit::finish`]; dropped unfinished (the
/// request was cancelled) it is given back without a sample.
pub struct Permit<'a> {
    limiter: &'a Limiter,
    permit: Option<SemaphorePermit<'a>>,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Limiter {
    /// An adaptive limit within `[min, max]`.
    pub fn adaptive(min: usize, max: usize) -> Limiter {
        Self::with(Controller::new(min, max))
    }

    /// A fixed limit (no adaptation).
    pub fn fixed(limit: usize) -> Limiter {
        Self::with(Controller::new(limit, limit))
    }

    fn with(controller: Controller) -> Limiter {
        Limiter {
            semaphore: Semaphore::new(controller.limit()),
            state: Mutex::new(State {
                controller,
                debt: 0,
                in_flight: 0,
            }),
            gauges: OnceLock::new(),
        }
    }

    /// Exports the limit and the requests in flight through these gauges from now on.
    pub fn report_to(&self, limit: IntGauge, in_flight: IntGauge) {
        let state = lock(&self.state);
        limit.set(state.controller.limit() as i64);
        in_flight.set(state.in_flight as i64);
        let _ = self.gauges.set(Gauges { limit, in_flight });
    }

    pub fn limit(&self) -> usize {
        lock(&self.state).controller.limit()
    }

    pub fn in_flight(&self) -> usize {
        lock(&self.state).in_flight
    }

    /// Waits for a permit. Cancellation-safe: a dropped wait holds nothing.
    pub async fn acquire(&self) -> Permit<'_> {
        let permit = match self.semaphore.try_acquire() {
            Ok(p) => {
                if self.semaphore.available_permits() == 0 {
                    lock(&self.state).controller.limit_reached();
                }
                p
            }
            Err(_) => {
                lock(&self.state).controller.limit_reached();
                self.semaphore
                    .acquire()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        let mut state = lock(&self.state);
        state.in_flight += 1;
        if let Some(g) = self.gauges.get() {
            g.in_flight.set(state.in_flight as i64);
        }
        Permit {
            limiter: self,
            permit: Some(permit),
            started: Instant::now(),
        }
    }

    fn release(&self, permit: SemaphorePermit<'_>, answer: Option<(Duration, Answer)>) {
        let mut state = lock(&self.state);
        state.in_flight -= 1;
        if let Some((rtt, answer)) = answer {
            let before = state.controller.limit();
            if let Some(after) = state.controller.answered(Instant::now(), rtt, answer) {
                self.resize(&mut state, before, after);
            }
        }
        if state.debt > 0 {
            state.debt -= 1;
            permit.forget();
        } else {
            drop(permit);
        }
        if let Some(g) = self.gauges.get() {
            g.in_flight.set(state.in_flight as i64);
        }
    }

    /// Makes the permits in circulation follow a limit change.
    fn resize(&self, state: &mut State, before: usize, after: usize) {
        if after > before {
            let mut more = after - before;
            let repaid = more.min(state.debt);
            state.debt -= repaid;
            more -= repaid;
            self.semaphore.add_permits(more);
        } else {
            let fewer = before - after;
            let forgotten = self.semaphore.forget_permits(fewer);
            state.debt += fewer - forgotten;
        }
        if let Some(g) = self.gauges.get() {
            g.limit.set(after as i64);
        }
    }
}

impl Permit<'_> {
    /// Ends the request with its answer, which the controller learns from.
    pub fn finish(mut self, answer: Answer) {
        let rtt = self.started.elapsed();
        if let Some(p) = self.permit.take() {
            self.limiter.release(p, Some((rtt, answer)));
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            self.limiter.release(p, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Closes `n` windows of the controller with one answer each (on the paused clock).
    async fn windows(c: &mut Controller, n: usize, rtt: Duration, answer: Answer, at_limit: bool) {
        for _ in 0..n {
            if at_limit {
                c.limit_reached();
            }
            tokio::time::advance(MIN_WINDOW.max(rtt)).await;
            c.answered(Instant::now(), rtt, answer);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn back_pressure_decreases_multiplicatively_down_to_the_minimum() {
        let mut c = Controller::new(4, 100);
        assert_eq!(c.limit(), 100, "starts at the maximum");
        windows(&mut c, 1, MS, Answer::Success, false).await;
        windows(&mut c, 1, MS, Answer::BackPressure, false).await;
        assert_eq!(c.limit(), 90);
        windows(&mut c, 1, MS, Answer::BackPressure, false).await;
        assert_eq!(c.limit(), 81);
        windows(&mut c, 100, MS, Answer::BackPressure, false).await;
        assert_eq!(c.limit(), 4, "never below the minimum");
    }

    #[tokio::test(start_paused = true)]
    async fn back_pressure_is_acted_on_without_waiting_for_a_long_window() {
        let mut c = Controller::new(1, 100);
        // A 200 ms response time: windows of 200 ms.
        windows(&mut c, 3, 200 * MS, Answer::Success, false).await;
        tokio::time::advance(BACK_PRESSURE_WINDOW).await;
        assert_eq!(
            c.answered(Instant::now(), 200 * MS, Answer::BackPressure),
            Some(90),
            "cut within {BACK_PRESSURE_WINDOW:?}, not at the window's end"
        );
        tokio::time::advance(BACK_PRESSURE_WINDOW).await;
        assert_eq!(
            c.answered(Instant::now(), 200 * MS, Answer::Success),
            None,
            "a success does not end the new window early"
        );
        // Timeouts of requests sent before the cut keep coming: the cut answered them.
        for _ in 0..5 {
            tokio::time::advance(BACK_PRESSURE_WINDOW).await;
            assert_eq!(
                c.answered(Instant::now(), 200 * MS, Answer::BackPressure),
                None,
                "one cut per generation of requests"
            );
        }
        assert_eq!(c.limit(), 90);
        // Back pressure on a request sent after the cut cuts again.
        assert_eq!(
            c.answered(Instant::now(), MS, Answer::BackPressure),
            Some(81)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn small_limits_still_decrease_by_one() {
        let mut c = Controller::new(1, 5);
        windows(&mut c, 1, MS, Answer::Success, false).await;
        let mut path = vec![c.limit()];
        for _ in 0..5 {
            windows(&mut c, 1, MS, Answer::BackPressure, false).await;
            path.push(c.limit());
        }
        assert_eq!(path, [5, 4, 3, 2, 1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn success_at_the_limit_increases_additively_up_to_the_maximum() {
        let mut c = Controller::new(1, 10);
        windows(&mut c, 1, MS, Answer::Success, false).await;
        windows(&mut c, 5, MS, Answer::BackPressure, false).await;
        assert_eq!(c.limit(), 5);
        windows(&mut c, 1, MS, Answer::Success, true).await;
        assert_eq!(c.limit(), 6, "one more per window at the limit");
        windows(&mut c, 2, MS, Answer::Success, true).await;
        assert_eq!(c.limit(), 8);
        windows(&mut c, 50, MS, Answer::Success, true).await;
        assert_eq!(c.limit(), 10, "never above the maximum");
    }

    #[tokio::test(start_paused = true)]
    async fn success_below_the_limit_leaves_it_alone() {
        let mut c = Controller::new(1, 10);
        windows(&mut c, 1, MS, Answer::Success, false).await;
        windows(&mut c, 5, MS, Answer::BackPressure, false).await;
        windows(&mut c, 20, MS, Answer::Success, false).await;
        assert_eq!(
            c.limit(),
            5,
            "no demand beyond the limit: no reason to raise it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_time_above_the_baseline_decreases_the_limit() {
        let mut c = Controller::new(1, 50);
        windows(&mut c, 10, 2 * MS, Answer::Success, true).await;
        assert_eq!(c.limit(), 50);
        windows(&mut c, 1, 20 * MS, Answer::Success, true).await;
        assert_eq!(c.limit(), 45, "latency rose: the database is queueing");
        // Other failures carry no signal about load.
        let mut d = Controller::new(1, 50);
        windows(&mut d, 10, 2 * MS, Answer::Other, true).await;
        assert_eq!(d.limit(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_limit_never_moves() {
        let mut c = Controller::new(32, 32);
        windows(&mut c, 10, MS, Answer::BackPressure, true).await;
        windows(&mut c, 10, 50 * MS, Answer::Success, true).await;
        assert_eq!(c.limit(), 32);
    }

    #[test]
    fn answers_are_classified_from_store_errors() {
        let ok: Result<(), StoreError> = Ok(());
        assert_eq!(Answer::of(&ok), Answer::Success);
        for e in [
            StoreError::Timeout("t".into()),
            StoreError::Overloaded("o".into()),
        ] {
            assert_eq!(Answer::of::<()>(&Err(e)), Answer::BackPressure);
        }
        for e in [
            StoreError::Invalid("i".into()),
            StoreError::Connection("c".into()),
            StoreError::Unavailable("u".into()),
        ] {
            assert_eq!(Answer::of::<()>(&Err(e)), Answer::Other);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn permits_follow_the_limit_and_a_decrease_takes_back_held_ones() {
        let limiter = Limiter::adaptive(1, 4);
        let (limit, in_flight) = (
            IntGauge::new("l", "l").unwrap(),
            IntGauge::new("f", "f").unwrap(),
        );
        limiter.report_to(limit.clone(), in_flight.clone());
        let held: Vec<Permit<'_>> = vec![
            limiter.acquire().await,
            limiter.acquire().await,
            limiter.acquire().await,
            limiter.acquire().await,
        ];
        assert_eq!((limit.get(), in_flight.get()), (4, 4));
        let mut waiting = Box::pin(limiter.acquire());
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "a fifth waits"
        );
        drop(waiting); // A cancelled wait holds nothing.
        let mut held = held.into_iter();
        // A back-pressure answer closes the first window: 4 → 3 while 3 are still held.
        tokio::time::sleep(MIN_WINDOW).await;
        held.next().unwrap().finish(Answer::BackPressure);
        assert_eq!(limit.get(), 3);
        assert_eq!(in_flight.get(), 3);
        let mut waiting = Box::pin(limiter.acquire());
        assert!(futures::poll!(waiting.as_mut()).is_pending(), "3 of 3 held");
        // A cancelled request gives its permit back.
        drop(held.next());
        let p = waiting.await;
        assert_eq!(in_flight.get(), 3);
        drop(p);
        drop(held);
        assert_eq!(in_flight.get(), 0);
        assert_eq!(limiter.semaphore.available_permits(), 3);
    }

    /// A simulated database whose latency grows with the requests in flight: up to `capacity`
    /// are served in `base`, beyond that each waits its turn (`base × in flight / capacity`),
    /// and above `overload_above` it answers Overloaded at once.
    struct Service {
        capacity: AtomicUsize,
        overload_above: AtomicUsize,
        base: Duration,
        in_flight: AtomicUsize,
        served: AtomicUsize,
        overloaded: AtomicUsize,
    }

    impl Service {
        async fn call(&self) -> Answer {
            let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            let answer = if n > self.overload_above.load(Ordering::SeqCst) {
                tokio::time::sleep(MS).await;
                self.overloaded.fetch_add(1, Ordering::SeqCst);
                Answer::BackPressure
            } else {
                let capacity = self.capacity.load(Ordering::SeqCst);
                let queued = n.max(capacity) as f64 / capacity as f64;
                tokio::time::sleep(self.base.mul_f64(queued)).await;
                self.served.fetch_add(1, Ordering::SeqCst);
                Answer::Success
            };
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            answer
        }
    }

    /// What a run of `clients` callers against the service through `limiter` did.
    struct Run {
        /// The limit, sampled every 10 ms of simulated time.
        path: Vec<usize>,
    }

    /// `clients` callers loop acquire → call → finish (backing off 10 ms after back pressure, as
    /// the persisters do) for `phases`: each runs `secs` seconds with a capacity and an
    /// overload threshold.
    async fn drive(
        limiter: Arc<Limiter>,
        service: Arc<Service>,
        clients: usize,
        phases: &[(usize, usize, u64)],
    ) -> Run {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (limiter, service, stop) = (limiter.clone(), service.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let permit = limiter.acquire().await;
                    let answer = service.call().await;
                    permit.finish(answer);
                    if answer == Answer::BackPressure {
                        tokio::time::sleep(10 * MS).await;
                    }
                }
            }));
        }
        let mut path = Vec::new();
        for &(capacity, overload_above, secs) in phases {
            service.capacity.store(capacity, Ordering::SeqCst);
            service
                .overload_above
                .store(overload_above, Ordering::SeqCst);
            for _ in 0..secs * 100 {
                tokio::time::sleep(10 * MS).await;
                path.push(limiter.limit());
            }
        }
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
        Run { path }
    }

    fn service(capacity: usize, overload_above: usize) -> Arc<Service> {
        Arc::new(Service {
            capacity: AtomicUsize::new(capacity),
            overload_above: AtomicUsize::new(overload_above),
            base: 2 * MS,
            in_flight: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            overloaded: AtomicUsize::new(0),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_database_keeps_the_maximum() {
        let (limiter, svc) = (Arc::new(Limiter::adaptive(1, 64)), service(1000, 1000));
        let run = drive(limiter, svc.clone(), 200, &[(1000, 1000, 5)]).await;
        assert!(run.path.iter().all(|&l| l == 64), "{:?}", run.path);
        assert_eq!(svc.overloaded.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_backs_off_from_a_saturated_database_and_recovers() {
        // 16 at full speed, Overloaded above 48: 256 callers at a fixed limit of 256 overload it.
        let svc = service(16, 48);
        let limiter = Arc::new(Limiter::adaptive(1, 256));
        let run = drive(
            limiter,
            svc.clone(),
            256,
            &[(16, 48, 6), (10_000, 10_000, 12)],
        )
        .await;
        let (saturated, healthy) = run.path.split_at(600);
        let first_below = saturated.iter().position(|&l| l <= 48);
        assert!(
            first_below.is_some_and(|i| i < 100),
            "falls below the overload threshold within 1 s: {saturated:?}"
        );
        let settled = &saturated[300..];
        // AIMD's saw-tooth: it climbs one at a time, touches the threshold, and backs off.
        assert!(
            settled.iter().all(|&l| (16..=49).contains(&l)),
            "stays at most one above the overload threshold, and at or above the capacity: {settled:?}"
        );
        assert_eq!(
            healthy.last(),
            Some(&256),
            "recovers to the maximum once the database is healthy: {healthy:?}"
        );

        // The same load at today's fixed limit: the database answers Overloaded all along
        // (about 70 times as often, on this schedule).
        let fixed_svc = service(16, 48);
        drive(
            Arc::new(Limiter::fixed(256)),
            fixed_svc.clone(),
            256,
            &[(16, 48, 6)],
        )
        .await;
        let (adaptive_overloaded, fixed_overloaded) = (
            svc.overloaded.load(Ordering::SeqCst),
            fixed_svc.overloaded.load(Ordering::SeqCst),
        );
        assert!(
            adaptive_overloaded * 10 < fixed_overloaded,
            "adaptive {adaptive_overloaded} vs fixed {fixed_overloaded}"
        );
    }
}

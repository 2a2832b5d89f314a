//! Programmable faults of the stand-in node: an error, a delay or a dropped connection for the
//! next n matching requests (or with a probability), matched by opcode and statement text; and
//! a saturated node ([`Saturation`]), whose latency grows with the statements in flight and which
//! sheds load with Overloaded above a threshold.

use std::time::Duration;

use crate::cql::frame::Opcode;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    WriteTimeout,
    ReadTimeout,
    Unavailable,
    Overloaded,
    ServerError,
    /// Answer normally, after this delay.
    Delay(Duration),
    /// Close the connection without answering.
    DropConnection,
}

impl FaultKind {
    /// Parses the names used by the sandbox control port: `write-timeout`, `read-timeout`,
    /// `unavailable`, `overloaded`, `server-error`, `drop`, `delay:<duration>`.
    pub fn parse(s: &str) -> Result<FaultKind, String> {
        Ok(match s {
            "write-timeout" => FaultKind::WriteTimeout,
            "read-timeout" => FaultKind::ReadTimeout,
            "unavailable" => FaultKind::Unavailable,
            "overloaded" => FaultKind::Overloaded,
            "server-error" => FaultKind::ServerError,
            "drop" => FaultKind::DropConnection,
            other => match other.strip_prefix("delay:") {
                Some(d) => FaultKind::Delay(humantime::parse_duration(d).map_err(|e| format!("bad delay {d}: {e}"))?),
                None => return Err(format!("unknown fault '{other}' (write-timeout, read-timeout, unavailable, overloaded, server-error, drop, delay:<duration>)")),
            },
        })
    }
}

/// One fault rule. Build with [`Fault::new`] and the builder methods.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    /// Opcodes it applies to; empty means QUERY, PREPARE, EXECUTE and BATCH.
    pub opcodes: Vec<Opcode>,
    /// Only requests whose statement text contains this (case-insensitive).
    pub statement_contains: Option<String>,
    /// Requests left to hit; `None` means until cleared.
    pub remaining: Option<u64>,
    /// Chance of hitting a matching request.
    pub probability: f64,
}

impl Fault {
    pub fn new(kind: FaultKind) -> Fault {
        Fault {
            kind,
            opcodes: Vec::new(),
            statement_contains: None,
            remaining: None,
            probability: 1.0,
        }
    }

    pub fn times(mut self, n: u64) -> Fault {
        self.remaining = Some(n);
        self
    }

    pub fn on(mut self, opcodes: &[Opcode]) -> Fault {
        self.opcodes = opcodes.to_vec();
        self
    }

    pub fn matching(mut self, text: &str) -> Fault {
        self.statement_contains = Some(text.to_ascii_lowercase());
        self
    }

    pub fn probability(mut self, p: f64) -> Fault {
        self.probability = p.clamp(0.0, 1.0);
        self
    }

    pub(crate) fn matches(&self, opcode: Opcode, statement: &str) -> bool {
        let op_ok = if self.opcodes.is_empty() {
            matches!(
                opcode,
                Opcode::Query | Opcode::Prepare | Opcode::Execute | Opcode::Batch
            )
        } else {
            self.opcodes.contains(&opcode)
        };
        op_ok
            && self.remaining != Some(0)
            && self
                .statement_contains
                .as_ref()
                .is_none_or(|t| statement.to_ascii_lowercase().contains(t))
    }
}

/// A node saturated by load, modelled on how one behaves. Its work is counted in statements
/// (rows) in flight, since a node's cost is per mutation: a BATCH of `k` statements weighs `k`,
/// any other request 1. It serves up to `capacity` statements at once in `base_latency`;
/// beyond that, requests queue (with `n` statements in flight, each request takes
/// `base_latency × n / capacity`, so the node's throughput stays `capacity / base_latency`
/// statements a second however they are sent); above `overload_above` statements in flight it
/// sheds load, answering Overloaded at once, as ScyllaDB does when a shard's queue is full (a
/// request that finds nothing else in flight is always served, however large). It applies to
/// QUERY, EXECUTE and BATCH requests, or only to those whose statement contains a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Saturation {
    pub capacity: usize,
    pub base_latency: Duration,
    pub overload_above: usize,
    /// Only requests whose statement text contains this (case-insensitive).
    pub statement_contains: Option<String>,
}

impl Saturation {
    pub fn new(capacity: usize, base_latency: Duration, overload_above: usize) -> Saturation {
        Saturation {
            capacity: capacity.max(1),
            base_latency,
            overload_above,
            statement_contains: None,
        }
    }

    pub fn matching(mut self, text: &str) -> Saturation {
        self.statement_contains = Some(text.to_ascii_lowercase());
        self
    }

    /// Parses the control port's `CAPACITY LATENCY OVERLOAD_ABOVE [match TEXT]`, e.g.
    /// `16 2ms 64 match user_activity`.
    pub fn parse(words: &[&str]) -> Result<Saturation, String> {
        const USAGE: &str = "cql saturate CAPACITY LATENCY OVERLOAD_ABOVE [match TEXT], e.g. cql saturate 16 2ms 64 match user_activity";
        let count = |w: Option<&&str>, what: &str| -> Result<usize, String> {
            w.ok_or(format!("missing {what}: {USAGE}"))?
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(format!("{what} must be a positive count: {USAGE}"))
        };
        let capacity = count(words.first(), "CAPACITY")?;
        let latency = words
            .get(1)
            .ok_or(format!("missing LATENCY: {USAGE}"))
            .and_then(|d| {
                humantime::parse_duration(d).map_err(|e| format!("LATENCY {d}: {e}: {USAGE}"))
            })?;
        let overload_above = count(words.get(2), "OVERLOAD_ABOVE")?;
        let mut s = Saturation::new(capacity, latency, overload_above);
        match &words[3.min(words.len())..] {
            [] => {}
            ["match", text] => s = s.matching(text),
            other => return Err(format!("unexpected '{}': {USAGE}", other.join(" "))),
        }
        Ok(s)
    }

    /// How long a request takes with `in_flight` requests in flight, itself included.
    pub fn latency(&self, in_flight: usize) -> Duration {
        let queued = in_flight.max(self.capacity) as f64 / self.capacity as f64;
        self.base_latency.mul_f64(queued)
    }

    pub(crate) fn applies(&self, opcode: Opcode, statement: &str) -> bool {
        matches!(opcode, Opcode::Query | Opcode::Execute | Opcode::Batch)
            && self
                .statement_contains
                .as_ref()
                .is_none_or(|t| statement.to_ascii_lowercase().contains(t))
    }
}

/// The most latencies [`SaturationStats`] keeps (1 MiB of them): a sandbox saturated for
/// hours serves millions of requests, and its figures must not grow with them.
pub const LATENCY_SAMPLES: usize = 1 << 16;

/// What a saturated node did since it was saturated.
#[derive(Debug, Clone, Default)]
pub struct SaturationStats {
    /// Requests served (after their queueing latency).
    pub served: u64,
    /// Requests answered Overloaded.
    pub overloaded: u64,
    /// The most statements in flight at once.
    pub peak_in_flight: usize,
    /// Served requests' latencies, a uniform sample of at most [`LATENCY_SAMPLES`]: every one,
    /// in arrival order, up to that many; beyond, each served request has the same chance to
    /// be in it (reservoir sampling), so its percentiles estimate those of the whole run, not of
    /// its end.
    pub latencies: Vec<Duration>,
    /// The state of the reservoir's random choices (splitmix64, from a fixed seed: a run's
    /// sample is reproducible).
    rng: u64,
}

impl SaturationStats {
    /// Counts a served request and offers its latency to the sample (Algorithm R).
    pub(crate) fn record_served(&mut self, latency: Duration) {
        self.served += 1;
        if self.latencies.len() < LATENCY_SAMPLES {
            self.latencies.push(latency);
            return;
        }
        // The n-th request replaces a random sample with probability LATENCY_SAMPLES / n.
        let slot = self.next_random() % self.served;
        if let Some(kept) = usize::try_from(slot)
            .ok()
            .and_then(|i| self.latencies.get_mut(i))
        {
            *kept = latency;
        }
    }

    /// splitmix64: small, fast, and good enough to pick reservoir slots.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturation_parses_and_latency_grows_past_the_capacity() {
        let s = Saturation::parse(&["4", "10ms", "8", "match", "user_activity"]).unwrap();
        assert_eq!(
            s,
            Saturation::new(4, Duration::from_millis(10), 8).matching("user_activity")
        );
        assert_eq!(s.latency(1), Duration::from_millis(10));
        assert_eq!(s.latency(4), Duration::from_millis(10));
        assert_eq!(s.latency(8), Duration::from_millis(20));
        assert!(s.applies(Opcode::Execute, "INSERT INTO ks.user_activity"));
        assert!(!s.applies(Opcode::Execute, "INSERT INTO ks.user_days"));
        assert!(!s.applies(Opcode::Prepare, "INSERT INTO ks.user_activity"));
        for bad in [
            &["0", "1ms", "2"][..],
            &["4", "soon", "8"],
            &["4", "1ms"],
            &["4", "1ms", "8", "x"],
        ] {
            let err = Saturation::parse(bad).unwrap_err();
            assert!(err.contains("cql saturate CAPACITY"), "{err}");
        }
    }

    /// The nearest-rank percentile of sorted latencies, as benches/throughput.rs reads them.
    fn percentile(sorted: &[Duration], q: f64) -> Duration {
        sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
    }

    #[test]
    fn latency_samples_stay_bounded_and_represent_the_whole_run() {
        let ms = Duration::from_millis;
        // Under the bound: every latency, in arrival order.
        let mut stats = SaturationStats::default();
        for i in 0..100 {
            stats.record_served(ms(i));
        }
        assert_eq!(stats.latencies, (0..100).map(ms).collect::<Vec<_>>());

        // A long session: 16 times the bound, in three phases (80% at 2 ms, then 18% at 4 ms,
        // then 2% at 40 ms, as a node that grows slower), so a sample of the last requests
        // would see only the slow end.
        let total = 16 * LATENCY_SAMPLES as u64;
        let (fast, slow) = (total * 80 / 100, total * 18 / 100);
        let mut stats = SaturationStats::default();
        for i in 0..total {
            stats.record_served(match i {
                i if i < fast => ms(2),
                i if i < fast + slow => ms(4),
                _ => ms(40),
            });
        }
        assert_eq!(stats.served, total, "every request is counted");
        assert_eq!(
            stats.latencies.len(),
            LATENCY_SAMPLES,
            "the sample is bounded"
        );
        assert!(
            stats.latencies.capacity() < 2 * LATENCY_SAMPLES,
            "{}",
            stats.latencies.capacity()
        );
        // Each phase's share of the sample is its share of the run, within 1%.
        let share = |l: Duration| {
            stats.latencies.iter().filter(|&&x| x == l).count() as f64 / LATENCY_SAMPLES as f64
        };
        for (latency, expected) in [(ms(2), 0.80), (ms(4), 0.18), (ms(40), 0.02)] {
            let got = share(latency);
            assert!(
                (got - expected).abs() < 0.01,
                "{latency:?}: {got} of the sample, {expected} of the run"
            );
        }
        // So the percentiles callers read are the run's: p50 2 ms, p90 4 ms, p99 40 ms.
        let mut sorted = stats.latencies.clone();
        sorted.sort();
        assert_eq!(percentile(&sorted, 0.5), ms(2));
        assert_eq!(percentile(&sorted, 0.9), ms(4));
        assert_eq!(percentile(&sorted, 0.99), ms(40));
        assert_eq!(sorted.last(), Some(&ms(40)));
    }
}

//! What decoding one event costs: `vault::event::decode` of events shaped like `vault
//! produce`'s (about 210 bytes: an id, a user, a type, a timestamp and a small attributes
//! object), on one thread, as a partition task decodes them. Prints nanoseconds per event, the
//! best of five rounds:
//!
//! ```sh
//! cargo run --release --example decode_cost [events]
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use vault::event::{decode, Limits, Source};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("events: a number"))
        .unwrap_or(1_000_000);
    let now = chrono::Utc::now();
    let values: Vec<String> = (0..10_000u32)
        .map(|i| {
            let at = (now - chrono::Duration::milliseconds(i64::from(i) * 37))
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            format!(
                r#"{{"event_id":"{}","user_id":"user-{}","event_type":"page_view","occurred_at":"{at}","attributes":{{"page":"/products/{i}","referrer":"google","device":"web"}}}}"#,
                uuid::Uuid::from_u128(u128::from(i) * 0x9e37_79b9_7f4a_7c15),
                i * 7919 % 100_000,
            )
        })
        .collect();
    let topic: Arc<str> = Arc::from("activity");
    let limits = Limits::default();
    let mean = values.iter().map(String::len).sum::<usize>() / values.len();
    let mut best = f64::INFINITY;
    for round in 1..=5 {
        let started = Instant::now();
        for i in 0..n {
            let value = &values[i % values.len()];
            let source = Source {
                topic: topic.clone(),
                partition: 0,
                offset: i as i64,
                timestamp_ms: Some(now.timestamp_millis()),
            };
            let event = decode(Some(b"k"), Some(value.as_bytes()), source, None, limits);
            black_box(event.expect("a valid event"));
        }
        let ns = started.elapsed().as_nanos() as f64 / n as f64;
        println!("round {round}: {ns:.0} ns per event");
        best = best.min(ns);
    }
    println!("decode: {best:.0} ns per event ({mean} bytes each), best of 5 rounds of {n}");
}

//! The rows of the bench's baseline B (prepared inserts straight to the CQL stand-in), shared
//! with `examples/driver_cost.rs` so that both send the same statement and values. Included by
//! path (`#[path]`), not a crate: nothing here is part of vault.

use scylla::value::{CqlDate, CqlTimestamp};

/// vault's insert of one event row, with its write timestamp and TTL bound, in `keyspace`.
pub fn insert_cql(keyspace: &str) -> String {
    format!(
        "INSERT INTO {keyspace}.user_activity (user_id, day, occurred_at, event_id, event_type, \
         attributes, payload, source_topic, source_partition, source_offset, kafka_timestamp) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ? AND TTL ?"
    )
}

/// The values of [`insert_cql`] for row `i`: one of 100,000 users, one day, `payload` as the
/// stored message.
pub type Row = (
    String,
    CqlDate,
    CqlTimestamp,
    uuid::Uuid,
    &'static str,
    &'static str,
    Vec<u8>,
    &'static str,
    i32,
    i64,
    CqlTimestamp,
    i64,
    i32,
);

/// The user of row `i`.
pub fn user(i: u64) -> String {
    format!("b-{}", i % 100_000)
}

/// The day every row is written to.
pub const DAY: CqlDate = CqlDate((1u32 << 31) + 20_000);

pub fn row(i: u64, payload: Vec<u8>) -> Row {
    (
        user(i),
        DAY,
        CqlTimestamp(1_700_000_000_000 + i as i64),
        uuid::Uuid::from_u128(i as u128),
        "page_view",
        "{}",
        payload,
        "bench",
        0i32,
        i as i64,
        CqlTimestamp(1_700_000_000_000),
        vault::store::version::write_timestamp(1_700_000_000_000, i as i64),
        0i32,
    )
}

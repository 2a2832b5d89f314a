//! `vault query`: a user's activity over a time range, newest first, read page by page from the
//! `(user_id, day)` partitions the range covers.

use futures::TryStreamExt;
use scylla::client::session::Session;
use scylla::value::{CqlDate, CqlTimestamp};

use crate::config::ScyllaConfig;
use crate::store::scylla::TABLE;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ActivityRow {
    pub occurred_at: String,
    pub event_type: String,
    pub event_id: uuid::Uuid,
    pub attributes: Option<String>,
    pub source: String,
}

/// Up to `limit` events of `user` with `from_ms <= occurred_at <= to_ms`, newest first.
pub async fn user_activity(
    session: &Session,
    c: &ScyllaConfig,
    user: &str,
    from_ms: i64,
    to_ms: i64,
    limit: usize,
) -> Result<Vec<ActivityRow>, String> {
    let mut select = session
        .prepare(format!(
            "SELECT occurred_at, event_type, event_id, attributes, source_topic, source_partition, source_offset FROM {}.{TABLE} \
             WHERE user_id = ? AND day = ? AND occurred_at >= ? AND occurred_at <= ?",
            c.keyspace
        ))
        .await
        .map_err(|e| format!("cannot prepare the query: {e} (run `vault migrate`?)"))?;
    select.set_page_size(limit.clamp(1, 1000) as i32);
    let mut out = Vec::new();
    let mut day = to_ms.div_euclid(86_400_000);
    let first_day = from_ms.div_euclid(86_400_000);
    while day >= first_day && out.len() < limit {
        let values = (
            user,
            CqlDate(((1i64 << 31) + day) as u32),
            CqlTimestamp(from_ms),
            CqlTimestamp(to_ms),
        );
        type Row = (
            CqlTimestamp,
            String,
            uuid::Uuid,
            Option<String>,
            String,
            i32,
            i64,
        );
        let mut rows = session
            .execute_iter(select.clone(), values)
            .await
            .map_err(|e| e.to_string())?
            .rows_stream::<Row>()
            .map_err(|e| e.to_string())?;
        while let Some((at, event_type, event_id, attributes, topic, partition, offset)) =
            rows.try_next().await.map_err(|e| e.to_string())?
        {
            let occurred_at = chrono::DateTime::from_timestamp_millis(at.0)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_else(|| at.0.to_string());
            out.push(ActivityRow {
                occurred_at,
                event_type,
                event_id,
                attributes,
                source: format!("{topic}/{partition}@{offset}"),
            });
            if out.len() >= limit {
                break;
            }
        }
        day -= 1;
    }
    Ok(out)
}

/// Renders rows as an aligned text table.
pub fn table(rows: &[ActivityRow]) -> String {
    let mut out = format!(
        "{:<24}  {:<12}  {:<36}  {:<22}  {}\n",
        "occurred_at", "event_type", "event_id", "source", "attributes"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<24}  {:<12}  {:<36}  {:<22}  {}\n",
            r.occurred_at,
            r.event_type,
            r.event_id,
            r.source,
            r.attributes.as_deref().unwrap_or("")
        ));
    }
    out
}

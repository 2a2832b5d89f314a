//! `vault verify`: reads back what `vault produce` recorded and reports events stored, missing,
//! stored more than once and dead-lettered, plus the group's committed offset against the end
//! offset of every partition.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use scylla::value::CqlDate;

use crate::config::Settings;
use crate::store::read::{pager_error, row_error};
use crate::store::scylla::{connect, TABLE};
use crate::tools::dlq::LetterInfo;
use crate::tools::progress::Progress;
use crate::tools::record;

#[derive(Debug, Clone, Default)]
pub struct PartitionState {
    pub partition: i32,
    pub committed: Option<i64>,
    /// The log's start (low watermark) and end.
    pub start: i64,
    pub end: i64,
}

impl PartitionState {
    /// Committed to the end; or the log holds nothing to read (never written to, or emptied by
    /// retention), where vault may have nothing to commit. Whether what was produced there is
    /// stored is the rows' check, not this one.
    pub fn caught_up(&self) -> bool {
        self.committed == Some(self.end) || self.start == self.end
    }
}

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Distinct valid events produced.
    pub expected: usize,
    pub stored: usize,
    pub missing: usize,
    /// Rows beyond one per event (0 when writes are idempotent).
    pub stored_more_than_once: usize,
    pub invalid_expected: usize,
    pub dead_lettered: usize,
    pub dead_letters_missing: usize,
    pub partitions: Vec<PartitionState>,
}

impl VerifyReport {
    pub fn all_committed(&self) -> bool {
        self.partitions.iter().all(PartitionState::caught_up)
    }

    pub fn ok(&self) -> bool {
        self.missing == 0 && self.dead_letters_missing == 0 && self.all_committed()
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "events expected      {}", self.expected)?;
        writeln!(f, "stored               {}", self.stored)?;
        writeln!(f, "missing              {}", self.missing)?;
        writeln!(f, "stored more than once {}", self.stored_more_than_once)?;
        writeln!(f, "invalid produced     {}", self.invalid_expected)?;
        writeln!(
            f,
            "dead-lettered        {} ({} missing)",
            self.dead_lettered, self.dead_letters_missing
        )?;
        let lag: i64 = self
            .partitions
            .iter()
            .map(|p| p.end - p.committed.unwrap_or(p.start))
            .sum();
        writeln!(
            f,
            "partitions           {} (committed == end, or empty, on all: {}, total lag {lag})",
            self.partitions.len(),
            self.all_committed()
        )?;
        for p in self.partitions.iter().filter(|p| !p.caught_up()) {
            writeln!(
                f,
                "  partition {}: committed {:?}, end {}",
                p.partition, p.committed, p.end
            )?;
        }
        write!(
            f,
            "verdict              {}",
            if self.ok() {
                "OK: nothing lost"
            } else {
                "FAILED"
            }
        )
    }
}

fn offsets(consumer: &BaseConsumer, topic: &str) -> Result<Vec<PartitionState>, String> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map_err(|e| format!("committed offsets: {e}"))?;
    parts
        .iter()
        .map(|&p| {
            let (start, end) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map_err(|e| format!("watermarks: {e}"))?;
            let committed = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            };
            Ok(PartitionState {
                partition: p,
                committed,
                start,
                end,
            })
        })
        .collect()
}

/// Verifies `record` against Kafka and ScyllaDB, first waiting up to `wait` for the group to
/// commit every partition to its end.
pub async fn verify(
    settings: &Settings,
    base: &ClientConfig,
    record_path: &Path,
    wait: Duration,
) -> Result<VerifyReport, String> {
    let produced = record::read(record_path)
        .map_err(|e| format!("cannot read {}: {e}", record_path.display()))?;
    let topic = settings
        .config
        .kafka
        .topics
        .first()
        .cloned()
        .ok_or("no topic configured")?;
    let mut report = VerifyReport::default();

    // 1. The group's progress.
    let mut cfg = base.clone();
    cfg.set("group.id", &settings.config.kafka.group_id)
        .set("enable.auto.commit", "false");
    let probe: Arc<BaseConsumer> = Arc::new(
        cfg.create()
            .map_err(|e| format!("cannot create a consumer: {e}"))?,
    );
    let mut progress = Progress::new("commits", None);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (p, t) = (probe.clone(), topic.clone());
        let states = tokio::task::spawn_blocking(move || offsets(&p, &t))
            .await
            .map_err(|e| e.to_string())??;
        let committed: i64 = states.iter().map(|s| s.committed.unwrap_or(0)).sum();
        let end: i64 = states.iter().map(|s| s.end).sum();
        report.partitions = states;
        if report.all_committed() || tokio::time::Instant::now() >= deadline {
            progress.finish(committed as u64, &format!("of {end} committed"));
            break;
        }
        progress.update(committed as u64, &format!("of {end} committed, waiting"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // 2. Rows in ScyllaDB, one query per (user, day) partition.
    let mut groups: HashMap<(String, i64), HashSet<uuid::Uuid>> = HashMap::new();
    let mut invalid: HashSet<(i32, i64)> = HashSet::new();
    for r in &produced {
        match (&r.u, r.d, r.id) {
            (Some(u), Some(d), Some(id)) => {
                groups.entry((u.clone(), d)).or_default().insert(id);
            }
            _ => {
                invalid.insert((r.p, r.o));
            }
        }
    }
    report.expected = groups.values().map(HashSet::len).sum();
    report.invalid_expected = invalid.len();
    let c = &settings.config.scylla;
    let session = Arc::new(connect(c).await.map_err(|e| e.to_string())?);
    let select = session
        .prepare(format!(
            "SELECT event_id FROM {}.{TABLE} WHERE user_id = ? AND day = ?",
            c.keyspace
        ))
        .await
        .map_err(|e| format!("cannot prepare the read: {e} (run `vault migrate`?)"))?;
    let mut progress = Progress::new("verify", Some(groups.len() as u64));
    let mut results = stream::iter(groups)
        .map(|((user, day), ids)| {
            let (session, select) = (session.clone(), select.clone());
            async move {
                // Paged: a partition of a heavy user may hold more rows than one answer should.
                let mut rows = session
                    .execute_iter(
                        select,
                        (user.as_str(), CqlDate(((1i64 << 31) + day) as u32)),
                    )
                    .await
                    .map_err(|e| pager_error(e).to_string())?
                    .rows_stream::<(uuid::Uuid,)>()
                    .map_err(|e| e.to_string())?;
                let mut found: HashMap<uuid::Uuid, usize> = HashMap::new();
                while let Some(row) = rows.next().await {
                    let (id,) = row.map_err(|e| row_error(e).to_string())?;
                    *found.entry(id).or_default() += 1;
                }
                let stored = ids.iter().filter(|id| found.contains_key(id)).count();
                let extra = ids
                    .iter()
                    .map(|id| found.get(id).copied().unwrap_or(0).saturating_sub(1))
                    .sum::<usize>();
                Ok::<_, String>((ids.len(), stored, extra))
            }
        })
        .buffer_unordered(64);
    let mut done = 0u64;
    while let Some(r) = results.next().await {
        let (expected, stored, extra) = r?;
        report.stored += stored;
        report.missing += expected - stored;
        report.stored_more_than_once += extra;
        done += 1;
        progress.update(done, "");
    }
    progress.finish(done, "user-day partitions read");

    // 3. The dead-letter topic.
    let dlq = settings.dead_letter_topic(&topic);
    let cfg = base.clone();
    let found = tokio::task::spawn_blocking(move || read_dead_letters(&cfg, &dlq, &topic))
        .await
        .map_err(|e| e.to_string())??;
    report.dead_lettered = invalid.iter().filter(|k| found.contains(k)).count();
    report.dead_letters_missing = report.invalid_expected - report.dead_lettered;
    Ok(report)
}

/// Source `(partition, offset)` of every dead letter of `source_topic` in `dlq`.
fn read_dead_letters(
    cfg: &ClientConfig,
    dlq: &str,
    source_topic: &str,
) -> Result<HashSet<(i32, i64)>, String> {
    let mut found = HashSet::new();
    let mut progress = Progress::new("letters", None);
    let read = crate::tools::dlq::scan(
        cfg,
        dlq,
        false,
        |m| {
            let info = LetterInfo::of(m);
            if let (true, Some(p), Some(o)) = (
                info.source_topic == source_topic,
                info.source_partition,
                info.source_offset,
            ) {
                found.insert((p, o));
            }
            Ok(())
        },
        |done, total| progress.update(done, &format!("of {total} dead letters scanned")),
    )?;
    progress.finish(read, "dead letters scanned");
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_nothing_was_ever_written_to_is_caught_up_without_a_commit() {
        let p = |committed, start, end| PartitionState {
            partition: 0,
            committed,
            start,
            end,
        };
        assert!(p(None, 0, 0).caught_up(), "never written to");
        assert!(p(None, 7, 7).caught_up(), "everything deleted by retention");
        assert!(p(Some(3), 7, 7).caught_up(), "deleted after a commit");
        assert!(
            !p(None, 0, 5).caught_up(),
            "nothing committed, five to read"
        );
        assert!(p(Some(5), 0, 5).caught_up());
        assert!(!p(Some(4), 0, 5).caught_up());
    }
}

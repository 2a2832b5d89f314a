//! The dead-letter topic, read back: `vault dlq replay` re-publishes dead letters to their source
//! topic after the cause is fixed (filtered by error kind and time), and `verify` finds which
//! source messages were dead-lettered. Both read a dead-letter topic from its beginning to the
//! end it had when the read started, with [`scan`].
//!
//! Replay publishes only to the configured source topics that dead-letter into the topic read:
//! a letter naming any other topic (forged, or from another configuration) is counted and
//! skipped. A replayed message carries its original coordinates (`vault.source.*`), from which
//! an event without `event_id` gets the same id, so the same row, as its first read would have.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};

use crate::event::MAX_USER_ID_BYTES;
use crate::kafka::dead_letter::headers;
use crate::kafka::options;
use crate::tools::progress::Progress;
use crate::tools::query::escape;

/// Header a replayed message carries: `<dead-letter topic>/<partition>/<offset>` it came from.
pub const REPLAYED_FROM: &str = "vault.replayed.from";

/// What a dead letter's headers say about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LetterInfo {
    pub kind: String,
    pub source_topic: String,
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
    /// The source message's timestamp (ms), else the dead letter's own.
    pub timestamp_ms: Option<i64>,
    /// The source message's timestamp (ms) only: `None` when the letter does not carry one.
    pub source_timestamp_ms: Option<i64>,
    /// The letter's value, or key, was cut to fit the dead-letter topic
    /// (`vault.value.truncated`, `vault.key.truncated`): it is not the source message.
    pub value_cut: bool,
    pub key_cut: bool,
    /// The letter has a value (a tombstone's, or a dead-lettered erasure request's, has none).
    pub has_value: bool,
    /// Hex SHA-256 of the whole source value, when it was cut (`vault.value.sha256`).
    pub value_sha256: Option<String>,
}

impl LetterInfo {
    /// Whether the letter was cut to fit the dead-letter topic.
    pub fn cut(&self) -> bool {
        self.value_cut || self.key_cut
    }

    pub fn of(m: &BorrowedMessage<'_>) -> LetterInfo {
        let mut info = LetterInfo {
            timestamp_ms: m.timestamp().to_millis(),
            has_value: m.payload().is_some(),
            ..Default::default()
        };
        // By name, never by rdkafka's iteration, which panics on a name that is not UTF-8
        // (whoever can write the dead-letter topic chooses them).
        let text = |name| {
            crate::kafka::header(m, name)
                .map(|v| String::from_utf8_lossy(v.unwrap_or_default()).into_owned())
        };
        info.kind = text(headers::ERROR_KIND).unwrap_or_default();
        info.source_topic = text(headers::SOURCE_TOPIC).unwrap_or_default();
        info.source_partition = text(headers::SOURCE_PARTITION).and_then(|v| v.parse().ok());
        info.source_offset = text(headers::SOURCE_OFFSET).and_then(|v| v.parse().ok());
        info.value_cut = text(headers::VALUE_TRUNCATED).is_some_and(|v| v == "true");
        info.key_cut = text(headers::KEY_TRUNCATED).is_some_and(|v| v == "true");
        info.value_sha256 = text(headers::VALUE_SHA256);
        if let Some(t) = text(headers::SOURCE_TIMESTAMP).and_then(|v| v.parse().ok()) {
            info.timestamp_ms = Some(t);
            info.source_timestamp_ms = Some(t);
        }
        info
    }
}

/// The partitions of `topic` from the cluster's metadata; `None` when it does not exist.
fn partitions_of(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Option<Vec<i32>>, String> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error() {
        None => Ok(Some(t.partitions().iter().map(|p| p.id()).collect())),
        Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => Ok(None),
        Some(e) => Err(format!(
            "metadata of {topic}: {}",
            RDKafkaErrorCode::from(e)
        )),
    }
}

/// Calls `each` for every message of `topic`, from the beginning of each partition to the end
/// offset it had when the scan started (messages arriving meanwhile are not waited for).
/// Returns how many messages were read. A topic the cluster does not have reads as empty unless
/// `must_exist`; any other error of the topic (say, not authorized) fails the scan.
pub fn scan(
    base: &ClientConfig,
    topic: &str,
    must_exist: bool,
    mut each: impl FnMut(&BorrowedMessage<'_>) -> Result<(), String>,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, String> {
    let mut cfg = base.clone();
    cfg.set("group.id", "vault-dlq-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    // Reading a topic never creates it, whatever the configuration allows.
    options::set_owned(&mut cfg, "allow.auto.create.topics", "false");
    let consumer: BaseConsumer = cfg
        .create()
        .map_err(|e| format!("Kafka client for {topic}: {e}"))?;
    let Some(partitions) = partitions_of(&consumer, topic, Duration::from_secs(10))? else {
        if must_exist {
            return Err(missing_dead_letter_topic(topic));
        }
        return Ok(0);
    };
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    let mut total = 0u64;
    for p in partitions {
        let (lo, hi) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(|e| format!("end offsets of {topic}: {e}"))?;
        if hi > lo {
            tpl.add_partition_offset(topic, p, Offset::Offset(lo))
                .map_err(|e| e.to_string())?;
            ends.insert(p, hi);
            total += (hi - lo) as u64;
        }
    }
    if ends.is_empty() {
        return Ok(0);
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let mut read = 0u64;
    let mut idle = std::time::Instant::now();
    while !ends.is_empty() {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                idle = std::time::Instant::now();
                let Some(&end) = ends.get(&m.partition()) else {
                    continue;
                };
                if m.offset() < end {
                    each(&m)?;
                    read += 1;
                    progress(read, total);
                }
                if m.offset() + 1 >= end {
                    ends.remove(&m.partition());
                }
            }
            Some(Err(e)) => return Err(format!("reading {topic}: {e}")),
            None if idle.elapsed() > Duration::from_secs(60) => {
                return Err(format!(
                    "reading {topic}: nothing arrived for 60s with partitions {:?} unfinished",
                    ends.keys().collect::<Vec<_>>()
                ))
            }
            None => {}
        }
    }
    Ok(read)
}

/// Checks that every topic a replay of `routes` (each dead-letter topic with the source topics
/// its letters may go back to) will read or write exists and can be described, before any is
/// replayed: a replay of several dead-letter topics then stops before it sends anything, not
/// after the earlier ones were replayed. [`replay`] describes its own topics again.
pub fn check_routes<'a>(
    base: &ClientConfig,
    routes: impl IntoIterator<Item = (&'a str, &'a [String])>,
) -> Result<(), String> {
    let reader = Sources::new(base)?;
    for (dead_letter_topic, sources) in routes {
        if partitions_of(&reader.consumer, dead_letter_topic, Duration::from_secs(30))?.is_none() {
            return Err(missing_dead_letter_topic(dead_letter_topic));
        }
        for source in sources {
            reader.partition_count(source)?;
        }
    }
    Ok(())
}

fn missing_dead_letter_topic(topic: &str) -> String {
    format!("topic {topic} does not exist: check kafka.dead_letter_topic")
}

/// Reads source messages back by their coordinates: the whole message a letter cut to fit the
/// dead-letter topic stands for, while the source topic still keeps it.
struct Sources {
    consumer: BaseConsumer,
}

impl Sources {
    fn new(base: &ClientConfig) -> Result<Sources, String> {
        let mut cfg = base.clone();
        cfg.set("group.id", "vault-dlq-source-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "error");
        // Describing a topic never creates it, whatever the configuration allows.
        options::set_owned(&mut cfg, "allow.auto.create.topics", "false");
        let consumer = cfg
            .create()
            .map_err(|e| format!("Kafka client for source topics: {e}"))?;
        Ok(Sources { consumer })
    }

    /// How many partitions `topic` has (its consumer never creates a topic it asks about).
    fn partition_count(&self, topic: &str) -> Result<i32, String> {
        match partitions_of(&self.consumer, topic, Duration::from_secs(30))? {
            Some(p) => Ok(i32::try_from(p.len()).unwrap_or(i32::MAX)),
            None => Err(format!(
                "source topic {topic} does not exist (kafka.topics names it)"
            )),
        }
    }

    /// The whole message the cut `letter` stands for: the one at its source coordinates, when
    /// the log still holds it and it is the one the letter was cut from (its value has the
    /// digest the letter names; or, with only the key cut, its value is the letter's and its key
    /// begins with the letter's). Otherwise why not, for the summary.
    fn whole(
        &self,
        letter: &BorrowedMessage<'_>,
        info: &LetterInfo,
    ) -> Result<OwnedMessage, String> {
        let (Some(partition), Some(offset)) = (info.source_partition, info.source_offset) else {
            return Err("the letter does not say where its source is".into());
        };
        if info.value_cut && info.value_sha256.is_none() {
            return Err("the letter names no digest of its source's value".into());
        }
        let topic = info.source_topic.as_str();
        let (start, end) = self
            .consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .map_err(|e| format!("cannot read the source's offsets: {e}"))?;
        if offset < start || offset >= end {
            return Err(format!(
                "no longer in the source (its log holds offsets {start} to {end})"
            ));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(|e| e.to_string())?;
        self.consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let message = loop {
            match self.consumer.poll(Duration::from_millis(500)) {
                // A message of an earlier read of the partition, before the one asked for.
                Some(Ok(m))
                    if m.topic() == topic && m.partition() == partition && m.offset() < offset => {}
                Some(Ok(m)) if m.topic() == topic && m.partition() == partition => {
                    if m.offset() != offset {
                        return Err("no longer in the source (compacted away)".into());
                    }
                    break m.detach();
                }
                Some(Ok(_)) => {}
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                    return Err("no longer in the source (deleted meanwhile)".into());
                }
                Some(Err(e)) => return Err(format!("cannot read the source: {e}")),
                None if std::time::Instant::now() > deadline => {
                    return Err("cannot read the source: nothing arrived for 30s".into());
                }
                None => {}
            }
        };
        let same = if info.value_cut {
            let hex: String = openssl::sha::sha256(message.payload().unwrap_or_default())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            info.value_sha256.as_deref() == Some(hex.as_str())
        } else {
            message.payload() == letter.payload()
                && message
                    .key()
                    .unwrap_or_default()
                    .starts_with(letter.key().unwrap_or_default())
        };
        if !same {
            return Err("the source message there is not the one the letter was cut from".into());
        }
        Ok(message)
    }
}

/// The header value of each original coordinate a letter names, for the replayed message.
fn origin_headers(info: &LetterInfo) -> Option<[(&'static str, String); 3]> {
    Some([
        (headers::SOURCE_TOPIC, info.source_topic.clone()),
        (
            headers::SOURCE_PARTITION,
            info.source_partition?.to_string(),
        ),
        (headers::SOURCE_OFFSET, info.source_offset?.to_string()),
    ])
}

/// Which dead letters to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// Error kinds to replay (`vault.error.kind`); empty: every letter with a value. A letter
    /// without one ([`TOMBSTONE`]s, and erasure requests dead-lettered for another reason, such
    /// as `future_timestamp`) goes back only when its kind is named: with
    /// `pipeline.tombstones = "erase"`, each one erases its user.
    pub kinds: Vec<String>,
    /// Only letters whose source timestamp is at or after this (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Only letters whose source timestamp is before this (ms since the epoch).
    pub until_ms: Option<i64>,
}

impl ReplayFilter {
    pub fn matches(&self, info: &LetterInfo) -> bool {
        let kind = if self.kinds.is_empty() {
            info.has_value
        } else {
            self.kinds.contains(&info.kind)
        };
        let ts = info.timestamp_ms.unwrap_or(i64::MIN);
        kind && self.since_ms.is_none_or(|s| ts >= s) && self.until_ms.is_none_or(|u| ts < u)
    }
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplaySummary {
    pub dead_letter_topic: String,
    pub scanned: u64,
    /// Letters the filter selected, by error kind.
    pub matched_by_kind: BTreeMap<String, u64>,
    /// Selected letters to re-publish, by destination (their source topic).
    pub destinations: BTreeMap<String, u64>,
    /// Selected letters whose `vault.source.topic` is not a source topic of this dead-letter
    /// topic, by the topic they name: never published.
    pub refused: BTreeMap<String, u64>,
    /// Selected letters not re-published because their user was erased through a time at or
    /// after the event's (or, for a letter without a timestamp, erased at all).
    pub erased: u64,
    /// Selected letters cut to fit the dead-letter topic whose whole message was read from its
    /// source (and re-published, unless erased).
    pub recovered: u64,
    /// Selected letters cut to fit the dead-letter topic whose whole message could not be read
    /// back (gone from the source, not the one the letter was cut from, or unreadable): not
    /// re-published; and the first [`CUT_NAMED`] of them (`topic/partition/offset: why`).
    pub cut: u64,
    pub cut_sources: Vec<String>,
    /// Selected letters sent by key: their letter names no source partition their topic has
    /// now.
    pub by_key: u64,
    pub replayed: u64,
    pub dry_run: bool,
    pub elapsed: Duration,
}

/// The error kind of a dead-lettered tombstone (a key without a value): replayed only when
/// named.
pub const TOMBSTONE: &str = "tombstone";

/// The largest message a replay re-publishes (a letter's whole source message included): the
/// producer's `message.max.bytes`; the broker's own limit still applies.
pub const MAX_REPLAYED_BYTES: usize = 100_000_000;

/// Cut letters named in a summary, at most.
const CUT_NAMED: usize = 10;

/// How [`ReplaySummary`] names a letter without a `vault.source.topic` header.
const NO_SOURCE_TOPIC: &str = "(no vault.source.topic)";

impl fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let matched: u64 = self.matched_by_kind.values().sum();
        let refused: u64 = self.refused.values().sum();
        writeln!(f, "dead-letter topic    {}", self.dead_letter_topic)?;
        writeln!(f, "scanned              {}", self.scanned)?;
        writeln!(f, "matched              {matched}")?;
        // Kinds and refused topics come from the letters' headers, which whoever can write
        // the dead-letter topic controls: escaped, like `vault query`'s stored text.
        for (kind, n) in &self.matched_by_kind {
            writeln!(f, "  {:<18} {n}", escape(kind))?;
        }
        writeln!(f, "destinations")?;
        for (topic, n) in &self.destinations {
            writeln!(f, "  {topic} -> {n}")?;
        }
        if refused > 0 {
            writeln!(
                f,
                "skipped              {refused} (naming a topic that is not a configured source of this dead-letter topic)"
            )?;
            for (topic, n) in &self.refused {
                writeln!(f, "  {} -> {n}", escape(topic))?;
            }
        }
        if self.erased > 0 {
            writeln!(
                f,
                "skipped              {} (their user was erased after they happened)",
                self.erased
            )?;
        }
        if self.recovered > 0 {
            writeln!(
                f,
                "read whole           {} (cut to fit the dead-letter topic: read again from their source)",
                self.recovered
            )?;
        }
        if self.cut > 0 {
            writeln!(
                f,
                "skipped              {} (cut to fit the dead-letter topic, and their whole \
                 message could not be read back from their source{})",
                self.cut,
                if self.cut_sources.is_empty() {
                    ""
                } else {
                    ", e.g."
                }
            )?;
            for source in &self.cut_sources {
                writeln!(f, "  {}", escape(source))?;
            }
        }
        if self.by_key > 0 {
            writeln!(
                f,
                "{}          {} (their letter names no partition their topic has now)",
                if self.dry_run {
                    "by key     "
                } else {
                    "sent by key"
                },
                self.by_key
            )?;
        }
        if self.dry_run {
            write!(f, "replayed             0 (dry run)")
        } else {
            write!(
                f,
                "replayed             {} in {:.1}s",
                self.replayed,
                self.elapsed.as_secs_f64()
            )
        }
    }
}

/// Re-publishes the dead letters of `dead_letter_topic` that `filter` selects to the topic they
/// came from, when that is one of `sources` (the configured topics that dead-letter there), with
/// their original key, value and timestamp, their original coordinates (`vault.source.topic`,
/// `.partition`, `.offset`) and a [`REPLAYED_FROM`] header, to their original partition (by
/// key when the topic has no such partition any more). Letters naming another topic are
/// counted in [`ReplaySummary::refused`] and skipped. A letter cut to fit the dead-letter topic
/// is not the message that was read: that one is read again from its source coordinates and
/// re-published whole when its value has the digest the letter names
/// ([`ReplaySummary::recovered`]), else skipped ([`ReplaySummary::cut`]). The producer takes
/// messages up to [`MAX_REPLAYED_BYTES`] (compressed with lz4 unless the configuration says
/// otherwise, as a large source message likely was), and a missing dead-letter topic is an
/// error. Each replayed letter is acknowledged by
/// Kafka (`acks=all`, idempotent producer) before the summary is returned. Running it twice
/// replays twice, onto the same rows: an event's `event_id`, or the id derived from its original
/// coordinates, is the same each time.
///
/// A letter of a user erased after the event happened is skipped and counted in
/// [`ReplaySummary::erased`]: `erased_through(user_id)` answers the latest erasure of a user (see
/// [`crate::store::erasure::erased_through`]), asked once per user; an error stops the replay.
/// Letters whose value names no user (not JSON, no `user_id` string) cannot become a row and go
/// back as they are.
pub async fn replay(
    base: &ClientConfig,
    dead_letter_topic: &str,
    sources: &[String],
    filter: &ReplayFilter,
    dry_run: bool,
    mut erased_through: impl FnMut(&str) -> Result<Option<i64>, String> + Send + 'static,
) -> Result<ReplaySummary, String> {
    let started = std::time::Instant::now();
    let mut pcfg = base.clone();
    for (name, value) in [
        ("acks", "all"),
        ("enable.idempotence", "true"),
        ("linger.ms", "5"),
    ] {
        options::set_owned(&mut pcfg, name, value);
    }
    options::set_default(
        &mut pcfg,
        "message.max.bytes",
        &MAX_REPLAYED_BYTES.to_string(),
    );
    options::set_default(&mut pcfg, "compression.type", "lz4");
    // Where letters go back, asked before anything is read or sent (a dry run too): a topic
    // that cannot be described stops the replay before it publishes anything. Metadata
    // requests block, for up to 30 s each: on a thread of the blocking pool.
    let described = tokio::task::spawn_blocking({
        let (base, sources) = (base.clone(), sources.to_vec());
        move || {
            let reader = Sources::new(&base)?;
            let mut partitions: HashMap<String, i32> = HashMap::new();
            for source in &sources {
                partitions.insert(source.clone(), reader.partition_count(source)?);
            }
            Ok::<_, String>((reader, partitions))
        }
    });
    let (sources_reader, partitions) = described.await.map_err(|e| e.to_string())??;
    // Shared, and held here until every delivery has reported: dropping a producer purges
    // what it has not delivered yet.
    let producer: std::sync::Arc<FutureProducer> =
        std::sync::Arc::new(pcfg.create().map_err(|e| format!("producer: {e}"))?);
    let scan_producer = producer.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(), String>>(1024);
    let base = base.clone();
    let topic = dead_letter_topic.to_owned();
    let filter = filter.clone();
    let sources = sources.to_vec();
    let scanning = tokio::task::spawn_blocking(move || {
        let mut summary = ReplaySummary {
            dead_letter_topic: topic.clone(),
            dry_run,
            ..Default::default()
        };
        let mut progress = Progress::new("replay", None);
        let mut erasures: HashMap<String, Option<i64>> = HashMap::new();
        let scanned = scan(
            &base,
            &topic,
            true,
            |m| {
                let info = LetterInfo::of(m);
                if !filter.matches(&info) {
                    return Ok(());
                }
                *summary
                    .matched_by_kind
                    .entry(info.kind.clone())
                    .or_default() += 1;
                if !sources.contains(&info.source_topic) {
                    let named = if info.source_topic.is_empty() {
                        NO_SOURCE_TOPIC
                    } else {
                        &info.source_topic
                    };
                    *summary.refused.entry(named.to_owned()).or_default() += 1;
                    return Ok(());
                }
                let whole = if info.cut() {
                    match sources_reader.whole(m, &info) {
                        Ok(whole) => {
                            summary.recovered += 1;
                            Some(whole)
                        }
                        Err(why) => {
                            summary.cut += 1;
                            if summary.cut_sources.len() < CUT_NAMED {
                                summary.cut_sources.push(format!(
                                    "{}/{}/{}: {why}",
                                    info.source_topic,
                                    info.source_partition.map_or("?".into(), |p| p.to_string()),
                                    info.source_offset.map_or("?".into(), |o| o.to_string())
                                ));
                            }
                            return Ok(());
                        }
                    }
                } else {
                    None
                };
                let (key, value) = match &whole {
                    Some(w) => (w.key(), w.payload()),
                    None => (m.key(), m.payload()),
                };
                if let Some(user) = value.and_then(letter_user) {
                    let through = match erasures.get(&user) {
                        Some(t) => *t,
                        None => {
                            let t = erased_through(&user)
                                .map_err(|e| format!("checking erasures before replaying: {e}"))?;
                            erasures.insert(user, t);
                            t
                        }
                    };
                    let erased_after = match (through, info.source_timestamp_ms) {
                        (Some(t), Some(ts)) => t >= ts,
                        (Some(_), None) => true,
                        (None, _) => false,
                    };
                    if erased_after {
                        summary.erased += 1;
                        return Ok(());
                    }
                }
                *summary
                    .destinations
                    .entry(info.source_topic.clone())
                    .or_default() += 1;
                // Back to the partition it was read from, where the rest of its key's messages
                // are, whatever partitioner its producer used; by key only when the topic no
                // longer has that partition (counted, in a dry run too).
                let count = partitions.get(&info.source_topic).copied().unwrap_or(0);
                let partition = info.source_partition.filter(|p| (0..count).contains(p));
                if partition.is_none() {
                    summary.by_key += 1;
                }
                if dry_run {
                    return Ok(());
                }
                let from = format!("{topic}/{}/{}", m.partition(), m.offset());
                let mut hdrs = OwnedHeaders::new().insert(Header {
                    key: REPLAYED_FROM,
                    value: Some(&from),
                });
                for (key, value) in origin_headers(&info).iter().flatten() {
                    hdrs = hdrs.insert(Header {
                        key,
                        value: Some(value),
                    });
                }
                let mut record: FutureRecord<'_, [u8], [u8]> =
                    FutureRecord::to(&info.source_topic).headers(hdrs);
                if let Some(p) = partition {
                    record = record.partition(p);
                }
                if let Some(k) = key {
                    record = record.key(k);
                }
                if let Some(v) = value {
                    record = record.payload(v);
                }
                if let Some(ts) = info.timestamp_ms {
                    record = record.timestamp(ts);
                }
                let delivery = loop {
                    match scan_producer.send_result(record) {
                        Ok(d) => break d,
                        Err((e, r)) if is_queue_full(&e) => {
                            record = r;
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err((e, _)) => return Err(format!("re-publishing {from}: {e}")),
                    }
                };
                let tx = tx.clone();
                let from2 = from.clone();
                // Deliveries are awaited on the runtime; the scan thread only enqueues.
                tokio::runtime::Handle::current().spawn(async move {
                    let r = match delivery.await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((e, _))) => Err(format!("re-publishing {from2}: {e}")),
                        Err(_) => Err(format!("re-publishing {from2}: cancelled")),
                    };
                    let _ = tx.send(r).await;
                });
                Ok(())
            },
            |done, total| progress.update(done, &format!("of {total} scanned")),
        )?;
        summary.scanned = scanned;
        progress.finish(scanned, "dead letters scanned");
        Ok::<_, String>(summary)
    });
    // Every sender is gone once the scan has ended and each delivery has reported.
    let (mut replayed, mut first_error) = (0u64, None);
    while let Some(r) = rx.recv().await {
        match r {
            Ok(()) => replayed += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let summary = scanning.await.map_err(|e| e.to_string())?;
    drop(producer);
    if let Some(e) = first_error {
        return Err(format!(
            "{e} ({replayed} other letter(s) acknowledged; once fixed, replay again: the \
             same letters land on the same rows)"
        ));
    }
    let mut summary = summary?;
    summary.replayed = replayed;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// The user a letter's value names, if it is a JSON object with a `user_id` string the decoder
/// would accept (not empty, at most [`MAX_USER_ID_BYTES`]): any other letter cannot become a
/// row, and asking the store about its user could only fail.
fn letter_user(value: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        user_id: String,
    }
    serde_json::from_slice::<Named>(value)
        .ok()
        .map(|n| n.user_id)
        .filter(|u| !u.is_empty() && u.len() <= MAX_USER_ID_BYTES)
}

fn is_queue_full(e: &rdkafka::error::KafkaError) -> bool {
    matches!(
        e,
        rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: &str, ts: i64) -> LetterInfo {
        LetterInfo {
            kind: kind.into(),
            source_topic: "t".into(),
            timestamp_ms: Some(ts),
            has_value: kind != TOMBSTONE,
            ..Default::default()
        }
    }

    #[test]
    fn letters_without_a_value_go_back_only_when_their_kind_is_named() {
        let every = ReplayFilter::default();
        assert!(every.matches(&info("bad_json", 1)));
        assert!(
            !every.matches(&info(TOMBSTONE, 1)),
            "each one would erase its user"
        );
        let future_erasure = LetterInfo {
            has_value: false,
            ..info("future_timestamp", 1)
        };
        assert!(
            !every.matches(&future_erasure),
            "an erasure request, whatever its kind"
        );
        let named = ReplayFilter {
            kinds: vec![TOMBSTONE.into()],
            ..Default::default()
        };
        assert!(named.matches(&info(TOMBSTONE, 1)));
        assert!(!named.matches(&info("bad_json", 1)));
    }

    #[test]
    fn a_replayed_message_carries_the_original_coordinates_when_the_letter_has_them() {
        let full = LetterInfo {
            source_partition: Some(3),
            source_offset: Some(42),
            ..info("bad_json", 1)
        };
        assert_eq!(
            origin_headers(&full),
            Some([
                (headers::SOURCE_TOPIC, "t".to_owned()),
                (headers::SOURCE_PARTITION, "3".to_owned()),
                (headers::SOURCE_OFFSET, "42".to_owned()),
            ])
        );
        assert_eq!(origin_headers(&info("bad_json", 1)), None);
    }

    #[test]
    fn the_summary_shows_destinations_and_what_was_skipped() {
        let summary = ReplaySummary {
            dead_letter_topic: "shared.dlq".into(),
            scanned: 5,
            matched_by_kind: BTreeMap::from([("bad_json".into(), 4)]),
            destinations: BTreeMap::from([("a".into(), 2), ("b".into(), 1)]),
            refused: BTreeMap::from([("payments".into(), 1)]),
            dry_run: true,
            ..Default::default()
        };
        let text = summary.to_string();
        for line in [
            "matched              4\n",
            "destinations\n  a -> 2\n  b -> 1\n",
            "skipped              1 (",
            "  payments -> 1\n",
            "replayed             0 (dry run)",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
    }

    #[test]
    fn a_letter_names_its_user_only_when_its_value_is_an_object_with_a_user_id_string() {
        assert_eq!(
            letter_user(br#"{"event_type":"t","user_id":"u-1","x":[1]}"#),
            Some("u-1".into())
        );
        assert_eq!(letter_user(br#"{"user_id":"a\"b"}"#), Some("a\"b".into()));
        let long = format!(r#"{{"user_id":"{}"}}"#, "u".repeat(MAX_USER_ID_BYTES + 1));
        for value in [
            &b"{not json"[..],
            br#"{"user_id":7}"#,
            br#"{"user_id":""}"#,
            long.as_bytes(),
            b"[1]",
            b"",
        ] {
            assert_eq!(
                letter_user(value),
                None,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn forged_header_text_cannot_drive_the_terminal() {
        let summary = ReplaySummary {
            matched_by_kind: BTreeMap::from([("bad\u{1b}]0;owned\u{7}".into(), 1)]),
            refused: BTreeMap::from([("t\u{1b}[2J".into(), 1)]),
            ..Default::default()
        };
        let text = summary.to_string();
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        assert!(
            text.contains("bad\\u{1b}]0;owned\\u{7}") && text.contains("t\\u{1b}[2J"),
            "{text}"
        );
    }

    #[test]
    fn the_filter_selects_by_kind_and_half_open_time_range() {
        let all = ReplayFilter::default();
        assert!(all.matches(&info("bad_json", 5)));
        let f = ReplayFilter {
            kinds: vec!["bad_json".into(), "too_large".into()],
            since_ms: Some(100),
            until_ms: Some(200),
        };
        assert!(f.matches(&info("bad_json", 100)));
        assert!(f.matches(&info("too_large", 199)));
        assert!(!f.matches(&info("bad_json", 200)), "until is exclusive");
        assert!(!f.matches(&info("bad_json", 99)));
        assert!(!f.matches(&info("missing_field", 150)));
    }
}

//! Adversarial paths: failpoint panics and fatal errors in the real pipeline, and poison pills
//! larger than the dead-letter topic accepts. Each test fails without the fix it names.
//! Failpoints fire only for this test's topic or group (see `vault::failpoint`), so tests
//! sharing the process stay apart.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};

use vault::kafka::dead_letter::{headers, MemoryDeadLetters};
use vault::store::{MemoryStore, StoreError};

use crate::common::{
    event_json, kafka_dead_letters, read_all, settings, stored_positions, unique, wait_until,
    Kafka, Running,
};

/// Waits until the pipeline's counter `name` reaches `at_least`.
async fn wait_counter(vault: &Running, name: &str, at_least: f64) {
    wait_until(name, Duration::from_secs(60), || {
        let n = vault.counter(name);
        async move { (n >= at_least).then_some(()).ok_or(format!("{n}")) }
    })
    .await;
}

/// The in-flight budget of the memory tests: 1 MiB, with batches of 500 events.
const TIGHT_BUDGET: usize = 1 << 20;

fn with_tight_memory(cfg: &mut vault::config::Config) {
    cfg.pipeline.max_in_flight_bytes = TIGHT_BUDGET;
    cfg.batch.max_events = 500;
}

/// Waits until batches (failing ones, in the memory tests) hold most of [`TIGHT_BUDGET`].
async fn wait_memory_filled(vault: &Running) {
    wait_until(
        "failing batches filling the in-flight memory",
        Duration::from_secs(60),
        || {
            let used = vault.metrics.in_flight_bytes.get();
            async move {
                (used >= TIGHT_BUDGET as i64 * 3 / 4)
                    .then_some(())
                    .ok_or(format!("{used} bytes"))
            }
        },
    )
    .await;
}

/// Waits until the pipeline restarted a partition (a failpoint fired).
async fn wait_restarted(vault: &Running) {
    wait_counter(vault, "vault_partition_restarts_total", 1.0).await;
}

/// Once its fault is gone, the one-partition `topic` is committed to its end within `secs`
/// with every produced event stored, and the pipeline stops cleanly.
async fn recovers(
    kafka: &Kafka,
    group: &str,
    topic: &str,
    vault: Running,
    memory: &MemoryStore,
    produced: &BTreeSet<(i32, i64)>,
    secs: u64,
) {
    kafka
        .probe(group)
        .wait_committed_to_end(topic, 1, Duration::from_secs(secs))
        .await;
    assert_eq!(&stored_positions(memory), produced, "nothing lost");
    vault.stop().await;
}

/// A one-partition source topic holding `n` events; returns the Kafka, topic, group and the
/// events' positions.
async fn one_partition(name: &str, n: usize) -> (Kafka, String, String, BTreeSet<(i32, i64)>) {
    let kafka = Kafka::start();
    let (topic, group) = (unique(name), unique("g"));
    kafka.create_source_topic(&topic, 1).await;
    let produced = kafka.produce_events(&topic, 1, 0, n).await;
    (kafka, topic, group, produced.into_iter().collect())
}

/// Resumes at the first record it read, not where the queue stands: a task that panics with
/// an open batch and nothing durable yet loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_panics_before_its_first_durable_batch_loses_nothing() {
    let (kafka, topic, group, produced) = one_partition("panic-early", 300).await;
    // Offset 7 panics the decoder while records 0-6 sit in the open batch.
    fail::cfg("kafka::decode", &format!("return({topic}@7)")).unwrap();
    let memory = MemoryStore::new();
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.batch.max_events = 100;
    let vault = Running::start(cfg, memory.clone(), MemoryDeadLetters::default());
    wait_restarted(&vault).await;
    fail::remove("kafka::decode");
    recovers(&kafka, &group, &topic, vault, &memory, &produced, 60).await;
}

/// A read error as the very first item of an assignment (records skipped, nothing read yet, no
/// position known): the restart seeks to the committed offset, never reads on from where the
/// queue stands. Then, with something committed, the same at the next member, whose restart's
/// lookup of the committed offset the broker answers with an error for the partition (as one
/// refusing the group's read of the topic does): a failed lookup, tried again, never "nothing
/// committed", which would start over from the log's start. (librdkafka reports a
/// one-partition lookup's partition error as the call's error; the coordinator's own check of
/// the partition's error covers an answer that does not.) One test: the failpoint is
/// process-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_error_before_anything_was_read_resumes_at_the_committed_offset() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (kafka, topic, group, produced) = one_partition("read-error", 200).await;
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    // No group-view read of the committed offsets: the injected errors are the restart's.
    cfg.kafka.group_view_interval = Duration::from_secs(3600);
    // Offset 0 is lost to a read error: librdkafka would move on past it.
    fail::cfg("kafka::read", &format!("return({topic}@0)")).unwrap();
    let memory = MemoryStore::new();
    let vault = Running::start(cfg.clone(), memory.clone(), MemoryDeadLetters::default());
    wait_restarted(&vault).await;
    fail::remove("kafka::read");
    recovers(&kafka, &group, &topic, vault, &memory, &produced, 60).await;

    let written = memory.writes();
    fail::cfg("kafka::read", &format!("return({topic}@200)")).unwrap();
    kafka.produce_events(&topic, 1, 200, 100).await;
    let vault = Running::start(cfg, memory.clone(), MemoryDeadLetters::default());
    wait_restarted(&vault).await;
    fail::remove("kafka::read");
    kafka.mock().expect("the mock cluster").request_errors(
        RDKafkaApiKey::OffsetFetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 2],
    );
    wait_counter(&vault, "vault_restart_seek_failures_total", 2.0).await;
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
        .await;
    assert_eq!(
        memory.writes() - written,
        100,
        "only the new events were written: nothing was read again from the start"
    );
    vault.stop().await;
}

/// A panic while adding to a batch and a failing seek before the restart: the partition is not
/// started until the seek succeeds, and then resumes where it must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_whose_seek_fails_starts_nothing_until_a_seek_succeeds() {
    let (kafka, topic, group, produced) = one_partition("seek-fails", 200).await;
    fail::cfg("batcher::add", &format!("return({topic}@120)")).unwrap();
    fail::cfg("kafka::seek", &format!("return({topic})")).unwrap();
    let memory = MemoryStore::new();
    let vault = Running::start(
        settings(&kafka.brokers, &topic, &group),
        memory.clone(),
        MemoryDeadLetters::default(),
    );
    wait_restarted(&vault).await;
    fail::remove("batcher::add");
    // While every seek fails, nothing past the failure is read, stored or committed.
    wait_counter(&vault, "vault_restart_seek_failures_total", 2.0).await;
    assert!(
        !memory.contains_source(&topic, 0, 150),
        "a partition whose seek failed was started anyway"
    );
    fail::remove("kafka::seek");
    recovers(&kafka, &group, &topic, vault, &memory, &produced, 90).await;
}

/// A fatal librdkafka error (as a fenced static member gets) ends the run with its cause, after
/// draining: it is not just logged while the process writes on and never commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_error_drains_and_ends_the_run_naming_its_cause() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("fatal"), unique("g"));
    kafka.create_source_topic(&topic, 2).await;
    let memory = MemoryStore::new();
    let vault = Running::start(
        settings(&kafka.brokers, &topic, &group),
        memory.clone(),
        MemoryDeadLetters::default(),
    );
    let produced = kafka
        .produce_and_wait_committed(&topic, &group, 2, 0, 200)
        .await;
    assert!(produced.is_subset(&stored_positions(&memory)));
    fail::cfg("kafka::fatal", &format!("return({group})")).unwrap();
    let ended = vault.wait_exit(Duration::from_secs(60)).await;
    fail::remove("kafka::fatal");
    let err = ended.expect_err("a fatal error ends the run with an error");
    let text = err.to_string();
    assert!(text.contains("fatal"), "{text}");
    assert!(text.contains("instance_id"), "says what to check: {text}");
}

/// A fatal error in the dead-letter producer (as a broken idempotent sequence raises) fails
/// every later send of that producer: it is replaced, the letter goes with the new one, and the
/// partition moves on. A replacement that hits one again before any letter of it went through
/// (each new producer refused, say, its idempotent producer id) is a refusal for good: counted,
/// the partition stalls visibly until it is fixed, then its letter goes. (One test: the
/// failpoint is process-wide.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_producer_that_hits_a_fatal_error_is_replaced() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("dlq-fatal"), unique("g"));
    kafka.create_source_topic(&topic, 1).await;
    kafka
        .produce(
            &topic,
            &[
                (0, "k".into(), b"not json".to_vec()),
                (0, "u".into(), event_json("u", 1).into_bytes()),
            ],
        )
        .await;
    let cfg = settings(&kafka.brokers, &topic, &group);
    let dlq = kafka_dead_letters(&cfg);
    fail::cfg("dead_letter::fatal", &format!("return({topic}:once)")).unwrap();
    let memory = MemoryStore::new();
    let vault = Running::start(cfg, memory.clone(), dlq);
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
        .await;
    fail::remove("dead_letter::fatal");
    assert!(memory.contains_source(&topic, 0, 1), "the event after it");
    let letters = read_all(&kafka.brokers, &format!("{topic}.dlq")).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].payload(), Some(&b"not json"[..]));
    assert!(
        vault.counter("vault_dead_letter_send_failures_total") >= 1.0,
        "the fatal producer's send failed first"
    );
    assert_eq!(vault.counter("vault_dead_letters_refused_total"), 0.0);

    // Every producer fatal from its first send on.
    fail::cfg("dead_letter::fatal", &format!("return({topic})")).unwrap();
    kafka
        .produce(&topic, &[(0, "k".into(), b"not json either".to_vec())])
        .await;
    wait_counter(&vault, "vault_dead_letters_refused_total", 1.0).await;
    fail::remove("dead_letter::fatal");
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
        .await;
    let letters = read_all(&kafka.brokers, &format!("{topic}.dlq")).await;
    assert_eq!(letters.len(), 2);
    vault.stop().await;
}

/// A panic in the dead-letter producer's polling thread, while it hands out a delivery report,
/// does not stop the thread: that letter reads as not acknowledged, goes again (it may land
/// twice), is acknowledged, and the partition moves on. A thread that died there would leave
/// every later send waiting for a report that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_handing_out_a_delivery_report_leaves_the_polling_thread_polling() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("dlq-report"), unique("g"));
    kafka.create_source_topic(&topic, 1).await;
    kafka
        .produce(
            &topic,
            &[
                (0, "k".into(), b"not json".to_vec()),
                (0, "u".into(), event_json("u", 1).into_bytes()),
            ],
        )
        .await;
    let cfg = settings(&kafka.brokers, &topic, &group);
    let dlq = kafka_dead_letters(&cfg);
    fail::cfg("dead_letter::report", &format!("return({topic}.dlq:once)")).unwrap();
    let memory = MemoryStore::new();
    let vault = Running::start(cfg, memory.clone(), dlq);
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
        .await;
    fail::remove("dead_letter::report");
    assert!(memory.contains_source(&topic, 0, 1), "the event after it");
    assert!(
        vault.counter("vault_dead_letter_send_failures_total") >= 1.0,
        "the letter whose report was lost counts as a failed send"
    );
    let letters = read_all(&kafka.brokers, &format!("{topic}.dlq")).await;
    assert!(
        !letters.is_empty() && letters.len() <= 2,
        "{}",
        letters.len()
    );
    assert!(letters
        .iter()
        .all(|l| l.payload() == Some(&b"not json"[..])));
    vault.stop().await;
}

/// A value too large for the dead-letter topic, an error text that would echo half a megabyte
/// of input, and "original coordinates" headers naming a topic of 900 KB, are dead-lettered cut
/// to fit (the headers are no coordinates Kafka gives, so the letter names the message's own):
/// the partition moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_pills_larger_than_the_dead_letter_topic_accepts_are_cut_to_fit() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("huge"), unique("g"));
    kafka.create_source_topic(&topic, 1).await;
    let huge = vec![b'#'; 1_500_000];
    let digits = "9".repeat(520_000);
    let long_error = format!(
        r#"{{"user_id":"u","event_type":"t","occurred_at":"1970-01-01T00:00:00.{digits}Z"}}"#
    );
    let producer = crate::common::big_producer(&kafka.brokers);
    for value in [huge.as_slice(), long_error.as_bytes()] {
        producer
            .send(
                FutureRecord::<str, [u8]>::to(&topic)
                    .partition(0)
                    .key("k")
                    .payload(value),
                Duration::from_secs(10),
            )
            .await
            .expect("the broker takes the compressed value");
    }
    let forged_topic = "a".repeat(900_000);
    let forged = rdkafka::message::OwnedHeaders::new()
        .insert(rdkafka::message::Header {
            key: headers::SOURCE_TOPIC,
            value: Some(&forged_topic),
        })
        .insert(rdkafka::message::Header {
            key: headers::SOURCE_PARTITION,
            value: Some("0"),
        })
        .insert(rdkafka::message::Header {
            key: headers::SOURCE_OFFSET,
            value: Some("0"),
        });
    producer
        .send(
            FutureRecord::<str, [u8]>::to(&topic)
                .partition(0)
                .key("k")
                .payload(b"not json")
                .headers(forged),
            Duration::from_secs(10),
        )
        .await
        .expect("the broker takes the forged headers");
    let good = event_json("u", 1).into_bytes();
    kafka.produce(&topic, &[(0, "u".into(), good)]).await;

    let cfg = settings(&kafka.brokers, &topic, &group);
    let dlq = kafka_dead_letters(&cfg);
    let memory = MemoryStore::new();
    let vault = Running::start(cfg, memory.clone(), dlq);
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
        .await;
    assert!(
        memory.contains_source(&topic, 0, 3),
        "the good event after them"
    );

    let letters = read_all(&kafka.brokers, &format!("{topic}.dlq")).await;
    assert_eq!(letters.len(), 3);
    let header = |m: &rdkafka::message::OwnedMessage, name: &str| -> Option<String> {
        m.headers()?
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let big = &letters[0];
    assert_eq!(
        header(big, headers::ERROR_KIND).as_deref(),
        Some("too_large")
    );
    assert_eq!(
        header(big, headers::VALUE_TRUNCATED).as_deref(),
        Some("true")
    );
    assert_eq!(header(big, headers::VALUE_SIZE).as_deref(), Some("1500000"));
    let digest: String = openssl::sha::sha256(&huge)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(header(big, headers::VALUE_SHA256), Some(digest));
    assert!(big.payload().unwrap().len() < 1_000_000);
    assert_eq!(header(big, headers::SOURCE_OFFSET).as_deref(), Some("0"));
    let echo = &letters[1];
    let message = header(echo, headers::ERROR_MESSAGE).unwrap();
    assert!(
        message.len() <= 1024,
        "error text is bounded: {}",
        message.len()
    );
    let forged = &letters[2];
    assert_eq!(header(forged, headers::SOURCE_TOPIC), Some(topic.clone()));
    assert_eq!(header(forged, headers::SOURCE_OFFSET).as_deref(), Some("2"));
    assert_eq!(forged.payload(), Some(&b"not json"[..]));
    assert!(
        vault.counter("vault_dead_letters_refused_total") == 0.0,
        "nothing was refused"
    );
    vault.stop().await;
}

/// When the store fails every write (down or overloaded), failing partitions press nobody for a
/// turn (`RETRY_HOLD_TURN`): once each partition has had a write fail, none of their batches is
/// abandoned, not when a
/// partition waits for memory and not when a partition whose batch was abandoned earlier
/// restarts and waits to read it again (its task's next incarnation inherits its health). So
/// the outage costs retries, not re-reads. Then the store recovers with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_every_partition_fails_an_outage_abandons_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let kafka = Kafka::start();
    let (topic, group) = (unique("outage"), unique("g"));
    kafka.create_source_topic(&topic, 4).await;
    // Partitions 0-2 hold a backlog whose writes fail from the start; partition 3's writes go
    // through until the outage.
    let mut produced: BTreeSet<(i32, i64)> = kafka
        .produce_events(&topic, 3, 0, 9_000)
        .await
        .into_iter()
        .collect();
    let memory = MemoryStore::new();
    let outage = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(Mutex::new(BTreeSet::new()));
    let (seen, everything) = (failed.clone(), outage.clone());
    memory.fail_when(
        move |e| {
            let fails = e.source.partition != 3 || everything.load(Ordering::SeqCst);
            if fails {
                seen.lock().unwrap().insert(e.source.partition);
            }
            fails
        },
        None,
        StoreError::Overloaded("injected".into()),
    );
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    // Three partitions of 4 batches of 500 events (about 300 bytes each in memory) would hold
    // several times this budget: they fill it and wait for room, failing.
    with_tight_memory(&mut cfg);
    let vault = Running::start(cfg, memory.clone(), MemoryDeadLetters::default());
    wait_memory_filled(&vault).await;
    let partition_3 = |first: usize, n: usize| -> Vec<(i32, String, Vec<u8>)> {
        (first..first + n)
            .map(|i| {
                let user = format!("user-{}", i % 97);
                let value = event_json(&user, i).into_bytes();
                (3, user, value)
            })
            .collect()
    };
    // Partition 3, healthy, waits for memory: failing batches without a claim are abandoned
    // for it, and their partitions restart.
    produced.extend(kafka.produce(&topic, &partition_3(9_000, 500)).await);
    wait_counter(&vault, "vault_retries_out_of_memory_total", 1.0).await;
    wait_counter(&vault, "vault_partition_restarts_total", 1.0).await;
    // From here the restarted partitions wait for memory, failing; a wait of theirs that lasts
    // RETRY_HOLD_TURN (60 s) would press again by design, so the check must end before that.
    let restarted = std::time::Instant::now();
    // The outage: from now on every write fails, partition 3's too.
    outage.store(true, Ordering::SeqCst);
    failed.lock().unwrap().clear();
    produced.extend(kafka.produce(&topic, &partition_3(9_500, 2_000)).await);
    // Partitions 0-2 have failed all along (one whose batch was abandoned may wait for memory
    // without writing again: it is failing, and presses nobody); partition 3 fails now.
    wait_until("partition 3 failing", Duration::from_secs(60), || {
        let failing = failed.lock().unwrap().contains(&3);
        async move { failing.then_some(()).ok_or("not yet".to_owned()) }
    })
    .await;
    // A few more failed writes, so that partition 3's first failure has marked it failing.
    let failed_then = memory.failed_requests();
    wait_until("50 more failed writes", Duration::from_secs(60), || {
        let n = memory.failed_requests();
        async move {
            (n >= failed_then + 50)
                .then_some(())
                .ok_or(format!("{}", n - failed_then))
        }
    })
    .await;
    let abandoned = vault.counter("vault_retries_out_of_memory_total");
    // Many retries of every failing batch later (each one a chance to be abandoned), and at
    // least 4 s after the restarts were scheduled (their backoff: 1 s, then 2 s), so that the
    // restarted incarnations are running and waiting for memory.
    let failed_then = memory.failed_requests();
    wait_until(
        "600 more failed writes, 4 s after the restarts",
        Duration::from_secs(60),
        || {
            let (n, since) = (memory.failed_requests(), restarted.elapsed());
            async move {
                (n >= failed_then + 600 && since >= Duration::from_secs(4))
                    .then_some(())
                    .ok_or(format!("{} after {since:?}", n - failed_then))
            }
        },
    )
    .await;
    assert!(
        restarted.elapsed() < Duration::from_secs(50),
        "the check took {:?}: too slow to tell (failed partitions press again after 60 s of waiting)",
        restarted.elapsed()
    );
    assert_eq!(
        vault.counter("vault_retries_out_of_memory_total"),
        abandoned,
        "no failing batch was abandoned once every partition was failing"
    );
    memory.clear_faults();
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 4, Duration::from_secs(120))
        .await;
    assert_eq!(stored_positions(&memory), produced, "nothing lost");
    vault.stop().await;
}

/// Partitions whose writes keep failing cannot hold the whole in-flight memory: failing batches
/// keep at most half of it, the others are abandoned (their partitions restart where they must
/// resume), and a healthy topic produced only once the failing ones have filled memory is
/// stored and committed while they still fail. Then the failing topic recovers with nothing
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_whose_writes_keep_failing_leave_memory_to_healthy_ones() {
    let kafka = Kafka::start();
    let (stuck, healthy, group) = (unique("stuck"), unique("healthy"), unique("g"));
    kafka.create_source_topic(&stuck, 6).await;
    kafka.create_source_topic(&healthy, 1).await;
    let stuck_produced: BTreeSet<(i32, i64)> = kafka
        .produce_events(&stuck, 6, 0, 18_000)
        .await
        .into_iter()
        .collect();
    fail::cfg("persister::write", &format!("return({stuck})")).unwrap();
    let memory = MemoryStore::new();
    let mut cfg = settings(&kafka.brokers, &stuck, &group);
    cfg.kafka.topics.push(healthy.clone());
    // Six partitions of 4 batches of 500 events (about 300 bytes each in memory) would hold
    // several times this budget: they fill it (their own waits for room are no reason to give
    // any of it back) and stop reading.
    with_tight_memory(&mut cfg);
    let vault = Running::start(cfg, memory.clone(), MemoryDeadLetters::default());
    wait_memory_filled(&vault).await;
    let healthy_produced: BTreeSet<(i32, i64)> = kafka
        .produce_events(&healthy, 1, 0, 500)
        .await
        .into_iter()
        .collect();
    // Within half a claim's turn (RETRY_HOLD_TURN): not by failing batches taking turns.
    kafka
        .probe(&group)
        .wait_committed_to_end(&healthy, 1, Duration::from_secs(30))
        .await;
    let stored = |topic: &str| -> BTreeSet<(i32, i64)> {
        memory
            .rows()
            .iter()
            .filter(|e| &*e.source.topic == topic)
            .map(|e| (e.source.partition, e.source.offset))
            .collect()
    };
    assert_eq!(
        stored(&healthy),
        healthy_produced,
        "the healthy topic flowed"
    );
    assert!(
        stored(&stuck).is_empty(),
        "the failing topic's writes failed"
    );
    assert!(
        vault.counter("vault_retries_out_of_memory_total") >= 1.0,
        "failing batches beyond half the memory were abandoned"
    );
    fail::remove("persister::write");
    kafka
        .probe(&group)
        .wait_committed_to_end(&stuck, 6, Duration::from_secs(120))
        .await;
    assert_eq!(stored(&stuck), stuck_produced, "nothing lost");
    vault.stop().await;
}

/// A header name that is not UTF-8 (a Go or C producer may send any bytes) is input like any
/// other: the event it rides on is stored, an invalid one is dead-lettered, and the partition
/// goes on. rdkafka's header iteration panics on such a name, which would restart the
/// partition at the message for good; vault reads headers by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_input_like_any_other() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("header-bytes"), unique("g"));
    kafka.create_source_topic(&topic, 1).await;
    let hostile = || {
        let headers = rdkafka::message::OwnedHeaders::new();
        let (name, value) = (b"\xff\xfe", b"x");
        // SAFETY: the borrowed view of owned headers is their native pointer (rdkafka's own
        // `as_borrowed`); the name and value are copied by librdkafka.
        unsafe {
            let native = headers.as_borrowed() as *const rdkafka::message::BorrowedHeaders
                as *mut rdkafka::bindings::rd_kafka_headers_t;
            rdkafka::bindings::rd_kafka_header_add(
                native,
                name.as_ptr().cast(),
                name.len() as isize,
                value.as_ptr().cast(),
                value.len() as isize,
            );
        }
        headers
    };
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()
        .expect("producer");
    let valid = event_json("u", 1);
    for value in [valid.as_str(), "not json"] {
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key("u")
                    .payload(value)
                    .headers(hostile()),
                Duration::from_secs(10),
            )
            .await
            .expect("the broker takes any header name");
    }
    kafka
        .produce(&topic, &[(0, "u".into(), event_json("u", 2).into_bytes())])
        .await;
    let cfg = settings(&kafka.brokers, &topic, &group);
    let (memory, letters) = (MemoryStore::new(), MemoryDeadLetters::default());
    let vault = Running::start(cfg, memory.clone(), letters.clone());
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
        .await;
    assert!(
        memory.contains_source(&topic, 0, 0),
        "the event with the header"
    );
    assert!(memory.contains_source(&topic, 0, 2), "the event after it");
    let dead = letters.letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (dead[0].error.kind(), dead[0].source.offset),
        ("bad_json", 1)
    );
    assert_eq!(vault.restarts(&topic), 0, "no restart");
    vault.stop().await;
}

/// A message whose decoding panics (a fault of vault's or of a library's, which a message of
/// some shape triggers) is dead-lettered as `undecodable`, whole, and the partition goes on: left
/// to unwind, the panic would restart the partition at the message, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_decoding_panics_is_dead_lettered_and_the_partition_goes_on() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("decode-panics"), unique("g"));
    kafka.create_source_topic(&topic, 1).await;
    let events: Vec<_> = (0..3)
        .map(|i| (0, "u".to_owned(), event_json("u", i).into_bytes()))
        .collect();
    kafka.produce(&topic, &events).await;
    fail::cfg("kafka::to_record", &format!("return({topic}@1)")).unwrap();
    let (memory, letters) = (MemoryStore::new(), MemoryDeadLetters::default());
    let vault = Running::start(
        settings(&kafka.brokers, &topic, &group),
        memory.clone(),
        letters.clone(),
    );
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
        .await;
    fail::remove("kafka::to_record");
    assert!(memory.contains_source(&topic, 0, 0));
    assert!(
        memory.contains_source(&topic, 0, 2),
        "the partition went on"
    );
    assert!(!memory.contains_source(&topic, 0, 1));
    let dead = letters.letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (dead[0].error.kind(), dead[0].source.offset),
        ("undecodable", 1)
    );
    assert_eq!(
        dead[0].value.as_deref(),
        Some(events[1].2.as_slice()),
        "kept whole"
    );
    assert_eq!(vault.restarts(&topic), 0);
    vault.stop().await;

    // Never skipped: with on_invalid = "skip" (and for an erasure request, with any policy) the
    // partition stops at it, committing nothing past it, and restarts there until it is fixed.
    for (phase, tombstone) in [("skip", false), ("erase", true)] {
        let (topic, group) = (unique(&format!("decode-panics-{phase}")), unique("g"));
        kafka.create_source_topic(&topic, 1).await;
        kafka
            .produce(&topic, &[(0, "u".into(), event_json("u", 0).into_bytes())])
            .await;
        if tombstone {
            kafka
                .produce_at(&topic, 0, "u", None, chrono::Utc::now().timestamp_millis())
                .await;
        } else {
            kafka
                .produce(&topic, &[(0, "u".into(), event_json("u", 1).into_bytes())])
                .await;
        }
        kafka
            .produce(&topic, &[(0, "u".into(), event_json("u", 2).into_bytes())])
            .await;
        fail::cfg("kafka::to_record", &format!("return({topic}@1)")).unwrap();
        let mut cfg = settings(&kafka.brokers, &topic, &group);
        if tombstone {
            cfg.pipeline.tombstones = vault::config::TombstonePolicy::Erase;
        } else {
            cfg.pipeline.on_invalid = vault::config::InvalidPolicy::Skip;
        }
        let (memory, letters) = (MemoryStore::new(), MemoryDeadLetters::default());
        let vault = Running::start(cfg, memory.clone(), letters.clone());
        wait_until(
            &format!("{phase}: two restarts at the message"),
            Duration::from_secs(60),
            || {
                let n = vault.restarts(&topic);
                async move { (n >= 2).then_some(()).ok_or(format!("{n}")) }
            },
        )
        .await;
        // (An erasure's panic restarts the partition task, which may not have handed the
        // event before it to the store yet; under skip the batch is written, then not committed.)
        assert!(tombstone || memory.contains_source(&topic, 0, 0), "{phase}");
        assert!(letters.letters().is_empty(), "{phase}");
        assert_eq!(
            vault.counter("vault_events_skipped_total"),
            0.0,
            "{phase}: nothing skipped"
        );
        // (Under skip, events after it in its batch may be stored: the batch is not committed,
        // and their rows are rewritten when it is read again.)
        let committed = kafka.probe(&group).committed(&topic, 1).await;
        assert!(
            committed[0].is_none_or(|c| c <= 1),
            "{phase}: nothing committed past it: {committed:?}"
        );
        fail::remove("kafka::to_record");
        vault.stop().await;
    }
}

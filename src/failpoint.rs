//! Failpoints: where tests inject panics and errors, one per pipeline stage. Compiled in only
//! with the `failpoints` cargo feature, which `make test` enables and a release build never
//! does; without it every check is `false` and costs nothing.
//!
//! A failpoint fires when it is configured (`fail::cfg` in a test, or the `FAILPOINTS`
//! environment variable of a `vault` process built with the feature) with `return(SPEC)`,
//! where SPEC is a topic (`activity`) or a topic and offset (`activity@120`), and `:once` after
//! it to fire at the first match only; the stage then panics or fails. Tying each firing to a topic keeps tests that share a process apart.
//!
//! | failpoint | stage | what it does |
//! |---|---|---|
//! | `kafka::decode` | a record taken off a partition queue | panics the partition task |
//! | `kafka::to_record` | the decoding of a record | panics inside it (caught: dead-lettered as `undecodable`) |
//! | `batcher::add` | a record added to the open batch | panics the partition task |
//! | `batcher::flush` | a batch handed to the persisters | panics the partition task |
//! | `persister::write` | a store write of a batch | fails it with a timeout |
//! | `dead_letter::produce` | a dead-letter send of a batch | fails it as a broker transport failure |
//! | `dead_letter::fatal` | a dead-letter send of a batch | raises a librdkafka fatal error in the dead-letter producer first |
//! | `dead_letter::report` | a letter's delivery report (SPEC: the dead-letter topic) | panics the dead-letter producer's polling thread while it hands the report out |
//! | `kafka::seek` | the seek before a restart | fails it |
//! | `store::reindex` | `migrate`'s fill of the day index (SPEC: the keyspace) | fails it before it writes |
//! | `kafka::commit` | an offset commit | fails it as refused during a rebalance |
//! | `coordinator::drain` | draining revoked or stopping partitions | panics the coordinator (the process dies) |
//! | `kafka::fatal` | the consumer | raises a librdkafka fatal error (SPEC: the consumer group) |
//! | `kafka::poll` | the thread polling the main queue | blocks it while configured (SPEC: the consumer group) |
//! | `coordinator::loop` | the coordinator loop | stops it turning while configured (SPEC: the consumer group) |

/// Whether failpoint `name` fires for a record of `topic` at `offset` (or for the topic as a
/// whole when `offset` is `None`). A SPEC ending in `:once` fires at its first match only, in
/// the whole process: `1*return(SPEC)` would be spent by the first evaluation, matching or not
/// (the fail crate counts every time the action runs).
#[cfg(feature = "failpoints")]
pub fn hit(name: &str, topic: &str, offset: Option<i64>) -> bool {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static FIRED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    fail::eval(name, |spec| {
        let Some(spec) = spec else {
            return false;
        };
        match spec.strip_suffix(":once") {
            Some(s) if matches(s, topic, offset) => FIRED
                .get_or_init(Mutex::default)
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(format!("{name}={spec}")),
            Some(_) => false,
            None => matches(&spec, topic, offset),
        }
    })
    .unwrap_or(false)
}

/// Whether failpoint `name` fires (never: built without the `failpoints` feature).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str, _topic: &str, _offset: Option<i64>) -> bool {
    false
}

/// `spec` is `topic`, `topic@offset` or `*` (any).
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn matches(spec: &str, topic: &str, offset: Option<i64>) -> bool {
    if spec == "*" {
        return true;
    }
    match spec.rsplit_once('@') {
        Some((t, o)) => t == topic && offset.is_some() && o.parse().ok() == offset,
        None => spec == topic,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "failpoints")]
    #[test]
    fn a_once_spec_fires_at_its_first_match_whatever_came_before() {
        fail::cfg("failpoint::test_once", "return(t@2:once)").unwrap();
        let fired: Vec<bool> = [0, 1, 2, 2, 3]
            .iter()
            .map(|&o| hit("failpoint::test_once", "t", Some(o)))
            .collect();
        fail::remove("failpoint::test_once");
        assert_eq!(fired, [false, false, true, false, false]);
    }

    #[test]
    fn a_spec_names_a_topic_or_one_of_its_offsets() {
        assert!(matches("a", "a", Some(3)));
        assert!(matches("a", "a", None));
        assert!(!matches("a", "b", Some(3)));
        assert!(matches("a@3", "a", Some(3)));
        assert!(!matches("a@3", "a", Some(4)));
        assert!(!matches("a@3", "a", None));
        assert!(matches("*", "z", None));
        assert!(matches("t.dlq@7", "t.dlq", Some(7)));
    }
}

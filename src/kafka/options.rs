//! librdkafka option names: the one place that knows which names set the same option.
//!
//! librdkafka accepts several options under two names (`linger.ms` and
//! `queue.buffering.max.ms`, `acks` and `request.required.acks`...). rdkafka keeps a
//! configuration in a `HashMap` and hands it over in that map's random order, so a value vault
//! sets under one name and a value the user gave under the other would each win half the time.
//! Every option vault sets or reserves is therefore looked up, set and refused here under all of
//! its names.

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;

/// Names librdkafka takes for one option (its `_RK_C_ALIAS` entries in `rdkafka_conf.c`),
/// each pair as (alias, the name it stands for). `enable.auto.commit` and `auto.commit.enable`
/// are one option only at topic scope, where the legacy `auto.commit.enable` is the real one
/// and nothing reads it any more (globally, `enable.auto.commit` is an option of its own):
/// listed so that both are refused as the reserved `enable.auto.commit`.
const ALIASES: [(&str, &str); 12] = [
    ("bootstrap.servers", "metadata.broker.list"),
    ("max.partition.fetch.bytes", "fetch.message.max.bytes"),
    ("linger.ms", "queue.buffering.max.ms"),
    ("acks", "request.required.acks"),
    ("delivery.timeout.ms", "message.timeout.ms"),
    ("compression.type", "compression.codec"),
    ("retries", "message.send.max.retries"),
    ("max.in.flight", "max.in.flight.requests.per.connection"),
    ("sasl.mechanism", "sasl.mechanisms"),
    ("enable.auto.commit", "auto.commit.enable"),
    (
        "sasl.oauthbearer.client.credentials.client.id",
        "sasl.oauthbearer.client.id",
    ),
    (
        "sasl.oauthbearer.client.credentials.client.secret",
        "sasl.oauthbearer.client.secret",
    ),
];

/// The global options whose names begin with `topic.` (`rdkafka_conf.c`). Any other
/// `topic.X` is a third name for the topic-level option `X` (librdkafka strips the prefix), so
/// vault refuses it: it would escape [`names_of`]. This list and [`ALIASES`] are checked
/// against the linked librdkafka's own by a test.
const GLOBAL_TOPIC_OPTIONS: [&str; 6] = [
    "topic.metadata.refresh.interval.ms",
    "topic.metadata.refresh.fast.interval.ms",
    "topic.metadata.refresh.fast.cnt",
    "topic.metadata.refresh.sparse",
    "topic.metadata.propagation.max.ms",
    "topic.blacklist",
];

/// Whether `name` is a topic-level option written with the `topic.` prefix.
pub fn is_prefixed_topic_option(name: &str) -> bool {
    name.starts_with("topic.") && !GLOBAL_TOPIC_OPTIONS.contains(&name)
}

/// Every name of the option `name` sets, `name` first.
pub fn names_of(name: &str) -> impl Iterator<Item = &str> {
    std::iter::once(name).chain(ALIASES.iter().filter_map(move |&(alias, real)| {
        if alias == name {
            Some(real)
        } else if real == name {
            Some(alias)
        } else {
            None
        }
    }))
}

/// The value given for option `name` in `options`, under any of its names.
pub fn given<'a>(options: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    given_as(options, name).map(|(_, value)| value)
}

/// The name under which option `name` is given in `options`, and its value.
pub fn given_as<'a>(
    options: &'a BTreeMap<String, String>,
    name: &str,
) -> Option<(&'a str, &'a str)> {
    names_of(name).find_map(|n| {
        options
            .get_key_value(n)
            .map(|(k, v)| (k.as_str(), v.as_str()))
    })
}

/// Two names in `options` that set the same option, if any: the first such pair.
pub fn given_twice(options: &BTreeMap<String, String>) -> Option<(&str, &str)> {
    ALIASES
        .iter()
        .find(|(alias, real)| options.contains_key(*alias) && options.contains_key(*real))
        .copied()
}

/// Sets option `name` to `value`, whatever the configuration held under any of its names.
pub fn set_owned(cfg: &mut ClientConfig, name: &str, value: &str) {
    for n in names_of(name).skip(1) {
        cfg.remove(n);
    }
    cfg.set(name, value);
}

/// Sets option `name` to `value` unless the configuration already holds it under any name.
pub fn set_default(cfg: &mut ClientConfig, name: &str, value: &str) {
    if names_of(name).all(|n| cfg.get(n).is_none()) {
        cfg.set(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The options the linked librdkafka documents, by section (`Global` or `Topic`), each with
    /// the option it is an alias for, if it is one: `rd_kafka_conf_properties_show`, what its
    /// CONFIGURATION.md is made from (hidden options are not shown).
    fn librdkafka_options() -> Vec<(String, String, Option<String>)> {
        use std::ffi::{c_char, c_int, c_void, CString};
        extern "C" {
            fn fopen(path: *const c_char, mode: *const c_char) -> *mut c_void;
            fn fclose(file: *mut c_void) -> c_int;
        }
        let path = std::env::temp_dir().join(format!(
            "vault-librdkafka-options-{}.md",
            std::process::id()
        ));
        let c_path = CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a file opened for writing, written by librdkafka, then closed once.
        unsafe {
            let file = fopen(c_path.as_ptr(), c"w".as_ptr());
            assert!(!file.is_null(), "cannot open {}", path.display());
            rdkafka::bindings::rd_kafka_conf_properties_show(file.cast());
            assert_eq!(fclose(file), 0);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let mut section = String::new();
        let mut options = Vec::new();
        for line in text.lines() {
            if let Some(title) = line.strip_prefix("## ") {
                section = title
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                continue;
            }
            let mut cells = line.split(" | ");
            let (Some(name), Some(description)) = (cells.next(), cells.nth(4)) else {
                continue;
            };
            let name = name.trim();
            if name == "Property" || name.starts_with('-') || name.is_empty() {
                continue;
            }
            let alias_of = description
                .split("Alias for `")
                .nth(1)
                .and_then(|rest| rest.split('`').next())
                .map(str::to_owned);
            options.push((section.clone(), name.to_owned(), alias_of));
        }
        options
    }

    /// The hand-kept lists above are the linked librdkafka's: every alias it documents is in
    /// [`ALIASES`], and its global options named `topic.*` are [`GLOBAL_TOPIC_OPTIONS`]. A
    /// librdkafka upgrade that adds either fails here.
    #[test]
    fn the_alias_and_global_topic_lists_are_the_linked_librdkafkas() {
        let options = librdkafka_options();
        assert!(options.len() > 150, "{} options read", options.len());
        let mut aliases: Vec<(&str, &str)> = options
            .iter()
            .filter_map(|(_, name, real)| Some((name.as_str(), real.as_deref()?)))
            .collect();
        aliases.sort();
        aliases.dedup();
        let mut listed = ALIASES.to_vec();
        listed.sort();
        assert_eq!(aliases, listed);
        let mut global_topic: Vec<&str> = options
            .iter()
            .filter(|(section, name, _)| section == "Global" && name.starts_with("topic."))
            .map(|(_, name, _)| name.as_str())
            .collect();
        global_topic.sort();
        let mut listed = GLOBAL_TOPIC_OPTIONS.to_vec();
        listed.sort();
        assert_eq!(global_topic, listed);
    }

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_option_is_found_under_either_name() {
        let o = options(&[("request.required.acks", "1"), ("linger.ms", "7")]);
        assert_eq!(given(&o, "acks"), Some("1"));
        assert_eq!(given(&o, "request.required.acks"), Some("1"));
        assert_eq!(given(&o, "queue.buffering.max.ms"), Some("7"));
        assert_eq!(given(&o, "message.timeout.ms"), None);
        assert_eq!(names_of("group.id").collect::<Vec<_>>(), ["group.id"]);
    }

    #[test]
    fn a_topic_prefix_is_told_from_global_options_that_begin_with_it() {
        assert!(is_prefixed_topic_option("topic.auto.offset.reset"));
        assert!(is_prefixed_topic_option("topic.acks"));
        assert!(!is_prefixed_topic_option(
            "topic.metadata.refresh.interval.ms"
        ));
        assert!(!is_prefixed_topic_option("auto.offset.reset"));
    }

    #[test]
    fn both_names_of_one_option_are_found() {
        let o = options(&[("linger.ms", "7"), ("queue.buffering.max.ms", "9")]);
        assert_eq!(
            given_twice(&o),
            Some(("linger.ms", "queue.buffering.max.ms"))
        );
        assert_eq!(given_twice(&options(&[("linger.ms", "7")])), None);
    }

    #[test]
    fn an_owned_option_replaces_the_users_under_any_name() {
        let mut cfg = ClientConfig::new();
        cfg.set("request.required.acks", "0")
            .set("delivery.timeout.ms", "1000");
        set_owned(&mut cfg, "acks", "all");
        set_owned(&mut cfg, "message.timeout.ms", "30000");
        assert_eq!(cfg.get("acks"), Some("all"));
        assert_eq!(cfg.get("request.required.acks"), None);
        assert_eq!(cfg.get("message.timeout.ms"), Some("30000"));
        assert_eq!(cfg.get("delivery.timeout.ms"), None);
    }

    #[test]
    fn a_default_stands_back_for_the_users_value_under_any_name() {
        let mut cfg = ClientConfig::new();
        cfg.set("compression.codec", "zstd");
        set_default(&mut cfg, "compression.type", "lz4");
        set_default(&mut cfg, "linger.ms", "5");
        assert_eq!(cfg.get("compression.type"), None);
        assert_eq!(cfg.get("compression.codec"), Some("zstd"));
        assert_eq!(cfg.get("linger.ms"), Some("5"));
    }
}

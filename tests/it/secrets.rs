//! Secrets are never echoed (issue 19): every output of the real binary is scanned for the
//! configured secrets' values: `check-config`, the errors of every configuration layer (file,
//! environment, `--set`, `*_file`), the logs of a `vault run` at trace level with librdkafka's
//! `debug=all`, a panic inside it, and its `/metrics`. Also the tools' argument checks: every
//! bad argument is answered with a message and exit code 2, never a panic.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::{http_get, spawn_vault, stop_gracefully, unique, wait_until, ProcessRig};

/// Runs `vault args` with exactly `env` (plus PATH).
fn vault(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vault"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("run vault")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Panics naming the output that holds one of `secrets`.
fn assert_clean(what: &str, output: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !output.contains(secret),
            "{what} shows the secret {secret:?}:\n{output}"
        );
    }
}

#[test]
fn no_configuration_output_shows_a_secret() {
    // Digits first: a secret that reads as a number must keep its text and still never show.
    let secret = format!("0042{}", unique("Sx").replace('-', ""));
    let s = secret.as_str();
    let dir = std::env::temp_dir().join(unique("vault-secrets"));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, body: String| {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let password_file = write("password", format!("{s}\n"));
    let options_file = write(
        "kafka.properties",
        format!(
            "sasl.password={s}\nsasl.oauthbearer.config=secret={s}\n\
             ssl.key.password={s}\n"
        ),
    );
    let bad_toml = write("bad.toml", format!("[scylla]\npassword = {s}\n"));
    let typed_toml = write("typed.toml", format!("[scylla]\npassword = [\"{s}\"]\n"));
    let numeric_toml = write("numeric.toml", "[scylla]\npassword = 1e400\n".into());
    let opt_toml = write(
        "opt.toml",
        format!("[kafka.options]\n\"security.protocol\" = \"{s}\"\n"),
    );
    let tls = ("VAULT_SCYLLA_TLS", "true");
    let user = ("VAULT_SCYLLA_USERNAME", "vault");
    let set_password = format!("scylla.password={s}");
    let set_typo = format!("scylla.pasword={s}");
    let set_option = format!("kafka.options.sasl.password={s}");
    let set_option_typo = format!("kafka.options.sasl.passwrd={s}");
    /// What is tried, the arguments, the environment, and whether it is accepted.
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, bool);
    let cases: Vec<Case> = vec![
        // (what, args, env, accepted)
        (
            "check-config, secrets from the environment",
            vec!["check-config"],
            vec![
                ("VAULT_SCYLLA_PASSWORD", s),
                tls,
                user,
                ("VAULT_KAFKA_OPTION_SASL_PASSWORD", s),
                ("VAULT_KAFKA_OPTION_SASL_OAUTHBEARER_CONFIG", s),
            ],
            true,
        ),
        (
            "check-config, secrets from files",
            vec!["check-config"],
            vec![
                ("VAULT_SCYLLA_PASSWORD_FILE", &password_file),
                tls,
                user,
                ("VAULT_KAFKA_OPTIONS_FILE", &options_file),
            ],
            true,
        ),
        (
            "check-config, a secret on the command line",
            vec!["check-config", "--set", &set_password, "--set", &set_option],
            vec![tls, user],
            true,
        ),
        (
            "a misspelled librdkafka option in the environment",
            vec!["check-config"],
            vec![("VAULT_KAFKA_OPTION_SASL_PASSWRD", s)],
            false,
        ),
        (
            "a misspelled librdkafka option on the command line",
            vec!["check-config", "--set", &set_option_typo],
            vec![],
            false,
        ),
        (
            "a misspelled key on the command line",
            vec!["check-config", "--set", &set_typo],
            vec![],
            false,
        ),
        (
            "a --set without '='",
            vec!["check-config", "--set", s],
            vec![],
            false,
        ),
        (
            "a misspelled key in the environment",
            vec!["check-config"],
            vec![("VAULT_SCYLLA_PASWORD", s)],
            false,
        ),
        (
            "a password that is not TOML",
            vec!["check-config", &bad_toml],
            vec![],
            false,
        ),
        (
            "a password of the wrong type",
            vec!["check-config", &typed_toml],
            vec![],
            false,
        ),
        (
            "a number too large for TOML",
            vec!["check-config", &numeric_toml],
            vec![],
            false,
        ),
        (
            "a secret under a wrong option",
            vec!["check-config", &opt_toml],
            vec![],
            false,
        ),
        (
            "a password without TLS",
            vec!["check-config"],
            vec![("VAULT_SCYLLA_PASSWORD", s)],
            false,
        ),
        (
            "both a password and a password file",
            vec!["check-config"],
            vec![
                ("VAULT_SCYLLA_PASSWORD", s),
                ("VAULT_SCYLLA_PASSWORD_FILE", &password_file),
                tls,
            ],
            false,
        ),
    ];
    for (what, args, env, accepted) in &cases {
        let out = vault(args, env);
        let shown = text(&out);
        assert_eq!(out.status.success(), *accepted, "{what}:\n{shown}");
        assert!(!shown.contains("panicked"), "{what}:\n{shown}");
        assert_clean(what, &shown, &[s, "1e400"]);
        if *accepted {
            assert!(shown.contains("********"), "{what}: masked\n{shown}");
        }
    }
    // A secret on the command line is warned about, by key.
    let out = vault(&["check-config", "--set", &set_password], &[tls]);
    assert!(
        text(&out).contains("warning: --set scylla.password=... puts a secret on the command line"),
        "{}",
        text(&out)
    );
    // A secret kept exactly: the file's text, not a number.
    let out = vault(
        &[
            "check-config",
            "--set",
            &set_typo.replace("pasword", "username"),
        ],
        &[],
    );
    assert!(
        text(&out).contains(&format!("username = \"{s}\"")),
        "{}",
        text(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "injects failpoints: run with --features vault/failpoints, as make test does"
)]
#[tokio::test]
async fn a_running_vault_never_logs_or_exposes_a_secret() {
    let rig = ProcessRig::start("secrets", 2).await;
    let secret = unique("Run-S3cret").replace('-', "");
    let s = secret.as_str();
    let options_file = rig.dir.join("kafka.properties");
    // Sensitive librdkafka options that a PLAINTEXT connection carries but never uses.
    std::fs::write(
        &options_file,
        format!("sasl.password={s}\nssl.key.password={s}\n"),
    )
    .unwrap();
    let mut env = rig.env.clone();
    env.extend(
        [
            ("VAULT_SCYLLA_USERNAME", "vault"),
            ("VAULT_SCYLLA_PASSWORD", s),
            ("VAULT_SCYLLA_ALLOW_CLEARTEXT_PASSWORD", "true"),
            ("VAULT_KAFKA_OPTIONS_FILE", options_file.to_str().unwrap()),
            ("VAULT_KAFKA_OPTION_DEBUG", "all"),
            ("VAULT_KAFKA_OPTION_SASL_OAUTHBEARER_CONFIG", s),
            ("RUST_LOG", "trace"),
            // A panic in a partition task (restarted), so that its message is scanned too.
            (
                "FAILPOINTS",
                &format!("kafka::decode=1*return({})", rig.topic),
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let log = rig.dir.join("vault.log");
    let (child, metrics) = spawn_vault(&env, &log);
    rig.kafka
        .produce_and_wait_committed(&rig.topic, &rig.group, 2, 0, 50)
        .await;
    let mut scraped = String::new();
    wait_until("/metrics", Duration::from_secs(10), || {
        let got = http_get(&metrics, "/metrics");
        if let Ok((200, body)) = &got {
            scraped = body.clone();
        }
        async move { got.map(|_| ()) }
    })
    .await;
    stop_gracefully(child, "vault with secrets").await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.lines().count() > 100 && logged.contains("TRACE"),
        "the run logged at trace level: {} lines",
        logged.lines().count()
    );
    assert!(logged.contains("panicked"), "the failpoint panicked");
    assert_clean("the trace log", &logged, &[s]);
    assert_clean("/metrics", &scraped, &[s]);
    let _ = std::fs::remove_dir_all(Path::new(&rig.dir));
}

/// Every tool refuses each bad argument with clap's message and exit code 2, before it
/// connects to anything (there is nothing to connect to here).
#[test]
fn every_tool_refuses_bad_arguments_with_a_message_and_exit_code_2() {
    let table: &[(&[&str], &str)] = &[
        (&["produce", "--rate", "0"], "--rate"),
        (&["produce", "--rate=-5"], "--rate"),
        (&["produce", "--rate", "NaN"], "above 0"),
        (&["produce", "--rate", "inf"], "above 0"),
        (&["produce", "--count", "0"], "--count"),
        (&["produce", "--users", "0"], "--users"),
        (&["produce", "--skew", "0"], "Zipf exponent"),
        (&["produce", "--skew=-1"], "Zipf exponent"),
        (&["produce", "--duplicates", "1.5"], "fraction from 0 to 1"),
        (&["produce", "--invalid=-0.1"], "fraction from 0 to 1"),
        (
            &["produce", "--duplicates", "0.6", "--invalid", "0.6"],
            "add up to more than 1",
        ),
        (&["produce", "--seed", "x"], "--seed"),
        (&["verify"], "--record"),
        (&["verify", "--record", "r", "--wait", "soon"], "--wait"),
        (&["query"], "--user"),
        (&["query", "--user", ""], "user_id of 1 to 256 bytes"),
        (&["query", "--user", "u", "--limit", "0"], "1 to 100000"),
        (
            &["query", "--user", "u", "--since", "yesterday"],
            "RFC 3339",
        ),
        (
            &["query", "--user", "u", "--since", "100000000years"],
            "at most 100 years",
        ),
        (
            &["query", "--user", "u", "--since", "2000-01-01T00:00:00Z"],
            "at most 366 days",
        ),
        (
            &["query", "--user", "u", "--since", "1h", "--until", "2h"],
            "--since is after --until",
        ),
        (
            &["forget", "--user", "u", "--through", "2099-01-01T00:00:00Z"],
            "--through is in the future",
        ),
        (&["dlq", "replay", "--kind", "Bad Kind"], "error kind"),
        (&["dlq", "replay", "--since", "soon"], "RFC 3339"),
        (
            &["dlq", "replay", "--since", "1h", "--until", "2h"],
            "--since is not before --until",
        ),
        (&["healthcheck", "--addr", "nowhere"], "--addr"),
        (&["healthcheck", "--timeout", "x"], "--timeout"),
        (
            &["check-config", "--set", "no-equals-sign"],
            "--set argument 1",
        ),
        (&["run", "--bogus"], "--bogus"),
        (&["bogus-tool"], "bogus-tool"),
    ];
    for (args, expected) in table {
        let out = vault(args, &[]);
        let shown = text(&out);
        assert_eq!(out.status.code(), Some(2), "vault {args:?}:\n{shown}");
        assert!(
            shown.contains(expected),
            "vault {args:?}: no {expected:?} in\n{shown}"
        );
        assert!(!shown.contains("panicked"), "vault {args:?}:\n{shown}");
    }
}

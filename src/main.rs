//! The `vault` binary: parses the command line, loads configuration, installs logging and hands
//! over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use vault::config::{self, LogFormat, StoreKind};
use vault::kafka::dead_letter::KafkaDeadLetters;
use vault::pipeline::deadline;
use vault::store::runtime::StoreRuntime;
use vault::store::scylla::{self as scylla_store, ScyllaStore};
use vault::store::MemoryStore;
use vault::Pipeline;

/// mimalloc: the pipeline allocates and frees a few small buffers per event across threads,
/// where glibc's per-thread arenas cost more time and fragment more (measured in `make bench`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "vault",
    version,
    about = "Stores user-activity events from Kafka in ScyllaDB, committing offsets only after writes are durable."
)]
struct Cli {
    /// Configuration file (TOML). Environment variables VAULT_<SECTION>_<KEY> override it.
    #[arg(long, short, global = true, env = "VAULT_CONFIG")]
    config: Option<PathBuf>,
    /// Override one setting, e.g. --set batch.max_events=500 (repeatable; wins over file and env).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume, batch and store events until SIGTERM/SIGINT.
    Run {
        /// Create the keyspace and table first if they are missing (as `vault migrate`).
        #[arg(long)]
        migrate: bool,
    },
    /// Serve the read side over HTTP until SIGTERM/SIGINT: a user's events, their export and
    /// erasure, the timeline page, /metrics, /healthz and /readyz, on api.addr (see [api]).
    Api,
    /// Create the keyspace and table if missing (idempotent), then exit.
    Migrate {
        /// Also fill the day index (used by erasures) from every existing row: runs by itself
        /// when upgrading from the first release; run it again if that upgrade was interrupted.
        #[arg(long)]
        reindex: bool,
    },
    /// Print the CQL schema `vault migrate` runs for the current settings.
    Schema,
    /// Generate realistic user-activity events into the first configured topic.
    Produce {
        /// Messages to send (at least 1).
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
        count: u64,
        /// Target rate in events per second, above 0 (default: as fast as the broker takes them).
        #[arg(long, value_parser = args::rate)]
        rate: Option<f64>,
        /// Distinct users (at least 1).
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
        users: u64,
        /// Zipf exponent of user activity, above 0 and at most 100 (higher: a few users dominate).
        #[arg(long, default_value_t = 1.1, value_parser = args::skew)]
        skew: f64,
        /// Fraction of messages that re-send an earlier event (same event_id), 0 to 1.
        #[arg(long, default_value_t = 0.0, value_parser = args::fraction)]
        duplicates: f64,
        /// Fraction of messages that are invalid (bad JSON, missing fields, bad timestamps...),
        /// 0 to 1; with --duplicates at most 1 in all.
        #[arg(long, default_value_t = 0.0, value_parser = args::fraction)]
        invalid: f64,
        /// Record every delivered message here, for `vault verify`.
        #[arg(long)]
        record: Option<PathBuf>,
        /// Random seed (same seed, same events).
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Check that everything a `produce --record` sent is stored or dead-lettered and committed.
    Verify {
        /// The record written by `vault produce --record`.
        #[arg(long)]
        record: PathBuf,
        /// How long to wait for the group to commit every partition to its end.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// Show a user's activity over a time range, newest first.
    Query {
        /// The user_id.
        #[arg(long, value_parser = args::user_id)]
        user: String,
        /// Start of the range: RFC 3339, or a duration before now such as 1h or 7days.
        #[arg(long, default_value = "1day", value_parser = args::time)]
        since: args::Time,
        /// End of the range (RFC 3339, or a duration before now); default now. The range is
        /// cut to the days an event can be stored on and may span at most 366 days.
        #[arg(long, value_parser = args::time)]
        until: Option<args::Time>,
        /// Events to show, 1 to 100000.
        #[arg(long, default_value_t = 20, value_parser = args::limit)]
        limit: usize,
        /// Output as JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Erase a user (the right to be forgotten): every stored row of theirs whose message is
    /// not later than --through goes, and stays gone under any replay; later activity is kept.
    /// The erasure is recorded. Cost: one delete per day the user has activity on.
    Forget {
        /// The user_id.
        #[arg(long, value_parser = args::user_id)]
        user: String,
        /// Erase rows of messages up to this time (RFC 3339, or a duration before now; not
        /// later than now); default now.
        #[arg(long, value_parser = args::time)]
        through: Option<args::Time>,
        /// Who asks, for the record (default: the login name running the command).
        #[arg(long)]
        requested_by: Option<String>,
        /// Show the partitions that would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Work with the dead-letter topic.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Validate a configuration and print the effective settings (secrets masked).
    CheckConfig {
        /// The file to check (defaults to --config).
        file: Option<PathBuf>,
    },
    /// Exit 0 when a running vault answers GET /healthz (or each --path given: /healthz,
    /// /readyz) with 200 (the container health check; the image has no curl).
    Healthcheck {
        /// The address vault serves on; default: metrics.addr from the configuration, with
        /// 0.0.0.0 asked at 127.0.0.1.
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
        /// How long to wait for the answer.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// The endpoint to ask: /healthz (alive) or /readyz (ready); given twice, both must
        /// answer 200.
        #[arg(long, default_value = "/healthz", value_parser = ["/healthz", "/readyz"])]
        path: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Re-publish dead letters to their source topic once the cause is fixed (each configured
    /// topic's dead-letter topic is read from its beginning to its current end; letters naming a
    /// topic that is not a configured source of it are skipped and counted).
    Replay {
        /// Only this error kind (repeatable), e.g. bad_json, missing_field, invalid_field.
        /// Without it, every kind but tombstone, which goes back only when named: with
        /// pipeline.tombstones = "erase", each one erases its user.
        #[arg(long = "kind", value_name = "KIND", value_parser = args::kind)]
        kinds: Vec<String>,
        /// Only events from this time on: RFC 3339, or a duration before now such as 6h.
        #[arg(long, value_parser = args::time)]
        since: Option<args::Time>,
        /// Only events before this time (RFC 3339, or a duration before now).
        #[arg(long, value_parser = args::time)]
        until: Option<args::Time>,
        /// Count what would be replayed, publish nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    #[cfg(feature = "mimalloc")]
    tune_allocator();
    // Failpoints named in FAILPOINTS (only in a build with the `failpoints` feature, for tests).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    for key in config::secrets_on_command_line(&cli.overrides) {
        eprintln!(
            "vault: warning: --set {key}=... puts a secret on the command line, where every \
             user of this machine can read it (ps, /proc/<pid>/cmdline); use the environment \
             (VAULT_...) or a file (scylla.password_file, kafka.options_file) instead"
        );
    }
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // In a JSON log, the reason vault stopped is a JSON line like every other.
            if JSON_LOG.load(std::sync::atomic::Ordering::Relaxed)
                && tracing::enabled!(tracing::Level::ERROR)
            {
                tracing::error!(error = %format!("{e:#}"), "vault stopped.");
            } else {
                eprintln!("vault: {e:#}");
            }
            // A malformed --set is a bad argument, answered like clap's own.
            match e.downcast_ref::<config::ConfigError>() {
                Some(config::ConfigError::BadOverride(_)) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// mimalloc 3 keeps freed memory for a second before returning it to the OS; at vault's
/// allocation rate that adds tens of MiB to the resident set (a 1M-event drain peaked at
/// 100-118 MiB). Purging after 10 ms (mimalloc 2's default) gave most of it back but paid for
/// it in page faults, a sixth of the CPU of the ScyllaDB store's runs (zeroing fresh pages).
/// 100 ms kept both low on one machine, but let a 1M-event drain peak at 87-123 MiB on a
/// faster one; 50 ms kept it at 79-95 MiB there for 5-15% more CPU in the store's runs than
/// 100 ms (see README, Benchmarks). MIMALLOC_PURGE_DELAY still overrides it.
/// `mi_option_purge_delay` in mimalloc.h (v3), which libmimalloc-sys names no constant for.
#[cfg(feature = "mimalloc")]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc keeps freed memory before returning it to the OS (ms).
#[cfg(feature = "mimalloc")]
const PURGE_DELAY_MS: std::ffi::c_long = 50;

#[cfg(feature = "mimalloc")]
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set stores one integer option; mimalloc reads it atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig { file } => {
            let file = file.or(cli.config);
            let settings = config::load(file.as_deref(), &cli.overrides)?.validate()?;
            println!("# configuration is valid; effective settings:");
            print!("{}", settings.config.to_masked_toml());
            Ok(())
        }
        Command::Run { migrate } => {
            let settings = config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
            init_logging(&settings.config.log)?;
            let threads = settings.config.scylla.store_threads;
            let store_runtime = match settings.config.pipeline.store {
                StoreKind::Scylla if threads > 0 => {
                    Some(StoreRuntime::new(threads).context("cannot start the store's runtime")?)
                }
                _ => None,
            };
            let main_runtime = runtime()?;
            let outcome = main_runtime.block_on(run(
                settings,
                migrate,
                store_runtime.as_ref().map(|r| r.handle().clone()),
            ));
            // The main runtime first (the pipeline has joined the persisters), then the
            // store's, out of async code, so that it waits for its threads.
            drop(main_runtime);
            drop(store_runtime);
            outcome
        }
        Command::Api => {
            let settings = config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
            let api = vault::api::ApiSettings::new(&settings.config)?;
            init_logging(&settings.config.log)?;
            runtime()?.block_on(serve_api(settings, api))
        }
        Command::Produce {
            count,
            rate,
            users,
            skew,
            duplicates,
            invalid,
            record,
            seed,
        } => {
            if duplicates + invalid > 1.0 {
                usage_error(format!(
                    "--duplicates {duplicates} and --invalid {invalid} add up to more than 1: \
                     they are fractions of the same messages"
                ));
            }
            let settings = config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
            let opts = vault::tools::produce::ProduceOptions {
                topic: settings.config.kafka.topics[0].clone(),
                count,
                rate,
                users,
                skew,
                duplicates,
                invalid,
                record,
                seed,
            };
            let base = vault::kafka::base_client_config(&settings);
            let summary = runtime()?
                .block_on(vault::tools::produce::produce(&base, &opts))
                .map_err(anyhow::Error::msg)?;
            println!("{summary}");
            Ok(())
        }
        Command::Verify { record, wait } => {
            let settings = config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
            let base = vault::kafka::base_client_config(&settings);
            let report = runtime()?
                .block_on(vault::tools::verify::verify(
                    &settings, &base, &record, wait,
                ))
                .map_err(anyhow::Error::msg)?;
            println!("{report}");
            if !report.ok() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Forget {
            user,
            through,
            requested_by,
            dry_run,
        } => {
            let now = chrono::Utc::now().timestamp_millis();
            if through.is_some_and(|t| t.at(now) > now) {
                // Its tombstones would shadow the user's activity until then, and the erasure
                // watermark cannot come down: every write would look the user up until then.
                usage_error(
                    "--through is in the future: an erasure covers what happened up to now at \
                     the latest; give a time not later than now (or leave it out: now)",
                );
            }
            let settings = config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
            let who = requested_by
                .unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "unknown".into()));
            let erasure = vault::store::erasure::Erasure {
                user_id: user,
                through_ms: through.map_or(now, |t| t.at(now)),
                requested_by: format!("cli:{who}"),
                requested_at_ms: now,
            };
            runtime()?.block_on(async {
                let store = ScyllaStore::connect(&settings.config.scylla, false).await?;
                let report = vault::store::erasure::forget(&store, &erasure, dry_run).await?;
                print!("{}", vault::store::erasure::summary(&report));
                anyhow::Ok(())
            })
        }
        Command::Query {
            user,
            since,
            until,
            limit,
            json,
        } => {
            let now = chrono::Utc::now().timestamp_millis();
            let to = until.map_or(now, |t| t.at(now));
            let from = since.at(now);
            let settings = config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
            let (from, to) = vault::tools::query::bounded_range(from, to, now)
                .unwrap_or_else(|e| usage_error(e));
            runtime()?.block_on(async {
                let c = &settings.config.scylla;
                let session = std::sync::Arc::new(scylla_store::connect(c).await?);
                let rows = vault::tools::query::user_activity(&session, c, &user, from, to, limit)
                    .await
                    .map_err(anyhow::Error::msg)?;
                if json {
                    for r in &rows {
                        println!("{}", vault::tools::query::json_line(r));
                    }
                } else {
                    print!("{}", vault::tools::query::table(&rows));
                    eprintln!(
                        "{} event(s) of {}",
                        rows.len(),
                        vault::tools::query::escape(&user)
                    );
                }
                anyhow::Ok(())
            })
        }
        Command::Dlq {
            command:
                DlqCommand::Replay {
                    kinds,
                    since,
                    until,
                    dry_run,
                },
        } => {
            let now = chrono::Utc::now().timestamp_millis();
            let filter = vault::tools::dlq::ReplayFilter {
                kinds,
                since_ms: since.map(|t| t.at(now)),
                until_ms: until.map(|t| t.at(now)),
            };
            if let (Some(s), Some(u)) = (filter.since_ms, filter.until_ms) {
                if s >= u {
                    usage_error("--since is not before --until: the range holds nothing");
                }
            }
            let settings = config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
            let base = vault::kafka::base_client_config(&settings);
            runtime()?.block_on(async {
                // Letters of users erased since are not replayed: the store's record of
                // erasures says which (see vault::store::erasure::erased_through).
                let store = std::sync::Arc::new(
                    vault::store::scylla::ScyllaStore::connect(&settings.config.scylla, false)
                        .await
                        .map_err(|e| match e {
                            vault::store::StoreError::Config(_) => anyhow::anyhow!("{e}"),
                            e => anyhow::anyhow!("{e} (dlq replay reads the record of erasures, so that it never brings back an erased user's events)"),
                        })?,
                );
                // Each dead-letter topic once, even when several source topics share it; its
                // letters may go back only to those source topics. All of them are described
                // first: a missing one stops the run before anything is sent.
                let routes = settings.dead_letter_routes();
                let checked = tokio::task::spawn_blocking({
                    let (base, routes) = (base.clone(), routes.clone());
                    move || {
                        vault::tools::dlq::check_routes(
                            &base,
                            routes
                                .iter()
                                .map(|(dlq, sources)| (dlq.as_str(), sources.as_slice())),
                        )
                    }
                });
                checked.await?.map_err(anyhow::Error::msg)?;
                for (dlq, sources) in routes {
                    let (store, handle) = (store.clone(), tokio::runtime::Handle::current());
                    let erased_through = move |user: &str| {
                        handle
                            .block_on(vault::store::erasure::erased_through(&store, user))
                            .map_err(|e| e.to_string())
                    };
                    let summary = vault::tools::dlq::replay(
                        &base,
                        &dlq,
                        &sources,
                        &filter,
                        dry_run,
                        erased_through,
                    )
                    .await
                    .map_err(anyhow::Error::msg)?;
                    println!("{summary}");
                }
                anyhow::Ok(())
            })
        }
        Command::Healthcheck {
            addr,
            timeout,
            path,
        } => {
            let addr = match addr {
                Some(a) => a,
                None => {
                    let settings =
                        config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
                    let mut a = settings.metrics_addr;
                    if a.ip().is_unspecified() {
                        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                    }
                    a
                }
            };
            path.iter()
                .try_for_each(|path| healthcheck(addr, path, timeout))
        }
        Command::Schema => {
            let settings = config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
            print!("{}", scylla_store::schema_script(&settings.config.scylla));
            Ok(())
        }
        Command::Migrate { reindex } => {
            let settings = config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
            init_logging(&settings.config.log)?;
            runtime()?.block_on(async {
                let c = &settings.config.scylla;
                let session = scylla_store::connect(c).await?;
                scylla_store::migrate(&session, c).await?;
                if reindex {
                    let n = scylla_store::reindex_user_days(&session, c).await?;
                    println!("day index: {n} partition(s)");
                }
                println!("schema ready: {}.{}", c.keyspace, scylla_store::TABLE);
                anyhow::Ok(())
            })
        }
    }
}

/// A usage error found after parsing (one argument against another): clap's message and exit
/// code 2, like every other bad argument.
/// Cancels `shutdown` at the first SIGINT or SIGTERM. A second signal of the same kind (a
/// second Ctrl-C) cuts the drain short and exits at once, with 130 or 143: nothing is lost, since
/// nothing past what is durable was committed, and the partitions' next owner reads the rest
/// again. One of the other kind does not (`kill` after a Ctrl-C, as a script's clean-up sends).
/// Both streams are taken once, before the first signal, so none is missed.
fn stop_on_signals(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::spawn(async move {
                    let interrupted = tokio::select! {
                        _ = int.recv() => true,
                        _ = term.recv() => false,
                    };
                    tracing::info!("Shutdown signal received.");
                    shutdown.cancel();
                    let code = if interrupted {
                        int.recv().await;
                        130
                    } else {
                        term.recv().await;
                        143
                    };
                    tracing::warn!(
                        "Second shutdown signal: exiting now, without waiting for the drain; \
                         what was not committed is read again by the partitions' next owner."
                    );
                    std::process::exit(code);
                });
                return;
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "Cannot listen for signals one by one; a second signal will not cut the drain short.");
            }
        }
    }
    tokio::spawn(async move {
        vault::shutdown_signal().await;
        shutdown.cancel();
    });
}

fn usage_error(message: impl std::fmt::Display) -> ! {
    Cli::command()
        .error(clap::error::ErrorKind::ValueValidation, message)
        .exit()
}

/// Exit 0 when `addr` answers `GET path` with 200 within `timeout`.
fn healthcheck(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut status = [0u8; 12];
    s.read_exact(&mut status)
        .with_context(|| format!("no answer from {addr}"))?;
    anyhow::ensure!(
        &status == b"HTTP/1.1 200",
        "{addr}{path} answered {}",
        String::from_utf8_lossy(&status)
    );
    Ok(())
}

/// Value parsers for the tools' arguments: each refuses what the tool cannot do, with what it
/// accepts, so that clap answers with the message and exit code 2 before anything starts.
mod args {
    /// A time argument: RFC 3339, or a duration before now.
    #[derive(Debug, Clone, Copy)]
    pub enum Time {
        At(i64),
        Ago(std::time::Duration),
    }

    impl Time {
        /// Milliseconds since the epoch, `now` being the time a duration counts back from.
        pub fn at(self, now: i64) -> i64 {
            match self {
                Time::At(t) => t,
                Time::Ago(d) => {
                    now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                }
            }
        }
    }

    /// Durations longer than this are not a time before now anyone means.
    const MAX_AGO: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);

    pub fn time(s: &str) -> Result<Time, String> {
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
            return Ok(Time::At(t.timestamp_millis()));
        }
        match humantime::parse_duration(s) {
            Ok(d) if d <= MAX_AGO => Ok(Time::Ago(d)),
            Ok(_) => Err("a duration of at most 100 years".into()),
            Err(_) => Err(
                "an RFC 3339 time (2025-11-24T10:00:00Z) or a duration before now (1h, 7days)"
                    .into(),
            ),
        }
    }

    pub fn rate(s: &str) -> Result<f64, String> {
        match s.parse::<f64>() {
            Ok(r) if r.is_finite() && r > 0.0 && r <= 1e9 => Ok(r),
            _ => Err(
                "events per second, above 0 and at most 1e9 (leave --rate out for no limit)".into(),
            ),
        }
    }

    pub fn skew(s: &str) -> Result<f64, String> {
        match s.parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 && x <= 100.0 => Ok(x),
            _ => Err("a Zipf exponent above 0 and at most 100, such as 1.1".into()),
        }
    }

    pub fn fraction(s: &str) -> Result<f64, String> {
        match s.parse::<f64>() {
            Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
            _ => Err("a fraction from 0 to 1, such as 0.01".into()),
        }
    }

    pub fn limit(s: &str) -> Result<usize, String> {
        match s.parse::<usize>() {
            Ok(n) if (1..=100_000).contains(&n) => Ok(n),
            _ => Err("a number of events from 1 to 100000".into()),
        }
    }

    pub fn user_id(s: &str) -> Result<String, String> {
        if s.is_empty() || s.len() > vault::event::MAX_USER_ID_BYTES {
            return Err(format!(
                "a user_id of 1 to {} bytes",
                vault::event::MAX_USER_ID_BYTES
            ));
        }
        Ok(s.to_owned())
    }

    pub fn kind(s: &str) -> Result<String, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        if ok {
            Ok(s.to_owned())
        } else {
            Err("an error kind such as bad_json or missing_field (vault.error.kind)".into())
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vault")
        .build()
        .context("cannot start the async runtime")
}

/// Runs the pipeline; with the ScyllaDB store, its client is started on `store_runtime` and the
/// persisters run there (see `vault::store::runtime`).
async fn run(
    settings: vault::Settings,
    migrate: bool,
    store_runtime: Option<tokio::runtime::Handle>,
) -> anyhow::Result<()> {
    // Before connecting to anything: a pod that cannot read its StatefulSet stops at once.
    vault::kubernetes::ScaleCheck::for_config(&settings.config.kafka)
        .map_err(vault::Error::Kubernetes)?;
    let shutdown = CancellationToken::new();
    stop_on_signals(shutdown.clone());
    let dead_letters = KafkaDeadLetters::new(
        &vault::kafka::base_client_config(&settings),
        &settings.config.kafka.dead_letter_topic,
        settings.config.kafka.dead_letter_max_bytes,
    )
    .context(
        "the dead-letter producer refuses the Kafka options (kafka.options apply to it too; \
         it is idempotent, with acks=all)",
    )?;
    match settings.config.pipeline.store {
        StoreKind::Null => {
            tracing::warn!("pipeline.store = null: events are acknowledged without being stored (benchmarking only).");
            Pipeline::new(settings, MemoryStore::null(), dead_letters)
                .run(shutdown)
                .await?;
        }
        StoreKind::Scylla => {
            // The driver's connection tasks are spawned on the runtime it is started on.
            let connecting = {
                let (settings, shutdown) = (settings.clone(), shutdown.clone());
                let connect = async move { connect_store(&settings, migrate, &shutdown).await };
                match &store_runtime {
                    Some(runtime) => runtime.spawn(connect),
                    None => tokio::spawn(connect),
                }
            };
            let connected = connecting.await.map_err(|e| {
                anyhow::anyhow!("connecting to ScyllaDB ended without an answer: {e}")
            })?;
            let Some(store) = connected? else {
                return Ok(());
            };
            let store = store.with_retention(settings.retention.clone());
            let mut pipeline = Pipeline::new(settings, store, dead_letters);
            if let Some(runtime) = store_runtime {
                pipeline = pipeline.with_store_runtime(runtime);
            }
            pipeline.run(shutdown).await?;
        }
    }
    Ok(())
}

/// `vault api`: connects to ScyllaDB (retrying like `vault run`), then serves until a signal.
async fn serve_api(settings: vault::Settings, api: vault::api::ApiSettings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            vault::shutdown_signal().await;
            shutdown.cancel();
        }
    });
    let listener = tokio::net::TcpListener::bind(api.addr)
        .await
        .with_context(|| format!("cannot listen on api.addr {}", api.addr))?;
    let Some(store) = connect_store(&settings, false, &shutdown).await? else {
        return Ok(());
    };
    let api = std::sync::Arc::new(vault::api::Api::new(api, store).await?);
    vault::api::serve(listener, api, shutdown.cancelled_owned()).await?;
    tracing::info!("Stopped.");
    Ok(())
}

/// Connects to ScyllaDB, retrying transient failures (a node restarting, a dropped connection)
/// with backoff for up to [`deadline::STARTUP_CONNECT_PATIENCE`], so a blip at start-up is not
/// a crash; a permanent error (authentication, schema, a consistency the cluster refuses) or a longer outage ends the start with
/// the error. Nothing is read from Kafka meanwhile. `None` when shutdown came first.
async fn connect_store(
    settings: &vault::Settings,
    migrate: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<ScyllaStore>> {
    let retry = settings.retry();
    let give_up_at = tokio::time::Instant::now() + deadline::STARTUP_CONNECT_PATIENCE;
    let mut delay = retry.initial_backoff;
    loop {
        match ScyllaStore::connect(&settings.config.scylla, migrate).await {
            Ok(store) => return Ok(Some(store)),
            Err(e) if e.is_retryable() && tokio::time::Instant::now() + delay < give_up_at => {
                tracing::warn!(error = %e, retry_in = ?delay, "Cannot start on ScyllaDB yet; retrying.");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(retry.max_backoff);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether the log is JSON (set once logging is set up): then the error vault stops on is
/// logged as a JSON line, not written as text.
static JSON_LOG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn init_logging(log: &config::LogConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .context("log.level")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => {
            builder.json().flatten_event(true).init();
            JSON_LOG.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        LogFormat::Text => builder.init(),
    }
    // A panic (caught and restarted, or dead-lettered as undecodable) is logged like any other
    // error, in the configured format: a JSON log stays one JSON object a line, with the
    // backtrace as a field when RUST_BACKTRACE asks for one. A filter that leaves vault's errors
    // out gets the default hook's text instead: a panic is never silent.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !tracing::enabled!(tracing::Level::ERROR) {
            return default_hook(info);
        }
        let payload = info.payload();
        let mut message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        // Long enough for any cause; bounded, as a panic may echo input.
        if let Some((cut, _)) = message.char_indices().nth(4096) {
            message.truncate(cut);
            message.push('…');
        }
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
            .then(|| backtrace.to_string());
        tracing::error!(
            panic = %message,
            location,
            thread = thread.name().unwrap_or("<unnamed>"),
            backtrace,
            "A thread panicked."
        );
    }));
    Ok(())
}

#[cfg(all(test, feature = "mimalloc"))]
mod tests {
    use super::*;

    /// The option index is mimalloc's purge delay: its v3 default (1 s) before, 50 ms after.
    /// Fails when an upgraded mimalloc numbers its options differently.
    #[test]
    fn the_allocator_purges_after_50_ms() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reading an integer option.
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            before, 1000,
            "option {MI_OPTION_PURGE_DELAY} is not the purge delay"
        );
        tune_allocator();
        // SAFETY: as above.
        let after = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(after, PURGE_DELAY_MS);
        assert_eq!(after, 50);
    }
}

//! The `vault` binary: parses the command line, loads configuration, installs logging and hands
//! over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use vault::config::{self, LogFormat, StoreKind};
use vault::kafka::dead_letter::KafkaDeadLetters;
use vault::pipeline::deadline;
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
    /// Create the keyspace and table if missing (idempotent), then exit.
    Migrate,
    /// Print the CQL schema `vault migrate` runs for the current settings.
    Schema,
    /// Generate realistic user-activity events into the first configured topic.
    Produce {
        /// Messages to send.
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// Target rate in events per second (default: as fast as the broker takes them).
        #[arg(long)]
        rate: Option<f64>,
        /// Distinct users.
        #[arg(long, default_value_t = 10_000)]
        users: u64,
        /// Zipf exponent of user activity (higher: a few users dominate).
        #[arg(long, default_value_t = 1.1)]
        skew: f64,
        /// Fraction of messages that re-send an earlier event (same event_id).
        #[arg(long, default_value_t = 0.0)]
        duplicates: f64,
        /// Fraction of messages that are invalid (bad JSON, missing fields, bad timestamps...).
        #[arg(long, default_value_t = 0.0)]
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
        #[arg(long)]
        user: String,
        /// Start of the range: RFC 3339, or a duration before now such as 1h or 7days.
        #[arg(long, default_value = "1day")]
        since: String,
        /// End of the range (RFC 3339); default now.
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Output as JSON lines instead of a table.
        #[arg(long)]
        json: bool,
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
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Re-publish dead letters to their source topic once the cause is fixed (each configured
    /// topic's dead-letter topic is read from its beginning to its current end; letters naming a
    /// topic that is not a configured source of it are skipped and counted).
    Replay {
        /// Only this error kind (repeatable), e.g. bad_json, missing_field, invalid_field.
        #[arg(long = "kind", value_name = "KIND")]
        kinds: Vec<String>,
        /// Only events from this time on: RFC 3339, or a duration before now such as 6h.
        #[arg(long)]
        since: Option<String>,
        /// Only events before this time (RFC 3339, or a duration before now).
        #[arg(long)]
        until: Option<String>,
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
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vault: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// mimalloc 3 keeps freed memory for a second before returning it to the OS; at vault's
/// allocation rate that adds tens of MiB to the resident set for no gain. Purge after 10 ms
/// (mimalloc 2's default) unless MIMALLOC_PURGE_DELAY says otherwise.
/// `mi_option_purge_delay` in mimalloc.h (v3), which libmimalloc-sys names no constant for.
#[cfg(feature = "mimalloc")]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[cfg(feature = "mimalloc")]
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set stores one integer option; mimalloc reads it atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10) };
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
            runtime()?.block_on(run(settings, migrate))
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
        Command::Query {
            user,
            since,
            until,
            limit,
            json,
        } => {
            let settings = config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
            let now = chrono::Utc::now().timestamp_millis();
            let to = match until {
                Some(t) => parse_time(&t, now)?,
                None => now,
            };
            let from = parse_time(&since, now)?;
            runtime()?.block_on(async {
                let c = &settings.config.scylla;
                let session = scylla_store::connect(c).await?;
                let rows = vault::tools::query::user_activity(&session, c, &user, from, to, limit)
                    .await
                    .map_err(anyhow::Error::msg)?;
                if json {
                    for r in &rows {
                        println!("{}", serde_json::to_string(r)?);
                    }
                } else {
                    print!("{}", vault::tools::query::table(&rows));
                    eprintln!("{} event(s) of {user}", rows.len());
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
            let settings = config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
            let now = chrono::Utc::now().timestamp_millis();
            let filter = vault::tools::dlq::ReplayFilter {
                kinds,
                since_ms: since.map(|t| parse_time(&t, now)).transpose()?,
                until_ms: until.map(|t| parse_time(&t, now)).transpose()?,
            };
            let base = vault::kafka::base_client_config(&settings);
            runtime()?.block_on(async {
                // Each dead-letter topic once, even when several source topics share it; its
                // letters may go back only to those source topics.
                for (dlq, sources) in settings.dead_letter_routes() {
                    let summary =
                        vault::tools::dlq::replay(&base, &dlq, &sources, &filter, dry_run)
                            .await
                            .map_err(anyhow::Error::msg)?;
                    println!("{summary}");
                }
                anyhow::Ok(())
            })
        }
        Command::Schema => {
            let settings = config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
            print!("{}", scylla_store::schema_script(&settings.config.scylla));
            Ok(())
        }
        Command::Migrate => {
            let settings = config::load(cli.config.as_deref(), &cli.overrides)?.validate()?;
            init_logging(&settings.config.log)?;
            runtime()?.block_on(async {
                let c = &settings.config.scylla;
                let session = scylla_store::connect(c).await?;
                scylla_store::migrate(&session, c).await?;
                println!("schema ready: {}.{}", c.keyspace, scylla_store::TABLE);
                anyhow::Ok(())
            })
        }
    }
}

/// An RFC 3339 time, or a duration before `now` ("1h", "7days").
fn parse_time(s: &str, now: i64) -> anyhow::Result<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    let d = humantime::parse_duration(s)
        .with_context(|| format!("'{s}' is neither an RFC 3339 time nor a duration such as 1h"))?;
    Ok(now - d.as_millis() as i64)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vault")
        .build()
        .context("cannot start the async runtime")
}

async fn run(settings: vault::Settings, migrate: bool) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            vault::shutdown_signal().await;
            shutdown.cancel();
        }
    });
    let dead_letters = KafkaDeadLetters::new(
        &vault::kafka::base_client_config(&settings),
        &settings.config.kafka.dead_letter_topic,
        settings.config.kafka.dead_letter_max_bytes,
    )?;
    match settings.config.pipeline.store {
        StoreKind::Null => {
            tracing::warn!("pipeline.store = null: events are acknowledged without being stored (benchmarking only).");
            Pipeline::new(settings, MemoryStore::null(), dead_letters)
                .run(shutdown)
                .await?;
        }
        StoreKind::Scylla => {
            let Some(store) = connect_store(&settings, migrate, &shutdown).await? else {
                return Ok(());
            };
            Pipeline::new(settings, store, dead_letters)
                .run(shutdown)
                .await?;
        }
    }
    Ok(())
}

/// Connects to ScyllaDB, retrying transient failures (a node restarting, a dropped connection)
/// with backoff for up to [`deadline::STARTUP_CONNECT_PATIENCE`], so a blip at start-up is not
/// a crash; a permanent error (authentication, schema) or a longer outage ends the start with
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
                tracing::warn!(error = %e, retry_in = ?delay, "ScyllaDB is not reachable yet; retrying.");
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

fn init_logging(log: &config::LogConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .context("log.level")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

#[cfg(all(test, feature = "mimalloc"))]
mod tests {
    use super::*;

    /// The option index is mimalloc's purge delay: its v3 default (1 s) before, 10 ms after.
    /// Fails when an upgraded mimalloc numbers its options differently.
    #[test]
    fn the_allocator_purges_after_10_ms() {
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
        assert_eq!(after, 10);
    }
}

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
use vault::store::scylla::{self as scylla_store, ScyllaStore};
use vault::store::MemoryStore;
use vault::Pipeline;

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
    /// Validate a configuration and print the effective settings (secrets masked).
    CheckConfig {
        /// The file to check (defaults to --config).
        file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vault: {e:#}");
            ExitCode::FAILURE
        }
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
    )?;
    match settings.config.pipeline.store {
        StoreKind::Null => {
            tracing::warn!("pipeline.store = null: events are acknowledged without being stored (benchmarking only).");
            Pipeline::new(settings, MemoryStore::null(), dead_letters)
                .run(shutdown)
                .await?;
        }
        StoreKind::Scylla => {
            let store = ScyllaStore::connect(&settings.config.scylla, migrate).await?;
            Pipeline::new(settings, store, dead_letters)
                .run(shutdown)
                .await?;
        }
    }
    Ok(())
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

//! `vault-sandbox`: TEST AND DEMO INFRASTRUCTURE, NOT A DATABASE OR A BROKER.
//!
//! Hosts librdkafka's mock Kafka cluster and the in-memory CQL stand-in (one node, or with
//! `--cql-nodes N` a cluster of N on 127.0.0.1..N sharing one port; `--cql-tablets-by-default`
//! gives new NetworkTopologyStrategy keyspaces tablets) on loopback ports, prints
//! `VAULT_KAFKA_BROKERS=...`, `VAULT_SCYLLA_NODES=...` (every CQL node, comma-separated) and
//! `VAULT_SANDBOX_CONTROL=...` lines (usable with `eval`/`env`), and runs until SIGTERM/SIGINT.
//! Faults (and compaction, which purges tombstones past their `gc_grace_seconds`) are
//! triggered while it runs through a line-based control port (`vault-sandbox ctl ADDR
//! COMMAND...`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use vault_sandbox::cql::{CqlCluster, CqlOptions, Fault, FaultKind, Saturation};

#[derive(Parser)]
#[command(
    name = "vault-sandbox",
    about = "Test stand-ins for vault: librdkafka's mock Kafka cluster and an in-memory CQL node (not a database)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Mock Kafka brokers.
    #[arg(long, default_value_t = 3)]
    brokers: i32,
    /// Topics to create, as NAME:PARTITIONS (repeatable). Each also gets NAME.dlq with 1 partition.
    #[arg(long = "topic", default_value = "user-activity:12")]
    topics: Vec<String>,
    /// CQL node address (loopback only); with --cql-nodes N, the first node's, the others on the
    /// next addresses up and the same port.
    #[arg(long, default_value = "127.0.0.1:0")]
    cql: SocketAddr,
    /// CQL stand-in nodes, 1 to 8: a cluster with vnode tokens, SimpleStrategy and
    /// NetworkTopologyStrategy placement, tablets for keyspaces created WITH tablets, and one
    /// shared store.
    #[arg(long, default_value_t = 1)]
    cql_nodes: usize,
    /// Give tablets to every NetworkTopologyStrategy keyspace created without a `tablets`
    /// option, as ScyllaDB's `tablets_mode_for_new_keyspaces: enabled` does (`tablets =
    /// {'enabled': false}` opts out; SimpleStrategy keeps vnodes, as in ScyllaDB 6.x).
    /// Without it, only keyspaces created WITH tablets get them.
    #[arg(long)]
    cql_tablets_by_default: bool,
    /// Control port address (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    control: SocketAddr,
    /// Also write the VAULT_* lines to this file.
    #[arg(long)]
    env_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send one command to a running sandbox's control port and print the answer.
    Ctl {
        /// The control address (VAULT_SANDBOX_CONTROL).
        addr: SocketAddr,
        /// The command, e.g. `broker down 1`, `cql outage 10s`, `cql write-timeout 5`.
        #[arg(trailing_var_arg = true, required = true)]
        words: Vec<String>,
    },
}

const HELP: &str = "commands:
  broker down N | broker up N | broker rtt N DURATION
  kafka errors API COUNT ERROR     API: produce fetch metadata offset-commit offset-fetch join-group heartbeat sync-group
                                   ERROR: not-coordinator coordinator-not-available rebalance-in-progress unknown-member-id request-timed-out not-leader
  cql KIND [COUNT] [match TEXT] [p=PROB]   KIND: write-timeout read-timeout unavailable overloaded server-error drop delay:DURATION
  cql outage DURATION | cql drop-connections | cql clear | cql stats
  cql compact [DURATION]           compaction (tombstone_gc mode timeout), as if DURATION (e.g. 11d) had passed: purges
                                   the tombstones whose table's gc_grace_seconds (default 10 days) are over, after which
                                   an older write is visible again; answers how many
  cql routing                      prepared write statements (EXECUTE, BATCH) received so far, how many by a node that
                                   is not a replica of their partition (by tablet in a tablet keyspace), and per node:
                                   writes=N non_replica=M by_node=A,B,...
  cql move-tablet KEYSPACE TOKEN NODE,NODE,...   moves the tablet that holds TOKEN (of every table of the tablet
                                   keyspace KEYSPACE) to these nodes (indexes as in by_node, as many as the replication
                                   factor), as ScyllaDB's load balancer does: drivers learn it from the next EXECUTE
  cql saturate CAPACITY LATENCY OVERLOAD_ABOVE [match TEXT]   a saturated node: CAPACITY statements at once take LATENCY
                                   (a BATCH of k weighs k), more queue (latency grows with the statements in flight),
                                   above OVERLOAD_ABOVE statements in flight: Overloaded
  help";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Some(Cmd::Ctl { addr, words }) => rt.block_on(ctl(addr, &words.join(" "))),
        None => rt.block_on(serve(cli)),
    }
}

async fn ctl(addr: SocketAddr, line: &str) -> anyhow::Result<()> {
    let mut sock = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach the sandbox control port at {addr}"))?;
    sock.write_all(format!("{line}\n").as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new(sock).read_line(&mut answer).await?;
    print!("{answer}");
    if answer.starts_with("error") {
        std::process::exit(1);
    }
    Ok(())
}

type Request = (String, oneshot::Sender<String>);

async fn serve(cli: Cli) -> anyhow::Result<()> {
    for a in [cli.cql, cli.control] {
        if !a.ip().is_loopback() {
            bail!("{a}: the sandbox only listens on loopback addresses");
        }
    }
    let cluster = MockCluster::new(cli.brokers).context("cannot start the mock Kafka cluster")?;
    for t in &cli.topics {
        let (name, parts) = t.split_once(':').unwrap_or((t.as_str(), "12"));
        let parts: i32 = parts
            .parse()
            .with_context(|| format!("--topic {t}: partitions must be a number"))?;
        cluster.create_topic(name, parts, 1)?;
        cluster.create_topic(&format!("{name}.dlq"), 1, 1)?;
    }
    let options = CqlOptions {
        tablets_by_default: cli.cql_tablets_by_default,
        // The control port reports totals only (`cql stats`, `cql routing`): a stand-in that
        // serves for hours keeps no request in full.
        request_log_limit: Some(0),
    };
    let node = CqlCluster::start_on_with(cli.cql, cli.cql_nodes, options)
        .await
        .context("cannot start the CQL stand-in")?;
    let control = TcpListener::bind(cli.control)
        .await
        .context("cannot open the control port")?;

    let lines = format!(
        "VAULT_KAFKA_BROKERS={}\nVAULT_SCYLLA_NODES={}\nVAULT_SANDBOX_CONTROL={}\n",
        cluster.bootstrap_servers(),
        join(node.addrs()),
        control.local_addr()?
    );
    if let Some(path) = &cli.env_file {
        std::fs::write(path, &lines).with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!("{lines}");
    std::io::stdout().flush()?;
    eprintln!("vault-sandbox: test stand-ins running (mock Kafka, in-memory CQL nodes; nothing is durable). Ctrl-C to stop.");

    let (tx, mut rx) = mpsc::channel::<Request>(16);
    tokio::spawn(async move {
        while let Ok((sock, _)) = control.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = sock.into_split();
                let mut lines = BufReader::new(rd).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let (reply, answer) = oneshot::channel();
                    if tx.send((line, reply)).await.is_err() {
                        break;
                    }
                    let text = answer
                        .await
                        .unwrap_or_else(|_| "error: sandbox stopping".into());
                    if wr.write_all(format!("{text}\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });

    // The mock cluster is driven from this task only; commands reach it over the channel.
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some((line, reply)) = rx.recv() => {
                let answer = match command(&cluster, &node, &line) {
                    Ok(s) => format!("ok {s}"),
                    Err(e) => format!("error: {e}"),
                };
                let _ = reply.send(answer);
            }
        }
    }
    eprintln!("vault-sandbox: stopped.");
    Ok(())
}

fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn command(
    cluster: &MockCluster<'static, DefaultProducerContext>,
    node: &CqlCluster,
    line: &str,
) -> Result<String, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |s: Option<&&str>| -> Result<i32, String> {
        s.ok_or("missing number")?
            .parse()
            .map_err(|_| "not a number".to_string())
    };
    let dur = |s: Option<&&str>| -> Result<Duration, String> {
        humantime::parse_duration(s.ok_or("missing duration")?).map_err(|e| e.to_string())
    };
    match words.as_slice() {
        ["help"] | [] => Ok(HELP.replace('\n', " | ")),
        ["broker", "down", n] => cluster
            .broker_down(num(Some(n))?)
            .map(|_| format!("broker {n} down"))
            .map_err(|e| e.to_string()),
        ["broker", "up", n] => cluster
            .broker_up(num(Some(n))?)
            .map(|_| format!("broker {n} up"))
            .map_err(|e| e.to_string()),
        ["broker", "rtt", n, d] => cluster
            .broker_round_trip_time(num(Some(n))?, dur(Some(d))?)
            .map(|_| format!("broker {n} rtt {d}"))
            .map_err(|e| e.to_string()),
        ["kafka", "errors", api, count, err] => {
            let api = match *api {
                "produce" => RDKafkaApiKey::Produce,
                "fetch" => RDKafkaApiKey::Fetch,
                "metadata" => RDKafkaApiKey::Metadata,
                "offset-commit" => RDKafkaApiKey::OffsetCommit,
                "offset-fetch" => RDKafkaApiKey::OffsetFetch,
                "join-group" => RDKafkaApiKey::JoinGroup,
                "heartbeat" => RDKafkaApiKey::Heartbeat,
                "sync-group" => RDKafkaApiKey::SyncGroup,
                other => return Err(format!("unknown API '{other}'")),
            };
            let e = match *err {
                "not-coordinator" => RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
                "coordinator-not-available" => {
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE
                }
                "rebalance-in-progress" => RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
                "unknown-member-id" => RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID,
                "request-timed-out" => RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                "not-leader" => RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                other => return Err(format!("unknown error '{other}'")),
            };
            let n = num(Some(count))?.max(0) as usize;
            cluster.request_errors(api, &vec![e; n]);
            Ok(format!("next {n} {api:?} requests fail with {err}"))
        }
        ["cql", "outage", d] => {
            let d = dur(Some(d))?;
            node.outage(d);
            Ok(format!(
                "CQL node down for {}",
                humantime::format_duration(d)
            ))
        }
        ["cql", "drop-connections"] => {
            node.drop_connections();
            Ok("CQL connections dropped".into())
        }
        ["cql", "clear"] => {
            node.clear_faults();
            Ok("CQL faults cleared".into())
        }
        ["cql", "saturate", rest @ ..] => {
            let s = Saturation::parse(rest)?;
            let desc = format!("{s:?}");
            node.saturate(s);
            Ok(desc)
        }
        ["cql", "stats"] => {
            let t = node.request_totals();
            Ok(format!(
                "requests={} execute={} batch={} query={}",
                t.requests(),
                t.of("EXECUTE"),
                t.of("BATCH"),
                t.of("QUERY")
            ))
        }
        ["cql", "routing"] => {
            let r = node.routing();
            let by_node: Vec<String> = r.writes_by_node.iter().map(usize::to_string).collect();
            Ok(format!(
                "writes={} non_replica={} by_node={}",
                r.writes,
                r.non_replica,
                by_node.join(",")
            ))
        }
        ["cql", "move-tablet", keyspace, token, to] => {
            let token: i64 = token
                .parse()
                .map_err(|_| format!("'{token}' is not a token (a bigint)"))?;
            let to = to
                .split(',')
                .map(|n| n.parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| format!("'{to}' is not a list of node indexes (e.g. 0,2)"))?;
            let t = node.move_tablet_at(keyspace, token, to)?;
            let replicas: Vec<String> = t.replicas.iter().map(usize::to_string).collect();
            Ok(format!(
                "tablet ({},{}] of {keyspace} on nodes {}",
                t.first,
                t.last,
                replicas.join(",")
            ))
        }
        ["cql", "compact", rest @ ..] => {
            let (purged, after) = match rest {
                [] => (node.compact(), String::new()),
                [d] => {
                    let elapsed = dur(Some(d))?;
                    let after =
                        format!(" as if {} had passed", humantime::format_duration(elapsed));
                    (node.compact_after(elapsed), after)
                }
                _ => return Err("cql compact takes at most one DURATION, e.g. 11d".into()),
            };
            Ok(format!("compacted{after}: {purged} tombstones purged"))
        }
        ["cql", kind, rest @ ..] => {
            let mut fault = Fault::new(FaultKind::parse(kind)?);
            let mut it = rest.iter();
            while let Some(w) = it.next() {
                if *w == "match" {
                    fault = fault.matching(it.next().ok_or("match needs a text")?);
                } else if let Some(p) = w.strip_prefix("p=") {
                    fault =
                        fault.probability(p.parse().map_err(|_| "p= needs a number from 0 to 1")?);
                } else {
                    fault = fault.times(w.parse().map_err(|_| format!("'{w}' is not a count"))?);
                }
            }
            let desc = format!("{fault:?}");
            node.inject(fault);
            Ok(desc)
        }
        _ => Err(format!("unknown command '{line}'; try 'help'")),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

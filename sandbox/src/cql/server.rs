//! The stand-in's protocol server: accepts connections for each node of a cluster on its
//! loopback listener, serves many stream ids per connection concurrently against the store the
//! nodes share, logs every request with the node that served it, and applies injected faults.
//! It offers ScyllaDB's TABLETS_ROUTING_V1 extension: a connection that takes it learns a
//! tablet from the answer to an EXECUTE that a node not among the tablet's replicas served.
//! TEST INFRASTRUCTURE: in memory, no durability. The handles tests hold are in `cluster`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use openssl::ssl::{Ssl, SslAcceptor};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_openssl::SslStream;
use tracing::{debug, warn};

use crate::cql::engine::{Database, EngineError, Outcome, Prepared, Value};
use crate::cql::faults::{Fault, FaultKind, Saturation, SaturationStats};
use crate::cql::frame::{self, consistency_name, error_code, Opcode, Reader, Writer};
use crate::cql::parser;
use crate::cql::tablets;

// The node handle, also reachable under this module where code names it so.
pub use crate::cql::cluster::CqlNode;

/// One request as seen by the node that served it, for tests to assert on.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    /// The node that served it: its index in [`crate::cql::CqlCluster::addrs`] (0 on a
    /// single node).
    pub node: usize,
    pub opcode: &'static str,
    pub statement: String,
    pub consistency: Option<&'static str>,
    /// Statements in a BATCH (1 otherwise).
    pub rows: usize,
    /// Statements per table (`keyspace.table`), in order of first appearance: one entry for an
    /// EXECUTE, one per table a BATCH writes; empty for QUERY and PREPARE.
    pub tables: Vec<(String, usize)>,
    /// Write statements (INSERT, UPDATE, DELETE) of user keyspaces in an EXECUTE or BATCH.
    pub writes: usize,
    /// Per table, in the order of `tables`: how many of its write statements touch a partition
    /// that `node` is not a replica of (by tablet in a tablet keyspace, else by the ring and the
    /// keyspace's replication). Always 0 on one node.
    pub non_replica: Vec<(String, usize)>,
    pub at: Instant,
}

/// The nodes' request log: the latest requests in full (every one unless
/// [`crate::cql::CqlOptions::request_log_limit`] bounds them), and totals of every request
/// served, kept exact however many the bound drops.
#[derive(Debug, Default)]
pub(crate) struct RequestLog {
    latest: VecDeque<LoggedRequest>,
    limit: Option<usize>,
    pub(crate) totals: RequestTotals,
}

/// Every request served since the log was last cleared, by any node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestTotals {
    /// Requests, by opcode name (`EXECUTE`, `BATCH`, `QUERY`, ...).
    pub by_opcode: BTreeMap<&'static str, usize>,
    /// Write statements ([`LoggedRequest::writes`]) served by each node, by node index.
    pub writes_by_node: Vec<usize>,
    /// Of those, statements served by a node not a replica of a partition they write.
    pub non_replica: usize,
}

impl RequestTotals {
    /// Requests of every opcode.
    pub fn requests(&self) -> usize {
        self.by_opcode.values().sum()
    }

    /// Requests of opcode `name`.
    pub fn of(&self, name: &str) -> usize {
        self.by_opcode.get(name).copied().unwrap_or(0)
    }
}

impl RequestLog {
    pub(crate) fn new(limit: Option<usize>) -> RequestLog {
        RequestLog {
            limit,
            ..RequestLog::default()
        }
    }

    fn push(&mut self, request: LoggedRequest) {
        let t = &mut self.totals;
        *t.by_opcode.entry(request.opcode).or_default() += 1;
        if t.writes_by_node.len() <= request.node {
            t.writes_by_node.resize(request.node + 1, 0);
        }
        t.writes_by_node[request.node] += request.writes;
        t.non_replica += request.non_replica.iter().map(|(_, n)| n).sum::<usize>();
        if self.limit == Some(0) {
            return;
        }
        if Some(self.latest.len()) == self.limit {
            self.latest.pop_front();
        }
        self.latest.push_back(request);
    }

    /// The requests kept, oldest first.
    pub(crate) fn latest(&self) -> Vec<LoggedRequest> {
        self.latest.iter().cloned().collect()
    }

    pub(crate) fn clear(&mut self) {
        self.latest.clear();
        self.totals = RequestTotals::default();
    }
}

/// What the nodes of a cluster share.
pub(crate) struct Shared {
    pub(crate) db: Mutex<Database>,
    prepared: Mutex<HashMap<Vec<u8>, Arc<Prepared>>>,
    pub(crate) faults: Mutex<Vec<Fault>>,
    /// The saturated-node mode, its requests in flight, and what it did.
    pub(crate) saturation: Mutex<Option<Saturation>>,
    saturated_in_flight: std::sync::atomic::AtomicUsize,
    pub(crate) saturation_stats: Mutex<SaturationStats>,
    pub(crate) outage_until: Mutex<Option<Instant>>,
    pub(crate) log: Mutex<RequestLog>,
    /// Bound values the nodes refuse as invalid (see
    /// [`crate::cql::CqlCluster::reject_values_containing`]).
    pub(crate) rejected_values: Mutex<Vec<Vec<u8>>>,
    /// Bumped to make every open connection close (outage, drop-all).
    pub(crate) generation: watch::Sender<u64>,
    /// Nodes in the ring: on one, every write is on a replica, and requests skip the lookup.
    nodes: usize,
}

/// What one connection negotiated and chose.
#[derive(Default)]
struct Connection {
    /// Its keyspace (USE).
    keyspace: Mutex<Option<String>>,
    /// Whether its STARTUP asked for TABLETS_ROUTING_V1: only then does an EXECUTE on a node
    /// that is not its tablet's replica carry the tablet (as ScyllaDB skips the work for a
    /// driver that does not read it).
    tablets_routing: AtomicBool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Accepts connections for node `node` on `listener` (over TLS when `tls` is set) until
/// `stopped` turns.
pub(crate) fn spawn_node(
    listener: TcpListener,
    node: usize,
    shared: Arc<Shared>,
    tls: Option<Arc<SslAcceptor>>,
    mut stopped: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                accepted = listener.accept() => match accepted {
                    Ok((sock, _)) => {
                        if shared.in_outage() {
                            drop(sock);
                            continue;
                        }
                        let _ = sock.set_nodelay(true);
                        let (s, stopped) = (shared.clone(), stopped.clone());
                        match &tls {
                            None => {
                                tokio::spawn(serve(sock, node, s, stopped));
                            }
                            Some(acceptor) => {
                                let acceptor = acceptor.clone();
                                tokio::spawn(async move {
                                    match tls_accept(&acceptor, sock).await {
                                        Ok(stream) => serve(stream, node, s, stopped).await,
                                        Err(e) => debug!(error = %e, "TLS handshake failed."),
                                    }
                                });
                            }
                        }
                    }
                    Err(e) => warn!(error = %e, "CQL stand-in accept failed."),
                }
            }
        }
    });
}

impl Shared {
    /// What the nodes of `db`'s ring share, starting from `db`, keeping at most `log_limit`
    /// requests in full (all when `None`).
    pub(crate) fn new(db: Database, log_limit: Option<usize>) -> Shared {
        let (generation, _) = watch::channel(0);
        let nodes = db.ring().nodes().len();
        Shared {
            db: Mutex::new(db),
            prepared: Mutex::new(HashMap::new()),
            faults: Mutex::new(Vec::new()),
            saturation: Mutex::new(None),
            saturated_in_flight: std::sync::atomic::AtomicUsize::new(0),
            saturation_stats: Mutex::new(SaturationStats::default()),
            outage_until: Mutex::new(None),
            log: Mutex::new(RequestLog::new(log_limit)),
            rejected_values: Mutex::new(Vec::new()),
            generation,
            nodes,
        }
    }

    /// Whether `node` holds every partition the prepared write `p` touches with `values`
    /// ([`Database::write_on_replica`]); `None` for a statement that writes no user table. A
    /// lone node holds them all, which it answers without taking the database's lock.
    fn write_on_replica(&self, node: usize, p: &Prepared, values: &[Value]) -> Option<bool> {
        if self.nodes == 1 {
            let writes = matches!(
                p.statement,
                parser::Statement::Insert { .. } | parser::Statement::Delete { .. }
            );
            return (writes && !p.keyspace.starts_with("system")).then_some(true);
        }
        lock(&self.db).write_on_replica(node, p, values)
    }

    fn in_outage(&self) -> bool {
        let mut o = lock(&self.outage_until);
        match *o {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                *o = None;
                false
            }
            None => false,
        }
    }

    /// Refuses values that hold a rejected needle, with Scylla's answer to an invalid request.
    fn validate(&self, values: &[Value], stream: i16) -> Result<(), Vec<u8>> {
        let rejected = lock(&self.rejected_values);
        let bad = values.iter().flatten().find(|v| {
            rejected
                .iter()
                .any(|n| !n.is_empty() && v.windows(n.len()).any(|w| w == n.as_slice()))
        });
        match bad {
            Some(_) => Err(error_frame(
                stream,
                error_code::INVALID,
                "Invalid value for a column (refused by the stand-in node)",
                &[],
            )),
            None => Ok(()),
        }
    }

    fn pick_fault(&self, opcode: Opcode, statement: &str) -> Option<FaultKind> {
        let mut faults = lock(&self.faults);
        for f in faults.iter_mut() {
            if f.matches(opcode, statement)
                && (f.probability >= 1.0 || rand::random::<f64>() < f.probability)
            {
                if let Some(n) = f.remaining.as_mut() {
                    *n -= 1;
                }
                return Some(f.kind.clone());
            }
        }
        None
    }
}

enum Out {
    Frame(Vec<u8>),
    Close,
}

async fn tls_accept(
    acceptor: &SslAcceptor,
    sock: TcpStream,
) -> Result<SslStream<TcpStream>, String> {
    let ssl = Ssl::new(acceptor.context()).map_err(|e| e.to_string())?;
    let mut stream = SslStream::new(ssl, sock).map_err(|e| e.to_string())?;
    std::pin::Pin::new(&mut stream)
        .accept()
        .await
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Serves one connection to node `node`.
async fn serve<S>(sock: S, node: usize, shared: Arc<Shared>, mut stopped: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(sock);
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            match out {
                Out::Frame(f) => {
                    if wr.write_all(&f).await.is_err() {
                        break;
                    }
                }
                Out::Close => break,
            }
        }
        let _ = wr.shutdown().await;
    });
    let connection: Arc<Connection> = Arc::default();
    let mut generation = shared.generation.subscribe();
    generation.borrow_and_update();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    'conn: loop {
        tokio::select! {
            _ = stopped.changed() => break,
            _ = generation.changed() => break,
            n = rd.read_buf(&mut buf) => {
                match n {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                loop {
                    match frame::decode(&mut buf) {
                        Ok(Some(f)) => {
                            let (shared, tx, conn) = (shared.clone(), tx.clone(), connection.clone());
                            tokio::spawn(async move {
                                let stream = f.stream;
                                match handle(&shared, node, f, &conn).await {
                                    Some(bytes) => { let _ = tx.send(Out::Frame(bytes)); }
                                    None => { let _ = tx.send(Out::Close); }
                                }
                                debug!(stream, "CQL request answered.");
                            });
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx.send(Out::Frame(error_frame(0, error_code::PROTOCOL_ERROR, &e, &[])));
                            break 'conn;
                        }
                    }
                }
            }
        }
    }
    let _ = tx.send(Out::Close);
    let _ = writer.await;
}

fn error_frame(stream: i16, code: i32, message: &str, extra: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.int(code);
    body.string(message);
    body.extend_from_slice(extra);
    frame::encode(stream, Opcode::Error, &body)
}

struct Params {
    consistency: u16,
    values: Vec<Value>,
    skip_metadata: bool,
    page_size: Option<usize>,
    paging_state: Option<Vec<u8>>,
}

fn read_params(r: &mut Reader<'_>) -> Result<Params, String> {
    let consistency = r.short()?;
    let flags = r.u8()?;
    let mut values = Vec::new();
    if flags & 0x01 != 0 {
        let n = r.short()?;
        for _ in 0..n {
            if flags & 0x40 != 0 {
                r.string()?;
            }
            values.push(r.bytes()?);
        }
    }
    let page_size = if flags & 0x04 != 0 {
        Some(r.int()?)
    } else {
        None
    };
    let paging_state = if flags & 0x08 != 0 { r.bytes()? } else { None };
    Ok(Params {
        consistency,
        values,
        skip_metadata: flags & 0x02 != 0,
        page_size: page_size.filter(|p| *p > 0).map(|p| p as usize),
        paging_state,
    })
}

fn prepared_id(keyspace: Option<&str>, query: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    for seed in [0x5eed_u64, 0xfeed] {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        seed.hash(&mut h);
        keyspace.hash(&mut h);
        query.hash(&mut h);
        out.extend_from_slice(&h.finish().to_be_bytes());
    }
    out
}

/// Handles one request; `None` closes the connection.
async fn handle(
    shared: &Shared,
    node: usize,
    f: frame::Frame,
    connection: &Connection,
) -> Option<Vec<u8>> {
    let keyspace = &connection.keyspace;
    let stream = f.stream;
    let Some(opcode) = Opcode::from_u8(f.opcode) else {
        return Some(error_frame(
            stream,
            error_code::PROTOCOL_ERROR,
            &format!("unknown opcode 0x{:02x}", f.opcode),
            &[],
        ));
    };
    if f.version & 0x7f != 4 {
        return Some(error_frame(
            stream,
            error_code::PROTOCOL_ERROR,
            "the stand-in node speaks protocol v4 only",
            &[],
        ));
    }
    let mut r = Reader(&f.body);
    let result = match opcode {
        Opcode::Options => {
            let mut body = Vec::new();
            body.string_multimap(&[
                ("CQL_VERSION", &["3.4.5"]),
                ("COMPRESSION", &[]),
                ("PROTOCOL_VERSIONS", &["4/v4"]),
                (tablets::EXTENSION, &[""]),
            ]);
            return Some(frame::encode(stream, Opcode::Supported, &body));
        }
        Opcode::Startup => {
            let opts = r.string_map().unwrap_or_default();
            if let Some((_, c)) = opts
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("COMPRESSION"))
            {
                return Some(error_frame(
                    stream,
                    error_code::PROTOCOL_ERROR,
                    &format!("compression '{c}' is not supported by the stand-in node"),
                    &[],
                ));
            }
            let tablets_routing = opts.iter().any(|(k, _)| k == tablets::EXTENSION);
            connection
                .tablets_routing
                .store(tablets_routing, Ordering::Relaxed);
            return Some(frame::encode(stream, Opcode::Ready, &[]));
        }
        Opcode::Register => return Some(frame::encode(stream, Opcode::Ready, &[])),
        Opcode::Query => request_query(shared, node, &mut r, keyspace, stream).await,
        Opcode::Prepare => request_prepare(shared, node, &mut r, keyspace, stream).await,
        Opcode::Execute => {
            let tablets_routing = connection.tablets_routing.load(Ordering::Relaxed);
            request_execute(shared, node, &mut r, keyspace, tablets_routing, stream).await
        }
        Opcode::Batch => request_batch(shared, node, &mut r, keyspace, stream).await,
        other => Err(error_frame(
            stream,
            error_code::PROTOCOL_ERROR,
            &format!("{} is not supported by the stand-in node", other.name()),
            &[],
        )),
    };
    match result {
        Ok(Some(reply)) => {
            let payload: Vec<(&str, &[u8])> = reply
                .custom_payload
                .iter()
                .map(|(k, v)| (*k, v.as_slice()))
                .collect();
            Some(frame::encode_with_payload(
                stream,
                Opcode::Result,
                &payload,
                &reply.body,
            ))
        }
        Ok(None) => None,
        Err(frame) => Some(frame),
    }
}

/// A RESULT's body and custom payload.
struct Reply {
    body: Vec<u8>,
    custom_payload: Vec<(&'static str, Vec<u8>)>,
}

impl From<Vec<u8>> for Reply {
    fn from(body: Vec<u8>) -> Reply {
        Reply {
            body,
            custom_payload: Vec::new(),
        }
    }
}

/// A reply (`None`: close the connection), or an error frame.
type Answer = Result<Option<Reply>, Vec<u8>>;

/// A request's statements per table, and where its writes went, for the log.
#[derive(Default)]
struct Tally {
    tables: Vec<(String, usize)>,
    writes: usize,
    /// Per table, in the order of `tables`.
    non_replica: Vec<(String, usize)>,
}

impl Tally {
    /// Counts one statement on `table`; `on_replica` is `None` for one that writes no user
    /// keyspace (see [`Database::write_on_replica`]).
    fn add(&mut self, table: String, on_replica: Option<bool>) {
        let i = match self.tables.iter().position(|(t, _)| *t == table) {
            Some(i) => i,
            None => {
                self.tables.push((table.clone(), 0));
                self.non_replica.push((table, 0));
                self.tables.len() - 1
            }
        };
        self.tables[i].1 += 1;
        if let Some(on_replica) = on_replica {
            self.writes += 1;
            self.non_replica[i].1 += usize::from(!on_replica);
        }
    }

    fn statements(&self) -> usize {
        self.tables.iter().map(|(_, n)| n).sum()
    }
}

/// Logs the request and applies a matching fault. `Err` is the fault's answer (or `Ok(None)`
/// in it for a dropped connection).
async fn gate(
    shared: &Shared,
    node: usize,
    opcode: Opcode,
    statement: &str,
    consistency: Option<u16>,
    tally: Tally,
    stream: i16,
) -> Result<(), Answer> {
    // A BATCH counts its statements; any other request is one.
    let rows = match opcode {
        Opcode::Batch => tally.statements(),
        _ => 1,
    };
    lock(&shared.log).push(LoggedRequest {
        node,
        opcode: opcode.name(),
        statement: statement.to_owned(),
        consistency: consistency.map(consistency_name),
        rows,
        tables: tally.tables,
        writes: tally.writes,
        non_replica: tally.non_replica,
        at: Instant::now(),
    });
    if shared.in_outage() {
        return Err(Ok(None));
    }
    let cl = consistency.unwrap_or(1);
    let Some(kind) = shared.pick_fault(opcode, statement) else {
        return saturated(shared, opcode, statement, rows, stream).await;
    };
    let write_type = if opcode == Opcode::Batch {
        "UNLOGGED_BATCH"
    } else {
        "SIMPLE"
    };
    let mut extra = Vec::new();
    let frame = match kind {
        FaultKind::Delay(d) => {
            tokio::time::sleep(d).await;
            return Ok(());
        }
        FaultKind::DropConnection => return Err(Ok(None)),
        FaultKind::WriteTimeout => {
            extra.short(cl);
            extra.int(0);
            extra.int(1);
            extra.string(write_type);
            error_frame(
                stream,
                error_code::WRITE_TIMEOUT,
                "Operation timed out - received only 0 responses (injected by the stand-in node)",
                &extra,
            )
        }
        FaultKind::ReadTimeout => {
            extra.short(cl);
            extra.int(0);
            extra.int(1);
            extra.push(0);
            error_frame(
                stream,
                error_code::READ_TIMEOUT,
                "Operation timed out - received only 0 responses (injected by the stand-in node)",
                &extra,
            )
        }
        FaultKind::Unavailable => {
            extra.short(cl);
            extra.int(1);
            extra.int(0);
            error_frame(
                stream,
                error_code::UNAVAILABLE,
                "Cannot achieve consistency level (injected by the stand-in node)",
                &extra,
            )
        }
        FaultKind::Overloaded => overloaded(stream, "Too many in flight hints"),
        FaultKind::ServerError => error_frame(
            stream,
            error_code::SERVER_ERROR,
            "Internal server error (injected by the stand-in node)",
            &[],
        ),
    };
    Err(Err(frame))
}

fn overloaded(stream: i16, why: &str) -> Vec<u8> {
    let message = format!("{why} (injected by the stand-in node)");
    error_frame(stream, error_code::OVERLOADED, &message, &[])
}

/// The saturated-node mode: queues the request (`rows` statements) for its latency, or sheds it
/// with Overloaded.
async fn saturated(
    shared: &Shared,
    opcode: Opcode,
    statement: &str,
    rows: usize,
    stream: i16,
) -> Result<(), Answer> {
    let Some(s) = lock(&shared.saturation)
        .as_ref()
        .filter(|s| s.applies(opcode, statement))
        .cloned()
    else {
        return Ok(());
    };
    let weight = rows.max(1);
    let in_flight = shared
        .saturated_in_flight
        .fetch_add(weight, Ordering::SeqCst)
        + weight;
    if in_flight > s.overload_above && in_flight > weight {
        shared
            .saturated_in_flight
            .fetch_sub(weight, Ordering::SeqCst);
        lock(&shared.saturation_stats).overloaded += 1;
        let why = format!(
            "{in_flight} statements in flight, above {}",
            s.overload_above
        );
        return Err(Err(overloaded(stream, &why)));
    }
    let latency = s.latency(in_flight);
    {
        let mut stats = lock(&shared.saturation_stats);
        stats.peak_in_flight = stats.peak_in_flight.max(in_flight);
    }
    tokio::time::sleep(latency).await;
    shared
        .saturated_in_flight
        .fetch_sub(weight, Ordering::SeqCst);
    lock(&shared.saturation_stats).record_served(latency);
    Ok(())
}

fn engine_error(stream: i16, e: EngineError) -> Vec<u8> {
    match &e {
        EngineError::Syntax(m) => error_frame(stream, error_code::SYNTAX_ERROR, m, &[]),
        EngineError::Invalid(m) => error_frame(stream, error_code::INVALID, m, &[]),
        EngineError::AlreadyExists { keyspace, table } => {
            let mut extra = Vec::new();
            extra.string(keyspace);
            extra.string(table);
            error_frame(stream, error_code::ALREADY_EXISTS, &e.message(), &extra)
        }
    }
}

fn current(keyspace: &Mutex<Option<String>>) -> Option<String> {
    lock(keyspace).clone()
}

async fn request_query(
    shared: &Shared,
    node: usize,
    r: &mut Reader<'_>,
    keyspace: &Mutex<Option<String>>,
    stream: i16,
) -> Answer {
    let bad = |e: String| error_frame(stream, error_code::PROTOCOL_ERROR, &e, &[]);
    let query = r.long_string().map_err(bad)?;
    let params = read_params(r).map_err(bad)?;
    if let Err(a) = gate(
        shared,
        node,
        Opcode::Query,
        &query,
        Some(params.consistency),
        Tally::default(),
        stream,
    )
    .await
    {
        return a;
    }
    let st = parser::parse(&query).map_err(|e| {
        error_frame(
            stream,
            error_code::SYNTAX_ERROR,
            &format!("line 1: {e}"),
            &[],
        )
    })?;
    let ks = current(keyspace);
    let outcome = lock(&shared.db)
        .execute_on(node, &st, &params.values, ks.as_deref())
        .map_err(|e| engine_error(stream, e))?;
    Ok(Some(
        encode_outcome(outcome, keyspace, &params, None).into(),
    ))
}

async fn request_prepare(
    shared: &Shared,
    node: usize,
    r: &mut Reader<'_>,
    keyspace: &Mutex<Option<String>>,
    stream: i16,
) -> Answer {
    let query = r
        .long_string()
        .map_err(|e| error_frame(stream, error_code::PROTOCOL_ERROR, &e, &[]))?;
    let tally = Tally::default();
    if let Err(a) = gate(shared, node, Opcode::Prepare, &query, None, tally, stream).await {
        return a;
    }
    let st = parser::parse(&query).map_err(|e| {
        error_frame(
            stream,
            error_code::SYNTAX_ERROR,
            &format!("line 1: {e}"),
            &[],
        )
    })?;
    let ks = current(keyspace);
    let mut prepared = lock(&shared.db)
        .prepare(st, ks.as_deref())
        .map_err(|e| engine_error(stream, e))?;
    prepared.text = query.clone();
    let id = prepared_id(ks.as_deref(), &query);
    let mut body = Vec::new();
    body.int(4);
    body.short_bytes(&id);
    // Bind marker metadata.
    body.int(0x0001);
    body.int(prepared.binds.len() as i32);
    body.int(prepared.pk_indexes.len() as i32);
    for i in &prepared.pk_indexes {
        body.short(*i);
    }
    body.string(&prepared.keyspace);
    body.string(&prepared.table);
    for (name, ty) in &prepared.binds {
        body.string(name);
        ty.write_option(&mut body);
    }
    // Result metadata.
    match &prepared.result {
        Some(cols) => {
            body.int(0x0001);
            body.int(cols.len() as i32);
            body.string(&prepared.keyspace);
            body.string(&prepared.table);
            for (name, ty) in cols {
                body.string(name);
                ty.write_option(&mut body);
            }
        }
        None => {
            body.int(0x0004);
            body.int(0);
        }
    }
    lock(&shared.prepared).insert(id, Arc::new(prepared));
    Ok(Some(body.into()))
}

fn unprepared(stream: i16, id: &[u8]) -> Vec<u8> {
    let mut extra = Vec::new();
    extra.short_bytes(id);
    error_frame(
        stream,
        error_code::UNPREPARED,
        "prepared statement not found on this node",
        &extra,
    )
}

fn statement_text(p: &Prepared) -> String {
    p.text.clone()
}

/// The table a prepared statement reads or writes, as `keyspace.table`.
fn qualified(p: &Prepared) -> String {
    format!("{}.{}", p.keyspace, p.table)
}

/// Executes a prepared statement; with `tablets_routing` (negotiated), on a node that is not
/// a replica of the one partition it names in a tablet keyspace, the answer carries its tablet
/// ([`Database::tablet_payload`]).
async fn request_execute(
    shared: &Shared,
    node: usize,
    r: &mut Reader<'_>,
    keyspace: &Mutex<Option<String>>,
    tablets_routing: bool,
    stream: i16,
) -> Answer {
    let bad = |e: String| error_frame(stream, error_code::PROTOCOL_ERROR, &e, &[]);
    let id = r.short_bytes().map_err(bad)?;
    let params = read_params(r).map_err(bad)?;
    let prepared = lock(&shared.prepared)
        .get(&id)
        .cloned()
        .ok_or_else(|| unprepared(stream, &id))?;
    let mut tally = Tally::default();
    let on_replica = shared.write_on_replica(node, &prepared, &params.values);
    tally.add(qualified(&prepared), on_replica);
    if let Err(a) = gate(
        shared,
        node,
        Opcode::Execute,
        &statement_text(&prepared),
        Some(params.consistency),
        tally,
        stream,
    )
    .await
    {
        return a;
    }
    shared.validate(&params.values, stream)?;
    let ks = current(keyspace);
    let (outcome, tablet) = {
        let mut db = lock(&shared.db);
        let outcome = db
            .execute_on(node, &prepared.statement, &params.values, ks.as_deref())
            .map_err(|e| engine_error(stream, e))?;
        // A lone node holds every tablet: it never answers with one.
        let tablet = (tablets_routing && shared.nodes > 1)
            .then(|| db.tablet_payload(node, &prepared, &params.values))
            .flatten();
        (outcome, tablet)
    };
    let body = encode_outcome(
        outcome,
        keyspace,
        &params,
        prepared.result.as_ref().map(|_| ()),
    );
    Ok(Some(Reply {
        body,
        custom_payload: tablet
            .map(|t| vec![(tablets::PAYLOAD_KEY, t)])
            .unwrap_or_default(),
    }))
}

async fn request_batch(
    shared: &Shared,
    node: usize,
    r: &mut Reader<'_>,
    keyspace: &Mutex<Option<String>>,
    stream: i16,
) -> Answer {
    let bad = |e: String| error_frame(stream, error_code::PROTOCOL_ERROR, &e, &[]);
    let _batch_type = r.u8().map_err(bad)?;
    let n = r.short().map_err(bad)?;
    let ks = current(keyspace);
    let mut items = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let kind = r.u8().map_err(bad)?;
        let st = if kind == 0 {
            let q = r.long_string().map_err(bad)?;
            let st = parser::parse(&q).map_err(|e| {
                error_frame(
                    stream,
                    error_code::SYNTAX_ERROR,
                    &format!("line 1: {e}"),
                    &[],
                )
            })?;
            let mut p = lock(&shared.db)
                .prepare(st, ks.as_deref())
                .map_err(|e| engine_error(stream, e))?;
            p.text = q;
            Arc::new(p)
        } else {
            let id = r.short_bytes().map_err(bad)?;
            lock(&shared.prepared)
                .get(&id)
                .cloned()
                .ok_or_else(|| unprepared(stream, &id))?
        };
        let count = r.short().map_err(bad)?;
        let values = (0..count)
            .map(|_| r.bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        items.push((st, values));
    }
    let consistency = r.short().map_err(bad)?;
    let text = items
        .first()
        .map(|(p, _)| statement_text(p))
        .unwrap_or_default();
    let mut tally = Tally::default();
    for (p, values) in &items {
        tally.add(qualified(p), shared.write_on_replica(node, p, values));
    }
    if let Err(a) = gate(
        shared,
        node,
        Opcode::Batch,
        &text,
        Some(consistency),
        tally,
        stream,
    )
    .await
    {
        return a;
    }
    for (_, values) in &items {
        shared.validate(values, stream)?;
    }
    let mut db = lock(&shared.db);
    for (p, values) in &items {
        db.execute_on(node, &p.statement, values, ks.as_deref())
            .map_err(|e| engine_error(stream, e))?;
    }
    let mut body = Vec::new();
    body.int(1);
    Ok(Some(body.into()))
}

fn encode_outcome(
    outcome: Outcome,
    keyspace: &Mutex<Option<String>>,
    params: &Params,
    _prepared_result: Option<()>,
) -> Vec<u8> {
    let mut body = Vec::new();
    match outcome {
        Outcome::Void => body.int(1),
        Outcome::SetKeyspace(ks) => {
            body.int(3);
            body.string(&ks);
            *lock(keyspace) = Some(ks);
        }
        Outcome::SchemaChange {
            change,
            target,
            keyspace,
            table,
        } => {
            body.int(5);
            body.string(change);
            body.string(target);
            body.string(&keyspace);
            if let Some(t) = table {
                body.string(&t);
            }
        }
        Outcome::Rows(rs) => {
            let start = params
                .paging_state
                .as_deref()
                .and_then(|p| p.try_into().ok())
                .map_or(0, |b: [u8; 8]| u64::from_be_bytes(b) as usize)
                .min(rs.rows.len());
            let end = params
                .page_size
                .map_or(rs.rows.len(), |p| (start + p).min(rs.rows.len()));
            let more = end < rs.rows.len();
            body.int(2);
            let mut flags = 0x0001;
            if more {
                flags |= 0x0002;
            }
            if params.skip_metadata {
                flags |= 0x0004;
            }
            body.int(flags);
            body.int(rs.columns.len() as i32);
            if more {
                body.bytes(Some(&(end as u64).to_be_bytes()));
            }
            if !params.skip_metadata {
                body.string(&rs.keyspace);
                body.string(&rs.table);
                for (name, ty) in &rs.columns {
                    body.string(name);
                    ty.write_option(&mut body);
                }
            }
            body.int((end - start) as i32);
            for row in &rs.rows[start..end] {
                for cell in row {
                    body.bytes(cell.as_deref());
                }
            }
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        node: usize,
        opcode: &'static str,
        writes: usize,
        non_replica: usize,
    ) -> LoggedRequest {
        LoggedRequest {
            node,
            opcode,
            statement: format!("{opcode} {writes}"),
            consistency: None,
            rows: writes.max(1),
            tables: Vec::new(),
            writes,
            non_replica: vec![("ks.t".into(), non_replica)],
            at: Instant::now(),
        }
    }

    #[test]
    fn a_bounded_log_keeps_the_latest_requests_and_counts_every_one() {
        let mut log = RequestLog::new(Some(2));
        log.push(request(0, "QUERY", 0, 0));
        log.push(request(1, "EXECUTE", 1, 1));
        log.push(request(2, "BATCH", 5, 2));
        log.push(request(1, "EXECUTE", 1, 0));
        let kept: Vec<_> = log.latest().iter().map(|r| r.statement.clone()).collect();
        assert_eq!(kept, ["BATCH 5", "EXECUTE 1"]);
        let t = &log.totals;
        assert_eq!(
            (t.requests(), t.of("EXECUTE"), t.of("BATCH"), t.of("QUERY")),
            (4, 2, 1, 1)
        );
        assert_eq!(t.writes_by_node, [0, 2, 5]);
        assert_eq!(t.non_replica, 3);
        log.clear();
        assert!(log.latest().is_empty());
        assert_eq!(log.totals, RequestTotals::default());
    }

    #[test]
    fn a_log_bounded_at_zero_keeps_none_and_an_unbounded_one_keeps_all() {
        let (mut none, mut all) = (RequestLog::new(Some(0)), RequestLog::new(None));
        for i in 0..1000 {
            none.push(request(0, "EXECUTE", 1, i % 2));
            all.push(request(0, "EXECUTE", 1, i % 2));
        }
        assert!(none.latest().is_empty());
        assert_eq!(all.latest().len(), 1000);
        assert_eq!(none.totals, all.totals);
        assert_eq!(none.totals.requests(), 1000);
        assert_eq!(none.totals.non_replica, 500);
    }
}

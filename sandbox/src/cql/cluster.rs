//! The handles tests hold on a running stand-in: [`CqlCluster`], N nodes on 127.0.0.1 ..
//! 127.0.0.N that all listen on ONE port (drivers reach a peer at its `rpc_address` with the
//! contact point's port), and [`CqlNode`], a cluster of one on an address the caller picks.
//! TEST INFRASTRUCTURE: in memory, no durability.
//!
//! The nodes share one store (data, prepared statements, faults, saturation, request log), as if
//! replication were instant: a write on any node is readable on every node. What differs per
//! node is its identity (host id, address, vnode tokens: see [`Ring`]) and so which partitions
//! it replicates (by the ring, or by tablet in a tablet keyspace: see
//! [`crate::cql::tablets`]; a test moves a tablet with [`CqlCluster::move_tablet`]), which the
//! request log records for every write it serves.
//!
//! Tombstones are purged only when a test compacts: [`CqlCluster::compact`] now, and
//! [`CqlCluster::compact_after`] as if days had passed, purging those whose table's
//! `gc_grace_seconds` are over (ScyllaDB's `tombstone_gc` mode `timeout`), after which an
//! older write is visible again. A [`CqlNode`] has both, as every control of the cluster.
//!
//! A cluster's [`CqlOptions`] are its server settings, fixed at start: `tablets_by_default`
//! (ScyllaDB's `tablets_mode_for_new_keyspaces: enabled`) gives tablets to a
//! NetworkTopologyStrategy keyspace created with no `tablets` option (the rule is
//! [`crate::cql::tablets::for_new_keyspace`]'s). The constructors without options start
//! with [`CqlOptions::default`]: vnodes unless a keyspace asks for tablets.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
use tokio::net::TcpListener;
use tokio::sync::watch;
use uuid::Uuid;

use crate::cql::engine::{self, Database, Outcome, RowSet};
use crate::cql::faults::{Fault, Saturation, SaturationStats};
use crate::cql::ring::Ring;
use crate::cql::server::{lock, spawn_node, LoggedRequest, RequestTotals, Shared};
use crate::cql::tablets::Tablet;
use crate::cql::{murmur3, parser};

/// How many times [`CqlCluster::start`] picks a new port when another process holds the one
/// the first node got on a later node's address.
const BIND_ATTEMPTS: usize = 5;

/// A stand-in cluster's server settings (ScyllaDB's scylla.yaml, as far as the stand-in models
/// it). The default is a cluster that gives new keyspaces vnodes unless they ask for tablets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CqlOptions {
    /// ScyllaDB's `tablets_mode_for_new_keyspaces: enabled` (`disabled` when false): CREATE
    /// KEYSPACE with NetworkTopologyStrategy and no `tablets` option gets tablets, their count
    /// the server's choice; `AND tablets = {'enabled': false}` opts out; SimpleStrategy keeps
    /// vnodes (as ScyllaDB 6.x; newer releases refuse it). See
    /// [`crate::cql::tablets::for_new_keyspace`].
    pub tablets_by_default: bool,
    /// How many requests the log keeps in full, the latest ones ([`CqlCluster::requests`]);
    /// `None`, the default, keeps every one, as tests that count them need. The totals
    /// ([`CqlCluster::request_totals`], [`CqlCluster::routing`]) count every request either
    /// way. A long-running stand-in (`vault-sandbox`) bounds it, so its memory does not grow
    /// with the requests it serves.
    pub request_log_limit: Option<usize>,
}

/// A running stand-in cluster. Dropping it stops every node.
pub struct CqlCluster {
    addrs: Vec<SocketAddr>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

/// Write statements served, from the request log (see [`CqlCluster::routing`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingStats {
    /// INSERT, UPDATE and DELETE statements of user keyspaces, in EXECUTE and BATCH requests.
    pub writes: usize,
    /// Those served by a node that is not a replica of a partition they write.
    pub non_replica: usize,
    /// Write statements served by each node.
    pub writes_by_node: Vec<usize>,
}

impl CqlCluster {
    /// The most nodes a cluster has: one loopback address each.
    pub const MAX_NODES: usize = 8;

    /// Starts `nodes` nodes (1..=[`Self::MAX_NODES`]) on 127.0.0.1, 127.0.0.2, ... on one free
    /// port (another one, a few times over, if a later address has the first one taken).
    pub async fn start(nodes: usize) -> std::io::Result<CqlCluster> {
        Self::start_with(nodes, CqlOptions::default()).await
    }

    /// [`Self::start`] with these settings.
    pub async fn start_with(nodes: usize, options: CqlOptions) -> std::io::Result<CqlCluster> {
        Self::start_on_with(SocketAddr::from(([127, 0, 0, 1], 0)), nodes, options).await
    }

    /// Starts `nodes` nodes on `first`'s address and the next ones up, all on `first`'s port (a
    /// free one if it is 0). Loopback addresses only (IPv4 for more than one node).
    pub async fn start_on(first: SocketAddr, nodes: usize) -> std::io::Result<CqlCluster> {
        Self::start_on_with(first, nodes, CqlOptions::default()).await
    }

    /// [`Self::start_on`] with these settings.
    pub async fn start_on_with(
        first: SocketAddr,
        nodes: usize,
        options: CqlOptions,
    ) -> std::io::Result<CqlCluster> {
        let listeners = bind_same_port(first, nodes).await?;
        Self::serve(listeners, None, options)
    }

    /// Serves one node on each listener, node `i` on `listeners[i]`, sharing one store.
    fn serve(
        listeners: Vec<TcpListener>,
        tls: Option<Arc<SslAcceptor>>,
        options: CqlOptions,
    ) -> std::io::Result<CqlCluster> {
        let addrs = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<std::io::Result<Vec<_>>>()?;
        let ips: Vec<Ipv4Addr> = addrs
            .iter()
            .map(|a| match a.ip() {
                IpAddr::V4(v4) => v4,
                IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
            })
            .collect();
        let db =
            Database::with_ring(Ring::new(&ips)).tablets_by_default(options.tablets_by_default);
        let shared = Arc::new(Shared::new(db, options.request_log_limit));
        let (stop, stopped) = watch::channel(false);
        for (node, listener) in listeners.into_iter().enumerate() {
            spawn_node(listener, node, shared.clone(), tls.clone(), stopped.clone());
        }
        Ok(CqlCluster {
            addrs,
            shared,
            stop,
        })
    }

    /// Each node's address, node `i` at index `i` (the index [`LoggedRequest::node`] names).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Each node's host id, as `system.local` and `system.peers` report it.
    pub fn host_ids(&self) -> Vec<Uuid> {
        let db = lock(&self.shared.db);
        db.ring().nodes().iter().map(|n| n.host_id).collect()
    }

    /// The nodes that replicate a partition of `keyspace`, primary first: its tablet's replicas
    /// in a tablet keyspace, else the ring's by the keyspace's replication; `key` is its
    /// partition key columns' serialized values, in key order. Empty for a keyspace that does
    /// not exist; every node for one that is not placed by token (LocalStrategy,
    /// EverywhereStrategy).
    pub fn replicas(&self, keyspace: &str, key: &[&[u8]]) -> Vec<usize> {
        lock(&self.shared.db).replicas(keyspace, murmur3::partition_token(key))
    }

    /// The tablet that holds a partition of `keyspace` (`key` as for [`Self::replicas`]): its
    /// token range and replicas, as a node that is not one of them reports it to a driver.
    /// `None` unless `keyspace` is a tablet keyspace: created `WITH ... AND tablets =
    /// {'enabled': true}`, or given tablets by [`CqlOptions::tablets_by_default`].
    pub fn tablet(&self, keyspace: &str, key: &[&[u8]]) -> Option<Tablet> {
        lock(&self.shared.db).tablet(keyspace, murmur3::partition_token(key))
    }

    /// Moves the tablet of `keyspace` that holds a partition (`key` as for [`Self::replicas`])
    /// to the nodes `to` (node indexes, primary first: distinct, as many as the keyspace's
    /// replication factor), as ScyllaDB's load balancer moves a tablet; returns the tablet
    /// after the move. That tablet of every table of the keyspace moves (see
    /// [`crate::cql::tablets`]). From now on writes to it are served as replicas by `to` only,
    /// [`Self::replicas`] and [`Self::tablet`] name `to`, and an EXECUTE to it on another node
    /// answers with the moved tablet, from which a driver learns the move (a BATCH does not).
    /// Refused (nothing moves) for a keyspace that does not exist or is not a tablet keyspace,
    /// and for a bad `to`.
    pub fn move_tablet(
        &self,
        keyspace: &str,
        key: &[&[u8]],
        to: Vec<usize>,
    ) -> Result<Tablet, String> {
        self.move_tablet_at(keyspace, murmur3::partition_token(key), to)
    }

    /// [`Self::move_tablet`] for the tablet that holds `token`.
    pub fn move_tablet_at(
        &self,
        keyspace: &str,
        token: i64,
        to: Vec<usize>,
    ) -> Result<Tablet, String> {
        lock(&self.shared.db).move_tablet(keyspace, token, to)
    }

    /// Write statements served so far, how many on a node not a replica of their partition,
    /// and per node (from the request log: [`Self::clear_requests`] starts them again).
    pub fn routing(&self) -> RoutingStats {
        let log = lock(&self.shared.log);
        let t = &log.totals;
        let mut writes_by_node = t.writes_by_node.clone();
        writes_by_node.resize(self.addrs.len(), 0);
        RoutingStats {
            writes: writes_by_node.iter().sum(),
            non_replica: t.non_replica,
            writes_by_node,
        }
    }

    /// Requests served so far by opcode, every one counted even where the log keeps only the
    /// latest ([`CqlOptions::request_log_limit`]); [`Self::clear_requests`] starts them again.
    pub fn request_totals(&self) -> RequestTotals {
        lock(&self.shared.log).totals.clone()
    }

    /// Adds a fault rule (for every node).
    pub fn inject(&self, fault: Fault) {
        lock(&self.shared.faults).push(fault);
    }

    /// Answers Invalid to every EXECUTE or BATCH with a bound value that contains `needle`, as
    /// Scylla refuses a row it cannot accept. A BATCH is refused whole, before any of it is
    /// applied, as Scylla validates every statement of a batch first. Cleared by
    /// [`Self::clear_faults`].
    pub fn reject_values_containing(&self, needle: &[u8]) {
        lock(&self.shared.rejected_values).push(needle.to_vec());
    }

    /// Makes the nodes behave as a saturated one (see [`Saturation`]; one count of requests in
    /// flight for all) until faults are cleared; its figures start again from zero.
    pub fn saturate(&self, saturation: Saturation) {
        *lock(&self.shared.saturation_stats) = SaturationStats::default();
        *lock(&self.shared.saturation) = Some(saturation);
    }

    /// What the saturated-node mode did since [`Self::saturate`].
    pub fn saturation_stats(&self) -> SaturationStats {
        lock(&self.shared.saturation_stats).clone()
    }

    pub fn clear_faults(&self) {
        *lock(&self.shared.saturation) = None;
        lock(&self.shared.rejected_values).clear();
        lock(&self.shared.faults).clear();
        *lock(&self.shared.outage_until) = None;
    }

    /// Drops every connection and refuses to serve for `duration` (every node).
    pub fn outage(&self, duration: Duration) {
        *lock(&self.shared.outage_until) = Some(Instant::now() + duration);
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Closes every open connection now (every node).
    pub fn drop_connections(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Every request received so far, by any node, oldest first (the latest ones only where
    /// [`CqlOptions::request_log_limit`] bounds the log).
    pub fn requests(&self) -> Vec<LoggedRequest> {
        lock(&self.shared.log).latest()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.log).clear();
    }

    /// Compacts every table of every user keyspace now, as ScyllaDB's major compaction does
    /// with `tombstone_gc` mode `timeout`: purges the tombstones whose table's
    /// `gc_grace_seconds` (10 days unless the table names it) have passed since their delete;
    /// returns how many. A write below a purged tombstone's timestamp that arrives later is
    /// stored and read again (see [`Database::compact`]).
    pub fn compact(&self) -> usize {
        self.compact_after(Duration::ZERO)
    }

    /// [`Self::compact`] as if `elapsed` more had passed (whole seconds), e.g. 11 days for the
    /// default `gc_grace_seconds`. Only this compaction sees that time: writes, reads, TTLs
    /// and later compactions keep the server clock.
    pub fn compact_after(&self, elapsed: Duration) -> usize {
        let elapsed = i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX);
        lock(&self.shared.db).compact(engine::now_secs().saturating_add(elapsed))
    }

    /// Rows stored in a table.
    pub fn row_count(&self, keyspace: &str, table: &str) -> usize {
        lock(&self.shared.db)
            .table(keyspace, table)
            .map_or(0, |t| t.row_count())
    }

    /// Runs one CQL statement directly (no protocol, as node 0), e.g. to inspect data in a test.
    pub fn execute(&self, cql: &str) -> Result<Option<RowSet>, String> {
        let st = parser::parse(cql)?;
        match lock(&self.shared.db)
            .execute(&st, &[], None)
            .map_err(|e| e.message())?
        {
            Outcome::Rows(r) => Ok(Some(r)),
            _ => Ok(None),
        }
    }
}

impl Drop for CqlCluster {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.shared.generation.send_modify(|g| *g += 1);
    }
}

/// Binds `nodes` listeners on consecutive loopback addresses from `first`'s, on one port. With
/// port 0 the first gets a free port, which another process may hold on a later address: then
/// all are let go and the whole is tried again on a new port.
async fn bind_same_port(first: SocketAddr, nodes: usize) -> std::io::Result<Vec<TcpListener>> {
    let invalid = |why: String| std::io::Error::new(ErrorKind::InvalidInput, why);
    if !(1..=CqlCluster::MAX_NODES).contains(&nodes) {
        return Err(invalid(format!(
            "a stand-in cluster has 1 to {} nodes, not {nodes}",
            CqlCluster::MAX_NODES
        )));
    }
    let loopback_only = || {
        invalid(format!(
            "{first}: the stand-in listens on loopback addresses only"
        ))
    };
    if !first.ip().is_loopback() {
        return Err(loopback_only());
    }
    if nodes == 1 {
        return Ok(vec![TcpListener::bind(first).await?]);
    }
    let IpAddr::V4(ip) = first.ip() else {
        return Err(invalid(format!(
            "{first}: a cluster of several needs an IPv4 address"
        )));
    };
    let base = u32::from(ip);
    let addr = |i: usize| Ipv4Addr::from(base + i as u32);
    if !addr(nodes - 1).is_loopback() {
        return Err(loopback_only());
    }
    let attempts = if first.port() == 0 { BIND_ATTEMPTS } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let head = TcpListener::bind(first).await?;
        let port = head.local_addr()?.port();
        let mut listeners = vec![head];
        for i in 1..nodes {
            match TcpListener::bind(SocketAddr::from((addr(i), port))).await {
                Ok(l) => listeners.push(l),
                Err(e) if e.kind() == ErrorKind::AddrInUse => {
                    last = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if listeners.len() == nodes {
            return Ok(listeners);
        }
    }
    Err(last.unwrap_or_else(|| invalid("no port free on every node's address".into())))
}

/// A running stand-in node: a [`CqlCluster`] of one (owning the single token 0) on the address
/// the caller chose, with every control of the cluster. Dropping it stops the server.
pub struct CqlNode {
    cluster: CqlCluster,
}

impl CqlNode {
    /// Starts a node on `addr` (use port 0 for an ephemeral port on 127.0.0.1).
    pub async fn start(addr: SocketAddr) -> std::io::Result<CqlNode> {
        Self::start_with(addr, CqlOptions::default()).await
    }

    /// [`Self::start`] with these settings.
    pub async fn start_with(addr: SocketAddr, options: CqlOptions) -> std::io::Result<CqlNode> {
        Self::serve_on(addr, None, options).await
    }

    /// Starts a node that speaks CQL over TLS only, with this certificate chain and key (PEM).
    pub async fn start_tls(
        addr: SocketAddr,
        cert_chain: &Path,
        key: &Path,
    ) -> std::io::Result<CqlNode> {
        let tls = || -> Result<SslAcceptor, openssl::error::ErrorStack> {
            let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
            b.set_certificate_chain_file(cert_chain)?;
            b.set_private_key_file(key, SslFiletype::PEM)?;
            b.check_private_key()?;
            Ok(b.build())
        };
        let acceptor = tls().map_err(std::io::Error::other)?;
        Self::serve_on(addr, Some(Arc::new(acceptor)), CqlOptions::default()).await
    }

    async fn serve_on(
        addr: SocketAddr,
        tls: Option<Arc<SslAcceptor>>,
        options: CqlOptions,
    ) -> std::io::Result<CqlNode> {
        let listener = TcpListener::bind(addr).await?;
        let cluster = CqlCluster::serve(vec![listener], tls, options)?;
        Ok(CqlNode { cluster })
    }

    pub fn addr(&self) -> SocketAddr {
        self.cluster.addrs[0]
    }
}

/// A node is a cluster of one: faults, the log and data are the cluster's.
impl Deref for CqlNode {
    type Target = CqlCluster;

    fn deref(&self) -> &CqlCluster {
        &self.cluster
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cluster_listens_on_consecutive_loopback_addresses_on_one_port() {
        let c = CqlCluster::start(3).await.unwrap();
        let ips: Vec<String> = c.addrs().iter().map(|a| a.ip().to_string()).collect();
        assert_eq!(ips, ["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
        assert!(c.addrs().iter().all(|a| a.port() == c.addrs()[0].port()));
        for a in c.addrs() {
            tokio::net::TcpStream::connect(a)
                .await
                .expect("each node accepts");
        }
        assert_eq!(c.host_ids().len(), 3);
    }

    #[tokio::test]
    async fn a_cluster_refuses_a_bad_size_or_address() {
        for n in [0, CqlCluster::MAX_NODES + 1] {
            assert!(CqlCluster::start(n).await.is_err(), "{n} nodes");
        }
        let public = SocketAddr::from(([10, 0, 0, 1], 0));
        assert!(CqlCluster::start_on(public, 2).await.is_err());
        let last = SocketAddr::from(([127, 255, 255, 255], 0));
        assert!(
            CqlCluster::start_on(last, 2).await.is_err(),
            "past the loopback range"
        );
    }

    /// Sends a request frame (protocol v4); the answer's opcode, header flags and body.
    async fn roundtrip(
        sock: &mut tokio::net::TcpStream,
        opcode: crate::cql::frame::Opcode,
        body: &[u8],
    ) -> (u8, u8, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut req = vec![4, 0, 0, 1, opcode as u8];
        req.extend_from_slice(&(body.len() as i32).to_be_bytes());
        req.extend_from_slice(body);
        sock.write_all(&req).await.unwrap();
        let mut head = [0u8; crate::cql::frame::HEADER_LEN];
        sock.read_exact(&mut head).await.unwrap();
        let len = i32::from_be_bytes(head[5..9].try_into().unwrap()) as usize;
        let mut out = vec![0; len];
        sock.read_exact(&mut out).await.unwrap();
        (head[4], head[1], out)
    }

    /// Only a connection whose STARTUP took TABLETS_ROUTING_V1 gets the tablet, and only from
    /// an EXECUTE a node outside the partition's tablet served.
    #[tokio::test]
    async fn a_tablet_is_reported_only_on_a_connection_that_negotiated_it() {
        use crate::cql::frame::{Opcode, Reader, Writer, FLAG_CUSTOM_PAYLOAD};
        let c = CqlCluster::start(3).await.unwrap();
        c.execute("CREATE KEYSPACE tk WITH replication = {'class': 'NetworkTopologyStrategy', 'datacenter1': 1} AND tablets = {'enabled': true}").unwrap();
        c.execute("CREATE TABLE tk.t (k text PRIMARY KEY)").unwrap();
        let tablet = c.tablet("tk", &[b"key"]).unwrap();
        let (replica, stranger) = (tablet.replicas[0], (tablet.replicas[0] + 1) % 3);
        // [long string] query, then [short bytes] id, consistency ONE, one value.
        let mut prepare = Vec::new();
        prepare.int(31);
        prepare.extend_from_slice(b"INSERT INTO tk.t (k) VALUES (?)");
        for (node, negotiated, reported) in [
            (stranger, true, true),
            (replica, true, false),
            (stranger, false, false),
        ] {
            let mut sock = tokio::net::TcpStream::connect(c.addrs()[node])
                .await
                .unwrap();
            let mut startup = Vec::new();
            let mut opts = vec![("CQL_VERSION", "3.0.0")];
            if negotiated {
                opts.push((crate::cql::tablets::EXTENSION, ""));
            }
            startup.short(opts.len() as u16);
            for (k, v) in opts {
                startup.string(k);
                startup.string(v);
            }
            let (ready, _, _) = roundtrip(&mut sock, Opcode::Startup, &startup).await;
            assert_eq!(ready, Opcode::Ready as u8);
            let (_, _, prepared) = roundtrip(&mut sock, Opcode::Prepare, &prepare).await;
            let mut r = Reader(&prepared);
            assert_eq!(r.int().unwrap(), 4, "a PREPARED result");
            let id = r.short_bytes().unwrap();
            let mut execute = Vec::new();
            execute.short_bytes(&id);
            execute.short(1);
            execute.push(0x01);
            execute.short(1);
            execute.bytes(Some(b"key"));
            let (result, flags, body) = roundtrip(&mut sock, Opcode::Execute, &execute).await;
            assert_eq!(result, Opcode::Result as u8);
            let case = format!("node {node}, negotiated {negotiated}");
            assert_eq!(flags & FLAG_CUSTOM_PAYLOAD != 0, reported, "{case}");
            if reported {
                let mut r = Reader(&body);
                assert_eq!(r.short().unwrap(), 1, "{case}");
                assert_eq!(r.string().unwrap(), crate::cql::tablets::PAYLOAD_KEY);
                let ids = c.host_ids();
                let want = crate::cql::tablets::payload(&tablet, &ids);
                assert_eq!(r.bytes().unwrap(), Some(want), "{case}");
                assert_eq!(r.int().unwrap(), 1, "then a Void result");
            }
        }
    }

    /// A node compacts as its cluster does: a tombstone outlives its delete by the table's
    /// `gc_grace_seconds` (10 days by default), then an older write lands again.
    #[tokio::test]
    async fn a_node_purges_a_tombstone_once_gc_grace_seconds_have_passed() {
        let n = CqlNode::start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        n.execute("CREATE KEYSPACE k WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
            .unwrap();
        n.execute("CREATE TABLE k.t (p text PRIMARY KEY, v text)")
            .unwrap();
        n.execute("DELETE FROM k.t USING TIMESTAMP 100 WHERE p = 'a'")
            .unwrap();
        let zombie = "INSERT INTO k.t (p, v) VALUES ('a', 'x') USING TIMESTAMP 50";
        let day = Duration::from_secs(86_400);
        assert_eq!(n.compact(), 0);
        assert_eq!(n.compact_after(9 * day), 0);
        n.execute(zombie).unwrap();
        assert_eq!(n.row_count("k", "t"), 0, "shadowed");
        assert_eq!(n.compact_after(11 * day), 1);
        n.execute(zombie).unwrap();
        assert_eq!(n.row_count("k", "t"), 1, "visible again");
    }

    /// Every node answers `system.local` as itself and `system.peers` as the others, with the
    /// one schema version, which moves with DDL on all of them at once.
    #[tokio::test]
    async fn each_node_reports_itself_and_its_peers_with_one_schema_version() {
        let c = CqlCluster::start(3).await.unwrap();
        let version = |node: usize, table: &str| -> Vec<Vec<u8>> {
            let mut db = lock(&c.shared.db);
            let st = parser::parse(&format!(
                "SELECT host_id, schema_version FROM system.{table}"
            ))
            .unwrap();
            match db.execute_on(node, &st, &[], None).unwrap() {
                Outcome::Rows(r) => r
                    .rows
                    .into_iter()
                    .map(|row| [row[0].clone().unwrap(), row[1].clone().unwrap()].concat())
                    .collect(),
                other => panic!("{other:?}"),
            }
        };
        let ids = c.host_ids();
        let before = version(1, "local")[0][16..].to_vec();
        for node in 0..3 {
            let local = version(node, "local");
            assert_eq!(local.len(), 1);
            assert_eq!(&local[0][..16], ids[node].as_bytes());
            let peers = version(node, "peers");
            let mut peer_ids: Vec<&[u8]> = peers.iter().map(|p| &p[..16]).collect();
            peer_ids.sort();
            let mut others: Vec<&[u8]> = (0..3)
                .filter(|n| *n != node)
                .map(|n| &ids[n].as_bytes()[..])
                .collect();
            others.sort();
            assert_eq!(peer_ids, others, "node {node}'s peers");
            for row in local.iter().chain(&peers) {
                assert_eq!(row[16..], before[..], "one schema version");
            }
        }
        c.execute("CREATE KEYSPACE k WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
            .unwrap();
        let after = version(2, "local")[0][16..].to_vec();
        assert_ne!(after, before, "DDL moves the schema version");
        assert!(version(0, "peers").iter().all(|p| p[16..] == after[..]));
    }
}

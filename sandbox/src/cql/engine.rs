//! The stand-in node's in-memory tables and statement execution. System tables (system.local,
//! system.peers, system_schema.*) are ordinary tables created from DDL at start and updated by
//! every CREATE/DROP, so drivers that read schema metadata see a consistent picture. The nodes
//! of a cluster share one database; system.local and system.peers are rendered from the ring
//! for the node a statement runs on.
//!
//! Values are kept in their protocol encoding. Rows of a partition are ordered by an
//! order-preserving encoding of the clustering key, so CLUSTERING ORDER follows type and direction.
//!
//! Writes follow ScyllaDB's rules where vault relies on them: every cell carries a write
//! timestamp (`USING TIMESTAMP`, else the server clock in microseconds) and last write wins per
//! cell, a tie going to the greater value; a delete leaves a partition or row tombstone that
//! shadows every cell at or below its timestamp, whenever that cell arrives (a delete wins a
//! tie), until compaction ([`Database::compact`], `tombstone_gc` mode `timeout`) purges it once
//! the table's `gc_grace_seconds` (10 days by default) have passed since the delete, after
//! which an older write is visible again; `USING TTL` makes cells expire; `WRITETIME()` and
//! `TTL()` read them back.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use uuid::Uuid;

use crate::cql::frame::Writer;
use crate::cql::murmur3;
use crate::cql::parser::{self, Op, RelValue, Relation, Selection, Statement, TableRef, Term};
use crate::cql::ring::{self, Replication, Ring};
use crate::cql::tablets::{self, Tablet, Tablets};
use crate::cql::types::CqlType;

pub type Value = Option<Vec<u8>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Partition(usize),
    Clustering(usize),
    Regular,
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub ty: CqlType,
    pub kind: Kind,
}

/// ScyllaDB's `gc_grace_seconds` when a table names none: 10 days.
pub const DEFAULT_GC_GRACE_SECONDS: i64 = 864_000;

/// A partition or row tombstone, as ScyllaDB keeps one: ordered by timestamp, then deletion
/// time, and two of one key merge into the greater (`tombstone::apply`), so a second delete
/// with an older timestamp changes neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tombstone {
    /// The delete's write timestamp (microseconds): it shadows every cell written at or
    /// before it, whenever that cell arrives.
    pub timestamp: i64,
    /// ScyllaDB's local deletion time: the server clock when the delete was applied (seconds
    /// since the epoch), from which `gc_grace_seconds` count (see [`Database::compact`]).
    pub deleted_at: i64,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub keyspace: String,
    pub name: String,
    pub columns: Vec<Column>,
    pub pk: Vec<usize>,
    pub ck: Vec<usize>,
    pub desc: Vec<bool>,
    /// Partition sort key → (clustering sort key → row of all columns, followed by each
    /// column's write timestamp, then each column's expiry: with `n` columns, cell `i`'s
    /// timestamp (microseconds, a big-endian bigint) is at `n + i` and its expiry (seconds since
    /// the epoch, big-endian; absent: never) at `2n + i`).
    pub rows: BTreeMap<Vec<u8>, BTreeMap<Vec<u8>, Vec<Value>>>,
    /// Tombstones by (partition key, clustering key; `None` for the whole partition): each
    /// shadows every cell written at or before its timestamp, whenever it arrives, until
    /// [`Database::compact`] purges it.
    pub tombstones: BTreeMap<(Vec<u8>, Option<Vec<u8>>), Tombstone>,
    /// `default_time_to_live` in seconds (0: none): the TTL of a write that names none.
    pub default_ttl: i64,
    /// `gc_grace_seconds`: how long after its delete a tombstone is kept by compaction
    /// ([`DEFAULT_GC_GRACE_SECONDS`] unless the table names it).
    pub gc_grace_seconds: i64,
    /// No cell expires before this (seconds since the epoch; `None`: none expires), so that
    /// reads skip [`Table::expire`]'s walk over the table until one may.
    pub next_expiry: Option<i64>,
}

impl Table {
    /// The timestamp of the newest tombstone covering a row: its partition's or its own.
    fn tombstone(&self, p: &[u8], c: &[u8]) -> Option<i64> {
        let part = self.tombstones.get(&(p.to_vec(), None));
        let row = self.tombstones.get(&(p.to_vec(), Some(c.to_vec())));
        part.max(row).map(|t| t.timestamp)
    }

    /// Purges the tombstones whose `gc_grace_seconds` have passed at `now` (seconds since the
    /// epoch); returns how many. What they shadowed went when they were applied
    /// ([`Self::apply_tombstones`]), so from now on a write below one of them is stored.
    fn purge_tombstones(&mut self, now: i64) -> usize {
        let before = self.tombstones.len();
        let grace = self.gc_grace_seconds;
        self.tombstones
            .retain(|_, t| t.deleted_at.saturating_add(grace) > now);
        before - self.tombstones.len()
    }

    /// Drops the cells whose TTL has run out at `now` (seconds), and the rows left with none.
    /// The key columns' cells stand for the row marker an INSERT writes: when it expires the
    /// row stays while a regular cell is live (written later, e.g. by an UPDATE), keys intact.
    fn expire(&mut self, now: i64) {
        if self.next_expiry.is_none_or(|at| at > now) {
            return;
        }
        let mut next: Option<i64> = None;
        let n = self.columns.len();
        let is_key: Vec<bool> = (0..n)
            .map(|i| self.pk.contains(&i) || self.ck.contains(&i))
            .collect();
        for part in self.rows.values_mut() {
            for row in part.values_mut() {
                for i in 0..n {
                    let at = row[2 * n + i]
                        .as_deref()
                        .and_then(|b| b.try_into().ok())
                        .map(i64::from_be_bytes);
                    let expired = at.is_some_and(|at| at <= now);
                    if let Some(at) = at.filter(|&at| at > now) {
                        next = Some(next.map_or(at, |next| next.min(at)));
                    }
                    if expired {
                        if !is_key[i] {
                            row[i] = None;
                        }
                        row[n + i] = None;
                        row[2 * n + i] = None;
                    }
                }
                if row[n..2 * n].iter().all(Option::is_none) {
                    row.clear();
                }
            }
            part.retain(|_, row| !row.is_empty());
        }
        self.rows.retain(|_, part| !part.is_empty());
        self.next_expiry = next;
    }

    /// Drops the cells the tombstones shadow, and the rows left with no live cell.
    fn apply_tombstones(&mut self) {
        let n = self.columns.len();
        let key_cols: Vec<usize> = self.pk.iter().chain(&self.ck).copied().collect();
        let cell_ts = |row: &[Value], i: usize| {
            row[n + i]
                .as_deref()
                .and_then(|b| b.try_into().ok())
                .map(i64::from_be_bytes)
        };
        let tombstones = &self.tombstones;
        for (p, part) in self.rows.iter_mut() {
            for (c, row) in part.iter_mut() {
                let part_ts = tombstones.get(&(p.clone(), None));
                let row_ts = tombstones.get(&(p.clone(), Some(c.clone())));
                let Some(tomb) = part_ts.max(row_ts).map(|t| t.timestamp) else {
                    continue;
                };
                for i in (0..n).filter(|i| !key_cols.contains(i)) {
                    if cell_ts(row, i).is_some_and(|ts| ts <= tomb) {
                        row[i] = None;
                        row[n + i] = None;
                        row[2 * n + i] = None;
                    }
                }
                // The row lives while a regular cell does, or its key was written after the
                // tombstone.
                let live = (0..n).any(|i| !key_cols.contains(&i) && row[n + i].is_some())
                    || key_cols
                        .iter()
                        .any(|&i| cell_ts(row, i).is_some_and(|ts| ts > tomb));
                if !live {
                    row.clear();
                }
            }
            part.retain(|_, row| !row.is_empty());
        }
        self.rows.retain(|_, part| !part.is_empty());
    }

    pub fn column(&self, name: &str) -> Result<(usize, &Column), EngineError> {
        self.columns
            .iter()
            .enumerate()
            .find(|(_, c)| c.name == name)
            .ok_or_else(|| {
                EngineError::Invalid(format!(
                    "undefined column name {name} in table {}.{}",
                    self.keyspace, self.name
                ))
            })
    }

    fn pk_key(&self, row: &[Value]) -> Vec<u8> {
        let mut k = Vec::new();
        for &i in &self.pk {
            self.columns[i]
                .ty
                .sort_key(row[i].as_deref(), false, &mut k);
        }
        k
    }

    fn ck_key(&self, row: &[Value]) -> Vec<u8> {
        let mut k = Vec::new();
        for (n, &i) in self.ck.iter().enumerate() {
            self.columns[i]
                .ty
                .sort_key(row[i].as_deref(), self.desc[n], &mut k);
        }
        k
    }

    pub fn row_count(&self) -> usize {
        self.rows.values().map(BTreeMap::len).sum()
    }
}

#[derive(Debug, Clone)]
pub struct Keyspace {
    pub replication: Vec<(String, String)>,
    /// Set for a tablet keyspace (see [`tablets`]): its tables are placed by tablet, not by
    /// the vnode ring, and its tablets move with [`Database::move_tablet`].
    pub tablets: Option<Tablets>,
    pub tables: BTreeMap<String, Table>,
}

/// What a statement produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    Void,
    Rows(RowSet),
    SetKeyspace(String),
    SchemaChange {
        change: &'static str,
        target: &'static str,
        keyspace: String,
        table: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct RowSet {
    pub keyspace: String,
    pub table: String,
    pub columns: Vec<(String, CqlType)>,
    pub rows: Vec<Vec<Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineError {
    Syntax(String),
    Invalid(String),
    AlreadyExists { keyspace: String, table: String },
}

impl EngineError {
    pub fn message(&self) -> String {
        match self {
            EngineError::Syntax(m) | EngineError::Invalid(m) => m.clone(),
            EngineError::AlreadyExists { keyspace, table } if table.is_empty() => {
                format!("keyspace {keyspace} already exists")
            }
            EngineError::AlreadyExists { keyspace, table } => {
                format!("table {keyspace}.{table} already exists")
            }
        }
    }
}

/// A statement prepared for execution: its bind marker specs and result columns.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The statement's text as the client sent it.
    pub text: String,
    pub statement: Statement,
    pub keyspace: String,
    pub table: String,
    pub binds: Vec<(String, CqlType)>,
    /// For each partition key column in order, the bind marker that gives its value.
    pub pk_indexes: Vec<u16>,
    pub result: Option<Vec<(String, CqlType)>>,
}

/// The stand-in's data: every keyspace, the system ones included, shared by all the nodes of a
/// cluster as if replication were instant. What differs per node is only its identity in
/// `system.local` and `system.peers`, rendered from the [`Ring`] for the node a statement runs on.
pub struct Database {
    pub keyspaces: BTreeMap<String, Keyspace>,
    ring: Ring,
    /// The schema version every node reports (drivers wait for all to agree after DDL); a new
    /// one after each schema change.
    schema_version: Uuid,
    /// The node whose identity `system.local` and `system.peers` hold now.
    shown: usize,
    /// Whether a NetworkTopologyStrategy keyspace created with no `tablets` option gets tablets
    /// (ScyllaDB's `tablets_mode_for_new_keyspaces: enabled`; see
    /// [`tablets::for_new_keyspace`]). Off unless set with [`Database::tablets_by_default`].
    tablets_by_default: bool,
}

const SYSTEM_DDL: &[&str] = &[
    "CREATE KEYSPACE system WITH replication = {'class': 'LocalStrategy'}",
    "CREATE KEYSPACE system_schema WITH replication = {'class': 'LocalStrategy'}",
    "CREATE TABLE system.local (key text PRIMARY KEY, host_id uuid, rpc_address inet, broadcast_address inet, listen_address inet, data_center text, rack text, tokens set<text>, cluster_name text, schema_version uuid, release_version text, partitioner text, cql_version text, native_protocol_version text, bootstrapped text)",
    "CREATE TABLE system.peers (peer inet PRIMARY KEY, host_id uuid, rpc_address inet, data_center text, rack text, tokens set<text>, release_version text, schema_version uuid, preferred_ip inet)",
    "CREATE TABLE system_schema.keyspaces (keyspace_name text PRIMARY KEY, durable_writes boolean, replication map<text, text>)",
    // ScyllaDB's: a row, with `initial_tablets` set, for each tablet keyspace only.
    "CREATE TABLE system_schema.scylla_keyspaces (keyspace_name text PRIMARY KEY, storage_type text, storage_options map<text, text>, initial_tablets int)",
    "CREATE TABLE system_schema.tables (keyspace_name text, table_name text, comment text, default_time_to_live int, flags set<text>, gc_grace_seconds int, id uuid, caching map<text, text>, compaction map<text, text>, compression map<text, text>, extensions map<text, blob>, speculative_retry text, bloom_filter_fp_chance double, crc_check_chance double, PRIMARY KEY (keyspace_name, table_name))",
    "CREATE TABLE system_schema.columns (keyspace_name text, table_name text, column_name text, clustering_order text, column_name_bytes blob, kind text, position int, type text, PRIMARY KEY (keyspace_name, table_name, column_name))",
    "CREATE TABLE system_schema.views (keyspace_name text, view_name text, base_table_id uuid, base_table_name text, include_all_columns boolean, where_clause text, id uuid, PRIMARY KEY (keyspace_name, view_name))",
    "CREATE TABLE system_schema.types (keyspace_name text, type_name text, field_names list<text>, field_types list<text>, PRIMARY KEY (keyspace_name, type_name))",
    "CREATE TABLE system_schema.functions (keyspace_name text, function_name text, argument_types list<text>, argument_names list<text>, body text, called_on_null_input boolean, language text, return_type text, PRIMARY KEY (keyspace_name, function_name, argument_types))",
    "CREATE TABLE system_schema.aggregates (keyspace_name text, aggregate_name text, argument_types list<text>, final_func text, initcond text, return_type text, state_func text, state_type text, PRIMARY KEY (keyspace_name, aggregate_name, argument_types))",
    "CREATE TABLE system_schema.indexes (keyspace_name text, table_name text, index_name text, kind text, options map<text, text>, PRIMARY KEY (keyspace_name, table_name, index_name))",
    "CREATE TABLE system_schema.triggers (keyspace_name text, table_name text, trigger_name text, options map<text, text>, PRIMARY KEY (keyspace_name, table_name, trigger_name))",
];

impl Database {
    /// A one-node database at `address` with the system tables a driver reads at connect time.
    pub fn new(address: Ipv4Addr) -> Database {
        Database::with_ring(Ring::new(&[address]))
    }

    /// A database for the nodes of `ring`.
    pub fn with_ring(ring: Ring) -> Database {
        let mut db = Database {
            keyspaces: BTreeMap::new(),
            ring,
            schema_version: Uuid::new_v4(),
            shown: 0,
            tablets_by_default: false,
        };
        for ddl in SYSTEM_DDL {
            let st = parser::parse(ddl).expect("system DDL parses");
            db.execute(&st, &[], None).expect("system DDL executes");
        }
        db.bump_schema_version();
        db
    }

    /// This database, giving tablets to NetworkTopologyStrategy keyspaces created from now on
    /// with no `tablets` option when `on` (see [`tablets::for_new_keyspace`]).
    pub fn tablets_by_default(mut self, on: bool) -> Database {
        self.tablets_by_default = on;
        self
    }

    pub fn table(&self, keyspace: &str, table: &str) -> Option<&Table> {
        self.keyspaces.get(keyspace)?.tables.get(table)
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Compacts every table of every user keyspace at `now` (seconds since the epoch), as
    /// ScyllaDB does with `tombstone_gc` mode `timeout`: purges each tombstone whose table's
    /// `gc_grace_seconds` have passed since its delete (its deletion time + grace at or before
    /// `now`); returns how many. The cells a tombstone shadowed went when it was applied, so
    /// only the tombstone goes, and with it its shadow: a write below its timestamp that
    /// arrives later is stored and read again (the resurrection ScyllaDB shows once a tombstone
    /// is gone). ScyllaDB purges one only once it is strictly older than that, at second
    /// resolution; the stand-in purges it in that second too, so that compacting right after a
    /// delete with `gc_grace_seconds = 0`, or exactly the grace after it, purges it whatever
    /// the clock. Cells with a TTL are untouched: they expire at reads, by the server clock.
    pub fn compact(&mut self, now: i64) -> usize {
        self.keyspaces
            .iter_mut()
            .filter(|(name, _)| !name.starts_with("system"))
            .flat_map(|(_, ks)| ks.tables.values_mut())
            .map(|t| t.purge_tombstones(now))
            .sum()
    }

    fn bump_schema_version(&mut self) {
        self.schema_version = Uuid::new_v4();
        self.render_identity(self.shown);
    }

    /// Makes `system.local` and `system.peers` those of `node`, unless they are already.
    fn show(&mut self, node: usize) {
        if node != self.shown {
            self.render_identity(node);
        }
    }

    /// Rewrites `system.local` (the node itself) and `system.peers` (every other node) as
    /// `node` answers them, with the one schema version all nodes share.
    fn render_identity(&mut self, node: usize) {
        self.shown = node;
        for t in ["local", "peers"] {
            match self
                .keyspaces
                .get_mut("system")
                .and_then(|k| k.tables.get_mut(t))
            {
                Some(t) => {
                    t.rows.clear();
                    t.tombstones.clear();
                }
                // Still creating the system tables.
                None => return,
            }
        }
        let text = |s: &str| Some(s.as_bytes().to_vec());
        let schema = Some(self.schema_version.as_bytes().to_vec());
        let nodes = self.ring.nodes().to_vec();
        for (i, n) in nodes.iter().enumerate() {
            let ip = Some(n.address.octets().to_vec());
            let mut tokens = Vec::new();
            tokens.int(n.tokens.len() as i32);
            for t in &n.tokens {
                tokens.bytes(Some(t.to_string().as_bytes()));
            }
            let common = [
                ("host_id", Some(n.host_id.as_bytes().to_vec())),
                ("rpc_address", ip.clone()),
                ("data_center", text(ring::DATACENTER)),
                ("rack", text(ring::RACK)),
                ("tokens", Some(tokens)),
                ("release_version", text("3.0.8")),
                ("schema_version", schema.clone()),
            ];
            if i != node {
                let peer = [("peer", ip)];
                self.put("system", "peers", &[&peer[..], &common].concat());
                continue;
            }
            let local = [
                ("key", text("local")),
                ("broadcast_address", ip.clone()),
                ("listen_address", ip),
                (
                    "cluster_name",
                    text("vault-sandbox (test stand-in, in memory)"),
                ),
                (
                    "partitioner",
                    text("org.apache.cassandra.dht.Murmur3Partitioner"),
                ),
                ("cql_version", text("3.3.1")),
                ("native_protocol_version", text("4")),
                ("bootstrapped", text("COMPLETED")),
            ];
            self.put("system", "local", &[&local[..], &common].concat());
        }
    }

    /// Inserts (merging) one row by column name; used for system tables.
    fn put(&mut self, ks: &str, table: &str, values: &[(&str, Value)]) {
        let t = self
            .keyspaces
            .get_mut(ks)
            .and_then(|k| k.tables.get_mut(table))
            .expect("system table exists");
        let mut row = vec![None; t.columns.len()];
        let mut set = vec![false; t.columns.len()];
        for (name, v) in values {
            let (i, _) = t.column(name).expect("system column exists");
            row[i] = v.clone();
            set[i] = true;
        }
        upsert(t, row, &set, now_micros(), None);
    }

    fn delete_where(&mut self, ks: &str, table: &str, column: &str, value: &str) {
        if let Some(t) = self
            .keyspaces
            .get_mut(ks)
            .and_then(|k| k.tables.get_mut(table))
        {
            let Ok((i, _)) = t.column(column) else { return };
            for part in t.rows.values_mut() {
                part.retain(|_, row| row[i].as_deref() != Some(value.as_bytes()));
            }
            t.rows.retain(|_, p| !p.is_empty());
        }
    }

    fn resolve<'a>(
        &self,
        t: &'a TableRef,
        current: Option<&'a str>,
    ) -> Result<(String, String), EngineError> {
        let ks = t.keyspace.as_deref().or(current).ok_or_else(|| {
            EngineError::Invalid(
                "no keyspace has been specified: USE a keyspace, or qualify the table name".into(),
            )
        })?;
        if self.table(ks, &t.table).is_none() {
            return Err(EngineError::Invalid(format!(
                "unconfigured table {ks}.{}",
                t.table
            )));
        }
        Ok((ks.to_owned(), t.table.clone()))
    }

    /// Prepares a statement: resolves its table and types its bind markers.
    pub fn prepare(
        &self,
        statement: Statement,
        current: Option<&str>,
    ) -> Result<Prepared, EngineError> {
        let n = statement.bind_count();
        let mut binds: Vec<Option<(String, CqlType)>> = vec![None; n];
        let (keyspace, table, result) = match &statement {
            Statement::Insert {
                table,
                columns,
                values,
                timestamp,
                ttl,
            } => {
                let (ks, tn) = self.resolve(table, current)?;
                let t = self.table(&ks, &tn).expect("resolved");
                if let Some(Term::Bind(i)) = ttl {
                    binds[*i] = Some(("[ttl]".into(), CqlType::Int));
                }
                for (c, v) in columns.iter().zip(values) {
                    if let Term::Bind(i) = v {
                        binds[*i] = Some((c.clone(), t.column(c)?.1.ty.clone()));
                    }
                }
                if let Some(Term::Bind(i)) = timestamp {
                    binds[*i] = Some(("[timestamp]".into(), CqlType::BigInt));
                }
                (ks, tn, None)
            }
            Statement::Select {
                table,
                selection,
                relations,
                limit,
                ..
            } => {
                let (ks, tn) = self.resolve(table, current)?;
                let t = self.table(&ks, &tn).expect("resolved");
                type_relations(t, relations, &mut binds)?;
                if let Some(Term::Bind(i)) = limit {
                    binds[*i] = Some(("[limit]".into(), CqlType::Int));
                }
                let cols = result_columns(t, selection)?;
                (ks, tn, Some(cols))
            }
            Statement::Delete {
                table,
                relations,
                timestamp,
            } => {
                let (ks, tn) = self.resolve(table, current)?;
                let t = self.table(&ks, &tn).expect("resolved");
                type_relations(t, relations, &mut binds)?;
                if let Some(Term::Bind(i)) = timestamp {
                    binds[*i] = Some(("[timestamp]".into(), CqlType::BigInt));
                }
                (ks, tn, None)
            }
            _ => (current.unwrap_or("").to_owned(), String::new(), None),
        };
        let binds: Vec<(String, CqlType)> = binds
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                b.ok_or_else(|| EngineError::Invalid(format!("cannot type bind marker {i}")))
            })
            .collect::<Result<_, _>>()?;
        let pk_indexes = match self.table(&keyspace, &table) {
            Some(t) => {
                t.pk.iter()
                    .map(|&c| {
                        binds
                            .iter()
                            .position(|(n, _)| *n == t.columns[c].name)
                            .map(|p| p as u16)
                    })
                    .collect::<Option<Vec<u16>>>()
                    .unwrap_or_default()
            }
            None => Vec::new(),
        };
        Ok(Prepared {
            text: String::new(),
            statement,
            keyspace,
            table,
            binds,
            pk_indexes,
            result,
        })
    }

    /// Whether `node` holds a copy of every partition a write (INSERT, UPDATE, DELETE) touches
    /// with these bound values ([`Self::replicas`]). `None` for a statement that
    /// writes no user keyspace, or whose partition key does not evaluate (the write then fails
    /// anyway). The key is read from the statement's own terms rather than from the bind markers
    /// announced as the partition key (`pk_indexes`), so that what drivers route by is checked,
    /// not trusted.
    pub fn write_on_replica(&self, node: usize, p: &Prepared, bound: &[Value]) -> Option<bool> {
        let writes = matches!(
            p.statement,
            Statement::Insert { .. } | Statement::Delete { .. }
        );
        if !writes || p.keyspace.starts_with("system") {
            return None;
        }
        let ks = self.keyspaces.get(&p.keyspace)?;
        let t = ks.tables.get(&p.table)?;
        let tokens = partition_tokens(t, &p.statement, bound)?;
        Some(
            tokens
                .into_iter()
                .all(|token| self.placement(ks, token).contains(&node)),
        )
    }

    /// The nodes that replicate the partition with this token in `keyspace`, primary first: its
    /// tablet's for a tablet keyspace, else the ring's by the keyspace's replication. Empty for
    /// a keyspace that does not exist.
    pub fn replicas(&self, keyspace: &str, token: i64) -> Vec<usize> {
        self.keyspaces
            .get(keyspace)
            .map_or_else(Vec::new, |ks| self.placement(ks, token))
    }

    fn placement(&self, ks: &Keyspace, token: i64) -> Vec<usize> {
        match self.tablet_of(ks, token) {
            Some(tablet) => tablet.replicas,
            None => self
                .ring
                .holders(token, Replication::parse(&ks.replication)),
        }
    }

    /// The tablet that holds the partition with this token in `keyspace`; `None` unless it is a
    /// tablet keyspace.
    pub fn tablet(&self, keyspace: &str, token: i64) -> Option<Tablet> {
        self.tablet_of(self.keyspaces.get(keyspace)?, token)
    }

    fn tablet_of(&self, ks: &Keyspace, token: i64) -> Option<Tablet> {
        let tablets = ks.tablets.as_ref()?;
        let replication = Replication::parse(&ks.replication);
        Some(tablets.tablet(token, replication, self.ring.nodes().len()))
    }

    /// Moves the tablet of `keyspace` that holds `token` to the nodes `to`, as ScyllaDB's load
    /// balancer moves one (see [`Tablets::move_tablet`]); the tablet after the move. Every
    /// placement follows it from now on: [`Self::replicas`], [`Self::tablet`],
    /// [`Self::write_on_replica`] and [`Self::tablet_payload`].
    pub fn move_tablet(
        &mut self,
        keyspace: &str,
        token: i64,
        to: Vec<usize>,
    ) -> Result<Tablet, String> {
        let nodes = self.ring.nodes().len();
        let ks = self
            .keyspaces
            .get_mut(keyspace)
            .ok_or_else(|| format!("keyspace '{keyspace}' does not exist"))?;
        let replication = Replication::parse(&ks.replication);
        let tablets = ks.tablets.as_mut().ok_or_else(|| {
            format!("keyspace '{keyspace}' is not a tablet keyspace: create it WITH tablets")
        })?;
        tablets.move_tablet(token, to, replication, nodes)
    }

    /// The `tablets-routing-v1` payload ScyllaDB adds to the answer to an EXECUTE of `p` with
    /// these values on `node`: its tablet's, when the statement's table is in a tablet keyspace,
    /// it names one partition, and `node` is not one of that tablet's replicas.
    pub fn tablet_payload(&self, node: usize, p: &Prepared, bound: &[Value]) -> Option<Vec<u8>> {
        let t = self.table(&p.keyspace, &p.table)?;
        let [token] = partition_tokens(t, &p.statement, bound)?[..] else {
            return None;
        };
        let tablet = self.tablet(&p.keyspace, token)?;
        if tablet.replicas.is_empty() || tablet.replicas.contains(&node) {
            return None;
        }
        let host_ids: Vec<Uuid> = self.ring.nodes().iter().map(|n| n.host_id).collect();
        Some(tablets::payload(&tablet, &host_ids))
    }

    /// Executes a statement with bound values as node 0 answers it (see [`Self::execute_on`]).
    pub fn execute(
        &mut self,
        st: &Statement,
        bound: &[Value],
        current: Option<&str>,
    ) -> Result<Outcome, EngineError> {
        self.execute_on(0, st, bound, current)
    }

    /// Executes a statement with bound values on `node` of the ring; `current` is the
    /// connection's keyspace. Only a read of the `system` keyspace (the node's identity) depends
    /// on the node.
    pub fn execute_on(
        &mut self,
        node: usize,
        st: &Statement,
        bound: &[Value],
        current: Option<&str>,
    ) -> Result<Outcome, EngineError> {
        if let Statement::Select { table, .. } = st {
            if table.keyspace.as_deref().or(current) == Some("system") {
                self.show(node);
            }
        }
        if bound.len() < st.bind_count() {
            return Err(EngineError::Invalid(format!(
                "expected {} bound values, got {}",
                st.bind_count(),
                bound.len()
            )));
        }
        match st {
            Statement::Use(ks) => {
                if !self.keyspaces.contains_key(ks) {
                    return Err(EngineError::Invalid(format!(
                        "keyspace '{ks}' does not exist"
                    )));
                }
                Ok(Outcome::SetKeyspace(ks.clone()))
            }
            Statement::CreateKeyspace {
                name,
                if_not_exists,
                replication,
                tablets,
            } => {
                let tablets =
                    tablets::for_new_keyspace(replication, tablets, self.tablets_by_default)
                        .map_err(EngineError::Invalid)?;
                if self.keyspaces.contains_key(name) {
                    if *if_not_exists {
                        return Ok(Outcome::Void);
                    }
                    return Err(EngineError::AlreadyExists {
                        keyspace: name.clone(),
                        table: String::new(),
                    });
                }
                // Stored as ScyllaDB stores it; placement and system_schema both read this.
                let replication = Replication::stored(replication);
                self.keyspaces.insert(
                    name.clone(),
                    Keyspace {
                        replication: replication.clone(),
                        tablets: tablets.map(Tablets::new),
                        tables: BTreeMap::new(),
                    },
                );
                if let Some(t) = tablets {
                    self.put(
                        "system_schema",
                        "scylla_keyspaces",
                        &[
                            ("keyspace_name", Some(name.as_bytes().to_vec())),
                            ("initial_tablets", Some(t.initial.to_be_bytes().to_vec())),
                        ],
                    );
                }
                if self.table("system_schema", "keyspaces").is_some() {
                    let mut map = Vec::new();
                    map.int(replication.len() as i32);
                    for (k, v) in &replication {
                        map.bytes(Some(k.as_bytes()));
                        map.bytes(Some(v.as_bytes()));
                    }
                    self.put(
                        "system_schema",
                        "keyspaces",
                        &[
                            ("keyspace_name", Some(name.as_bytes().to_vec())),
                            ("durable_writes", Some(vec![1])),
                            ("replication", Some(map)),
                        ],
                    );
                    self.bump_schema_version();
                }
                Ok(Outcome::SchemaChange {
                    change: "CREATED",
                    target: "KEYSPACE",
                    keyspace: name.clone(),
                    table: None,
                })
            }
            Statement::CreateTable {
                table,
                if_not_exists,
                columns,
                partition_key,
                clustering,
                descending,
                default_ttl,
                gc_grace_seconds,
            } => {
                let ks = table
                    .keyspace
                    .as_deref()
                    .or(current)
                    .ok_or_else(|| EngineError::Invalid("no keyspace has been specified".into()))?
                    .to_owned();
                let keyspace = self
                    .keyspaces
                    .get(&ks)
                    .ok_or_else(|| EngineError::Invalid(format!("keyspace {ks} does not exist")))?;
                if keyspace.tables.contains_key(&table.table) {
                    if *if_not_exists {
                        return Ok(Outcome::Void);
                    }
                    return Err(EngineError::AlreadyExists {
                        keyspace: ks,
                        table: table.table.clone(),
                    });
                }
                let mut t = build_table(
                    &ks,
                    &table.table,
                    columns,
                    partition_key,
                    clustering,
                    descending,
                )?;
                t.default_ttl = default_ttl.unwrap_or(0);
                if let Some(grace) = *gc_grace_seconds {
                    if !(0..=i64::from(i32::MAX)).contains(&grace) {
                        return Err(EngineError::Invalid(format!(
                            "gc_grace_seconds must be from 0 to {}, not {grace}",
                            i32::MAX
                        )));
                    }
                    t.gc_grace_seconds = grace;
                }
                self.keyspaces
                    .get_mut(&ks)
                    .expect("checked")
                    .tables
                    .insert(table.table.clone(), t.clone());
                if self.table("system_schema", "columns").is_some() {
                    self.record_table(&t);
                }
                Ok(Outcome::SchemaChange {
                    change: "CREATED",
                    target: "TABLE",
                    keyspace: ks,
                    table: Some(table.table.clone()),
                })
            }
            Statement::DropTable { table, if_exists } => {
                let ks = table
                    .keyspace
                    .as_deref()
                    .or(current)
                    .unwrap_or_default()
                    .to_owned();
                let removed = self
                    .keyspaces
                    .get_mut(&ks)
                    .and_then(|k| k.tables.remove(&table.table));
                match removed {
                    None if *if_exists => Ok(Outcome::Void),
                    None => Err(EngineError::Invalid(format!(
                        "table {ks}.{} does not exist",
                        table.table
                    ))),
                    Some(_) => {
                        for t in ["tables", "columns"] {
                            self.delete_table_rows(t, &ks, &table.table);
                        }
                        self.bump_schema_version();
                        Ok(Outcome::SchemaChange {
                            change: "DROPPED",
                            target: "TABLE",
                            keyspace: ks,
                            table: Some(table.table.clone()),
                        })
                    }
                }
            }
            Statement::DropKeyspace { name, if_exists } => match self.keyspaces.remove(name) {
                None if *if_exists => Ok(Outcome::Void),
                None => Err(EngineError::Invalid(format!(
                    "keyspace {name} does not exist"
                ))),
                Some(_) => {
                    for t in ["keyspaces", "scylla_keyspaces", "tables", "columns"] {
                        self.delete_where("system_schema", t, "keyspace_name", name);
                    }
                    self.bump_schema_version();
                    Ok(Outcome::SchemaChange {
                        change: "DROPPED",
                        target: "KEYSPACE",
                        keyspace: name.clone(),
                        table: None,
                    })
                }
            },
            Statement::Insert {
                table,
                columns,
                values,
                timestamp,
                ttl,
            } => {
                let (ks, tn) = self.resolve(table, current)?;
                let ts = write_timestamp(timestamp.as_ref(), bound)?;
                // No TTL named: the table's default_time_to_live, as Scylla applies it.
                let default_ttl = self.table(&ks, &tn).map_or(0, |t| t.default_ttl);
                let expiry = match ttl {
                    None => (default_ttl > 0).then(|| now_secs() + default_ttl),
                    Some(term) => {
                        let v = term_value(&CqlType::Int, term, bound)?
                            .ok_or_else(|| EngineError::Invalid("TTL must not be null".into()))?;
                        let secs = i32::from_be_bytes(
                            v.as_slice()
                                .try_into()
                                .map_err(|_| EngineError::Invalid("bad TTL".into()))?,
                        );
                        if secs < 0 {
                            return Err(EngineError::Invalid(format!(
                                "A TTL must be greater or equal to 0, but was {secs}"
                            )));
                        }
                        (secs > 0).then(|| now_secs() + i64::from(secs))
                    }
                };
                let t = self
                    .keyspaces
                    .get_mut(&ks)
                    .and_then(|k| k.tables.get_mut(&tn))
                    .expect("resolved");
                let mut row = vec![None; t.columns.len()];
                let mut set = vec![false; t.columns.len()];
                for (c, v) in columns.iter().zip(values) {
                    let (i, col) = t.column(c)?;
                    let value = term_value(&col.ty, v, bound)?;
                    row[i] = value;
                    set[i] = true;
                }
                for &i in t.pk.iter().chain(&t.ck) {
                    if row[i].is_none() {
                        return Err(EngineError::Invalid(format!(
                            "missing value for primary key column {}",
                            t.columns[i].name
                        )));
                    }
                }
                upsert(t, row, &set, ts, expiry);
                Ok(Outcome::Void)
            }
            Statement::Select {
                table,
                selection,
                relations,
                order_desc,
                limit,
            } => {
                let (ks, tn) = self.resolve(table, current)?;
                if let Some(t) = self
                    .keyspaces
                    .get_mut(&ks)
                    .and_then(|k| k.tables.get_mut(&tn))
                {
                    t.expire(now_secs());
                }
                let t = self.table(&ks, &tn).expect("resolved");
                let mut rows = matching_rows(t, relations, bound)?;
                if let (Some(desc), Some(first_desc)) = (order_desc, t.desc.first()) {
                    if desc != first_desc {
                        rows.reverse();
                    }
                }
                if let Some(l) = limit {
                    let v = term_value(&CqlType::Int, l, bound)?
                        .ok_or_else(|| EngineError::Invalid("LIMIT must not be null".into()))?;
                    let n = i32::from_be_bytes(
                        v.as_slice()
                            .try_into()
                            .map_err(|_| EngineError::Invalid("bad LIMIT".into()))?,
                    );
                    if n <= 0 {
                        return Err(EngineError::Invalid(
                            "LIMIT must be strictly positive".into(),
                        ));
                    }
                    rows.truncate(n as usize);
                }
                let columns = result_columns(t, selection)?;
                let rows = match selection {
                    Selection::Count => {
                        vec![vec![Some((rows.len() as i64).to_be_bytes().to_vec())]]
                    }
                    _ => {
                        let n = t.columns.len();
                        let now = now_secs();
                        let idx: Vec<usize> = columns
                            .iter()
                            .map(|(name, _)| match (writetime_of(name), ttl_of(name)) {
                                (Some(column), _) => t.column(column).map(|(i, _)| n + i),
                                (_, Some(column)) => t.column(column).map(|(i, _)| 2 * n + i),
                                _ => t.column(name).map(|(i, _)| i),
                            })
                            .collect::<Result<_, _>>()?;
                        rows.into_iter()
                            .map(|r| {
                                idx.iter()
                                    .map(|&i| match i {
                                        // TTL(): the seconds left, as an int.
                                        i if i >= 2 * n => r[i].as_deref().map(|b| {
                                            let at =
                                                i64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
                                            (((at - now).max(0)) as i32).to_be_bytes().to_vec()
                                        }),
                                        i => r[i].clone(),
                                    })
                                    .collect()
                            })
                            .collect()
                    }
                };
                Ok(Outcome::Rows(RowSet {
                    keyspace: ks,
                    table: tn,
                    columns,
                    rows,
                }))
            }
            Statement::Delete {
                table,
                relations,
                timestamp,
            } => {
                let (ks, tn) = self.resolve(table, current)?;
                let ts = write_timestamp(timestamp.as_ref(), bound)?;
                let t = self.table(&ks, &tn).expect("resolved");
                // Only the whole partition key restricted: a partition tombstone, which also
                // shadows rows written later with an older timestamp. Otherwise, a tombstone per
                // matching row.
                let on_key = |r: &Relation| {
                    t.column(&r.column)
                        .is_ok_and(|(i, _)| t.pk.contains(&i) && matches!(r.op, Op::Eq | Op::In))
                };
                let whole_partition = relations.iter().all(on_key)
                    && t.pk
                        .iter()
                        .all(|i| relations.iter().any(|r| r.column == t.columns[*i].name));
                let doomed: Vec<(Vec<u8>, Option<Vec<u8>>)> = if whole_partition {
                    partition_keys(t, relations, bound)?
                        .into_iter()
                        .map(|p| (p, None))
                        .collect()
                } else {
                    matching_rows(t, relations, bound)?
                        .iter()
                        .map(|r| (t.pk_key(r), Some(t.ck_key(r))))
                        .collect()
                };
                let t = self
                    .keyspaces
                    .get_mut(&ks)
                    .and_then(|k| k.tables.get_mut(&tn))
                    .expect("resolved");
                let tomb = Tombstone {
                    timestamp: ts,
                    deleted_at: now_secs(),
                };
                for key in doomed {
                    let kept = t.tombstones.entry(key).or_insert(tomb);
                    *kept = (*kept).max(tomb);
                }
                t.apply_tombstones();
                Ok(Outcome::Void)
            }
            Statement::AlterAdd { table, column, ty } => {
                let (ks, tn) = self.resolve(table, current)?;
                let ty = CqlType::parse(ty).map_err(EngineError::Invalid)?;
                let t = self
                    .keyspaces
                    .get_mut(&ks)
                    .and_then(|k| k.tables.get_mut(&tn))
                    .expect("resolved");
                if t.columns.iter().any(|c| c.name == *column) {
                    return Err(EngineError::Invalid(format!(
                        "Invalid column name {column} because it conflicts with an existing column"
                    )));
                }
                let n = t.columns.len();
                t.columns.push(Column {
                    name: column.clone(),
                    ty,
                    kind: Kind::Regular,
                });
                // Rows hold n values then n timestamps: the new value goes at n, its
                // timestamp at the end.
                for part in t.rows.values_mut() {
                    for row in part.values_mut() {
                        row.insert(n, None);
                        row.insert(2 * n + 1, None);
                        row.push(None);
                    }
                }
                let t = t.clone();
                self.record_table(&t);
                Ok(Outcome::SchemaChange {
                    change: "UPDATED",
                    target: "TABLE",
                    keyspace: ks,
                    table: Some(tn),
                })
            }
            Statement::Truncate(table) => {
                let (ks, tn) = self.resolve(table, current)?;
                self.keyspaces
                    .get_mut(&ks)
                    .and_then(|k| k.tables.get_mut(&tn))
                    .expect("resolved")
                    .rows
                    .clear();
                Ok(Outcome::Void)
            }
        }
    }

    fn delete_table_rows(&mut self, schema_table: &str, ks: &str, table: &str) {
        if let Some(t) = self
            .keyspaces
            .get_mut("system_schema")
            .and_then(|k| k.tables.get_mut(schema_table))
        {
            let ki = t.column("keyspace_name").map(|(i, _)| i).ok();
            let ti = t.column("table_name").map(|(i, _)| i).ok();
            if let (Some(ki), Some(ti)) = (ki, ti) {
                for part in t.rows.values_mut() {
                    part.retain(|_, r| {
                        !(r[ki].as_deref() == Some(ks.as_bytes())
                            && r[ti].as_deref() == Some(table.as_bytes()))
                    });
                }
                t.rows.retain(|_, p| !p.is_empty());
            }
        }
    }

    fn record_table(&mut self, t: &Table) {
        let text = |s: &str| Some(s.as_bytes().to_vec());
        self.put(
            "system_schema",
            "tables",
            &[
                ("keyspace_name", text(&t.keyspace)),
                ("table_name", text(&t.name)),
                ("id", Some(Uuid::new_v4().as_bytes().to_vec())),
                (
                    "default_time_to_live",
                    Some((t.default_ttl as i32).to_be_bytes().to_vec()),
                ),
                (
                    "gc_grace_seconds",
                    Some((t.gc_grace_seconds as i32).to_be_bytes().to_vec()),
                ),
                ("comment", text("")),
            ],
        );
        for c in &t.columns {
            let (kind, position, order) = match c.kind {
                Kind::Partition(i) => ("partition_key", i as i32, "none"),
                Kind::Clustering(i) => (
                    "clustering",
                    i as i32,
                    if t.desc[i] { "desc" } else { "asc" },
                ),
                Kind::Regular => ("regular", -1, "none"),
            };
            self.put(
                "system_schema",
                "columns",
                &[
                    ("keyspace_name", text(&t.keyspace)),
                    ("table_name", text(&t.name)),
                    ("column_name", text(&c.name)),
                    ("clustering_order", text(order)),
                    ("column_name_bytes", Some(c.name.as_bytes().to_vec())),
                    ("kind", text(kind)),
                    ("position", Some(position.to_be_bytes().to_vec())),
                    ("type", text(&c.ty.cql_name())),
                ],
            );
        }
        self.bump_schema_version();
    }
}

fn build_table(
    ks: &str,
    name: &str,
    columns: &[(String, String)],
    pk: &[String],
    ck: &[String],
    desc: &[String],
) -> Result<Table, EngineError> {
    let mut cols = Vec::new();
    for (n, ty) in columns {
        let ty = CqlType::parse(ty).map_err(EngineError::Invalid)?;
        let kind = if let Some(i) = pk.iter().position(|p| p == n) {
            Kind::Partition(i)
        } else if let Some(i) = ck.iter().position(|c| c == n) {
            Kind::Clustering(i)
        } else {
            Kind::Regular
        };
        cols.push(Column {
            name: n.clone(),
            ty,
            kind,
        });
    }
    let find = |n: &String| {
        cols.iter()
            .position(|c| &c.name == n)
            .ok_or_else(|| EngineError::Invalid(format!("unknown primary key column {n}")))
    };
    let pk_idx = pk.iter().map(find).collect::<Result<Vec<_>, _>>()?;
    let ck_idx = ck.iter().map(find).collect::<Result<Vec<_>, _>>()?;
    for d in desc {
        if !ck.contains(d) {
            return Err(EngineError::Invalid(format!(
                "CLUSTERING ORDER names {d}, which is not a clustering column"
            )));
        }
    }
    Ok(Table {
        keyspace: ks.to_owned(),
        name: name.to_owned(),
        columns: cols,
        pk: pk_idx,
        desc: ck.iter().map(|c| desc.contains(c)).collect(),
        ck: ck_idx,
        rows: BTreeMap::new(),
        tombstones: BTreeMap::new(),
        default_ttl: 0,
        gc_grace_seconds: DEFAULT_GC_GRACE_SECONDS,
        next_expiry: None,
    })
}

/// The timestamp of a write or delete: its `USING TIMESTAMP`, else the server clock.
fn write_timestamp(term: Option<&Term>, bound: &[Value]) -> Result<i64, EngineError> {
    let Some(term) = term else {
        return Ok(now_micros());
    };
    let v = term_value(&CqlType::BigInt, term, bound)?
        .ok_or_else(|| EngineError::Invalid("USING TIMESTAMP must not be null".into()))?;
    Ok(i64::from_be_bytes(v.as_slice().try_into().map_err(
        |_| EngineError::Invalid("bad USING TIMESTAMP".into()),
    )?))
}

/// The partition sort keys a restriction of the whole partition key selects.
fn partition_keys(
    t: &Table,
    relations: &[Relation],
    bound: &[Value],
) -> Result<Vec<Vec<u8>>, EngineError> {
    let mut keys: Vec<Vec<u8>> = vec![Vec::new()];
    for &c in &t.pk {
        let col = &t.columns[c];
        let r = relations
            .iter()
            .find(|r| r.column == col.name)
            .ok_or_else(|| EngineError::Invalid(format!("missing partition key {}", col.name)))?;
        let values = relation_values(col, r, bound)?;
        keys = keys
            .iter()
            .flat_map(|k| {
                values.iter().map(move |v| {
                    let mut k = k.clone();
                    col.ty.sort_key(v.as_deref(), false, &mut k);
                    k
                })
            })
            .collect();
    }
    Ok(keys)
}

/// The tokens of the partitions a statement names: an INSERT (or UPDATE) one, a DELETE or
/// SELECT one per combination of its partition key's `=` and `IN` values. `None` for any other
/// statement, or a key column without a value.
fn partition_tokens(t: &Table, st: &Statement, bound: &[Value]) -> Option<Vec<i64>> {
    let mut keys: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
    for &c in &t.pk {
        let col = &t.columns[c];
        let values = match st {
            Statement::Insert {
                columns, values, ..
            } => {
                let i = columns.iter().position(|n| *n == col.name)?;
                vec![term_value(&col.ty, values.get(i)?, bound).ok()?]
            }
            Statement::Delete { relations, .. } | Statement::Select { relations, .. } => {
                let r = relations
                    .iter()
                    .find(|r| r.column == col.name && matches!(r.op, Op::Eq | Op::In))?;
                relation_values(col, r, bound).ok()?
            }
            _ => return None,
        };
        let values: Vec<Vec<u8>> = values.into_iter().collect::<Option<_>>()?;
        keys = keys
            .iter()
            .flat_map(|k| {
                values.iter().map(move |v| {
                    let mut k = k.clone();
                    k.push(v.clone());
                    k
                })
            })
            .collect();
    }
    Some(
        keys.iter()
            .map(|key| {
                let parts: Vec<&[u8]> = key.iter().map(Vec::as_slice).collect();
                murmur3::partition_token(&parts)
            })
            .collect(),
    )
}

/// The server clock in seconds since the epoch (cell expiry, a tombstone's deletion time).
pub(crate) fn now_secs() -> i64 {
    now_micros() / 1_000_000
}

/// The server clock as a write timestamp: microseconds since the epoch.
fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Writes the `set` cells of `row` at write timestamp `ts`, cell by cell as ScyllaDB does
/// (`compare_atomic_cell_for_merge`): a cell is replaced only by a write with a greater
/// timestamp, or, at an equal timestamp, by an expiring cell over one that never expires, by a
/// later expiry over an earlier one, and then by a greater value (bytes compared unsigned; a
/// null value is the least). So the outcome does not depend on the order writes arrive in.
/// (Scylla breaks a tie of equal expiries by the shorter TTL, i.e. the later write, before the
/// value; the stand-in keeps no TTL apart from the expiry, so it goes to the value.)
fn upsert(t: &mut Table, row: Vec<Value>, set: &[bool], ts: i64, expiry: Option<i64>) {
    let n = t.columns.len();
    let (p, c) = (t.pk_key(&row), t.ck_key(&row));
    // A tombstone at or after this write shadows it (a delete wins a tie).
    if t.tombstone(&p, &c).is_some_and(|tomb| ts <= tomb) {
        return;
    }
    if let Some(at) = expiry {
        t.next_expiry = Some(t.next_expiry.map_or(at, |next| next.min(at)));
    }
    let part = t.rows.entry(p).or_default();
    let existing = part.entry(c).or_insert_with(|| vec![None; 3 * n]);
    for (i, v) in row.into_iter().enumerate() {
        if !set[i] {
            continue;
        }
        let old_ts = existing[n + i]
            .as_deref()
            .and_then(|b| b.try_into().ok())
            .map(i64::from_be_bytes);
        let old_expiry = existing[2 * n + i]
            .as_deref()
            .and_then(|b| b.try_into().ok())
            .map(i64::from_be_bytes);
        // Expiring beats never-expiring (`None` < `Some`), a later expiry an earlier one, then
        // the greater value.
        let wins = match old_ts {
            None => true,
            Some(old) => {
                ts > old
                    || (ts == old && (expiry, v.as_deref()) > (old_expiry, existing[i].as_deref()))
            }
        };
        if wins {
            existing[i] = v;
            existing[n + i] = Some(ts.to_be_bytes().to_vec());
            existing[2 * n + i] = expiry.map(|e| e.to_be_bytes().to_vec());
        }
    }
}

/// `writetime(column)` of a selection: the column it reads.
fn writetime_of(name: &str) -> Option<&str> {
    name.strip_prefix("writetime(")?.strip_suffix(')')
}

/// `ttl(column)` of a selection: the column it reads.
fn ttl_of(name: &str) -> Option<&str> {
    name.strip_prefix("ttl(")?.strip_suffix(')')
}

fn type_relations(
    t: &Table,
    relations: &[Relation],
    binds: &mut [Option<(String, CqlType)>],
) -> Result<(), EngineError> {
    for r in relations {
        let (_, col) = t.column(&r.column)?;
        match &r.value {
            RelValue::One(Term::Bind(i)) => {
                let ty = if r.op == Op::In {
                    CqlType::List(Box::new(col.ty.clone()))
                } else {
                    col.ty.clone()
                };
                binds[*i] = Some((col.name.clone(), ty));
            }
            RelValue::List(items) => {
                for item in items {
                    if let Term::Bind(i) = item {
                        binds[*i] = Some((col.name.clone(), col.ty.clone()));
                    }
                }
            }
            RelValue::One(Term::Lit(_)) => {}
        }
    }
    Ok(())
}

fn result_columns(t: &Table, selection: &Selection) -> Result<Vec<(String, CqlType)>, EngineError> {
    Ok(match selection {
        Selection::Star => t
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.ty.clone()))
            .collect(),
        Selection::Count => vec![("count".into(), CqlType::BigInt)],
        Selection::Columns(names) => names
            .iter()
            .map(|n| match (writetime_of(n), ttl_of(n)) {
                (Some(column), _) => t.column(column).map(|_| (n.clone(), CqlType::BigInt)),
                (_, Some(column)) => t.column(column).map(|_| (n.clone(), CqlType::Int)),
                _ => t.column(n).map(|(_, c)| (c.name.clone(), c.ty.clone())),
            })
            .collect::<Result<_, _>>()?,
    })
}

fn term_value(ty: &CqlType, term: &Term, bound: &[Value]) -> Result<Value, EngineError> {
    match term {
        Term::Bind(i) => {
            let v = bound.get(*i).cloned().flatten();
            if let Some(b) = &v {
                ty.validate(b).map_err(EngineError::Invalid)?;
            }
            Ok(v)
        }
        Term::Lit(l) => ty.encode_literal(l).map_err(EngineError::Invalid),
    }
}

/// The candidate values of one relation (several for IN).
fn relation_values(col: &Column, r: &Relation, bound: &[Value]) -> Result<Vec<Value>, EngineError> {
    match (&r.value, r.op) {
        (RelValue::List(items), _) => items
            .iter()
            .map(|t| term_value(&col.ty, t, bound))
            .collect(),
        (RelValue::One(t), Op::In) => {
            let list_ty = CqlType::List(Box::new(col.ty.clone()));
            match term_value(&list_ty, t, bound)? {
                None => Ok(Vec::new()),
                Some(b) => decode_collection(&b).map_err(EngineError::Invalid),
            }
        }
        (RelValue::One(t), _) => Ok(vec![term_value(&col.ty, t, bound)?]),
    }
}

/// Elements of a serialized list or set.
pub fn decode_collection(b: &[u8]) -> Result<Vec<Value>, String> {
    let mut r = crate::cql::frame::Reader(b);
    let n = r.int()?;
    (0..n).map(|_| r.bytes()).collect()
}

fn matching_rows(
    t: &Table,
    relations: &[Relation],
    bound: &[Value],
) -> Result<Vec<Vec<Value>>, EngineError> {
    let mut preds = Vec::new();
    for r in relations {
        let (i, col) = t.column(&r.column)?;
        preds.push((i, col, r.op, relation_values(col, r, bound)?));
    }
    let matches = |row: &[Value]| {
        preds.iter().all(|(i, col, op, vals)| {
            let Some(have) = row[*i].as_deref() else {
                return false;
            };
            vals.iter().any(|want| {
                let Some(want) = want.as_deref() else {
                    return false;
                };
                let ord = col.ty.compare(have, want);
                match op {
                    Op::Eq | Op::In => ord.is_eq(),
                    Op::Lt => ord.is_lt(),
                    Op::Le => ord.is_le(),
                    Op::Gt => ord.is_gt(),
                    Op::Ge => ord.is_ge(),
                }
            })
        })
    };
    // With every partition key column restricted by = or IN, read only those partitions.
    let pk_values: Option<Vec<Vec<Value>>> =
        t.pk.iter()
            .map(|&c| {
                preds
                    .iter()
                    .find(|(i, _, op, _)| *i == c && matches!(op, Op::Eq | Op::In))
                    .map(|(_, _, _, v)| v.clone())
            })
            .collect();
    let mut out = Vec::new();
    match pk_values {
        Some(sets) => {
            let mut keys: Vec<Vec<u8>> = vec![Vec::new()];
            for (n, set) in sets.iter().enumerate() {
                let ty = &t.columns[t.pk[n]].ty;
                keys = keys
                    .iter()
                    .flat_map(|k| {
                        set.iter().map(move |v| {
                            let mut k = k.clone();
                            ty.sort_key(v.as_deref(), false, &mut k);
                            k
                        })
                    })
                    .collect();
            }
            keys.sort();
            keys.dedup();
            for k in keys {
                if let Some(part) = t.rows.get(&k) {
                    out.extend(part.values().filter(|r| matches(r)).cloned());
                }
            }
        }
        None => {
            for part in t.rows.values() {
                out.extend(part.values().filter(|r| matches(r)).cloned());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(db: &mut Database, q: &str) -> Result<Outcome, EngineError> {
        let st = parser::parse(q).map_err(EngineError::Syntax)?;
        db.execute(&st, &[], Some("ks"))
    }

    /// A node with one (empty) keyspace.
    fn with_keyspace(ks: &str) -> Database {
        let mut db = Database::new(Ipv4Addr::LOCALHOST);
        run(&mut db, &format!("CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}")).unwrap();
        db
    }

    fn table_mut<'a>(db: &'a mut Database, ks: &str, table: &str) -> &'a mut Table {
        db.keyspaces
            .get_mut(ks)
            .and_then(|k| k.tables.get_mut(table))
            .expect("the table exists")
    }

    fn rows(o: Outcome) -> Vec<Vec<Value>> {
        match o {
            Outcome::Rows(r) => r.rows,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cells_are_last_write_wins_by_timestamp_whatever_the_arrival_order() {
        let mut db = with_keyspace("k");
        run(
            &mut db,
            "CREATE TABLE k.t (a text PRIMARY KEY, b text, c text)",
        )
        .unwrap();
        run(
            &mut db,
            "INSERT INTO k.t (a, b, c) VALUES ('x', 'new', 'c1') USING TIMESTAMP 20",
        )
        .unwrap();
        run(
            &mut db,
            "INSERT INTO k.t (a, b) VALUES ('x', 'old') USING TIMESTAMP 10",
        )
        .unwrap();
        run(
            &mut db,
            "INSERT INTO k.t (a, c) VALUES ('x', 'c2') USING TIMESTAMP 30",
        )
        .unwrap();
        let got = rows(
            run(
                &mut db,
                "SELECT b, writetime(b), c, writetime(c) FROM k.t WHERE a = 'x'",
            )
            .unwrap(),
        );
        let ts = |v: i64| Some(v.to_be_bytes().to_vec());
        assert_eq!(
            got,
            vec![vec![
                Some(b"new".to_vec()),
                ts(20),
                Some(b"c2".to_vec()),
                ts(30)
            ]]
        );
        // An equal timestamp: the greater value wins, so the order of arrival does not matter.
        run(
            &mut db,
            "INSERT INTO k.t (a, b) VALUES ('x', 'zzz') USING TIMESTAMP 20",
        )
        .unwrap();
        run(
            &mut db,
            "INSERT INTO k.t (a, b) VALUES ('x', 'aaa') USING TIMESTAMP 20",
        )
        .unwrap();
        let got = rows(run(&mut db, "SELECT b FROM k.t WHERE a = 'x'").unwrap());
        assert_eq!(got, vec![vec![Some(b"zzz".to_vec())]]);
    }

    #[test]
    fn tombstones_shadow_older_writes_whenever_they_arrive() {
        let mut db = with_keyspace("k");
        run(
            &mut db,
            "CREATE TABLE k.t (p text, c int, v text, PRIMARY KEY (p, c))",
        )
        .unwrap();
        for (c, ts) in [(1, 10), (2, 30)] {
            run(
                &mut db,
                &format!("INSERT INTO k.t (p, c, v) VALUES ('a', {c}, 'x') USING TIMESTAMP {ts}"),
            )
            .unwrap();
        }
        run(&mut db, "DELETE FROM k.t USING TIMESTAMP 20 WHERE p = 'a'").unwrap();
        let live = |db: &mut Database| {
            rows(run(db, "SELECT c FROM k.t WHERE p = 'a'").unwrap())
                .into_iter()
                .map(|r| i32::from_be_bytes(r[0].clone().unwrap().try_into().unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            live(&mut db),
            [2],
            "the write after the partition tombstone survives"
        );
        // Writes arriving after the delete: older ones (and a tie) stay shadowed.
        run(
            &mut db,
            "INSERT INTO k.t (p, c, v) VALUES ('a', 3, 'x') USING TIMESTAMP 19",
        )
        .unwrap();
        run(
            &mut db,
            "INSERT INTO k.t (p, c, v) VALUES ('a', 4, 'x') USING TIMESTAMP 20",
        )
        .unwrap();
        run(
            &mut db,
            "INSERT INTO k.t (p, c, v) VALUES ('a', 5, 'x') USING TIMESTAMP 21",
        )
        .unwrap();
        assert_eq!(live(&mut db), [2, 5]);
        // A row tombstone.
        run(
            &mut db,
            "DELETE FROM k.t USING TIMESTAMP 40 WHERE p = 'a' AND c = 2",
        )
        .unwrap();
        run(
            &mut db,
            "INSERT INTO k.t (p, c, v) VALUES ('a', 2, 'y') USING TIMESTAMP 35",
        )
        .unwrap();
        assert_eq!(live(&mut db), [5]);
    }

    /// The `c` of the rows of partition `'a'` of `k.t`.
    fn live_clusterings(db: &mut Database) -> Vec<i32> {
        rows(run(db, "SELECT c FROM k.t WHERE p = 'a'").unwrap())
            .into_iter()
            .map(|r| i32::from_be_bytes(r[0].clone().unwrap().try_into().unwrap()))
            .collect()
    }

    #[test]
    fn a_partition_tombstone_is_purged_once_gc_grace_seconds_have_passed() {
        let mut db = with_keyspace("k");
        run(
            &mut db,
            "CREATE TABLE k.t (p text, c int, v text, PRIMARY KEY (p, c))",
        )
        .unwrap();
        run(
            &mut db,
            "INSERT INTO k.t (p, c, v) VALUES ('a', 1, 'x') USING TIMESTAMP 10",
        )
        .unwrap();
        let before = now_secs();
        run(&mut db, "DELETE FROM k.t USING TIMESTAMP 100 WHERE p = 'a'").unwrap();
        let t = table_mut(&mut db, "k", "t");
        assert_eq!(t.gc_grace_seconds, DEFAULT_GC_GRACE_SECONDS);
        let key = (t.pk_key(&[Some(b"a".to_vec())]), None);
        let tomb = t.tombstones.get_mut(&key).unwrap();
        assert_eq!(tomb.timestamp, 100);
        assert!(
            (before..=now_secs()).contains(&tomb.deleted_at),
            "deleted at the server clock: {tomb:?}"
        );
        // As if the delete were a minute and a half old: a second one with an older timestamp
        // merges into it, which stays whole (ScyllaDB's `tombstone::apply`), neither lowering
        // the timestamp nor moving the deletion time.
        tomb.deleted_at -= 90;
        let tomb = *tomb;
        run(&mut db, "DELETE FROM k.t USING TIMESTAMP 60 WHERE p = 'a'").unwrap();
        assert_eq!(table_mut(&mut db, "k", "t").tombstones[&key], tomb);
        let zombie = "INSERT INTO k.t (p, c, v) VALUES ('a', 2, 'x') USING TIMESTAMP 50";
        run(&mut db, zombie).unwrap();
        assert!(live_clusterings(&mut db).is_empty(), "shadowed");
        let purged_at = tomb.deleted_at + DEFAULT_GC_GRACE_SECONDS;
        assert_eq!(db.compact(purged_at - 1), 0, "kept within gc_grace_seconds");
        run(&mut db, zombie).unwrap();
        assert!(live_clusterings(&mut db).is_empty(), "still shadowed");
        assert_eq!(db.compact(purged_at), 1, "purged once they have passed");
        assert!(table_mut(&mut db, "k", "t").tombstones.is_empty());
        assert!(
            live_clusterings(&mut db).is_empty(),
            "what it shadowed went with it"
        );
        run(&mut db, zombie).unwrap();
        assert_eq!(live_clusterings(&mut db), [2], "an older write lands again");
        assert_eq!(db.compact(purged_at), 0);
    }

    #[test]
    fn a_row_tombstone_is_purged_once_the_tables_gc_grace_seconds_have_passed() {
        let mut db = with_keyspace("k");
        run(
            &mut db,
            "CREATE TABLE k.t (p text, c int, v text, PRIMARY KEY (p, c)) WITH gc_grace_seconds = 60",
        )
        .unwrap();
        for c in [1, 2] {
            run(
                &mut db,
                &format!("INSERT INTO k.t (p, c, v) VALUES ('a', {c}, 'x') USING TIMESTAMP 10"),
            )
            .unwrap();
        }
        run(
            &mut db,
            "DELETE FROM k.t USING TIMESTAMP 20 WHERE p = 'a' AND c = 1",
        )
        .unwrap();
        let t = table_mut(&mut db, "k", "t");
        assert_eq!(t.tombstones.len(), 1);
        let ((_, row), tomb) = t.tombstones.iter().next().unwrap();
        assert!(row.is_some(), "a row tombstone");
        let deleted_at = tomb.deleted_at;
        let zombie = "INSERT INTO k.t (p, c, v) VALUES ('a', 1, 'y') USING TIMESTAMP 15";
        run(&mut db, zombie).unwrap();
        assert_eq!(live_clusterings(&mut db), [2]);
        assert_eq!(db.compact(deleted_at + 59), 0);
        run(&mut db, zombie).unwrap();
        assert_eq!(live_clusterings(&mut db), [2]);
        assert_eq!(db.compact(deleted_at + 60), 1);
        run(&mut db, zombie).unwrap();
        assert_eq!(live_clusterings(&mut db), [1, 2]);
    }

    #[test]
    fn gc_grace_seconds_is_read_defaulted_and_recorded_in_system_schema() {
        let mut db = with_keyspace("k");
        run(&mut db, "CREATE TABLE k.d (a text PRIMARY KEY)").unwrap();
        run(
            &mut db,
            "CREATE TABLE k.z (a text, b int, PRIMARY KEY (a, b)) WITH CLUSTERING ORDER BY (b DESC) \
             AND gc_grace_seconds = 0 AND default_time_to_live = 7",
        )
        .unwrap();
        assert_eq!(
            table_mut(&mut db, "k", "d").gc_grace_seconds,
            DEFAULT_GC_GRACE_SECONDS
        );
        assert_eq!(table_mut(&mut db, "k", "z").gc_grace_seconds, 0);
        let recorded = |db: &mut Database, table: &str| {
            let got = rows(
                run(
                    db,
                    &format!("SELECT gc_grace_seconds, default_time_to_live FROM system_schema.tables WHERE keyspace_name = 'k' AND table_name = '{table}'"),
                )
                .unwrap(),
            );
            let int = |v: &Value| i32::from_be_bytes(v.clone().unwrap().try_into().unwrap());
            (int(&got[0][0]), int(&got[0][1]))
        };
        assert_eq!(recorded(&mut db, "d"), (864_000, 0));
        assert_eq!(recorded(&mut db, "z"), (0, 7));
        run(&mut db, "ALTER TABLE k.z ADD c text").unwrap();
        assert_eq!(recorded(&mut db, "z"), (0, 7), "an ALTER keeps the options");
        assert!(matches!(
            run(
                &mut db,
                "CREATE TABLE k.n (a text PRIMARY KEY) WITH gc_grace_seconds = -1"
            ),
            Err(EngineError::Invalid(_))
        ));
    }

    #[test]
    fn cells_written_with_a_ttl_expire() {
        let mut db = with_keyspace("k");
        run(&mut db, "CREATE TABLE k.t (a text PRIMARY KEY, b text)").unwrap();
        run(
            &mut db,
            "INSERT INTO k.t (a, b) VALUES ('x', 'v') USING TTL 100 AND TIMESTAMP 5",
        )
        .unwrap();
        run(&mut db, "INSERT INTO k.t (a, b) VALUES ('y', 'v')").unwrap();
        let got = rows(
            run(
                &mut db,
                "SELECT a, ttl(b), writetime(b) FROM k.t WHERE a = 'x'",
            )
            .unwrap(),
        );
        let left = i32::from_be_bytes(got[0][1].clone().unwrap().try_into().unwrap());
        assert!((99..=100).contains(&left), "{left}");
        assert_eq!(got[0][2], Some(5i64.to_be_bytes().to_vec()));
        // Expire as of a later clock: the row goes; the row without a TTL stays.
        let t = table_mut(&mut db, "k", "t");
        t.expire(now_secs() + 101);
        assert_eq!(t.row_count(), 1);
        let got = rows(run(&mut db, "SELECT ttl(b) FROM k.t WHERE a = 'y'").unwrap());
        assert_eq!(got, vec![vec![None]], "no TTL");
    }

    #[test]
    fn a_tie_goes_to_the_expiring_cell_then_the_later_expiry_then_the_greater_value() {
        let mut db = with_keyspace("k");
        run(&mut db, "CREATE TABLE k.t (a text PRIMARY KEY, b text)").unwrap();
        let ttl = |db: &mut Database| {
            rows(run(db, "SELECT b, ttl(b) FROM k.t WHERE a = 'x'").unwrap())[0]
                .clone()
                .into_iter()
                .map(|v| v.map(|b| b.to_vec()))
                .collect::<Vec<_>>()
        };
        let left = |got: &[Value]| {
            got[1]
                .clone()
                .map(|b| i32::from_be_bytes(b.try_into().unwrap()))
        };
        for stmt in [
            "INSERT INTO k.t (a, b) VALUES ('x', 'v') USING TIMESTAMP 7",
            "INSERT INTO k.t (a, b) VALUES ('x', 'v') USING TIMESTAMP 7 AND TTL 100",
        ] {
            run(&mut db, stmt).unwrap();
        }
        assert!(
            left(&ttl(&mut db)).is_some_and(|s| (99..=100).contains(&s)),
            "expiring wins"
        );
        run(
            &mut db,
            "INSERT INTO k.t (a, b) VALUES ('x', 'v') USING TIMESTAMP 7",
        )
        .unwrap();
        assert!(left(&ttl(&mut db)).is_some(), "and keeps winning");
        run(
            &mut db,
            "INSERT INTO k.t (a, b) VALUES ('x', 'v') USING TIMESTAMP 7 AND TTL 200",
        )
        .unwrap();
        run(
            &mut db,
            "INSERT INTO k.t (a, b) VALUES ('x', 'z') USING TIMESTAMP 7 AND TTL 50",
        )
        .unwrap();
        let got = ttl(&mut db);
        assert_eq!(
            got[0].as_deref(),
            Some(&b"v"[..]),
            "the later expiry beats a greater value"
        );
        assert!(left(&got).is_some_and(|s| (199..=200).contains(&s)));
    }

    #[test]
    fn a_table_default_ttl_applies_to_writes_that_name_none() {
        let mut db = with_keyspace("k");
        run(
            &mut db,
            "CREATE TABLE k.t (a text PRIMARY KEY, b text) WITH default_time_to_live = 100",
        )
        .unwrap();
        run(&mut db, "INSERT INTO k.t (a, b) VALUES ('x', 'v')").unwrap();
        run(
            &mut db,
            "INSERT INTO k.t (a, b) VALUES ('y', 'v') USING TTL 0",
        )
        .unwrap();
        let got = rows(run(&mut db, "SELECT a, ttl(b) FROM k.t").unwrap());
        let by_key: std::collections::HashMap<Vec<u8>, Option<i32>> = got
            .into_iter()
            .map(|r| {
                (
                    r[0].clone().unwrap().to_vec(),
                    r[1].clone()
                        .map(|b| i32::from_be_bytes(b.to_vec().try_into().unwrap())),
                )
            })
            .collect();
        assert!(by_key[&b"x".to_vec()].is_some_and(|s| (99..=100).contains(&s)));
        assert_eq!(by_key[&b"y".to_vec()], None, "TTL 0: never expires");
    }

    #[test]
    fn a_row_whose_insert_expired_keeps_its_key_while_an_updated_cell_lives() {
        let mut db = with_keyspace("k");
        run(
            &mut db,
            "CREATE TABLE k.t (a text PRIMARY KEY, b text, c text)",
        )
        .unwrap();
        run(
            &mut db,
            "INSERT INTO k.t (a, b) VALUES ('x', 'v') USING TTL 100",
        )
        .unwrap();
        run(&mut db, "UPDATE k.t SET c = 'kept' WHERE a = 'x'").unwrap();
        let t = table_mut(&mut db, "k", "t");
        t.expire(now_secs() + 101);
        let got = rows(run(&mut db, "SELECT a, b, c FROM k.t").unwrap());
        assert_eq!(
            got,
            vec![vec![Some(b"x".to_vec()), None, Some(b"kept".to_vec())]]
        );
    }

    #[test]
    fn clustering_order_ranges_limits_and_counts() {
        let mut db = with_keyspace("ks");
        run(&mut db, "CREATE TABLE t (u text, ts timestamp, v int, PRIMARY KEY (u, ts)) WITH CLUSTERING ORDER BY (ts DESC)").unwrap();
        for (ts, v) in [(10, 1), (30, 3), (20, 2)] {
            run(
                &mut db,
                &format!("INSERT INTO t (u, ts, v) VALUES ('a', {ts}, {v})"),
            )
            .unwrap();
        }
        run(&mut db, "INSERT INTO t (u, ts, v) VALUES ('a', 20, 22)").unwrap(); // upsert
        let got = rows(run(&mut db, "SELECT v FROM t WHERE u = 'a'").unwrap());
        let vals: Vec<i32> = got
            .iter()
            .map(|r| i32::from_be_bytes(r[0].clone().unwrap().try_into().unwrap()))
            .collect();
        assert_eq!(vals, [3, 22, 1], "newest first, upsert kept one row");
        let got = rows(
            run(
                &mut db,
                "SELECT v FROM t WHERE u = 'a' AND ts >= 20 ORDER BY ts ASC LIMIT 1",
            )
            .unwrap(),
        );
        assert_eq!(got[0][0], Some(22i32.to_be_bytes().to_vec()));
        let got = rows(run(&mut db, "SELECT COUNT(*) FROM t WHERE u = 'a'").unwrap());
        assert_eq!(got[0][0], Some(3i64.to_be_bytes().to_vec()));
        run(&mut db, "DELETE FROM t WHERE u = 'a' AND ts = 30").unwrap();
        run(&mut db, "TRUNCATE t").unwrap();
        assert!(rows(run(&mut db, "SELECT * FROM t").unwrap()).is_empty());
    }

    /// A write's partition is read from its own terms, bound or literal, and judged by its
    /// keyspace's replication on the ring; reads and system tables are not writes.
    #[test]
    fn a_write_is_on_a_replica_when_the_node_owns_its_partitions() {
        let ip = |n| Ipv4Addr::new(127, 0, 0, n);
        let ring = Ring::with_tokens(vec![
            (ip(1), vec![i64::MIN / 2]),
            (ip(2), vec![0]),
            (ip(3), vec![i64::MAX / 2]),
        ]);
        let mut db = Database::with_ring(ring);
        run(&mut db, "CREATE KEYSPACE k WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}").unwrap();
        run(
            &mut db,
            "CREATE TABLE k.t (a text, b int, c int, v text, PRIMARY KEY ((a, b), c))",
        )
        .unwrap();
        let owner = |db: &Database, a: &str| {
            let token = murmur3::partition_token(&[a.as_bytes(), &1i32.to_be_bytes()]);
            db.ring().replicas(token, 1)[0]
        };
        let prepare = |db: &Database, q: &str| db.prepare(parser::parse(q).unwrap(), None).unwrap();
        let keys: Vec<String> = (0..100).map(|i| format!("key{i}")).collect();
        let x = &keys[0];
        let y = keys
            .iter()
            .find(|k| owner(&db, k) != owner(&db, x))
            .expect("two keys on different nodes");
        let one = Some(1i32.to_be_bytes().to_vec());
        let insert = prepare(&db, "INSERT INTO k.t (a, b, c) VALUES (?, ?, ?)");
        let update = prepare(
            &db,
            &format!("UPDATE k.t SET v = 'z' WHERE a = '{x}' AND b = 1 AND c = ?"),
        );
        let delete_both = prepare(&db, "DELETE FROM k.t WHERE a IN ? AND b = ?");
        let mut both = Vec::new();
        both.int(2);
        for k in [x, y] {
            both.bytes(Some(k.as_bytes()));
        }
        for node in 0..3 {
            for k in [x, y] {
                let bound = [Some(k.as_bytes().to_vec()), one.clone(), one.clone()];
                let want = Some(node == owner(&db, k));
                assert_eq!(
                    db.write_on_replica(node, &insert, &bound),
                    want,
                    "{k} on {node}"
                );
            }
            let want = Some(node == owner(&db, x));
            assert_eq!(
                db.write_on_replica(node, &update, std::slice::from_ref(&one)),
                want,
                "literal key"
            );
            let bound = [Some(both.clone()), one.clone()];
            assert_eq!(
                db.write_on_replica(node, &delete_both, &bound),
                Some(false),
                "no node holds both partitions"
            );
        }
        let read = prepare(&db, "SELECT v FROM k.t WHERE a = ? AND b = ?");
        let bound = [Some(x.as_bytes().to_vec()), one.clone()];
        assert_eq!(db.write_on_replica(0, &read, &bound), None, "a read");
        let system = prepare(&db, "INSERT INTO system.peers (peer) VALUES (?)");
        let bound = [Some(vec![127, 0, 0, 9])];
        assert_eq!(
            db.write_on_replica(0, &system, &bound),
            None,
            "a system table"
        );
    }

    /// NetworkTopologyStrategy's `replication_factor` is stored as ScyllaDB stores it, expanded
    /// to the one datacenter (a datacenter named beside it wins), for vnode and tablet
    /// keyspaces alike, and the keyspace is placed by that factor.
    #[test]
    fn the_nts_replication_factor_shorthand_is_stored_expanded_and_placed_by() {
        let ip = |n| Ipv4Addr::new(127, 0, 0, n);
        let mut db = Database::with_ring(Ring::new(&[ip(1), ip(2), ip(3)]));
        let nts = "'class': 'NetworkTopologyStrategy'";
        for ddl in [
            format!("CREATE KEYSPACE vn WITH replication = {{{nts}, 'replication_factor': 2}}"),
            format!("CREATE KEYSPACE tk WITH replication = {{{nts}, 'replication_factor': 2}} AND tablets = {{'enabled': true}}"),
            format!("CREATE KEYSPACE both WITH replication = {{'replication_factor': 3, {nts}, 'datacenter1': 1}}"),
        ] {
            run(&mut db, &ddl).unwrap();
        }
        let stored = |db: &mut Database, ks: &str| -> Vec<(String, String)> {
            let q = format!(
                "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = '{ks}'"
            );
            let got = rows(run(db, &q).unwrap());
            let map = got[0][0].clone().expect("a replication map");
            let int = |at: &mut usize| {
                let n = i32::from_be_bytes(map[*at..*at + 4].try_into().unwrap()) as usize;
                *at += 4;
                n
            };
            let text = |at: &mut usize| {
                let n = int(at);
                *at += n;
                String::from_utf8(map[*at - n..*at].to_vec()).unwrap()
            };
            let mut at = 0;
            (0..int(&mut at))
                .map(|_| (text(&mut at), text(&mut at)))
                .collect()
        };
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        let class = pair(
            "class",
            "org.apache.cassandra.locator.NetworkTopologyStrategy",
        );
        let expanded = [class.clone(), pair("datacenter1", "2")];
        assert_eq!(stored(&mut db, "vn"), expanded);
        assert_eq!(stored(&mut db, "tk"), expanded, "a tablet keyspace");
        assert_eq!(stored(&mut db, "both"), [class, pair("datacenter1", "1")]);
        for i in 0..20 {
            let token = murmur3::token(format!("k{i}").as_bytes());
            assert_eq!(db.replicas("vn", token), db.ring().replicas(token, 2));
            let tablet = tablets::tablet_for(token, 8, Replication::Factor(2), 3);
            assert_eq!(db.replicas("tk", token), tablet.replicas);
            assert_eq!(db.replicas("both", token), db.ring().replicas(token, 1));
        }
    }

    /// `system_schema.scylla_keyspaces`: each keyspace listed and its `initial_tablets`, by name.
    fn listed(db: &mut Database) -> Vec<(String, i32)> {
        let q = "SELECT keyspace_name, initial_tablets FROM system_schema.scylla_keyspaces";
        let mut got: Vec<(String, i32)> = rows(run(db, q).unwrap())
            .into_iter()
            .map(|r| {
                let name = String::from_utf8(r[0].clone().unwrap()).unwrap();
                let n = i32::from_be_bytes(r[1].clone().unwrap().try_into().unwrap());
                (name, n)
            })
            .collect();
        got.sort();
        got
    }

    /// With tablets by default (ScyllaDB's `tablets_mode_for_new_keyspaces: enabled`), a
    /// NetworkTopologyStrategy keyspace created with no `tablets` option is a tablet keyspace
    /// like one created WITH them: listed in `scylla_keyspaces` with `initial_tablets` 0 and
    /// placed by [`tablets::DEFAULT_TABLETS`] tablets; one that opts out, and a SimpleStrategy
    /// one, keep the ring. The same statements without the setting give vnodes.
    #[test]
    fn tablets_by_default_give_an_nts_keyspace_with_no_option_tablets() {
        let ip = |n| Ipv4Addr::new(127, 0, 0, n);
        let nts = "replication = {'class': 'NetworkTopologyStrategy', 'datacenter1': 1}";
        let simple = "replication = {'class': 'SimpleStrategy', 'replication_factor': 1}";
        let ddl = [
            format!("CREATE KEYSPACE dflt WITH {nts}"),
            format!("CREATE KEYSPACE optout WITH {nts} AND tablets = {{'enabled': false}}"),
            format!("CREATE KEYSPACE given WITH {nts} AND tablets = {{'initial': 4}}"),
            format!("CREATE KEYSPACE simple WITH {simple}"),
        ];
        for by_default in [true, false] {
            let ring = Ring::new(&[ip(1), ip(2), ip(3)]);
            let mut db = Database::with_ring(ring).tablets_by_default(by_default);
            for ddl in &ddl {
                run(&mut db, ddl).unwrap();
            }
            let mut want = vec![("given".to_string(), 4)];
            if by_default {
                want.insert(0, ("dflt".into(), 0));
            }
            assert_eq!(listed(&mut db), want, "by default: {by_default}");
            let mut unlike_the_ring = 0;
            for i in 0..50 {
                let token = murmur3::token(format!("k{i}").as_bytes());
                let ring = db.ring().replicas(token, 1);
                let count = tablets::DEFAULT_TABLETS;
                let tablet = tablets::tablet_for(token, count, Replication::Factor(1), 3);
                if by_default {
                    assert_eq!(db.tablet("dflt", token).as_ref(), Some(&tablet));
                    assert_eq!(db.replicas("dflt", token), tablet.replicas);
                    unlike_the_ring += usize::from(ring != tablet.replicas);
                } else {
                    assert_eq!(db.tablet("dflt", token), None);
                    assert_eq!(db.replicas("dflt", token), ring);
                }
                for vnodes in ["optout", "simple"] {
                    assert_eq!(db.tablet(vnodes, token), None, "{vnodes}");
                    assert_eq!(db.replicas(vnodes, token), ring, "{vnodes}");
                }
            }
            assert_eq!(unlike_the_ring > 0, by_default, "placed by tablet");
        }
    }

    /// A tablet keyspace has a `scylla_keyspaces` row while it exists; its partitions are
    /// placed by tablet, not by the ring; an EXECUTE on a node outside a partition's tablet
    /// answers with that tablet.
    #[test]
    fn a_tablet_keyspace_is_listed_placed_by_tablet_and_reports_its_tablets() {
        let ip = |n| Ipv4Addr::new(127, 0, 0, n);
        let mut db = Database::with_ring(Ring::new(&[ip(1), ip(2), ip(3)]));
        let simple = "replication = {'class': 'SimpleStrategy', 'replication_factor': 1}";
        let nts = "replication = {'class': 'NetworkTopologyStrategy', 'datacenter1': 1}";
        let refused = format!("CREATE KEYSPACE s WITH {simple} AND tablets = {{'enabled': true}}");
        assert!(matches!(
            run(&mut db, &refused),
            Err(EngineError::Invalid(_))
        ));
        for ddl in [
            format!("CREATE KEYSPACE IF NOT EXISTS tk WITH {nts} AND tablets = {{'enabled': true, 'initial': 8}}"),
            format!("CREATE KEYSPACE auto WITH {nts} AND tablets = {{'enabled': true}}"),
            format!("CREATE KEYSPACE vn WITH {simple} AND tablets = {{'enabled': false}}"),
            format!("CREATE KEYSPACE IF NOT EXISTS tk WITH {simple}"),
            "CREATE TABLE tk.t (k text PRIMARY KEY, v text)".into(),
        ] {
            run(&mut db, &ddl).unwrap();
        }
        let bad = format!("CREATE KEYSPACE b WITH {nts} AND tablets = {{'initial': 'many'}}");
        assert!(matches!(run(&mut db, &bad), Err(EngineError::Invalid(_))));
        assert_eq!(listed(&mut db), [("auto".into(), 0), ("tk".into(), 8)]);

        let prepare = |db: &Database, q: &str| db.prepare(parser::parse(q).unwrap(), None).unwrap();
        let insert = prepare(&db, "INSERT INTO tk.t (k, v) VALUES (?, ?)");
        let read = prepare(&db, "SELECT v FROM tk.t WHERE k = ?");
        let ids: Vec<Uuid> = db.ring().nodes().iter().map(|n| n.host_id).collect();
        let mut unlike_the_ring = 0;
        for i in 0..50 {
            let key = format!("k{i}");
            let token = murmur3::token(key.as_bytes());
            let tablet = tablets::tablet_for(token, 8, Replication::Factor(1), 3);
            assert_eq!(db.replicas("tk", token), tablet.replicas);
            unlike_the_ring += usize::from(db.ring().replicas(token, 1) != tablet.replicas);
            let bound = [Some(key.into_bytes()), None];
            for node in 0..3 {
                let on = tablet.replicas.contains(&node);
                assert_eq!(db.write_on_replica(node, &insert, &bound), Some(on));
                let want = (!on).then(|| tablets::payload(&tablet, &ids));
                assert_eq!(
                    db.tablet_payload(node, &insert, &bound),
                    want,
                    "{i} on {node}"
                );
                assert_eq!(db.tablet_payload(node, &read, &bound[..1]), want, "a read");
            }
        }
        assert!(unlike_the_ring > 0, "tablets are not the ring's placement");

        run(&mut db, "DROP KEYSPACE tk").unwrap();
        assert_eq!(listed(&mut db), [("auto".into(), 0)]);
    }

    /// A moved tablet is placed on its new replicas by every placement, for every table of the
    /// keyspace: replicas, tablet, which node serves a write as a replica, the payload; only
    /// a tablet keyspace's tablets move; the move goes with the keyspace.
    #[test]
    fn a_moved_tablet_is_placed_on_its_new_replicas_everywhere() {
        let ip = |n| Ipv4Addr::new(127, 0, 0, n);
        let mut db = Database::with_ring(Ring::new(&[ip(1), ip(2), ip(3)]));
        let nts = "replication = {'class': 'NetworkTopologyStrategy', 'datacenter1': 2}";
        let create = format!("CREATE KEYSPACE tk WITH {nts} AND tablets = {{'enabled': true}}");
        for ddl in [
            create.as_str(),
            "CREATE TABLE tk.a (k text PRIMARY KEY, v text)",
            "CREATE TABLE tk.b (k text PRIMARY KEY, v text)",
            "CREATE KEYSPACE vn WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 2}",
        ] {
            run(&mut db, ddl).unwrap();
        }
        let token = murmur3::token(b"moved");
        let before = db.tablet("tk", token).unwrap();
        let stranger = (0..3).find(|n| !before.replicas.contains(n)).unwrap();
        let to = vec![stranger, before.replicas[0]];
        let after = db.move_tablet("tk", token, to.clone()).unwrap();
        assert_eq!(
            after,
            Tablet {
                replicas: to.clone(),
                ..before.clone()
            }
        );
        assert_eq!(db.tablet("tk", token), Some(after.clone()));
        assert_eq!(db.replicas("tk", token), to);
        // A token of the next tablet, or of the previous one for the last.
        let other = if after.last == i64::MAX {
            after.first
        } else {
            after.last + 1
        };
        assert_eq!(
            db.replicas("tk", other),
            tablets::tablet_for(other, tablets::DEFAULT_TABLETS, Replication::Factor(2), 3)
                .replicas,
            "another tablet stays"
        );
        let ids: Vec<Uuid> = db.ring().nodes().iter().map(|n| n.host_id).collect();
        let bound = [Some(b"moved".to_vec()), None];
        for table in ["a", "b"] {
            let q = format!("INSERT INTO tk.{table} (k, v) VALUES (?, ?)");
            let insert = db.prepare(parser::parse(&q).unwrap(), None).unwrap();
            for node in 0..3 {
                let on = to.contains(&node);
                assert_eq!(db.write_on_replica(node, &insert, &bound), Some(on));
                let want = (!on).then(|| tablets::payload(&after, &ids));
                assert_eq!(
                    db.tablet_payload(node, &insert, &bound),
                    want,
                    "{table} on {node}"
                );
            }
        }
        assert!(db.move_tablet("vn", token, vec![0, 1]).is_err(), "vnodes");
        assert!(db.move_tablet("none", token, vec![0, 1]).is_err());
        assert!(db.move_tablet("tk", token, vec![0, 0]).is_err());
        assert_eq!(
            db.tablet("tk", token),
            Some(after),
            "a refused move moves nothing"
        );
        run(&mut db, "DROP KEYSPACE tk").unwrap();
        run(&mut db, &create).unwrap();
        assert_eq!(
            db.tablet("tk", token),
            Some(before),
            "a new keyspace, placed anew"
        );
    }

    #[test]
    fn schema_tables_follow_ddl() {
        let mut db = with_keyspace("ks");
        run(
            &mut db,
            "CREATE TABLE IF NOT EXISTS ks.t (a text PRIMARY KEY, b int)",
        )
        .unwrap();
        let cols = rows(
            run(
                &mut db,
                "SELECT column_name, kind FROM system_schema.columns WHERE keyspace_name = 'ks'",
            )
            .unwrap(),
        );
        assert_eq!(cols.len(), 2);
        assert!(matches!(
            run(&mut db, "CREATE TABLE ks.t (a text PRIMARY KEY)"),
            Err(EngineError::AlreadyExists { .. })
        ));
        assert!(matches!(
            run(&mut db, "SELECT * FROM nope"),
            Err(EngineError::Invalid(_))
        ));
    }
}

//! A parser for the CQL the stand-in node executes: USE, CREATE KEYSPACE/TABLE, DROP, INSERT,
//! SELECT (columns, *, COUNT(*); WHERE with =, <, <=, >, >=, IN; ORDER BY; LIMIT), DELETE,
//! TRUNCATE; ScyllaDB's `USING TIMEOUT` is read and ignored. Anything else is a syntax error
//! naming what was found.

use crate::cql::types::Literal;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Quoted(String),
    Str(String),
    Int(i64),
    Float(f64),
    Uuid([u8; 16]),
    Blob(Vec<u8>),
    Bind,
    Sym(&'static str),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if s[i..].starts_with("--") || s[i..].starts_with("//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if s[i..].starts_with("/*") {
            i = s[i..].find("*/").map_or(b.len(), |e| i + e + 2);
        } else if i + 36 <= b.len() && is_uuid(&s[i..i + 36]) {
            let u = uuid::Uuid::parse_str(&s[i..i + 36]).map_err(|e| e.to_string())?;
            out.push(Tok::Uuid(*u.as_bytes()));
            i += 36;
        } else if c == b'\'' {
            let mut v = String::new();
            i += 1;
            loop {
                match s[i..].find('\'') {
                    None => return Err("unterminated string literal".into()),
                    Some(e) => {
                        v.push_str(&s[i..i + e]);
                        i += e + 1;
                        if b.get(i) == Some(&b'\'') {
                            v.push('\'');
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            out.push(Tok::Str(v));
        } else if c == b'"' {
            let e = s[i + 1..]
                .find('"')
                .ok_or("unterminated quoted identifier")?;
            out.push(Tok::Quoted(s[i + 1..i + 1 + e].to_owned()));
            i += e + 2;
        } else if (c == b'0') && matches!(b.get(i + 1), Some(b'x' | b'X')) {
            let start = i + 2;
            let mut e = start;
            while e < b.len() && b[e].is_ascii_hexdigit() {
                e += 1;
            }
            let hex = &s[start..e];
            if !hex.len().is_multiple_of(2) {
                return Err(format!("odd-length blob literal 0x{hex}"));
            }
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|k| u8::from_str_radix(&hex[k..k + 2], 16).expect("hex digits"))
                .collect();
            out.push(Tok::Blob(bytes));
            i = e;
        } else if c.is_ascii_digit() || (c == b'-' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            let start = i;
            i += 1;
            let mut float = false;
            while i < b.len()
                && (b[i].is_ascii_digit() || b[i] == b'.' || b[i] == b'e' || b[i] == b'E')
            {
                float |= !b[i].is_ascii_digit();
                i += 1;
            }
            let t = &s[start..i];
            out.push(if float {
                Tok::Float(t.parse().map_err(|_| format!("bad number {t}"))?)
            } else {
                Tok::Int(t.parse().map_err(|_| format!("bad number {t}"))?)
            });
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(s[start..i].to_ascii_lowercase()));
        } else if c == b'?' {
            out.push(Tok::Bind);
            i += 1;
        } else if c == b':' && b.get(i + 1).is_some_and(|c| c.is_ascii_alphabetic()) {
            // Named bind marker: treated positionally.
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Bind);
        } else {
            let two = s.get(i..i + 2).unwrap_or("");
            let sym = ["<=", ">=", "!="].into_iter().find(|t| *t == two);
            if let Some(t) = sym {
                out.push(Tok::Sym(t));
                i += 2;
            } else {
                let one = [
                    "(", ")", ",", ";", ".", "=", "<", ">", "*", "{", "}", ":", "[", "]", "+", "-",
                ]
                .into_iter()
                .find(|t| t.as_bytes()[0] == c)
                .ok_or_else(|| format!("unexpected character '{}'", c as char))?;
                out.push(Tok::Sym(one));
                i += 1;
            }
        }
    }
    Ok(out)
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// A value in a statement: a literal or the n-th bind marker.
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    Lit(Literal),
    Bind(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
    In,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RelValue {
    One(Term),
    /// `IN (a, b)`: each element a term.
    List(Vec<Term>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub column: String,
    pub op: Op,
    pub value: RelValue,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TableRef {
    pub keyspace: Option<String>,
    pub table: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    Star,
    Count,
    Columns(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    Use(String),
    CreateKeyspace {
        name: String,
        if_not_exists: bool,
        replication: Vec<(String, String)>,
        /// The `tablets` option's map (`'enabled'`, `'initial'`); empty when not given.
        tablets: Vec<(String, String)>,
    },
    CreateTable {
        table: TableRef,
        if_not_exists: bool,
        columns: Vec<(String, String)>,
        partition_key: Vec<String>,
        clustering: Vec<String>,
        descending: Vec<String>,
        default_ttl: Option<i64>,
        /// `gc_grace_seconds`: how long a tombstone outlives its delete before compaction may
        /// purge it; `None` when not given (the table's default).
        gc_grace_seconds: Option<i64>,
    },
    DropTable {
        table: TableRef,
        if_exists: bool,
    },
    DropKeyspace {
        name: String,
        if_exists: bool,
    },
    Insert {
        table: TableRef,
        columns: Vec<String>,
        values: Vec<Term>,
        /// `USING TIMESTAMP t` (microseconds): the write timestamp of every cell written.
        timestamp: Option<Term>,
        /// `USING TTL s`: the cells written expire `s` seconds after the write (0: never).
        ttl: Option<Term>,
    },
    Select {
        table: TableRef,
        selection: Selection,
        relations: Vec<Relation>,
        order_desc: Option<bool>,
        limit: Option<Term>,
    },
    Delete {
        table: TableRef,
        relations: Vec<Relation>,
        /// `USING TIMESTAMP t`: the tombstone's timestamp (else the server clock).
        timestamp: Option<Term>,
    },
    Truncate(TableRef),
    /// `ALTER TABLE t ADD column type`.
    AlterAdd {
        table: TableRef,
        column: String,
        ty: String,
    },
}

impl Statement {
    /// Bind markers in the statement, in order.
    pub fn bind_count(&self) -> usize {
        let mut n = 0;
        let mut count = |t: &Term| {
            if let Term::Bind(i) = t {
                n = n.max(i + 1);
            }
        };
        match self {
            Statement::Insert {
                values,
                timestamp,
                ttl,
                ..
            } => values
                .iter()
                .chain(timestamp)
                .chain(ttl)
                .for_each(&mut count),
            Statement::Select {
                relations, limit, ..
            } => {
                rel_terms(relations).for_each(&mut count);
                limit.iter().for_each(&mut count);
            }
            Statement::Delete {
                relations,
                timestamp,
                ..
            } => rel_terms(relations).chain(timestamp).for_each(&mut count),
            _ => {}
        }
        n
    }
}

fn rel_terms(rels: &[Relation]) -> impl Iterator<Item = &Term> {
    rels.iter().flat_map(|r| match &r.value {
        RelValue::One(t) => std::slice::from_ref(t).iter(),
        RelValue::List(ts) => ts.iter(),
    })
}

struct P {
    toks: Vec<Tok>,
    pos: usize,
    binds: usize,
}

pub fn parse(query: &str) -> Result<Statement, String> {
    let mut p = P {
        toks: tokenize(query)?,
        pos: 0,
        binds: 0,
    };
    let st = p.statement()?;
    p.eat_sym(";");
    if p.pos < p.toks.len() {
        return Err(format!(
            "unexpected {:?} after the statement",
            p.toks[p.pos]
        ));
    }
    Ok(st)
}

impl P {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Result<Tok, String> {
        let t = self
            .toks
            .get(self.pos)
            .cloned()
            .ok_or("unexpected end of statement")?;
        self.pos += 1;
        Ok(t)
    }
    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(i)) if i == kw)
    }
    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.is_kw(kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn kw(&mut self, kw: &str) -> Result<(), String> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            Err(format!(
                "expected {} but found {:?}",
                kw.to_uppercase(),
                self.peek()
            ))
        }
    }
    fn eat_sym(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(t)) if *t == s) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn sym(&mut self, s: &str) -> Result<(), String> {
        if self.eat_sym(s) {
            Ok(())
        } else {
            Err(format!("expected '{s}' but found {:?}", self.peek()))
        }
    }
    fn ident(&mut self) -> Result<String, String> {
        match self.next()? {
            Tok::Ident(i) | Tok::Quoted(i) => Ok(i),
            t => Err(format!("expected a name but found {t:?}")),
        }
    }
    fn if_not_exists(&mut self) -> Result<bool, String> {
        if self.eat_kw("if") {
            self.kw("not")?;
            self.kw("exists")?;
            Ok(true)
        } else {
            Ok(false)
        }
    }
    fn table_ref(&mut self) -> Result<TableRef, String> {
        let first = self.ident()?;
        if self.eat_sym(".") {
            Ok(TableRef {
                keyspace: Some(first),
                table: self.ident()?,
            })
        } else {
            Ok(TableRef {
                keyspace: None,
                table: first,
            })
        }
    }

    fn statement(&mut self) -> Result<Statement, String> {
        match self.next()? {
            Tok::Ident(k) if k == "use" => Ok(Statement::Use(self.ident()?)),
            Tok::Ident(k) if k == "create" => self.create(),
            Tok::Ident(k) if k == "drop" => self.drop(),
            Tok::Ident(k) if k == "insert" => self.insert(),
            Tok::Ident(k) if k == "update" => self.update(),
            Tok::Ident(k) if k == "select" => self.select(),
            Tok::Ident(k) if k == "delete" => {
                self.kw("from")?;
                let table = self.table_ref()?;
                let (timestamp, ttl) = self.using()?;
                if ttl.is_some() {
                    return Err("a DELETE takes no TTL".into());
                }
                self.kw("where")?;
                Ok(Statement::Delete {
                    table,
                    relations: self.relations()?,
                    timestamp,
                })
            }
            Tok::Ident(k) if k == "alter" => {
                self.kw("table")?;
                let table = self.table_ref()?;
                self.kw("add")?;
                let column = self.ident()?;
                let ty = self.type_text()?;
                Ok(Statement::AlterAdd { table, column, ty })
            }
            Tok::Ident(k) if k == "truncate" => {
                self.eat_kw("table");
                Ok(Statement::Truncate(self.table_ref()?))
            }
            t => Err(format!("statement {t:?} is not supported by the stand-in node (USE, CREATE, ALTER TABLE ... ADD, DROP, INSERT, UPDATE, SELECT, DELETE, TRUNCATE are)")),
        }
    }

    fn create(&mut self) -> Result<Statement, String> {
        if self.eat_kw("keyspace") {
            let if_not_exists = self.if_not_exists()?;
            let name = self.ident()?;
            let (mut replication, mut tablets) = (Vec::new(), Vec::new());
            if self.eat_kw("with") {
                loop {
                    let opt = self.ident()?;
                    self.sym("=")?;
                    let into = match opt.as_str() {
                        "replication" => Some(&mut replication),
                        "tablets" => Some(&mut tablets),
                        _ => None,
                    };
                    match (into, self.literal()?) {
                        (Some(into), Literal::Map(entries)) => {
                            into.extend(entries.iter().map(|(k, v)| (lit_text(k), lit_text(v))));
                        }
                        (Some(_), other) => {
                            return Err(format!("{opt} must be a map, not {other:?}"));
                        }
                        (None, _) => {}
                    }
                    if !self.eat_kw("and") {
                        break;
                    }
                }
            }
            return Ok(Statement::CreateKeyspace {
                name,
                if_not_exists,
                replication,
                tablets,
            });
        }
        self.kw("table")?;
        let if_not_exists = self.if_not_exists()?;
        let table = self.table_ref()?;
        self.sym("(")?;
        let mut columns = Vec::new();
        let mut partition_key = Vec::new();
        let mut clustering = Vec::new();
        loop {
            if self.eat_kw("primary") {
                self.kw("key")?;
                self.sym("(")?;
                if self.eat_sym("(") {
                    loop {
                        partition_key.push(self.ident()?);
                        if !self.eat_sym(",") {
                            break;
                        }
                    }
                    self.sym(")")?;
                } else {
                    partition_key.push(self.ident()?);
                }
                while self.eat_sym(",") {
                    clustering.push(self.ident()?);
                }
                self.sym(")")?;
            } else {
                let name = self.ident()?;
                let ty = self.type_text()?;
                if self.eat_kw("primary") {
                    self.kw("key")?;
                    partition_key.push(name.clone());
                }
                columns.push((name, ty));
            }
            if !self.eat_sym(",") {
                break;
            }
        }
        self.sym(")")?;
        let mut descending = Vec::new();
        let mut default_ttl = None;
        let mut gc_grace_seconds = None;
        if self.eat_kw("with") {
            loop {
                if self.eat_kw("clustering") {
                    self.kw("order")?;
                    self.kw("by")?;
                    self.sym("(")?;
                    loop {
                        let c = self.ident()?;
                        if self.eat_kw("desc") {
                            descending.push(c);
                        } else {
                            self.eat_kw("asc");
                        }
                        if !self.eat_sym(",") {
                            break;
                        }
                    }
                    self.sym(")")?;
                } else {
                    let opt = self.ident()?;
                    self.sym("=")?;
                    let v = self.literal()?;
                    match (opt.as_str(), v) {
                        ("default_time_to_live", Literal::Int(i)) => default_ttl = Some(i),
                        ("gc_grace_seconds", Literal::Int(i)) => gc_grace_seconds = Some(i),
                        ("gc_grace_seconds", other) => {
                            return Err(format!(
                                "gc_grace_seconds must be an integer, not {other:?}"
                            ));
                        }
                        _ => {}
                    }
                }
                if !self.eat_kw("and") {
                    break;
                }
            }
        }
        if partition_key.is_empty() {
            return Err("CREATE TABLE needs a PRIMARY KEY".into());
        }
        Ok(Statement::CreateTable {
            table,
            if_not_exists,
            columns,
            partition_key,
            clustering,
            descending,
            default_ttl,
            gc_grace_seconds,
        })
    }

    /// A type as text, e.g. `map<text, text>`.
    fn type_text(&mut self) -> Result<String, String> {
        let mut t = self.ident()?;
        if self.eat_sym("<") {
            t.push('<');
            loop {
                t.push_str(&self.type_text()?);
                if self.eat_sym(",") {
                    t.push_str(", ");
                } else {
                    break;
                }
            }
            self.sym(">")?;
            t.push('>');
        }
        Ok(t)
    }

    fn drop(&mut self) -> Result<Statement, String> {
        let keyspace = if self.eat_kw("keyspace") {
            true
        } else {
            self.kw("table")?;
            false
        };
        let if_exists = if self.eat_kw("if") {
            self.kw("exists")?;
            true
        } else {
            false
        };
        if keyspace {
            Ok(Statement::DropKeyspace {
                name: self.ident()?,
                if_exists,
            })
        } else {
            Ok(Statement::DropTable {
                table: self.table_ref()?,
                if_exists,
            })
        }
    }

    fn insert(&mut self) -> Result<Statement, String> {
        self.kw("into")?;
        let table = self.table_ref()?;
        self.sym("(")?;
        let mut columns = vec![self.ident()?];
        while self.eat_sym(",") {
            columns.push(self.ident()?);
        }
        self.sym(")")?;
        self.kw("values")?;
        self.sym("(")?;
        let mut values = vec![self.term()?];
        while self.eat_sym(",") {
            values.push(self.term()?);
        }
        self.sym(")")?;
        if columns.len() != values.len() {
            return Err(format!(
                "{} columns but {} values",
                columns.len(),
                values.len()
            ));
        }
        if self.eat_kw("if") {
            self.kw("not")?;
            self.kw("exists")?;
        }
        let (timestamp, ttl) = self.using()?;
        Ok(Statement::Insert {
            table,
            columns,
            values,
            timestamp,
            ttl,
        })
    }

    /// An optional `USING TIMESTAMP t [AND TTL s] [AND TIMEOUT d]` (any order): the first two
    /// terms (see [`Self::timeout`] for the third).
    fn using(&mut self) -> Result<(Option<Term>, Option<Term>), String> {
        let (mut timestamp, mut ttl) = (None, None);
        if self.eat_kw("using") {
            loop {
                match self.ident()?.as_str() {
                    "timestamp" => timestamp = Some(self.term()?),
                    "ttl" => ttl = Some(self.term()?),
                    "timeout" => self.timeout()?,
                    other => return Err(format!("USING {other} is not supported")),
                }
                if !self.eat_kw("and") {
                    break;
                }
            }
        }
        Ok((timestamp, ttl))
    }

    /// The duration of ScyllaDB's `USING TIMEOUT` (`30000ms`, `1h30m`), which drivers append
    /// once they see a ScyllaDB node: read and ignored, as the stand-in answers at once.
    fn timeout(&mut self) -> Result<(), String> {
        match self.next()? {
            Tok::Int(n) if n >= 0 => {}
            t => return Err(format!("expected a duration after TIMEOUT, found {t:?}")),
        }
        // `30000ms` reads as 30000 then `ms`; `1h30m` as 1 then `h30m`.
        match self.next()? {
            Tok::Ident(unit) if unit.starts_with(|c: char| c.is_ascii_alphabetic()) => Ok(()),
            t => Err(format!(
                "expected a duration unit after TIMEOUT, found {t:?}"
            )),
        }
    }

    /// `UPDATE t [USING TIMESTAMP t] [AND TTL s] SET c = v, ... WHERE key = v AND ...`: an
    /// upsert of the SET cells into the row the WHERE clause names (every primary key column by
    /// `=`), with the same write timestamp and TTL rules as INSERT.
    fn update(&mut self) -> Result<Statement, String> {
        let table = self.table_ref()?;
        let (timestamp, ttl) = self.using()?;
        self.kw("set")?;
        let (mut columns, mut values) = (Vec::new(), Vec::new());
        loop {
            columns.push(self.ident()?);
            self.sym("=")?;
            values.push(self.term()?);
            if !self.eat_sym(",") {
                break;
            }
        }
        self.kw("where")?;
        for r in self.relations()? {
            match (r.op, r.value) {
                (Op::Eq, RelValue::One(term)) => {
                    columns.push(r.column);
                    values.push(term);
                }
                _ => {
                    return Err(format!(
                        "UPDATE names its row by key = value; {} is not",
                        r.column
                    ))
                }
            }
        }
        Ok(Statement::Insert {
            table,
            columns,
            values,
            timestamp,
            ttl,
        })
    }

    fn select(&mut self) -> Result<Statement, String> {
        let selection = if self.eat_sym("*") {
            Selection::Star
        } else if self.is_kw("count") && matches!(self.toks.get(self.pos + 1), Some(Tok::Sym("(")))
        {
            self.pos += 2;
            if !self.eat_sym("*") {
                self.ident()?;
            }
            self.sym(")")?;
            if self.eat_kw("as") {
                self.ident()?;
            }
            Selection::Count
        } else {
            let mut cols = vec![self.selector()?];
            while self.eat_sym(",") {
                cols.push(self.selector()?);
            }
            Selection::Columns(cols)
        };
        self.kw("from")?;
        let table = self.table_ref()?;
        let relations = if self.eat_kw("where") {
            self.relations()?
        } else {
            Vec::new()
        };
        let mut order_desc = None;
        if self.eat_kw("order") {
            self.kw("by")?;
            self.ident()?;
            order_desc = Some(self.eat_kw("desc"));
            if order_desc == Some(false) {
                self.eat_kw("asc");
            }
        }
        let limit = if self.eat_kw("limit") {
            Some(self.term()?)
        } else {
            None
        };
        if self.eat_kw("allow") {
            self.kw("filtering")?;
        }
        if self.eat_kw("bypass") {
            self.kw("cache")?;
        }
        if self.eat_kw("using") {
            self.kw("timeout")?;
            self.timeout()?;
        }
        Ok(Statement::Select {
            table,
            selection,
            relations,
            order_desc,
            limit,
        })
    }

    fn relations(&mut self) -> Result<Vec<Relation>, String> {
        let mut out = Vec::new();
        loop {
            let column = self.ident()?;
            let op = match self.next()? {
                Tok::Sym("=") => Op::Eq,
                Tok::Sym("<") => Op::Lt,
                Tok::Sym("<=") => Op::Le,
                Tok::Sym(">") => Op::Gt,
                Tok::Sym(">=") => Op::Ge,
                Tok::Ident(i) if i == "in" => Op::In,
                t => return Err(format!("unsupported relation operator {t:?}")),
            };
            let value = if op == Op::In && self.eat_sym("(") {
                let mut items = Vec::new();
                if !self.eat_sym(")") {
                    loop {
                        items.push(self.term()?);
                        if !self.eat_sym(",") {
                            break;
                        }
                    }
                    self.sym(")")?;
                }
                RelValue::List(items)
            } else {
                RelValue::One(self.term()?)
            };
            out.push(Relation { column, op, value });
            if !self.eat_kw("and") {
                break;
            }
        }
        Ok(out)
    }

    /// A selected column, or `writetime(column)` (named so in the result).
    fn selector(&mut self) -> Result<String, String> {
        let name = self.ident()?;
        for function in ["writetime", "ttl"] {
            if name.eq_ignore_ascii_case(function) && self.eat_sym("(") {
                let column = self.ident()?;
                self.sym(")")?;
                return Ok(format!("{function}({column})"));
            }
        }
        Ok(name)
    }

    fn term(&mut self) -> Result<Term, String> {
        if self.eat_bind() {
            let i = self.binds;
            self.binds += 1;
            return Ok(Term::Bind(i));
        }
        Ok(Term::Lit(self.literal()?))
    }

    fn eat_bind(&mut self) -> bool {
        if self.peek() == Some(&Tok::Bind) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn literal(&mut self) -> Result<Literal, String> {
        Ok(match self.next()? {
            Tok::Str(s) => Literal::Str(s),
            Tok::Int(i) => Literal::Int(i),
            Tok::Float(f) => Literal::Float(f),
            Tok::Uuid(u) => Literal::Uuid(u),
            Tok::Blob(b) => Literal::Blob(b),
            Tok::Ident(i) if i == "true" => Literal::Bool(true),
            Tok::Ident(i) if i == "false" => Literal::Bool(false),
            Tok::Ident(i) if i == "null" => Literal::Null,
            Tok::Sym("[") => Literal::List(self.items("]")?),
            Tok::Sym("{") => {
                if self.eat_sym("}") {
                    return Ok(Literal::Map(Vec::new()));
                }
                let first = self.literal()?;
                if self.eat_sym(":") {
                    let mut entries = vec![(first, self.literal()?)];
                    while self.eat_sym(",") {
                        let k = self.literal()?;
                        self.sym(":")?;
                        entries.push((k, self.literal()?));
                    }
                    self.sym("}")?;
                    Literal::Map(entries)
                } else {
                    let mut items = vec![first];
                    while self.eat_sym(",") {
                        items.push(self.literal()?);
                    }
                    self.sym("}")?;
                    Literal::List(items)
                }
            }
            t => return Err(format!("expected a value but found {t:?}")),
        })
    }

    fn items(&mut self, close: &str) -> Result<Vec<Literal>, String> {
        let mut items = Vec::new();
        if self.eat_sym(close) {
            return Ok(items);
        }
        loop {
            items.push(self.literal()?);
            if !self.eat_sym(",") {
                break;
            }
        }
        self.sym(close)?;
        Ok(items)
    }
}

fn lit_text(l: &Literal) -> String {
    match l {
        Literal::Str(s) => s.clone(),
        Literal::Int(i) => i.to_string(),
        Literal::Float(f) => f.to_string(),
        Literal::Bool(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_vault_table() {
        let st = parse(
            "CREATE TABLE IF NOT EXISTS vault.user_activity (user_id text, day date, occurred_at timestamp, event_id uuid, attributes map<text, text>, \
             PRIMARY KEY ((user_id, day), occurred_at, event_id)) WITH CLUSTERING ORDER BY (occurred_at DESC, event_id ASC) AND default_time_to_live = 0;",
        )
        .unwrap();
        match st {
            Statement::CreateTable {
                partition_key,
                clustering,
                descending,
                columns,
                ..
            } => {
                assert_eq!(partition_key, ["user_id", "day"]);
                assert_eq!(clustering, ["occurred_at", "event_id"]);
                assert_eq!(descending, ["occurred_at"]);
                assert_eq!(columns[4].1, "map<text, text>");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn table_options_come_in_any_order_with_clustering_order() {
        let st = parse(
            "CREATE TABLE k.t (p text, c int, v text, PRIMARY KEY (p, c)) WITH gc_grace_seconds = 0 \
             AND compaction = {'class': 'SizeTieredCompactionStrategy'} AND CLUSTERING ORDER BY (c DESC) \
             AND tombstone_gc = {'mode': 'timeout'} AND default_time_to_live = 5",
        )
        .unwrap();
        match st {
            Statement::CreateTable {
                descending,
                default_ttl,
                gc_grace_seconds,
                ..
            } => {
                assert_eq!(descending, ["c"]);
                assert_eq!(default_ttl, Some(5));
                assert_eq!(gc_grace_seconds, Some(0));
            }
            other => panic!("{other:?}"),
        }
        match parse("CREATE TABLE k.t (p text PRIMARY KEY)").unwrap() {
            Statement::CreateTable {
                gc_grace_seconds, ..
            } => assert_eq!(gc_grace_seconds, None, "the table's default"),
            other => panic!("{other:?}"),
        }
        assert!(
            parse("CREATE TABLE k.t (p text PRIMARY KEY) WITH gc_grace_seconds = 'soon'").is_err()
        );
    }

    #[test]
    fn numbers_bind_markers_in_order() {
        let st = parse("SELECT * FROM t WHERE a = ? AND b IN (?, ?) AND c >= 'x' LIMIT ?").unwrap();
        assert_eq!(st.bind_count(), 4);
        let st = parse(
            "INSERT INTO ks.t (a, b) VALUES (?, 6f1c3a52-5a0e-4b7e-9d61-1d2b6c1a9e01) USING TTL 5",
        )
        .unwrap();
        assert_eq!(st.bind_count(), 1);
    }

    /// ScyllaDB's `USING TIMEOUT`, which drivers add on seeing a ScyllaDB node, reads (and is
    /// ignored) after a SELECT and among a write's USING options.
    #[test]
    fn using_timeout_is_read_and_ignored() {
        let plain = parse("SELECT a FROM t WHERE b = ?").unwrap();
        let timed =
            parse("SELECT a FROM t WHERE b = ? BYPASS CACHE USING TIMEOUT 30000ms").unwrap();
        assert_eq!(timed, plain);
        let st = parse("INSERT INTO t (a) VALUES (?) USING TIMEOUT 1h30m AND TTL ?").unwrap();
        assert_eq!(st.bind_count(), 2);
        let st = parse("DELETE FROM t USING TIMEOUT 5s AND TIMESTAMP 3 WHERE a = ?").unwrap();
        assert!(matches!(
            st,
            Statement::Delete {
                timestamp: Some(_),
                ..
            }
        ));
        assert!(parse("SELECT a FROM t USING TIMEOUT soon").is_err());
        assert!(parse("DELETE FROM t USING TTL 5 WHERE a = 1").is_err());
    }

    /// `tablets = {...}` is read beside the replication map, in either order.
    #[test]
    fn create_keyspace_reads_the_tablets_option() {
        let st = parse("CREATE KEYSPACE IF NOT EXISTS k WITH tablets = {'enabled': true, 'initial': 8} AND replication = {'class': 'SimpleStrategy', 'replication_factor': 2} AND durable_writes = true").unwrap();
        let Statement::CreateKeyspace {
            if_not_exists,
            replication,
            tablets,
            ..
        } = st
        else {
            panic!("{st:?}");
        };
        assert!(if_not_exists);
        assert_eq!(replication.len(), 2);
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(tablets, [pair("enabled", "true"), pair("initial", "8")]);
        assert!(parse("CREATE KEYSPACE k WITH tablets = 4").is_err());
    }

    #[test]
    fn unsupported_statements_say_what_they_are() {
        let err = parse("GRANT SELECT ON t TO someone").unwrap_err();
        assert!(err.contains("grant"), "{err}");
    }

    #[test]
    fn an_update_is_an_upsert_of_its_row_with_the_same_binds() {
        let st = parse("UPDATE t USING TIMESTAMP ? SET a = ? WHERE b = ? AND c = 3").unwrap();
        assert_eq!(st.bind_count(), 3);
        match st {
            Statement::Insert {
                columns, timestamp, ..
            } => {
                assert_eq!(columns, ["a", "b", "c"]);
                assert_eq!(timestamp, Some(Term::Bind(0)));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse("UPDATE t SET a = 1 WHERE b > 2").is_err());
    }
}

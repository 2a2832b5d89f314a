//! Programmable faults of the stand-in node: an error, a delay or a dropped connection for the
//! next n matching requests (or with a probability), matched by opcode and statement text.

use std::time::Duration;

use crate::cql::frame::Opcode;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    WriteTimeout,
    ReadTimeout,
    Unavailable,
    Overloaded,
    ServerError,
    /// Answer normally, after this delay.
    Delay(Duration),
    /// Close the connection without answering.
    DropConnection,
}

impl FaultKind {
    /// Parses the names used by the sandbox control port: `write-timeout`, `read-timeout`,
    /// `unavailable`, `overloaded`, `server-error`, `drop`, `delay:<duration>`.
    pub fn parse(s: &str) -> Result<FaultKind, String> {
        Ok(match s {
            "write-timeout" => FaultKind::WriteTimeout,
            "read-timeout" => FaultKind::ReadTimeout,
            "unavailable" => FaultKind::Unavailable,
            "overloaded" => FaultKind::Overloaded,
            "server-error" => FaultKind::ServerError,
            "drop" => FaultKind::DropConnection,
            other => match other.strip_prefix("delay:") {
                Some(d) => FaultKind::Delay(humantime::parse_duration(d).map_err(|e| format!("bad delay {d}: {e}"))?),
                None => return Err(format!("unknown fault '{other}' (write-timeout, read-timeout, unavailable, overloaded, server-error, drop, delay:<duration>)")),
            },
        })
    }
}

/// One fault rule. Build with [`Fault::new`] and the builder methods.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    /// Opcodes it applies to; empty means QUERY, PREPARE, EXECUTE and BATCH.
    pub opcodes: Vec<Opcode>,
    /// Only requests whose statement text contains this (case-insensitive).
    pub statement_contains: Option<String>,
    /// Requests left to hit; `None` means until cleared.
    pub remaining: Option<u64>,
    /// Chance of hitting a matching request.
    pub probability: f64,
}

impl Fault {
    pub fn new(kind: FaultKind) -> Fault {
        Fault {
            kind,
            opcodes: Vec::new(),
            statement_contains: None,
            remaining: None,
            probability: 1.0,
        }
    }

    pub fn times(mut self, n: u64) -> Fault {
        self.remaining = Some(n);
        self
    }

    pub fn on(mut self, opcodes: &[Opcode]) -> Fault {
        self.opcodes = opcodes.to_vec();
        self
    }

    pub fn matching(mut self, text: &str) -> Fault {
        self.statement_contains = Some(text.to_ascii_lowercase());
        self
    }

    pub fn probability(mut self, p: f64) -> Fault {
        self.probability = p.clamp(0.0, 1.0);
        self
    }

    pub(crate) fn matches(&self, opcode: Opcode, statement: &str) -> bool {
        let op_ok = if self.opcodes.is_empty() {
            matches!(
                opcode,
                Opcode::Query | Opcode::Prepare | Opcode::Execute | Opcode::Batch
            )
        } else {
            self.opcodes.contains(&opcode)
        };
        op_ok
            && self.remaining != Some(0)
            && self
                .statement_contains
                .as_ref()
                .is_none_or(|t| statement.to_ascii_lowercase().contains(t))
    }
}

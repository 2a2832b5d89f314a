//! What `vault produce` records for `vault verify`: one JSON line per message produced.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Produced {
    /// Kafka partition and offset.
    pub p: i32,
    pub o: i64,
    /// For valid events: event id, user, UTC day (days since epoch). Absent for invalid ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<uuid::Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub u: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d: Option<i64>,
    /// A re-send of an earlier event (same id).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dup: bool,
}

pub struct Writer(BufWriter<std::fs::File>);

impl Writer {
    pub fn create(path: &Path) -> std::io::Result<Writer> {
        Ok(Writer(BufWriter::new(std::fs::File::create(path)?)))
    }

    pub fn write(&mut self, p: &Produced) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.0, p)?;
        self.0.write_all(b"\n")
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

pub fn read(path: &Path) -> std::io::Result<Vec<Produced>> {
    let f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    for (n, line) in BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}:{}: {e}", path.display(), n + 1),
            )
        })?);
    }
    Ok(out)
}

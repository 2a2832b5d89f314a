//! Progress of long-running tools on stderr: a redrawn line on a terminal, a line every few
//! seconds otherwise (so CI logs show it too).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    started: Instant,
    last: Instant,
    tty: bool,
}

impl Progress {
    pub fn new(what: &'static str, total: Option<u64>) -> Self {
        let now = Instant::now();
        Progress {
            what,
            total,
            started: now,
            last: now - Duration::from_secs(60),
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Reports `done` units (redraws at most a few times per second).
    pub fn update(&mut self, done: u64, detail: &str) {
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(3)
        };
        if self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let line = self.line(done, detail);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Ends the progress line.
    pub fn finish(&mut self, done: u64, detail: &str) {
        let line = self.line(done, detail);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = writeln!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn line(&self, done: u64, detail: &str) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        match self.total {
            Some(t) if t > 0 => {
                let pct = (done as f64 * 100.0 / t as f64).min(100.0);
                let filled = (pct / 5.0) as usize;
                format!(
                    "{:<8} [{}{}] {pct:5.1}% {done}/{t} {rate:.0}/s {detail}",
                    self.what,
                    "#".repeat(filled),
                    "-".repeat(20 - filled)
                )
            }
            _ => format!("{:<8} {done} {rate:.0}/s {detail}", self.what),
        }
    }
}

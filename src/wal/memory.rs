//! A log that keeps nothing: every record is "durable" as soon as it is submitted. Used with
//! `--data-dir none` (tests, benchmarks and throwaway data): a restart starts empty.

use super::{Completion, Log, LogStats, Record, Unavailable};

#[derive(Default)]
pub struct MemoryLog {
    next_seq: u64,
    submitted_through: u64,
    stats: LogStats,
}

impl MemoryLog {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Log for MemoryLog {
    fn append(&mut self, _record: Record) -> Result<u64, Unavailable> {
        self.next_seq += 1;
        self.stats.records_total += 1;
        Ok(self.next_seq)
    }

    fn submit(&mut self) {
        if self.submitted_through < self.next_seq {
            self.stats.batches_total += 1;
        }
        self.submitted_through = self.next_seq;
    }

    fn poll(&mut self) -> Completion {
        Completion {
            durable_through: self.submitted_through,
            failed_from: None,
        }
    }

    fn in_flight(&self) -> bool {
        false
    }

    fn refusing(&self) -> Option<String> {
        None
    }

    fn stats(&self) -> LogStats {
        self.stats.clone()
    }
}

//! Opening the data directory: lock it, recover the store and idempotency keys from the
//! newest snapshot and the log after it, and open the write-ahead log ([`crate::wal`]).

use std::path::Path;

use log::info;

use crate::cli::{FsyncPolicy, Settings};
use crate::stock::{Holds, IdempotencyCache, Store};
use crate::wal::{recovery, Log, LogOptions};

/// Recovers the store from `dir` and opens its log. Errors are for the operator: another
/// process holds the dir, or a file is corrupt (named, with the byte offset).
pub fn open(
    dir: &Path,
    settings: &Settings,
    keys: IdempotencyCache,
    holds: Holds,
) -> Result<(Store, IdempotencyCache, Holds, Box<dyn Log>), String> {
    let options = LogOptions {
        sync: settings.fsync == FsyncPolicy::Always,
        snapshot_log_bytes: settings.snapshot_log_bytes,
    };
    if !options.sync {
        log::warn!(
            "--fsync never: acknowledged writes survive a process crash but not a power loss \
             or kernel crash; for benchmarks and throwaway data only"
        );
    }
    let recovered = recovery::open_with_holds(dir, options, keys, holds, super::now_secs())
        .map_err(|e| format!("cannot open data dir {}: {e}", dir.display()))?;
    let report = &recovered.report;
    info!(
        "recovered {} in {} ms: snapshot {} ({} SKUs, {} keys), {} log segments ({} bytes), \
         {} records replayed, next record {}{}",
        dir.display(),
        report.elapsed.as_millis(),
        report
            .snapshot
            .as_ref()
            .map_or("none".to_string(), |p| p.display().to_string()),
        report.snapshot_states,
        report.snapshot_keys,
        report.segments,
        report.log_bytes,
        report.records_replayed,
        report.next_seq,
        match &report.torn_tail {
            Some((path, offset, cut)) => format!(
                "; cut a torn tail of {cut} bytes at {}:{offset}",
                path.display()
            ),
            None => String::new(),
        }
    );
    Ok((
        recovered.store,
        recovered.keys,
        recovered.holds,
        Box::new(recovered.log),
    ))
}

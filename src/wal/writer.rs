//! The disk log: group commit on a dedicated thread, failure handling, snapshot scheduling.
//!
//! Loop side ([`DiskLog`], the [`Log`] the service commits through):
//! - `append` encodes the record into the pending buffer (nothing is written yet).
//! - `submit` (once per loop iteration, in `before_sleep`) sends the pending buffer to the log
//!   thread as one batch, unless a batch is still being written: then the records keep
//!   piling up and go out together as soon as it is done. So one batch holds at least one
//!   iteration's records and one write plus one fdatasync serve all of them (group commit).
//! - `poll` drains the log thread's reports (`durable_through`, `failed_from`).
//!
//! Log thread: writes each batch at the end of the current segment with `pwrite`, then
//! fdatasync (skipped with `--fsync never`), and wakes the loop with the mio `Waker`. The loop
//! never waits for the disk.
//!
//! Failure (ENOSPC, EIO, EFBIG): the batch fails, and so does everything appended after it
//! (it was computed on top of it); the service undoes them all and answers `unavailable`.
//! The partial write is cut off with ftruncate to the last good offset (as Redis'
//! `flushAppendOnlyFile` does), and the log refuses appends (`refusing()`, /healthz 503)
//! while the thread retries every [`RETRY_INTERVAL`]: truncate again, then a probe write and
//! fdatasync of [`PROBE_BYTES`] that is cut off again. When the probe succeeds the disk is
//! back and appends are accepted again, without a restart. Sequence numbers of failed records
//! are reused, so the log on disk stays gapless.
//!
//! A failed fdatasync is treated like a failed write: the batch is cut off and refused. Its
//! pages may or may not have reached the disk, but truncating removes them either way, and
//! everything before them was synced by earlier successful calls.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{error, info, warn};
use mio::Waker;

use super::lock::DirLock;
use super::record::encode_record;
use super::snapshot::{self, KeyShadow, SnapshotCommand, SnapshotOutcome, SnapshotPart};
use super::{Completion, Log, LogOptions, LogStats, Record, SnapshotCursor, Unavailable};

/// How often a failing log tries the disk again.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Size of the probe write that tells a recovered disk.
pub const PROBE_BYTES: usize = 4096;
/// Repeated failures are logged at most this often (Redis' AOF_WRITE_LOG_ERROR_RATE).
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// After a failed snapshot, the next try waits this long.
const SNAPSHOT_RETRY_INTERVAL: Duration = Duration::from_secs(10);

/// The file name of the segment whose first record is `start`.
/// Test only: `STOCKSYNC_TEST_SYNC_DELAY_MS` makes every batch write that much slower, a
/// slow disk on demand (tests of bounded queues during slow syncs). Unset in production; read
/// once.
fn test_sync_delay() -> Option<std::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("STOCKSYNC_TEST_SYNC_DELAY_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(std::time::Duration::from_millis)
    })
}

pub fn segment_file_name(start: u64) -> String {
    format!("log-{start:020}.wal")
}

/// Parses a segment file name back into its first sequence number.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("log-")?.strip_suffix(".wal")?;
    (digits.len() == 20).then_some(())?;
    digits.parse().ok()
}

fn describe(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::ENOSPC) => format!("disk full ({error})"),
        Some(libc::EFBIG) => format!("file size limit reached ({error})"),
        _ => error.to_string(),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The log as recovery leaves it: where to go on writing.
pub struct OpenSegments {
    pub dir: PathBuf,
    /// First sequence numbers of the segments on disk, ascending; the last is written to.
    pub segments: Vec<u64>,
    pub current: File,
    /// Length of the current segment (every byte of it is a valid record).
    pub current_len: u64,
    /// The next record's sequence number.
    pub next_seq: u64,
    /// Bytes in all segments (what a snapshot would let us drop).
    pub log_bytes: u64,
}

enum Command {
    Batch {
        first: u64,
        last: u64,
        bytes: Vec<u8>,
        /// Some record carries an idempotency key: the snapshot thread's shadow needs the
        /// batch. Without one it is not woken at all (a thread switch per batch saved).
        keys: bool,
    },
    /// Start a new segment whose first record will be `at`.
    Rotate { at: u64 },
    /// A snapshot replaying from `replay_from` is durable: segments wholly before it can go.
    DropBefore { replay_from: u64 },
}

enum Event {
    Durable { through: u64 },
    Failed { from: u64, reason: String },
    Refusing { reason: String },
    Recovered,
    Snapshot(SnapshotOutcome),
}

/// Reports to the loop and wakes it.
#[derive(Clone)]
struct Reporter {
    events: Sender<Event>,
    waker: Arc<OnceLock<Arc<Waker>>>,
}

impl Reporter {
    fn report(&self, event: Event) {
        // The loop side is gone only while the process exits.
        let _ = self.events.send(event);
        if let Some(waker) = self.waker.get() {
            if let Err(e) = waker.wake() {
                error!("cannot wake the event loop: {e}");
            }
        }
    }
}

struct Failing {
    reason: String,
    since: Instant,
    next_retry: Instant,
    retries: u64,
    logged_at: Instant,
}

/// The log thread's state.
struct LogThread {
    dir: PathBuf,
    sync: bool,
    segments: Vec<u64>,
    file: File,
    /// End of the last good record in `file`.
    offset: u64,
    /// Sequence number of the last record written (and synced).
    last_seq: u64,
    pending_rotation: Option<u64>,
    failing: Option<Failing>,
    reporter: Reporter,
    /// Written batches go on to the snapshot thread, for their idempotency keys.
    snapshots: Sender<SnapshotCommand>,
}

impl LogThread {
    fn run(mut self, commands: Receiver<Command>) {
        loop {
            let command = match &self.failing {
                None => match commands.recv() {
                    Ok(command) => Some(command),
                    Err(_) => return,
                },
                Some(failing) => {
                    let wait = failing.next_retry.saturating_duration_since(Instant::now());
                    match commands.recv_timeout(wait) {
                        Ok(command) => Some(command),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            };
            match command {
                Some(Command::Batch {
                    first,
                    last,
                    bytes,
                    keys,
                }) => self.batch(first, last, bytes, keys),
                Some(Command::Rotate { at }) => self.rotate_at(at),
                Some(Command::DropBefore { replay_from }) => self.drop_before(replay_from),
                None => {}
            }
            if self
                .failing
                .as_ref()
                .is_some_and(|f| Instant::now() >= f.next_retry)
            {
                self.retry();
            }
        }
    }

    fn batch(&mut self, first: u64, last: u64, bytes: Vec<u8>, keys: bool) {
        if let Some(failing) = &self.failing {
            let reason = failing.reason.clone();
            self.reporter.report(Event::Failed {
                from: first,
                reason,
            });
            return;
        }
        assert_eq!(first, self.last_seq + 1, "batch out of sequence");
        if self.pending_rotation.is_some_and(|at| at != first) {
            // Asked for before a failure moved the sequence back: a later snapshot will ask
            // again.
            self.pending_rotation = None;
        }
        if let Some(at) = self.pending_rotation {
            if let Err(e) = self.rotate(at) {
                self.fail(&e, Some(first));
                return;
            }
        }
        if let Some(delay) = test_sync_delay() {
            std::thread::sleep(delay);
        }
        let result = self.file.write_all_at(&bytes, self.offset).and_then(|()| {
            if self.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => {
                self.offset += bytes.len() as u64;
                self.last_seq = last;
                // Before the loop hears of it: see `snapshot::KeyShadow` for why the order
                // matters. The snapshot thread is gone only while the process exits.
                if keys {
                    let _ = self.snapshots.send(SnapshotCommand::Durable(bytes));
                }
                self.reporter.report(Event::Durable { through: last });
            }
            Err(e) => {
                // Cut the partial write off now; if that fails too, `retry` does it before
                // anything else is written.
                let _ = self.file.set_len(self.offset);
                self.fail(&e, Some(first));
            }
        }
    }

    fn fail(&mut self, error: &io::Error, from: Option<u64>) {
        let reason = describe(error);
        let now = Instant::now();
        error!(
            "log write failed in {}: {reason}; refusing writes until the disk recovers",
            self.dir.display()
        );
        self.failing = Some(Failing {
            reason: reason.clone(),
            since: now,
            next_retry: now + RETRY_INTERVAL,
            retries: 0,
            logged_at: now,
        });
        match from {
            Some(from) => self.reporter.report(Event::Failed { from, reason }),
            None => self.reporter.report(Event::Refusing { reason }),
        }
    }

    fn rotate_at(&mut self, at: u64) {
        if at != self.last_seq + 1 {
            return;
        }
        if self.failing.is_some() {
            self.pending_rotation = Some(at);
            return;
        }
        if let Err(e) = self.rotate(at) {
            self.fail(&e, None);
        }
    }

    /// Starts segment `at` (unless it is the current one already).
    fn rotate(&mut self, at: u64) -> io::Result<()> {
        self.pending_rotation = Some(at);
        if self.segments.last() == Some(&at) {
            self.pending_rotation = None;
            return Ok(());
        }
        let path = self.dir.join(segment_file_name(at));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        if self.sync {
            super::sync_dir(&self.dir)?;
        }
        self.file = file;
        self.offset = 0;
        self.segments.push(at);
        self.pending_rotation = None;
        Ok(())
    }

    fn drop_before(&mut self, replay_from: u64) {
        // Segment k holds records [start_k, start_k+1): it can go when its successor starts
        // at or before `replay_from`. The current segment has no successor and stays.
        let mut keep_from = 0;
        while keep_from + 1 < self.segments.len() && self.segments[keep_from + 1] <= replay_from {
            let path = self.dir.join(segment_file_name(self.segments[keep_from]));
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!("cannot remove old log segment {}: {e}", path.display());
                    break;
                }
            }
            keep_from += 1;
        }
        self.segments.drain(..keep_from);
    }

    /// Truncates the failed write away, then probes the disk; on success, writes resume.
    fn retry(&mut self) {
        let result = self.try_recover();
        let failing = self.failing.as_mut().expect("retry only while failing");
        let now = Instant::now();
        match result {
            Ok(()) => {
                info!(
                    "log writes resumed in {} after {:.1} s ({} retries)",
                    self.dir.display(),
                    failing.since.elapsed().as_secs_f64(),
                    failing.retries
                );
                self.failing = None;
                self.reporter.report(Event::Recovered);
            }
            Err(e) => {
                failing.retries += 1;
                failing.next_retry = now + RETRY_INTERVAL;
                let reason = describe(&e);
                if now.duration_since(failing.logged_at) >= ERROR_LOG_INTERVAL {
                    failing.logged_at = now;
                    error!(
                        "log still failing in {} after {:.0} s ({} retries): {reason}",
                        self.dir.display(),
                        failing.since.elapsed().as_secs_f64(),
                        failing.retries
                    );
                }
                if reason != failing.reason {
                    failing.reason = reason.clone();
                    self.reporter.report(Event::Refusing { reason });
                }
            }
        }
    }

    fn try_recover(&mut self) -> io::Result<()> {
        self.sync_file(|file, offset| file.set_len(offset))?;
        if let Some(at) = self.pending_rotation {
            self.rotate(at)?;
        }
        let probe = [0u8; PROBE_BYTES];
        let written = self.sync_file(|file, offset| file.write_all_at(&probe, offset));
        // Cut the probe off whether or not it got written (a partial probe is still bytes).
        self.sync_file(|file, offset| file.set_len(offset))?;
        written
    }

    fn sync_file(&self, op: impl FnOnce(&File, u64) -> io::Result<()>) -> io::Result<()> {
        op(&self.file, self.offset)?;
        if self.sync {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// Snapshot progress, on the loop side.
enum SnapshotState {
    Idle,
    /// The log was rotated at `replay_from`; waiting until every record before it is durable
    /// (then the service's visible state includes all of them).
    Waiting {
        replay_from: u64,
        log_bytes_before: u64,
    },
    Collecting {
        replay_from: u64,
        log_bytes_before: u64,
        next_slot: u32,
        states: u64,
        started: Instant,
    },
    /// Everything handed to the snapshot thread; waiting for its outcome.
    Writing {
        replay_from: u64,
        log_bytes_before: u64,
        started: Instant,
    },
    Backoff {
        until: Instant,
    },
}

/// The loop side of the disk log. See the module docs.
pub struct DiskLog {
    commands: Option<Sender<Command>>,
    snapshots: Option<Sender<SnapshotCommand>>,
    events: Receiver<Event>,
    waker: Arc<OnceLock<Arc<Waker>>>,
    threads: Vec<JoinHandle<()>>,
    /// Sequence number the next append gets.
    next_seq: u64,
    /// Encoded records not yet sent, from `pending_first` to `next_seq - 1`.
    pending: Vec<u8>,
    pending_first: u64,
    /// Some record in `pending` carries an idempotency key.
    pending_keys: bool,
    /// The batch being written: first and last sequence numbers, bytes.
    in_flight: Option<(u64, u64, u64)>,
    durable_through: u64,
    /// `Some(first)`: the log thread is gone; everything from `first` on failed.
    thread_lost_from: Option<u64>,
    refusing: Option<String>,
    stats: LogStats,
    snapshot_log_bytes: u64,
    snapshot: SnapshotState,
    /// fdatasync per batch (`--fsync always`), for the fsync count.
    sync: bool,
    _lock: DirLock,
}

impl DiskLog {
    /// Starts the log and snapshot threads on `segments`, as recovered.
    pub fn start(
        segments: OpenSegments,
        options: LogOptions,
        keys: KeyShadow,
        lock: DirLock,
    ) -> io::Result<DiskLog> {
        let (command_tx, command_rx) = mpsc::channel();
        let (snapshot_tx, snapshot_rx) = mpsc::channel();
        let (event_tx, event_rx) = mpsc::channel();
        let waker = Arc::new(OnceLock::new());
        let reporter = Reporter {
            events: event_tx,
            waker: waker.clone(),
        };
        let thread = LogThread {
            dir: segments.dir.clone(),
            sync: options.sync,
            segments: segments.segments,
            file: segments.current,
            offset: segments.current_len,
            last_seq: segments.next_seq - 1,
            pending_rotation: None,
            failing: None,
            reporter: reporter.clone(),
            snapshots: snapshot_tx.clone(),
        };
        let log_thread = std::thread::Builder::new()
            .name("stocksync-log".into())
            .spawn(move || thread.run(command_rx))?;
        let dir = segments.dir.clone();
        let snapshot_thread = std::thread::Builder::new()
            .name("stocksync-snapshot".into())
            .spawn(move || {
                snapshot::run_writer(dir, true, keys, snapshot_rx, |outcome| {
                    reporter.report(Event::Snapshot(outcome));
                });
            })?;
        Ok(DiskLog {
            commands: Some(command_tx),
            snapshots: Some(snapshot_tx),
            events: event_rx,
            waker,
            threads: vec![log_thread, snapshot_thread],
            next_seq: segments.next_seq,
            pending: Vec::new(),
            pending_first: segments.next_seq,
            pending_keys: false,
            in_flight: None,
            durable_through: segments.next_seq - 1,
            thread_lost_from: None,
            refusing: None,
            stats: LogStats {
                log_bytes: segments.log_bytes,
                ..LogStats::default()
            },
            snapshot_log_bytes: options.snapshot_log_bytes,
            snapshot: SnapshotState::Idle,
            sync: options.sync,
            _lock: lock,
        })
    }

    fn send(&mut self, command: Command) -> bool {
        let sent = self
            .commands
            .as_ref()
            .is_some_and(|tx| tx.send(command).is_ok());
        if !sent && self.refusing.is_none() {
            error!("the log thread stopped; refusing every write from now on");
            self.refusing = Some("the log thread stopped".into());
        }
        sent
    }

    fn send_snapshot(&mut self, command: SnapshotCommand) {
        if let Some(tx) = &self.snapshots {
            if tx.send(command).is_err() {
                error!("the snapshot thread stopped; no more snapshots");
                self.snapshots = None;
            }
        }
    }

    /// Opens a snapshot when the log has grown enough and every appended record is sent.
    fn maybe_begin_snapshot(&mut self) {
        match self.snapshot {
            SnapshotState::Idle => {}
            SnapshotState::Backoff { until } if Instant::now() >= until => {}
            _ => return,
        }
        if self.stats.log_bytes < self.snapshot_log_bytes
            || !self.pending.is_empty()
            || self.refusing.is_some()
            || self.snapshots.is_none()
        {
            return;
        }
        let replay_from = self.next_seq;
        if !self.send(Command::Rotate { at: replay_from }) {
            return;
        }
        self.send_snapshot(SnapshotCommand::Begin {
            replay_from,
            created_secs: now_secs(),
        });
        let in_flight_bytes = self.in_flight.map_or(0, |(_, _, bytes)| bytes);
        self.snapshot = SnapshotState::Waiting {
            replay_from,
            log_bytes_before: self.stats.log_bytes + in_flight_bytes,
        };
        self.advance_snapshot();
    }

    /// Waiting -> Collecting once everything before `replay_from` is durable.
    fn advance_snapshot(&mut self) {
        if let SnapshotState::Waiting {
            replay_from,
            log_bytes_before,
        } = self.snapshot
        {
            if self.durable_through + 1 >= replay_from {
                self.snapshot = SnapshotState::Collecting {
                    replay_from,
                    log_bytes_before,
                    next_slot: 0,
                    states: 0,
                    started: Instant::now(),
                };
            }
        }
    }

    fn snapshot_outcome(&mut self, outcome: SnapshotOutcome) {
        let SnapshotState::Writing {
            replay_from,
            log_bytes_before,
            started,
        } = self.snapshot
        else {
            return;
        };
        match outcome {
            SnapshotOutcome::Done {
                replay_from: done,
                bytes,
            } if done == replay_from => {
                info!(
                    "{} written: {bytes} bytes in {} ms; dropping the log before record \
                     {replay_from}",
                    snapshot::file_name(replay_from),
                    started.elapsed().as_millis()
                );
                self.stats.snapshots_total += 1;
                self.stats.log_bytes = self.stats.log_bytes.saturating_sub(log_bytes_before);
                self.send(Command::DropBefore { replay_from });
                self.snapshot = SnapshotState::Idle;
            }
            other => {
                let reason = match other {
                    SnapshotOutcome::Failed { error, .. } => error,
                    SnapshotOutcome::Done { replay_from, .. } => {
                        format!("finished snapshot {replay_from} was not the one expected")
                    }
                };
                warn!(
                    "snapshot {} failed: {reason}; the log is kept, retrying in {} s",
                    snapshot::file_name(replay_from),
                    SNAPSHOT_RETRY_INTERVAL.as_secs()
                );
                self.snapshot = SnapshotState::Backoff {
                    until: Instant::now() + SNAPSHOT_RETRY_INTERVAL,
                };
            }
        }
    }
}

impl Log for DiskLog {
    fn append(&mut self, record: Record) -> Result<u64, Unavailable> {
        if let Some(reason) = &self.refusing {
            return Err(Unavailable(reason.clone()));
        }
        let seq = self.next_seq;
        if self.pending.is_empty() {
            self.pending_first = seq;
            self.pending_keys = false;
        }
        self.pending_keys |= record.key.is_some();
        if encode_record(&mut self.pending, seq, &record).is_none() {
            return Err(Unavailable(
                "the change is too large for one log record".into(),
            ));
        }
        self.next_seq += 1;
        self.stats.records_total += 1;
        Ok(seq)
    }

    fn submit(&mut self) {
        if self.in_flight.is_none() && !self.pending.is_empty() {
            let bytes = std::mem::take(&mut self.pending);
            let (first, last) = (self.pending_first, self.next_seq - 1);
            let len = bytes.len() as u64;
            let keys = self.pending_keys;
            if self.send(Command::Batch {
                first,
                last,
                bytes,
                keys,
            }) {
                self.in_flight = Some((first, last, len));
                self.stats.batches_total += 1;
            } else {
                self.thread_lost_from = Some(first);
            }
        }
        self.maybe_begin_snapshot();
    }

    fn poll(&mut self) -> Completion {
        let mut failed_from = self.thread_lost_from.take();
        if failed_from.is_some() {
            self.pending.clear();
            self.next_seq = self.durable_through + 1;
        }
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Durable { through } => {
                    if let Some((_, last, bytes)) = self.in_flight.take() {
                        debug_assert_eq!(last, through);
                        self.stats.bytes_total += bytes;
                        self.stats.log_bytes += bytes;
                        self.stats.fsyncs_total += u64::from(self.sync);
                    }
                    self.durable_through = through;
                }
                Event::Failed { from, reason } => {
                    self.in_flight = None;
                    self.pending.clear();
                    self.next_seq = from;
                    self.pending_first = from;
                    self.stats.failures_total += 1;
                    failed_from = Some(from);
                    self.refusing = Some(reason);
                    if let SnapshotState::Waiting { replay_from, .. } = self.snapshot {
                        if replay_from > from {
                            // Records before the rotation failed: start over later.
                            self.snapshot = SnapshotState::Backoff {
                                until: Instant::now(),
                            };
                        }
                    }
                }
                Event::Refusing { reason } => self.refusing = Some(reason),
                Event::Recovered => self.refusing = None,
                Event::Snapshot(outcome) => self.snapshot_outcome(outcome),
            }
        }
        self.advance_snapshot();
        Completion {
            durable_through: self.durable_through,
            failed_from,
        }
    }

    fn in_flight(&self) -> bool {
        self.in_flight.is_some() || !self.pending.is_empty()
    }

    fn refusing(&self) -> Option<String> {
        self.refusing.clone()
    }

    fn stats(&self) -> LogStats {
        self.stats.clone()
    }

    fn set_waker(&mut self, waker: Arc<Waker>) {
        let _ = self.waker.set(waker);
    }

    fn snapshot_request(&self) -> Option<SnapshotCursor> {
        match self.snapshot {
            SnapshotState::Collecting { next_slot, .. } => Some(SnapshotCursor { next_slot }),
            _ => None,
        }
    }

    fn snapshot_part(&mut self, part: SnapshotPart) {
        let SnapshotState::Collecting {
            replay_from,
            log_bytes_before,
            next_slot,
            states,
            started,
        } = self.snapshot
        else {
            return;
        };
        let more = part.next_slot;
        let (frames, part_states) = part.into_frames();
        self.send_snapshot(SnapshotCommand::Frames(frames));
        let states = states + part_states;
        self.snapshot = match more {
            Some(slot) => {
                assert!(slot > next_slot || part_states > 0, "snapshot cursor stuck");
                SnapshotState::Collecting {
                    replay_from,
                    log_bytes_before,
                    next_slot: slot,
                    states,
                    started,
                }
            }
            None => {
                self.send_snapshot(SnapshotCommand::Finish { states });
                SnapshotState::Writing {
                    replay_from,
                    log_bytes_before,
                    started,
                }
            }
        };
    }
}

impl Drop for DiskLog {
    fn drop(&mut self) {
        // Closing the channels ends both threads once they finish what they hold.
        self.commands = None;
        self.snapshots = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Opens (creating) segment `start` in `dir` for writing at its end.
pub fn open_segment(dir: &Path, start: u64, sync: bool) -> io::Result<(File, u64)> {
    let path = dir.join(segment_file_name(start));
    let existed = path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    if !existed && sync {
        super::sync_dir(dir)?;
    }
    let len = file.metadata()?.len();
    Ok((file, len))
}

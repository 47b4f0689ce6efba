//! The data directory's lock: one process at a time.
//!
//! `flock(LOCK_EX | LOCK_NB)` on `<dir>/LOCK`. The kernel drops the lock when the process
//! ends, however it ends (kill -9 included), so a stale lock file never blocks a restart.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;

pub const LOCK_FILE: &str = "LOCK";

/// Holds the lock until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Why the lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it (its pid, as it wrote it, if readable).
    Held {
        holder: String,
    },
    Io(io::Error),
}

impl DirLock {
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(LockError::Io)?;
        // SAFETY: flock(2) on a descriptor we own and keep open; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(LockError::Held {
                    holder: holder.trim().to_string(),
                });
            }
            return Err(LockError::Io(error));
        }
        // For the operator only: who holds it. Failing to write this is harmless.
        let _ = file.set_len(0);
        let _ = write!(file, "{}", std::process::id());
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file description, so a second open in the same
        // process conflicts just like another process would.
        match DirLock::acquire(dir.path()) {
            Err(LockError::Held { holder }) => assert_eq!(holder, std::process::id().to_string()),
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}

//! `--workers N`: start N worker processes on the listen address (each this same binary with
//! one loop, sharing the port through SO_REUSEPORT, like Workerman's `count`), restart one that
//! dies, forward SIGHUP, and on SIGTERM/SIGINT stop them all and exit once they have.

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};

/// How often the supervisor looks at its workers and signals.
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(50);
/// Restart backoff: doubles from the base after each quick death, up to the max.
const RESTART_BACKOFF_BASE: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A worker that ran this long before dying is restarted without delay (the backoff resets).
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// Stop: how long workers get to finish after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

struct Worker {
    child: Option<Child>,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
}

/// Runs the supervisor; `args` are this process's flags, given to every worker with
/// `--workers 1` after them. `write_token` is passed to all, so a generated one is shared.
pub fn supervise(count: usize, args: &[String], write_token: &str) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let terminate = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, terminate.clone())
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let spawn = || -> std::io::Result<Child> {
        Command::new(&exe)
            .args(args)
            .args(["--workers", "1"])
            .env("STOCKSYNC_WRITE_TOKEN", write_token)
            .spawn()
    };
    let mut workers = Vec::with_capacity(count);
    for _ in 0..count {
        let child = spawn().map_err(|e| format!("cannot start a worker: {e}"))?;
        workers.push(Worker {
            child: Some(child),
            started: Instant::now(),
            backoff: RESTART_BACKOFF_BASE,
            restart_at: None,
        });
    }
    info!("started {count} workers");
    loop {
        if terminate.load(Ordering::Relaxed) {
            return stop(&mut workers);
        }
        if reload.swap(false, Ordering::Relaxed) {
            info!("SIGHUP: forwarding to the workers");
            for worker in &workers {
                if let Some(child) = &worker.child {
                    signal(child, libc::SIGHUP);
                }
            }
        }
        for (slot, worker) in workers.iter_mut().enumerate() {
            if let Some(child) = worker.child.as_mut() {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        let ran = worker.started.elapsed();
                        if ran >= HEALTHY_RUN {
                            worker.backoff = RESTART_BACKOFF_BASE;
                        }
                        warn!(
                            "worker {slot} (pid {}) exited with {status} after {} ms; restarting \
                             in {} ms",
                            child.id(),
                            ran.as_millis(),
                            worker.backoff.as_millis()
                        );
                        worker.child = None;
                        worker.restart_at = Some(Instant::now() + worker.backoff);
                        worker.backoff = (worker.backoff * 2).min(RESTART_BACKOFF_MAX);
                    }
                    Ok(None) => {}
                    Err(e) => error!("cannot check worker {slot}: {e}"),
                }
            }
            if worker.restart_at.is_some_and(|at| Instant::now() >= at) {
                match spawn() {
                    Ok(child) => {
                        info!("worker {slot} restarted as pid {}", child.id());
                        worker.child = Some(child);
                        worker.started = Instant::now();
                        worker.restart_at = None;
                    }
                    Err(e) => {
                        error!("cannot restart worker {slot}: {e}");
                        worker.restart_at = Some(Instant::now() + worker.backoff);
                    }
                }
            }
        }
        std::thread::sleep(SUPERVISE_INTERVAL);
    }
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on a child we spawned and have not reaped (its pid cannot have been
    // reused); no memory is involved.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// SIGTERM to every worker, wait for them (each drains its clients), kill stragglers.
fn stop(workers: &mut [Worker]) -> Result<(), String> {
    info!("stopping {} workers", workers.len());
    for worker in workers.iter() {
        if let Some(child) = &worker.child {
            signal(child, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for worker in workers.iter_mut() {
        let Some(child) = worker.child.as_mut() else {
            continue;
        };
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(SUPERVISE_INTERVAL),
                _ => {
                    warn!("worker pid {} did not stop in time; killing it", child.id());
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
    info!("all workers stopped");
    Ok(())
}

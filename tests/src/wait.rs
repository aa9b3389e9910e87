//! Readiness polling: wait for a condition with a deadline, never a fixed sleep.

use std::time::{Duration, Instant};

/// Poll interval between checks of a condition.
pub const POLL: Duration = Duration::from_millis(10);

/// Calls `cond` until it returns `Some`, or panics after `timeout` with
/// `what` in the message.
pub fn wait_until<T>(what: &str, timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Like [`wait_until`] but returns `None` at the deadline instead of panicking.
pub fn poll_until<T>(timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

//! Keeping the agent out of the memory-reclaim loop it serves.
//!
//! When the agent serves a kernel `/dev/nbdX` on its own host, dirty pages of
//! the file system on that device can only be written back *through this
//! process*. Under memory pressure the kernel reclaims memory by writing
//! those pages back; if serving the write makes the agent itself allocate
//! memory and enter direct reclaim — which waits for the same writeback — or
//! page in its own code or heap that was swapped out, neither side can make
//! progress: a deadlock. Two defences:
//!
//! - `prctl(PR_SET_IO_FLUSHER, 1)` (Linux 5.6+, needs `CAP_SYS_RESOURCE`):
//!   marks the task `PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE`: its allocations
//!   never recurse into I/O for reclaim and it is not throttled for the
//!   dirty pages of the device it serves. It is a task (thread) flag,
//!   inherited by threads created later: call it on the main thread **before**
//!   the tokio runtime starts its workers (or from `on_thread_start`).
//! - `mlockall(MCL_CURRENT | MCL_FUTURE)`: no page of the agent (code, heap,
//!   stacks, buffers) can be swapped out, so serving a request never waits
//!   for a page-in that itself waits for reclaim. Needs `CAP_IPC_LOCK` or a
//!   large enough `RLIMIT_MEMLOCK`.

use std::io;

use super::KernelError;

/// `PR_SET_IO_FLUSHER` (linux/prctl.h; not in every libc release).
const PR_SET_IO_FLUSHER: libc::c_int = 57;
/// `PR_GET_IO_FLUSHER`.
const PR_GET_IO_FLUSHER: libc::c_int = 58;

/// Puts the calling thread (and threads it creates afterwards) in the
/// IO_FLUSHER state. See the module documentation.
pub fn set_io_flusher() -> Result<(), KernelError> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            PR_SET_IO_FLUSHER,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r < 0 {
        return Err(KernelError::Os {
            what: "prctl(PR_SET_IO_FLUSHER)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether the calling thread is in the IO_FLUSHER state.
pub fn is_io_flusher() -> Result<bool, KernelError> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            PR_GET_IO_FLUSHER,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r < 0 {
        return Err(KernelError::Os {
            what: "prctl(PR_GET_IO_FLUSHER)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(r == 1)
}

/// Locks all current and future pages of the process in memory.
pub fn lock_memory() -> Result<(), KernelError> {
    // SAFETY: mlockall takes flags only.
    let r = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    if r < 0 {
        return Err(KernelError::Os {
            what: "mlockall(MCL_CURRENT|MCL_FUTURE)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// What [`io_flusher_setup`] achieved; each failure is kept, not fatal.
#[derive(Debug)]
pub struct IoFlusherReport {
    /// Result of [`set_io_flusher`].
    pub io_flusher: Result<(), KernelError>,
    /// Result of [`lock_memory`].
    pub mlockall: Result<(), KernelError>,
}

impl IoFlusherReport {
    /// True when both protections are in place.
    pub fn complete(&self) -> bool {
        self.io_flusher.is_ok() && self.mlockall.is_ok()
    }
}

/// Both protections, for an agent that will serve a kernel device on its
/// own host. Call before starting the tokio runtime; each failure is logged
/// as a warning (the agent still works, with the deadlock risk described in
/// the module documentation) and returned in the report.
pub fn io_flusher_setup() -> IoFlusherReport {
    let report = IoFlusherReport {
        io_flusher: set_io_flusher(),
        mlockall: lock_memory(),
    };
    if let Err(e) = &report.io_flusher {
        tracing::warn!("{e}: writeback through this agent may deadlock under memory pressure");
    }
    if let Err(e) = &report.mlockall {
        tracing::warn!("{e}: agent pages may be swapped out and stall writeback");
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_flusher_state_follows_prctl_on_a_fresh_thread() {
        // A fresh thread so the flag does not leak into other tests.
        std::thread::spawn(|| match is_io_flusher() {
            Ok(before) => {
                assert!(!before, "a fresh thread starts without IO_FLUSHER");
                set_io_flusher().unwrap();
                assert!(is_io_flusher().unwrap());
            }
            // Both prctls need CAP_SYS_RESOURCE; without it the set fails too, naming the call.
            Err(get) => {
                assert!(get.to_string().contains("PR_GET_IO_FLUSHER"), "{get}");
                let e = set_io_flusher().unwrap_err().to_string();
                assert!(
                    e.contains("PR_SET_IO_FLUSHER") && e.contains("not permitted"),
                    "{e}"
                );
            }
        })
        .join()
        .unwrap();
    }
}

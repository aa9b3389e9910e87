//! Inline writes that may block a runtime worker, and the rescue that keeps
//! the runtime answering when one does.
//!
//! A buffered write to a file backed by a device is a `pwrite` in the calling
//! task ([`super::inline_write_max`]): a copy into the page cache, usually a
//! few microseconds. It can block for as long as the device stalls (dirty
//! throttling behind a slow disk, a stalled device behind FUSE or NFS). A
//! tokio worker blocked there holds nothing the other workers need, but the
//! other worker may be asleep on its condition variable rather than in the
//! I/O driver (a worker that parks while another one holds the driver waits
//! there, and nobody wakes it when that one leaves the driver to run the task
//! that then blocks): the admin socket and the peer links then go deaf
//! (bench/HISTORY.md, "Why a write may not block a tokio worker").
//!
//! `tokio::task::block_in_place` around every such write avoids that, but it
//! hands the worker to another thread each time (a thread wake-up per write:
//! half the rate of 4 KiB writes at queue depth 32). Here instead:
//!
//! - a write is done plainly only where its caller allows it ([`allow_plain`]:
//!   the NBD connection, for engines that wake no other task before such a
//!   write, `BlockEngine::plain_inline_writes`), and only while fewer than
//!   `workers - 1` plain writes are in progress in the process, so a worker is
//!   always left; otherwise, or on a runtime with one worker, it goes through
//!   `block_in_place` as before. Why the caller decides: a task woken by the
//!   blocked task just before it blocked waits in that worker's LIFO slot,
//!   which no other worker can take, for as long as the write blocks. For the
//!   NBD connection that is its own reply writer (its replies wait as its
//!   requests do); for a replicated write it would be the peer link's sender,
//!   and its heartbeats would stop. The connection asks again before each
//!   polling pass, and `Watched` says no once it has reported a disk error
//!   (its hook wakes the node's handling of it; a failing disk is the one
//!   that also stalls);
//! - each worker thread announces its plain write in its [`Slot`] (a ticket,
//!   two relaxed stores per write);
//! - a watchdog thread (started with the first plain write) looks at the
//!   slots every [`TICK`]; a ticket it saw at its previous look too belongs to
//!   a write that has blocked for at least a tick, and it then spawns an empty
//!   task on that worker's runtime. The idle worker wakes for it, and when it
//!   parks again it takes the I/O driver, which nobody holds: the runtime
//!   answers again within about two ticks of the stall, for as long as it
//!   lasts (the watchdog goes on kicking while the write is stuck).
//!
//! Tests: `a_blocked_plain_write_does_not_deafen_the_runtime` (below) and
//! `status_answers_while_the_data_disk_stalls_portable` (tests/tests/admin.rs)
//! fail without the watchdog;
//! `standby_data_disk_stall_keeps_the_link_and_is_told_to_the_active`
//! (tests/tests/rule_scenarios.rs) fails when every caller writes plainly;
//! `no_plain_inline_writes_after_a_disk_error` (engine::watched).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::runtime::{Handle, RuntimeFlavor};

/// How often the watchdog looks at the slots. A write blocked for longer than
/// a tick gets the idle worker woken.
pub const TICK: Duration = Duration::from_millis(50);

/// Plain inline writes in progress, in the whole process (a conservative
/// bound when a process runs several runtimes, as tests do).
static PLAIN: AtomicUsize = AtomicUsize::new(0);

/// The slots of every worker thread that wrote plainly, for the watchdog.
static SLOTS: Mutex<Vec<Weak<Slot>>> = Mutex::new(Vec::new());

/// One worker thread's announcement of its plain write.
#[derive(Debug)]
struct Slot {
    /// The write in progress (0: none). Written by the owning thread only.
    ticket: AtomicU64,
    /// The runtime of the thread, for the watchdog's kick.
    handle: Handle,
    /// Plain writes allowed in progress at once: the runtime's workers - 1.
    limit: usize,
}

thread_local! {
    /// Plain writes are allowed on this thread ([`allow_plain`]).
    static ALLOWED: Cell<bool> = const { Cell::new(false) };
    /// This thread's slot; `None` off a multi-thread runtime.
    static SLOT: OnceLock<Option<Arc<Slot>>> = const { OnceLock::new() };
    /// Tickets handed out by this thread.
    static NEXT: Cell<u64> = const { Cell::new(0) };
}

/// Allows plain writes on this thread until the guard is dropped (then the
/// previous setting is back): for a caller that woke no other task that must
/// not wait for a stalled write (see the module doc).
pub(crate) fn allow_plain() -> AllowPlain {
    AllowPlain(ALLOWED.with(|a| a.replace(true)))
}

/// Guard of [`allow_plain`]; holds the previous setting.
pub(crate) struct AllowPlain(bool);

impl Drop for AllowPlain {
    fn drop(&mut self) {
        ALLOWED.with(|a| a.set(self.0));
    }
}

/// Runs `f` (a `pwrite` that may block) in the calling task: plainly when the
/// caller allows it and a worker is left for the rest of the runtime, else
/// inside `block_in_place`. Only on a multi-thread runtime
/// ([`super::inline_write_max`] admits no such write elsewhere).
pub(crate) fn write<T>(f: impl FnOnce() -> T) -> T {
    if !ALLOWED.with(Cell::get) {
        return tokio::task::block_in_place(f);
    }
    let Some(slot) = SLOT.with(|s| s.get_or_init(new_slot).clone()) else {
        return tokio::task::block_in_place(f);
    };
    if PLAIN.fetch_add(1, Ordering::AcqRel) >= slot.limit {
        PLAIN.fetch_sub(1, Ordering::AcqRel);
        return tokio::task::block_in_place(f);
    }
    let ticket = NEXT.with(|n| {
        n.set(n.get() + 1);
        n.get()
    });
    slot.ticket.store(ticket, Ordering::Relaxed);
    // Ends the announcement also if `f` panics.
    struct Done<'a>(&'a Slot);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.ticket.store(0, Ordering::Relaxed);
            PLAIN.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _done = Done(&slot);
    f()
}

/// This thread's slot, registered with the watchdog (started on first use);
/// `None` outside a multi-thread runtime, on one with a single worker, or
/// without the watchdog.
fn new_slot() -> Option<Arc<Slot>> {
    let handle = Handle::try_current().ok()?;
    if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
        return None;
    }
    let limit = handle.metrics().num_workers().saturating_sub(1);
    if limit == 0 || !start_watchdog() {
        return None;
    }
    let slot = Arc::new(Slot {
        ticket: AtomicU64::new(0),
        handle,
        limit,
    });
    let mut slots = SLOTS.lock().unwrap_or_else(|p| p.into_inner());
    slots.retain(|s| s.strong_count() > 0);
    slots.push(Arc::downgrade(&slot));
    drop(slots);
    Some(slot)
}

/// Starts the watchdog thread once; whether it runs (without it no write
/// blocks plainly).
fn start_watchdog() -> bool {
    static STARTED: OnceLock<bool> = OnceLock::new();
    *STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("inline-watchdog".into())
            .spawn(watchdog);
        if let Err(e) = &spawned {
            tracing::warn!(error = %e, "cannot start the inline write watchdog thread: buffered inline writes go through block_in_place");
        }
        spawned.is_ok()
    })
}

fn watchdog() {
    // The ticket each slot had at the previous look, by slot address.
    let mut seen: Vec<(usize, u64)> = Vec::new();
    loop {
        std::thread::sleep(TICK);
        let live: Vec<Arc<Slot>> = {
            let mut slots = SLOTS.lock().unwrap_or_else(|p| p.into_inner());
            slots.retain(|s| s.strong_count() > 0);
            slots.iter().filter_map(Weak::upgrade).collect()
        };
        let mut now = Vec::with_capacity(live.len());
        for slot in &live {
            let key = Arc::as_ptr(slot) as usize;
            let ticket = slot.ticket.load(Ordering::Relaxed);
            if ticket != 0 && seen.contains(&(key, ticket)) {
                kick(&slot.handle);
            }
            now.push((key, ticket));
        }
        seen = now;
    }
}

/// Wakes an idle worker of the runtime: it runs the empty task, and when it
/// parks again it takes the I/O driver that the blocked worker does not hold.
fn kick(handle: &Handle) {
    drop(handle.spawn(async {}));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A write blocked plainly in one worker does not keep the runtime from
    /// running I/O and timers: the watchdog wakes the other worker.
    #[test]
    fn a_blocked_plain_write_does_not_deafen_the_runtime() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        rt.block_on(async move {
            let (listener, addr) = {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let a = l.local_addr().unwrap();
                (l, a)
            };
            // The "admin socket": accepts and answers one byte.
            let server = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let (mut s, _) = listener.accept().await.unwrap();
                s.write_all(b"!").await.unwrap();
            });
            // The write is started by socket input, as an NBD request's is:
            // the worker that polls the I/O driver runs the woken task itself
            // and blocks in it, while the other sleeps on its condition
            // variable (the workers settle first).
            let (poke, rx) = std::os::unix::net::UnixStream::pair().unwrap();
            rx.set_nonblocking(true).unwrap();
            let mut rx = tokio::net::UnixStream::from_std(rx).unwrap();
            let blocked = tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut b = [0u8; 1];
                rx.read_exact(&mut b).await.unwrap();
                let _plain = allow_plain();
                write(|| {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                });
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            {
                use std::io::Write;
                (&poke).write_all(b"w").unwrap();
            }
            tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
                .await
                .unwrap();
            // Nothing else wakes a worker from here on: only the watchdog can
            // get the accept below served (a timer would need the driver too).
            let client = tokio::task::spawn_blocking(move || {
                use std::io::Read;
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut b = [0u8; 1];
                c.read_exact(&mut b).map(|_| b[0])
            });
            let got = client
                .await
                .unwrap()
                .expect("no answer within 10 s: the runtime stayed deaf while a write blocked");
            assert_eq!(got, b'!');
            server.await.unwrap();
            release_tx.send(()).unwrap();
            blocked.await.unwrap();
        });
    }
}

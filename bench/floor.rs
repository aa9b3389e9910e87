//! Replication floor: the least CPU that *any* mirrored pair on this one box
//! spends to get a client's writes to the standby's data, measured without
//! nbd-mirror. `bench/mirror.sh` builds it with `rustc` (std only) and runs
//! it next to its jobs; the report adds its cost to the standalone agent's to
//! say how fast a pair could be at best on this machine. See "Replication
//! floor" in bench/README.md.
//!
//! What a pair must do on top of the standalone agent's work, and all this
//! program does:
//! - the active sends every written byte to the peer over loopback TCP (on
//!   loopback the sender's system call also runs the receiver's TCP input);
//! - the standby receives it into its own memory (it has to check a frame
//!   before applying it, so it cannot receive straight into the file) and
//!   writes it to its data file (tmpfs in the bench);
//! - `rand` only: each write is acknowledged back to the active.
//!
//! Left out, so the result stays *below* any real pair: frame headers beyond
//! a 16-byte offset/seq, the payload CRC, the second ack, the dirty bitmap,
//! and every hand-off between tasks (one thread per role, never idle).
//!
//! The file is written once, untimed, before the measurement (a standby's
//! file has its pages after its first pass; allocating them costs more).
//!
//! ```text
//! floor seq  SECS PATH SIZE_MIB       1 MiB messages, written in order, wrapping at SIZE_MIB
//! floor rand SECS PATH SIZE_MIB QD    4 KiB messages at random 4 KiB offsets, QD outstanding
//! ```
//!
//! Prints one line: `mode=.. ops=N secs=S cpu_us_per_op=C sender_us=.. receiver_us=.. acks_us=..`
//! (CPU per message, from each thread's `/proc/thread-self/schedstat`).

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;
/// `rand` message: u64 offset, u64 tag, 4 KiB payload. The ack echoes the 16 bytes.
const HDR: usize = 16;
const MSG: usize = HDR + PAGE;

/// CPU time of the calling thread, user + system, in ns.
fn thread_cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("read /proc/thread-self/schedstat");
    s.split_whitespace().next().and_then(|v| v.parse().ok()).expect("parse schedstat")
}

fn usage() -> ! {
    eprintln!("usage: floor seq SECS PATH SIZE_MIB | floor rand SECS PATH SIZE_MIB QD");
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    match args.get(i).map(|s| s.parse()) {
        Some(Ok(v)) => v,
        _ => {
            eprintln!("floor: missing or bad {what}");
            usage()
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| usage());
    let secs: f64 = arg(&args, 2, "SECS");
    let path: String = arg(&args, 3, "PATH");
    let size = arg::<u64>(&args, 4, "SIZE_MIB") * MIB as u64;
    let qd = if mode == "rand" { arg::<usize>(&args, 5, "QD").max(1) } else { 0 };
    if mode != "seq" && mode != "rand" {
        usage()
    }
    let file = OpenOptions::new().create(true).write(true).truncate(false).open(&path).expect("open PATH");
    file.set_len(size).expect("size PATH");
    // Populate the file first, untimed: the bench's standbys write into files
    // whose pages exist after the first pass, and the cheaper case is the floor.
    let zeros = vec![0u8; MIB];
    for off in (0..size).step_by(MIB) {
        let n = (size - off).min(MIB as u64) as usize;
        file.write_all_at(&zeros[..n], off).expect("fill PATH");
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local addr");

    // The standby: receive into its own buffer, then write to the file.
    let seq = mode == "seq";
    let standby = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let c0 = thread_cpu_ns();
        let mut n = 0u64;
        if seq {
            let mut buf = vec![0u8; MIB];
            let mut off = 0u64;
            while s.read_exact(&mut buf).is_ok() {
                file.write_all_at(&buf, off).expect("write PATH");
                off = (off + MIB as u64) % size;
                n += 1;
            }
        } else {
            // Read what is there, apply every whole message, ack them in one send.
            let mut buf = vec![0u8; MSG * 64];
            let mut have = 0;
            let mut acks = Vec::with_capacity(HDR * 64);
            loop {
                match s.read(&mut buf[have..]) {
                    Ok(0) | Err(_) => break,
                    Ok(r) => have += r,
                }
                let mut p = 0;
                acks.clear();
                while have - p >= MSG {
                    let off = u64::from_le_bytes(buf[p..p + 8].try_into().expect("8 bytes"));
                    file.write_all_at(&buf[p + HDR..p + MSG], off).expect("write PATH");
                    acks.extend_from_slice(&buf[p..p + HDR]);
                    p += MSG;
                    n += 1;
                }
                buf.copy_within(p..have, 0);
                have -= p;
                if !acks.is_empty() && s.write_all(&acks).is_err() {
                    break;
                }
            }
        }
        (n, thread_cpu_ns() - c0)
    });

    let mut tx = TcpStream::connect(addr).expect("connect");
    tx.set_nodelay(true).expect("nodelay");
    let deadline = Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let (sent, sender_ns, acks_ns) = if seq {
        let buf = vec![0x5au8; MIB];
        let c0 = thread_cpu_ns();
        let mut n = 0u64;
        while t0.elapsed() < deadline {
            tx.write_all(&buf).expect("send");
            n += 1;
        }
        let c = thread_cpu_ns() - c0;
        tx.shutdown(Shutdown::Write).expect("shutdown");
        (n, c, 0)
    } else {
        // An ack reader thread returns credits; the sender refills the window
        // with one send of all the messages it may add (as a corked burst).
        let (credit_tx, credit_rx) = sync_channel::<u32>(qd);
        let mut rx = tx.try_clone().expect("clone");
        let acker = std::thread::spawn(move || {
            let c0 = thread_cpu_ns();
            let mut b = vec![0u8; HDR * 64];
            let mut have = 0;
            loop {
                match rx.read(&mut b[have..]) {
                    Ok(0) | Err(_) => break,
                    Ok(r) => have += r,
                }
                let whole = have / HDR;
                b.copy_within(whole * HDR..have, 0);
                have -= whole * HDR;
                if whole > 0 && credit_tx.send(whole as u32).is_err() {
                    break;
                }
            }
            thread_cpu_ns() - c0
        });
        let mut burst = vec![0x5au8; MSG * qd];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let pages = size / PAGE as u64;
        let c0 = thread_cpu_ns();
        let (mut n, mut out) = (0u64, 0usize);
        while t0.elapsed() < deadline {
            let k = qd - out;
            for m in 0..k {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let h = &mut burst[m * MSG..m * MSG + HDR];
                h[..8].copy_from_slice(&((x % pages) * PAGE as u64).to_le_bytes());
                h[8..].copy_from_slice(&(n + m as u64).to_le_bytes());
            }
            tx.write_all(&burst[..k * MSG]).expect("send");
            n += k as u64;
            out = qd;
            out -= credit_rx.recv().expect("acks") as usize;
            while let Ok(c) = credit_rx.try_recv() {
                out -= c as usize;
            }
        }
        while out > 0 {
            out -= credit_rx.recv().expect("acks") as usize;
        }
        let c = thread_cpu_ns() - c0;
        tx.shutdown(Shutdown::Both).expect("shutdown");
        drop(credit_rx);
        (n, c, acker.join().expect("ack reader"))
    };
    let (received, receiver_ns) = standby.join().expect("standby");
    let el = t0.elapsed().as_secs_f64();
    assert_eq!(sent, received, "every message sent was applied");
    let per = |ns: u64| ns as f64 / 1000.0 / sent.max(1) as f64;
    println!(
        "mode={mode} ops={sent} secs={el:.3} cpu_us_per_op={:.2} sender_us={:.2} receiver_us={:.2} acks_us={:.2}",
        per(sender_ns + receiver_ns + acks_ns),
        per(sender_ns),
        per(receiver_ns),
        per(acks_ns)
    );
}

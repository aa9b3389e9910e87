//! Pooled, page-aligned I/O buffers.
//!
//! The data path moves whole requests through memory: write payloads arrive
//! from the socket, read data goes back to it. A fresh heap allocation per
//! request costs a zero-fill, page faults on first touch and, once freed, the
//! allocator trimming its arenas (`madvise`) — measured at 20-30% of the
//! agent's CPU on 1 MiB requests (bench/README.md). [`IoBuf`] instead takes a
//! buffer from a process-wide pool of power-of-two size classes and gives it
//! back on drop.
//!
//! - Memory is [`IO_ALIGN`]-aligned, so O_DIRECT can use a payload as it is
//!   (no bounce copy).
//! - Every byte of a pooled buffer is initialised: buffers are zero-filled
//!   once when allocated and afterwards only ever hold data written through
//!   safe slices. A reused buffer therefore contains stale bytes of an
//!   earlier request, never uninitialised memory; callers fill the part they
//!   expose (`len`) before handing it on.
//! - The pool is bounded: per class at most `max(2, CLASS_RETAIN_BYTES /
//!   class)` buffers, and at most [`POOL_RETAIN_BYTES`] in all; buffers beyond
//!   that, and requests above the largest class, are plain allocations freed
//!   on drop. In-flight memory itself is bounded by the callers (NBD in-flight
//!   byte limits, engine queue depth).

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

/// Alignment of every pooled buffer (page size; a multiple of any direct-I/O
/// memory alignment seen in practice).
pub const IO_ALIGN: usize = 4096;
/// Smallest size class.
const MIN_CLASS_SHIFT: u32 = 12; // 4 KiB
/// Largest size class; larger buffers are not pooled.
const MAX_CLASS_SHIFT: u32 = 25; // 32 MiB
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;
/// Bytes kept per class (at least two buffers are kept).
const CLASS_RETAIN_BYTES: usize = 16 << 20;
/// Bytes kept by the whole pool.
pub const POOL_RETAIN_BYTES: usize = 64 << 20;

struct FreeBuf(NonNull<u8>);
// SAFETY: a free buffer is an owned, unaliased allocation; moving the pointer
// between threads is like moving a Box<[u8]>.
unsafe impl Send for FreeBuf {}

struct Pool {
    classes: [Mutex<Vec<FreeBuf>>; CLASSES],
    retained: AtomicUsize,
}

static POOL: Pool = Pool {
    classes: [const { Mutex::new(Vec::new()) }; CLASSES],
    retained: AtomicUsize::new(0),
};

/// Size class index and capacity for `len`, or `None` if not pooled.
fn class_of(len: usize) -> Option<(usize, usize)> {
    let cap = len.max(1 << MIN_CLASS_SHIFT).checked_next_power_of_two()?;
    let shift = cap.trailing_zeros();
    (shift <= MAX_CLASS_SHIFT).then(|| ((shift - MIN_CLASS_SHIFT) as usize, cap))
}

fn layout(cap: usize, align: usize) -> Layout {
    Layout::from_size_align(cap, align).expect("I/O buffer layout")
}

/// A page-aligned byte buffer of `len` initialised bytes, returned to the pool
/// on drop. See the module docs.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    align: usize,
    /// Size class when the buffer may go back to the pool.
    class: Option<usize>,
}

// SAFETY: IoBuf uniquely owns its allocation (like Vec<u8>); no interior state
// is shared.
unsafe impl Send for IoBuf {}
// SAFETY: shared access is read-only (`&[u8]`); no interior mutability.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A buffer of `len` bytes aligned to [`IO_ALIGN`]. The contents are
    /// initialised but unspecified (zeroes or an earlier request's data):
    /// overwrite what you use.
    pub fn new(len: usize) -> IoBuf {
        IoBuf::with_align(len, IO_ALIGN)
    }

    /// As [`IoBuf::new`] with an alignment of at least `align` (a power of
    /// two); alignments above [`IO_ALIGN`] are not pooled.
    pub fn with_align(len: usize, align: usize) -> IoBuf {
        let align = align.max(IO_ALIGN);
        if align == IO_ALIGN {
            if let Some((class, cap)) = class_of(len) {
                let got = POOL.classes[class]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop();
                if let Some(FreeBuf(ptr)) = got {
                    POOL.retained.fetch_sub(cap, Ordering::Relaxed);
                    return IoBuf {
                        ptr,
                        len,
                        cap,
                        align,
                        class: Some(class),
                    };
                }
                return IoBuf {
                    ptr: alloc_zeroed(cap, align),
                    len,
                    cap,
                    align,
                    class: Some(class),
                };
            }
        }
        let cap = len.max(1).next_multiple_of(align);
        IoBuf {
            ptr: alloc_zeroed(cap, align),
            len,
            cap,
            align,
            class: None,
        }
    }

    /// Shortens the visible length (no effect if `len` is not smaller).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Converts into `Bytes` without copying; the buffer returns to the pool
    /// when the last `Bytes` referring to it is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

fn alloc_zeroed(cap: usize, align: usize) -> NonNull<u8> {
    let l = layout(cap, align);
    // SAFETY: `cap >= 1`, so the layout has a non-zero size.
    let raw = unsafe { alloc::alloc_zeroed(l) };
    NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(l))
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `cap >= len` initialised bytes (zeroed at
        // allocation, only written through safe slices since) for the life of
        // self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and uniquely borrowed through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Some(class) = self.class {
            let keep = (CLASS_RETAIN_BYTES / self.cap).max(2);
            let mut free = POOL.classes[class]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if free.len() < keep {
                if POOL.retained.fetch_add(self.cap, Ordering::Relaxed) + self.cap
                    <= POOL_RETAIN_BYTES
                {
                    free.push(FreeBuf(self.ptr));
                    return;
                }
                POOL.retained.fetch_sub(self.cap, Ordering::Relaxed);
            }
        }
        // SAFETY: allocated by `alloc_zeroed` with exactly this layout and not
        // handed to the pool (pooled buffers keep their original layout: the
        // class capacity and IO_ALIGN).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout(self.cap, self.align)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_sized_and_reused() {
        for len in [0, 1, 511, 4096, 4097, 65536, 1 << 20, (1 << 20) + 3] {
            let mut b = IoBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0, "len {len}");
            b.fill(0xa5);
            assert!(b.iter().all(|&x| x == 0xa5));
        }
        // A dropped buffer of a class comes back for the next request of that
        // class (same thread, nothing else in this test uses 8 MiB buffers).
        let b = IoBuf::new(8 << 20);
        let p = b.as_ptr();
        drop(b);
        let again = IoBuf::new((8 << 20) - 100);
        assert_eq!(again.as_ptr(), p);
        assert_eq!(again.len(), (8 << 20) - 100);
    }

    #[test]
    fn unpooled_sizes_and_alignments() {
        let big = IoBuf::new((64 << 20) + 1);
        assert_eq!(big.len(), (64 << 20) + 1);
        assert_eq!(big.as_ptr() as usize % IO_ALIGN, 0);
        let wide = IoBuf::with_align(100, 1 << 16);
        assert_eq!(wide.as_ptr() as usize % (1 << 16), 0);
        assert_eq!(wide.len(), 100);
    }

    #[test]
    fn bytes_keep_the_buffer_alive() {
        let mut b = IoBuf::new(10_000);
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        let bytes = b.into_bytes();
        let part = bytes.slice(100..200);
        drop(bytes);
        assert!(part.iter().enumerate().all(|(i, &x)| x == (i + 100) as u8));
    }

    #[test]
    fn truncate_only_shrinks() {
        let mut b = IoBuf::new(5000);
        b.truncate(6000);
        assert_eq!(b.len(), 5000);
        b.truncate(10);
        assert_eq!(b.len(), 10);
    }

    #[test]
    fn classes() {
        assert_eq!(class_of(0), Some((0, 4096)));
        assert_eq!(class_of(4096), Some((0, 4096)));
        assert_eq!(class_of(4097), Some((1, 8192)));
        assert_eq!(class_of(32 << 20), Some((CLASSES - 1, 32 << 20)));
        assert_eq!(class_of((32 << 20) + 1), None);
    }
}

//! Pooled, page-aligned I/O buffers.
//!
//! The data path moves whole requests through memory: write payloads arrive
//! from the socket, read data goes back to it. A fresh heap allocation per
//! request costs a zero-fill, page faults on first touch and, once freed, the
//! allocator trimming its arenas (`madvise`) — measured at 20-30% of the
//! agent's CPU on 1 MiB requests (bench/HISTORY.md). [`IoBuf`] instead takes a
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
//! - Buffers of 1 MiB and more are mapped with `mmap` at a 2 MiB boundary and
//!   marked `MADV_HUGEPAGE` (two 1 MiB buffers share one 2 MiB mapping).
//!   Backed by transparent huge pages, an O_DIRECT request on one of them is
//!   a few physically contiguous segments instead of one per 4 KiB page: a
//!   1 MiB read of scattered pages has 256 segments, more than a virtio disk
//!   takes in one request (`max_segments` 254 on the bench's VM), so the
//!   block layer split each into two requests (1016 + 8 KiB) whenever the
//!   pages happened to be scattered (bench/HISTORY.md, "Direct seq read
//!   round"; the io_uring engine submits large direct reads unplugged so
//!   that they are not merged instead). Without huge pages (THP off, no free
//!   huge page) they are ordinary pages, as before.
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
/// Pooled buffers of at least this size are mapped for huge pages.
const MAPPED_MIN: usize = 1 << 20;
/// The (x86-64 and arm64 4K-page) transparent huge page size.
const HUGE_PAGE: usize = 2 << 20;

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
                let ptr = if cap >= MAPPED_MIN {
                    map_huge(class, cap)
                } else {
                    alloc_zeroed(cap, align)
                };
                return IoBuf {
                    ptr,
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

/// A zeroed mapping for a pooled buffer of `cap >= MAPPED_MIN` bytes (a
/// power of two), 2 MiB-aligned and advised for transparent huge pages.
/// Below 2 MiB, the mapping is one huge page split into `HUGE_PAGE / cap`
/// buffers: the first is returned, the others go to the pool (if it has
/// room; else they are unmapped, and the returned one may then get ordinary
/// pages).
fn map_huge(class: usize, cap: usize) -> NonNull<u8> {
    let map_len = cap.max(HUGE_PAGE);
    // Over-map by one huge page so that a 2 MiB-aligned start exists inside.
    let reserve = map_len + HUGE_PAGE;
    // SAFETY: an anonymous private mapping at an address of the kernel's
    // choice; no existing memory is affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        alloc::handle_alloc_error(layout(cap, IO_ALIGN));
    }
    let base = raw as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    if start > base {
        // SAFETY: the head lies inside the mapping made above, before the
        // kept range `[start, start + map_len)`; nothing refers to it.
        unsafe { unmap(base, start - base) };
    }
    let tail = base + reserve - (start + map_len);
    if tail > 0 {
        // SAFETY: the tail lies inside the mapping made above, after the
        // kept range; nothing refers to it.
        unsafe { unmap(start + map_len, tail) };
    }
    // SAFETY: advice on the range just mapped (no memory is accessed).
    // Advice only: without THP the mapping works with ordinary pages.
    unsafe { libc::madvise(start as *mut libc::c_void, map_len, libc::MADV_HUGEPAGE) };
    for extra in (start + cap..start + map_len).step_by(cap) {
        let ptr = NonNull::new(extra as *mut u8).expect("inside a mapping");
        // SAFETY: `[extra, extra + cap)` is part of the fresh mapping and
        // not handed out elsewhere; `give_back` takes it over as a pooled
        // buffer of this class or unmaps it.
        unsafe { give_back(class, cap, ptr) };
    }
    NonNull::new(start as *mut u8).expect("mmap never returns address 0 here")
}

/// Unmaps `[addr, addr + len)`.
///
/// # Safety
/// The range must be mapped memory that nothing refers to any more.
unsafe fn unmap(addr: usize, len: usize) {
    // SAFETY: per the function's contract.
    let r = unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    debug_assert_eq!(r, 0, "munmap of an owned range");
}

/// Puts a pooled buffer of `class` (capacity `cap`) into the pool if it has
/// room, or frees it.
///
/// # Safety
/// `ptr` must own a buffer of this class (allocated by [`alloc_zeroed`] with
/// `layout(cap, IO_ALIGN)`, or by [`map_huge`] when `cap >= MAPPED_MIN`) that
/// nothing else refers to.
unsafe fn give_back(class: usize, cap: usize, ptr: NonNull<u8>) {
    let keep = (CLASS_RETAIN_BYTES / cap).max(2);
    {
        let mut free = POOL.classes[class]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if free.len() < keep {
            if POOL.retained.fetch_add(cap, Ordering::Relaxed) + cap <= POOL_RETAIN_BYTES {
                free.push(FreeBuf(ptr));
                return;
            }
            POOL.retained.fetch_sub(cap, Ordering::Relaxed);
        }
    }
    if cap >= MAPPED_MIN {
        // SAFETY: a `map_huge` buffer spans exactly `cap` mapped bytes
        // (per the contract), no longer referenced.
        unsafe { unmap(ptr.as_ptr() as usize, cap) }
    } else {
        // SAFETY: allocated by `alloc_zeroed` with exactly this layout (per
        // the contract).
        unsafe { alloc::dealloc(ptr.as_ptr(), layout(cap, IO_ALIGN)) }
    }
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
            // SAFETY: a pooled-class buffer was made by `alloc_zeroed` with
            // `layout(cap, IO_ALIGN)` or, from `MAPPED_MIN` on, by
            // `map_huge` (see `with_align`), and is owned by `self`.
            unsafe { give_back(class, self.cap, self.ptr) };
            return;
        }
        // SAFETY: allocated by `alloc_zeroed` with exactly this layout and
        // owned by `self`.
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
    fn mapped_classes_are_huge_page_aligned_and_survive_pool_overflow() {
        // 1 MiB buffers are halves of 2 MiB mappings, larger ones start on
        // a 2 MiB boundary (what lets THP back them).
        let big = IoBuf::new(16 << 20);
        assert_eq!(big.as_ptr() as usize % HUGE_PAGE, 0);
        // More 1 MiB buffers than the class keeps: the twins and the extra
        // buffers go to the pool or are unmapped; every byte stays usable.
        let mut bufs: Vec<IoBuf> = (0..40).map(|_| IoBuf::new(1 << 20)).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.as_ptr() as usize % MAPPED_MIN, 0);
            b.fill(i as u8);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8), "buffer {i}");
        }
        drop(bufs);
        let again: Vec<IoBuf> = (0..40).map(|_| IoBuf::new(3 << 19)).collect();
        for b in &again {
            assert_eq!(b.len(), 3 << 19);
            assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
        }
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

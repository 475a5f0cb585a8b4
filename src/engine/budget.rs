//! One memory budget for everything a client makes the server hold.
//!
//! Each limit on its own (body size, images per batch, pixels per image) is small; what kills
//! a server is many of them at once. So every byte that exists because of a request is reserved
//! here before it is allocated, and given back when its owner drops:
//!
//! - the **held** share: request bodies as they arrive, images fetched for Label Studio tasks,
//!   answers built from a client's list. These are reserved without waiting; when the share is
//!   taken the request is answered 429 (`memory_budget_exhausted`) at once, so a stalled upload
//!   can hold its bytes but never more than the share.
//! - the **decode** share: the working memory of decoding and preprocessing one image
//!   ([`crate::image::Header::peak_bytes`]). A decode waits for its share (until its request's
//!   deadline), because it only starts once its request's bytes are already held.
//!
//! The split keeps the two from starving each other: request bodies can never take the memory
//! that decoding needs to finish the requests already admitted. `--memory-budget-bytes` sets
//! the total; each share is half.
//!
//! Permits are counted in KiB (tokio's semaphore counts in `u32`), rounded up.

use std::{sync::Arc, time::Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Error;

/// The server's memory budget; cheap to clone.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    held: Arc<Semaphore>,
    decode: Arc<Semaphore>,
    share_kib: u32,
}

/// Bytes reserved from the budget; given back on drop.
#[derive(Debug, Default)]
pub struct Reservation(Option<OwnedSemaphorePermit>);

impl Reservation {
    /// Adds `other`'s bytes to this reservation.
    pub fn merge(&mut self, other: Reservation) {
        match (&mut self.0, other.0) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (mine @ None, theirs) => *mine = theirs,
            (Some(_), None) => {}
        }
    }

    /// Keeps `bytes` of this reservation (rounded up to a KiB) and gives the rest back.
    pub fn shrink_to(&mut self, bytes: u64) {
        if let Some(p) = &mut self.0 {
            let keep = kib(bytes) as usize;
            if p.num_permits() > keep {
                drop(p.split(p.num_permits() - keep));
            }
        }
    }

    /// Bytes held (in whole KiB).
    pub fn bytes(&self) -> u64 {
        self.0.as_ref().map_or(0, |p| p.num_permits() as u64 * 1024)
    }
}

/// A byte buffer filled from the network (a request body, a fetched image) whose capacity, not
/// only its length, is held in the budget. It starts small and doubles as bytes arrive, each
/// growth reserved before it happens, so what a client holds is at most twice what it has
/// really sent (plus [`FIRST_CAPACITY`]), and each growth also holds the old capacity while it
/// is copied: a declared length is only a ceiling, never reserved up front, or a client could
/// declare 32 MiB, send one byte and hold the budget from others.
#[derive(Debug)]
pub struct HeldBuffer {
    buf: Vec<u8>,
    held: Reservation,
    ceiling: usize,
    budget: MemoryBudget,
}

/// The capacity a [`HeldBuffer`] starts with: most images fit, so most bodies never regrow.
pub const FIRST_CAPACITY: usize = 64 * 1024;

impl HeldBuffer {
    /// An empty buffer for a body of `declared` bytes (0 when unknown), which the caller has
    /// checked is at most `limit`; it never grows past the declared length when there is one,
    /// nor past `limit`.
    pub fn new(budget: &MemoryBudget, declared: usize, limit: usize) -> Result<Self, Error> {
        let ceiling = if declared > 0 { declared.min(limit) } else { limit };
        let first = ceiling.min(FIRST_CAPACITY);
        let held = budget.hold(first as u64)?;
        Ok(Self { buf: Vec::with_capacity(first), held, ceiling, budget: budget.clone() })
    }

    /// Bytes in the buffer.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends `chunk`, reserving any growth first. The caller has checked that the result stays
    /// within `limit`.
    pub fn extend(&mut self, chunk: &[u8]) -> Result<(), Error> {
        let needed = self.buf.len() + chunk.len();
        if needed > self.buf.capacity() {
            let grown = needed.max(self.buf.capacity() * 2).min(self.ceiling).max(needed);
            // The reservation is topped up to the new capacity rounded up once, not by the
            // growth rounded up: growths of odd sizes (large network reads under load) would
            // otherwise each round up a KiB and the buffer hold more than its capacity.
            let top_up = (kib(grown as u64) * 1024).saturating_sub(self.held.bytes());
            self.held.merge(self.budget.hold(top_up)?);
            // Growing copies into a new allocation while the old one still exists: the old
            // capacity is held a second time until the copy is done, so several bodies growing
            // at once never pass the share (a test saw 1.5x the share without this).
            let copying = self.budget.hold(self.buf.capacity() as u64)?;
            self.buf.reserve_exact(grown - self.buf.len());
            drop(copying);
        }
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    /// The bytes and their reservation.
    pub fn into_parts(self) -> (bytes::Bytes, Reservation) {
        (bytes::Bytes::from(self.buf), self.held)
    }
}

/// Makes glibc hand every freed allocation of 1 MiB or more straight back to the kernel.
///
/// The budget counts what requests hold; it is only a bound on the process's memory if freed
/// bodies stop being resident. glibc's default raises its mmap threshold each time a large
/// block is freed (up to 32 MiB), so after a few big uploads every body under 32 MiB comes
/// from the heap, where a growing buffer copies into a new block and the old one stays
/// resident in its thread's arena: 16 stalled uploads against a 128 MiB held share raised the
/// peak resident set by 150-200 MiB (a CI run failed on it). With the threshold fixed at 1 MiB,
/// where the dynamic one settles under ordinary traffic anyway (a decoded photo is about a
/// MiB), the same run grows by the share and no more. Per-image buffers below it stay on the
/// heap, so normal requests pay no extra page faults.
///
/// An operator's own `MALLOC_MMAP_THRESHOLD_` or `GLIBC_TUNABLES` wins. Other C libraries
/// are left as they are.
pub fn release_large_frees_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() && std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; it is called before the runtime
        // starts any thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
    }
}

fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

impl MemoryBudget {
    /// A budget of `total` bytes, half for held request bytes and half for decoding.
    pub fn new(total: u64) -> Self {
        let share = (kib(total) / 2).clamp(1, u64::from(u32::MAX).min(Semaphore::MAX_PERMITS as u64)) as u32;
        Self {
            held: Arc::new(Semaphore::new(share as usize)),
            decode: Arc::new(Semaphore::new(share as usize)),
            share_kib: share,
        }
    }

    /// A budget that never refuses, for offline tools that feed the pipeline themselves.
    pub fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    /// Bytes in each share.
    pub fn share_bytes(&self) -> u64 {
        u64::from(self.share_kib) * 1024
    }

    /// Bytes reserved now, across both shares.
    pub fn used_bytes(&self) -> u64 {
        let free = self.held.available_permits() as u64 + self.decode.available_permits() as u64;
        (2 * u64::from(self.share_kib)).saturating_sub(free) * 1024
    }

    /// Reserves `bytes` of the held share at once, or says the share is taken.
    pub fn hold(&self, bytes: u64) -> Result<Reservation, Error> {
        if bytes == 0 {
            return Ok(Reservation::default());
        }
        let n = kib(bytes);
        if n > u64::from(self.share_kib) {
            return Err(Error::MemoryBudgetExhausted { retry_after_s: 1 });
        }
        Arc::clone(&self.held)
            .try_acquire_many_owned(n as u32)
            .map(|p| Reservation(Some(p)))
            .map_err(|_| Error::MemoryBudgetExhausted { retry_after_s: 1 })
    }

    /// Reserves `bytes` of the decode share, waiting for other decodes until `deadline`.
    /// A need larger than the whole share is refused at once: waiting would never meet it.
    pub async fn decode(&self, bytes: u64, deadline: Instant) -> Result<Reservation, Error> {
        let n = kib(bytes);
        if n > u64::from(self.share_kib) {
            return Err(Error::ImageNeedsTooMuchMemory { needed: bytes, limit: self.share_bytes() });
        }
        let acquire = Arc::clone(&self.decode).acquire_many_owned(n as u32);
        match tokio::time::timeout_at(deadline.into(), acquire).await {
            Ok(Ok(p)) => Ok(Reservation(Some(p))),
            Ok(Err(_)) => Err(Error::Unavailable("the memory budget is closed".into())),
            Err(_) => Err(Error::Timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn held_share_refuses_past_half_and_gives_back_on_drop() {
        let b = MemoryBudget::new(8 << 20);
        assert_eq!(b.share_bytes(), 4 << 20);
        let mut r = b.hold(3 << 20).unwrap();
        assert!(matches!(b.hold(2 << 20), Err(Error::MemoryBudgetExhausted { .. })));
        r.merge(b.hold(1 << 20).unwrap());
        assert_eq!(r.bytes(), 4 << 20);
        assert_eq!(b.used_bytes(), 4 << 20);
        drop(r);
        assert_eq!(b.used_bytes(), 0);
        // One byte still costs a whole KiB, so nothing is reserved for free.
        assert_eq!(b.hold(1).unwrap().bytes(), 1024);
        assert!(b.hold(5 << 20).is_err());
    }

    /// A declared length is a ceiling, not a reservation: one byte of a body declared at 32 MiB
    /// holds the first 64 KiB only; the buffer doubles as bytes arrive, never past the declared
    /// length, so what is held stays within twice what was received.
    #[test]
    fn held_buffer_reserves_what_arrives_not_what_is_declared() {
        let b = MemoryBudget::new(256 << 20);
        let mut buf = HeldBuffer::new(&b, 32 << 20, 32 << 20).unwrap();
        buf.extend(&[7]).unwrap();
        assert_eq!(b.used_bytes(), FIRST_CAPACITY as u64);
        let chunk = vec![0_u8; 1 << 20];
        for _ in 0..5 {
            buf.extend(&chunk).unwrap();
            assert!(
                b.used_bytes() <= 2 * buf.len() as u64 + FIRST_CAPACITY as u64,
                "{} for {}",
                b.used_bytes(),
                buf.len()
            );
        }
        // Filled to exactly its declared length: no byte of capacity past it.
        let mut exact = HeldBuffer::new(&b, 100_000, 1 << 20).unwrap();
        for _ in 0..10 {
            exact.extend(&[1; 10_000]).unwrap();
        }
        let before = b.used_bytes();
        let (bytes, held) = exact.into_parts();
        assert_eq!(bytes.len(), 100_000);
        assert_eq!(held.bytes(), 100_000_u64.div_ceil(1024) * 1024);
        drop(held);
        assert!(b.used_bytes() < before);
    }

    /// Reads of odd sizes, as a loaded server takes from a socket, grow the buffer by amounts
    /// that are not whole KiB; what it holds at the end is still its length rounded up once
    /// (a clean-clone CI run saw a 1 MiB upload hold 1 MiB and 1 KiB).
    #[test]
    fn odd_growths_hold_the_capacity_rounded_once() {
        let b = MemoryBudget::new(256 << 20);
        let mut buf = HeldBuffer::new(&b, 1 << 20, 32 << 20).unwrap();
        let mut sent = 0;
        for size in [1, 200_003, 3, 300_007, 1].into_iter().cycle() {
            let n = size.min((1 << 20) - sent);
            buf.extend(&vec![0; n]).unwrap();
            sent += n;
            if sent == 1 << 20 {
                break;
            }
        }
        assert_eq!(b.used_bytes(), 1 << 20);
    }

    #[tokio::test]
    async fn decode_share_waits_then_times_out() {
        let b = MemoryBudget::new(8 << 20);
        let first = b.decode(3 << 20, Instant::now() + Duration::from_secs(1)).await.unwrap();
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(matches!(b.decode(2 << 20, soon).await, Err(Error::Timeout)));
        drop(first);
        assert!(b.decode(4 << 20, soon + Duration::from_secs(1)).await.is_ok());
        assert!(matches!(
            b.decode(5 << 20, Instant::now() + Duration::from_secs(1)).await,
            Err(Error::ImageNeedsTooMuchMemory { .. })
        ));
        // The held share is separate: decodes never starve it.
        let _d = b.decode(4 << 20, Instant::now() + Duration::from_secs(1)).await.unwrap();
        assert!(b.hold(4 << 20).is_ok());
    }
}

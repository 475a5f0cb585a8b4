//! Admission: how many images may be inside the server at once, decided before any work.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use crate::error::Error;

/// How many images may be inside the server at once, across every model and request: past
/// it, a request is refused at once (429) instead of queueing without bound.
#[derive(Debug)]
pub struct Admission {
    limit: usize,
    used: AtomicUsize,
}

impl Admission {
    /// At most `limit` images in flight.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit: limit.max(1), used: AtomicUsize::new(0) })
    }

    /// Reserves room for `n` images, or says the server is full.
    pub fn admit(self: &Arc<Self>, n: usize) -> Result<Permit, Error> {
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            if used + n > self.limit && used > 0 {
                return Err(Error::Overloaded { retry_after_s: 1 });
            }
            match self.used.compare_exchange_weak(used, used + n, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(Permit { admission: Arc::clone(self), n }),
                Err(now) => used = now,
            }
        }
    }

    /// Images in flight now.
    pub fn in_flight(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Room for some images; given back on drop.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    n: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.used.fetch_sub(self.n, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admission refuses past the limit and gives room back on drop. A single request larger
    /// than the whole limit is still let in when nothing else runs, so it is never refused
    /// forever (the batch-size limit bounds it).
    #[test]
    fn admission_is_bounded_and_released() {
        let a = Admission::new(4);
        let p1 = a.admit(3).unwrap();
        assert!(matches!(a.admit(2), Err(Error::Overloaded { .. })));
        let p2 = a.admit(1).unwrap();
        assert_eq!(a.in_flight(), 4);
        drop((p1, p2));
        assert_eq!(a.in_flight(), 0);
        let big = a.admit(10).unwrap();
        assert!(a.admit(1).is_err());
        drop(big);
    }
}

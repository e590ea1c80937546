//! The memory budget: one count, for the whole server, of the bytes clients
//! make it hold in flight — messages being read off sockets, pages of
//! history being written. What the budget cannot cover waits (a socket
//! stops being read: backpressure onto its client) and, past a deadline, is
//! refused with `busy` and closed, instead of growing.
//!
//! Each socket may hold [`FREE_BYTES`] of an unfinished message without
//! asking, so everyday frames never touch the budget; only the part of a
//! message beyond it is charged, in [`CHUNK_BYTES`] steps, until the message
//! is complete. A byte read is charged twice: tungstenite keeps it in its
//! frame buffer, and copies it into the message it assembles from
//! fragments (measured: an unfinished 200 KiB part holds ~400 KiB).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::PollSemaphore;

/// The budget counts in KiB.
const UNIT: usize = 1024;
/// Bytes of an unfinished message a socket holds without a charge.
pub const FREE_BYTES: usize = 16 * 1024;
/// A reading socket asks the budget for this much at a time.
const CHUNK_BYTES: usize = 16 * 1024;
/// Bytes of memory one byte read is charged as.
const HELD_PER_BYTE: usize = 2;
/// How long a socket waits for the budget before it is closed with `busy`.
pub const WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Budget {
    semaphore: Arc<Semaphore>,
    total: usize,
}

/// Bytes taken from the budget; they return when it is dropped.
pub struct Charge(#[allow(dead_code)] OwnedSemaphorePermit);

impl Budget {
    pub fn new(bytes: usize) -> Self {
        let units = bytes.div_ceil(UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Budget {
            semaphore: Arc::new(Semaphore::new(units)),
            total: units,
        }
    }

    /// `bytes` now, or `None` when the budget cannot spare them.
    pub fn try_charge(&self, bytes: usize) -> Option<Charge> {
        let units = u32::try_from(bytes.div_ceil(UNIT)).ok()?;
        let permit = self.semaphore.clone().try_acquire_many_owned(units).ok()?;
        Some(Charge(permit))
    }

    /// `bytes` as soon as the budget can spare them, or `None` after `wait`.
    pub async fn charge(&self, bytes: usize, wait: Duration) -> Option<Charge> {
        let units = u32::try_from(bytes.div_ceil(UNIT)).ok()?;
        let acquire = self.semaphore.clone().acquire_many_owned(units);
        match tokio::time::timeout(wait, acquire).await {
            Ok(Ok(permit)) => Some(Charge(permit)),
            _ => None,
        }
    }

    /// Bytes charged at the moment (for `/metrics` and the tests).
    pub fn in_use(&self) -> usize {
        (self.total - self.semaphore.available_permits()) * UNIT
    }
}

/// What one socket has read of the message it is receiving, shared by its
/// [`Metered`] stream and its connection.
#[derive(Default)]
pub struct Meter {
    /// Bytes read since the last complete message.
    unsettled: AtomicUsize,
    /// The charge for what exceeds [`FREE_BYTES`] of them.
    held: Mutex<Option<OwnedSemaphorePermit>>,
    /// Set when the socket waited for the budget in vain.
    starved: AtomicBool,
}

impl Meter {
    /// A complete message was read: what was charged for it is handed to
    /// the caller, to keep while the message is handled.
    pub fn settle(&self) -> Option<Charge> {
        let read = self.unsettled.swap(0, Ordering::Relaxed);
        // Nothing is charged below the free bytes: most messages skip the lock.
        if read < FREE_BYTES {
            return None;
        }
        self.held.lock().expect("meter lock").take().map(Charge)
    }

    /// Whether the socket's read failed for want of budget.
    pub fn starved(&self) -> bool {
        self.starved.load(Ordering::Relaxed)
    }

    fn held_bytes(&self) -> usize {
        let held = self.held.lock().expect("meter lock");
        held.as_ref().map_or(0, |p| p.num_permits() * UNIT)
    }

    fn hold(&self, permit: OwnedSemaphorePermit) {
        let mut held = self.held.lock().expect("meter lock");
        match held.as_mut() {
            Some(h) => h.merge(permit),
            None => *held = Some(permit),
        }
    }
}

/// A socket's stream that reads only as far as the budget allows.
pub struct Metered<S> {
    inner: S,
    meter: Arc<Meter>,
    semaphore: PollSemaphore,
    waiting: Option<Pin<Box<Sleep>>>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, meter: Arc<Meter>, budget: &Budget) -> Self {
        Metered {
            inner,
            meter,
            semaphore: PollSemaphore::new(budget.semaphore.clone()),
            waiting: None,
        }
    }

    /// Ready with how many more bytes may be read once the budget covers
    /// at least one.
    fn poll_covered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            let unsettled = self.meter.unsettled.load(Ordering::Relaxed);
            // The lock only once past the free bytes: most messages never are.
            let covered = if unsettled < FREE_BYTES {
                FREE_BYTES
            } else {
                FREE_BYTES + self.meter.held_bytes() / HELD_PER_BYTE
            };
            if unsettled < covered {
                if self.waiting.take().is_some() {
                    // Settled while waiting: drop the acquire under way, or
                    // what it is granted would sit in it unused.
                    self.semaphore = PollSemaphore::new(self.semaphore.clone_inner());
                }
                return Poll::Ready(Ok(covered - unsettled));
            }
            match self
                .semaphore
                .poll_acquire_many(cx, (CHUNK_BYTES / UNIT) as u32)
            {
                Poll::Ready(Some(permit)) => self.meter.hold(permit),
                Poll::Ready(None) => return Poll::Ready(Err(io::Error::other("budget closed"))),
                Poll::Pending => {
                    let wait = self
                        .waiting
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(WAIT)));
                    ready!(wait.as_mut().poll(cx));
                    self.meter.starved.store(true, Ordering::Relaxed);
                    return Poll::Ready(Err(io::Error::other("memory budget exhausted")));
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let covered = ready!(self.poll_covered(cx))?;
        // tungstenite hands in initialized buffers, so this costs nothing.
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(covered.min(buf.remaining())));
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut part))?;
        let read = part.filled().len();
        buf.advance(read);
        self.meter.unsettled.fetch_add(read, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_reader_past_its_free_bytes_waits_for_the_budget() {
        let budget = Budget::new(CHUNK_BYTES);
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let meter = Arc::new(Meter::default());
        let mut reader = Metered::new(server, meter.clone(), &budget);
        client.write_all(&vec![0; 4 * CHUNK_BYTES]).await.unwrap();
        let mut buf = vec![0; FREE_BYTES + CHUNK_BYTES / HELD_PER_BYTE];
        reader.read_exact(&mut buf).await.unwrap();
        assert_eq!(
            budget.in_use(),
            CHUNK_BYTES,
            "the chunk past the free bytes"
        );
        // The budget is spent: the next read waits (and, after WAIT, fails).
        let mut more = [0; 1];
        let waited =
            tokio::time::timeout(Duration::from_millis(200), reader.read_exact(&mut more)).await;
        assert!(waited.is_err(), "a read past the budget must wait");
        assert!(!meter.starved());
        // A settled message gives its charge to whoever handles it.
        let charge = meter.settle();
        assert_eq!(budget.in_use(), CHUNK_BYTES);
        drop(charge);
        // Settled, the reader needs no budget for its next bytes, and gives
        // back what its abandoned wait was granted.
        reader.read_exact(&mut more).await.unwrap();
        assert_eq!(budget.in_use(), 0);
    }
}

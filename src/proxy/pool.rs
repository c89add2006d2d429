//! The express path's pool of idle upstream connections.
//!
//! Pingora's pool (`TransportConnector`) wraps every released connection in
//! an `Arc<Mutex<_>>`, allocates two watch channels for it and spawns a task
//! that watches it while idle; taking it back wakes that task. That is
//! several allocations, a task spawn and a cross-task wake-up per request.
//! This pool keeps idle connections in a plain stack per backend: the most
//! recently used one is reused first, a connection the backend closed (or
//! that has unexpected bytes waiting) is detected when it is taken or put
//! back, and a sweep every [`SWEEP_EVERY`] closes idle connections past
//! their idle timeout or closed by the backend.
//!
//! New connections are still made by Pingora's connector (`new_stream`:
//! connect timeout, socket options, TLS).

use pingora::protocols::Stream;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, ReadBuf};

/// How often idle connections are checked for expiry and closes.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

struct Idle {
    stream: Stream,
    since: Instant,
    timeout: Option<Duration>,
}

impl Idle {
    fn expired(&self, now: Instant) -> bool {
        self.timeout.is_some_and(|t| now.duration_since(self.since) >= t)
    }
}

#[derive(Default)]
struct Inner {
    by_key: HashMap<u64, Vec<Idle>, std::hash::BuildHasherDefault<KeyHasher>>,
    count: usize,
}

/// Pool keys are hashes already (`PooledPeer`): used as they are.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

pub struct Pool {
    inner: Mutex<Inner>,
    max: usize,
    sweeping: AtomicBool,
}

impl Pool {
    /// At most `max` idle connections, all backends together.
    pub fn new(max: usize) -> Arc<Pool> {
        Arc::new(Pool {
            inner: Mutex::new(Inner::default()),
            max,
            sweeping: AtomicBool::new(false),
        })
    }

    /// The most recently released idle connection for `key` that is still
    /// usable, if any.
    pub fn take(&self, key: u64) -> Option<Stream> {
        let now = Instant::now();
        loop {
            let mut idle = {
                let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                let idle = inner.by_key.get_mut(&key)?.pop()?;
                inner.count -= 1;
                idle
            };
            if !idle.expired(now) && still_idle(&mut idle.stream) {
                return Some(idle.stream);
            }
            // Dropped here: expired, closed by the backend, or unexpected data.
        }
    }

    /// Keep a connection whose exchange finished cleanly, for `timeout`.
    pub fn put(self: &Arc<Self>, key: u64, mut stream: Stream, timeout: Option<Duration>) {
        if !still_idle(&mut stream) {
            return;
        }
        self.start_sweeper();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.count >= self.max {
            return; // full: this one closes
        }
        inner.count += 1;
        inner.by_key.entry(key).or_default().push(Idle {
            stream,
            since: Instant::now(),
            timeout,
        });
    }

    /// Idle connections held now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().count
    }

    /// Close the expired connections and the ones the backend closed.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut closed = Vec::new();
        {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let mut removed = 0;
            inner.by_key.retain(|_, list| {
                let before = list.len();
                let mut keep = Vec::with_capacity(list.len());
                for mut idle in list.drain(..) {
                    if idle.expired(now) || !still_idle(&mut idle.stream) {
                        closed.push(idle);
                    } else {
                        keep.push(idle);
                    }
                }
                removed += before - keep.len();
                *list = keep;
                !list.is_empty()
            });
            inner.count -= removed;
        }
        drop(closed); // closed outside the lock
    }

    /// One sweeper task per pool, on the runtime that first releases a
    /// connection into it; it ends with that runtime.
    fn start_sweeper(self: &Arc<Self>) {
        if self.sweeping.load(Ordering::Relaxed) || self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                match pool.upgrade() {
                    Some(p) => p.sweep(),
                    None => return,
                }
            }
        });
    }
}

/// Whether an idle connection is still open with nothing waiting to be
/// read: one poll of a 1-byte read, with a no-op waker. Pending means idle
/// and open (tokio answers from its readiness state, without a system call,
/// unless the socket became readable); a close, an error or unexpected data
/// mean the connection cannot be reused.
fn still_idle(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(Pin::new(stream).poll_read(&mut cx, &mut buf), Poll::Pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    type L4 = pingora::protocols::l4::stream::Stream;

    /// A connected pair: (client side as a Pingora stream, server side).
    async fn pair(listener: &TcpListener) -> (Stream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client: L4 = client.unwrap().into();
        (Box::new(client), server.unwrap().0)
    }

    /// Poll `cond` (letting the runtime see socket events) for up to 2 s.
    async fn until(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..400 {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    #[tokio::test]
    async fn most_recent_first_per_key() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(8);
        let (a, _a_srv) = pair(&listener).await;
        let (b, _b_srv) = pair(&listener).await;
        let (a_id, b_id) = (a.id(), b.id());
        pool.put(1, a, None);
        pool.put(1, b, None);
        assert_eq!(pool.len(), 2);
        assert!(pool.take(2).is_none(), "other keys are separate");
        assert_eq!(pool.take(1).unwrap().id(), b_id);
        assert_eq!(pool.take(1).unwrap().id(), a_id);
        assert!(pool.take(1).is_none());
        assert_eq!(pool.len(), 0);
    }

    #[tokio::test]
    async fn unexpected_data_or_a_close_means_no_reuse() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(8);
        // Bytes waiting on an idle connection: refused when released.
        let (mut a, mut a_srv) = pair(&listener).await;
        assert!(still_idle(&mut a));
        a_srv.write_all(b"unexpected").await.unwrap();
        assert!(until(|| !still_idle(&mut a)).await, "the waiting bytes were never seen");
        pool.put(1, a, None);
        assert_eq!(pool.len(), 0);
        // A connection the backend closes while pooled: the sweep closes it.
        let (b, b_srv) = pair(&listener).await;
        let (c, _c_srv) = pair(&listener).await;
        pool.put(1, b, None);
        pool.put(2, c, None);
        drop(b_srv);
        assert!(
            until(|| {
                pool.sweep();
                pool.len() == 1
            })
            .await,
            "the closed connection stayed in the pool"
        );
        assert!(pool.take(1).is_none());
        assert!(pool.take(2).is_some(), "the open one stays");
    }

    #[tokio::test]
    async fn cap_and_idle_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(2);
        let mut servers = Vec::new();
        for _ in 0..3 {
            let (s, srv) = pair(&listener).await;
            servers.push(srv);
            pool.put(7, s, Some(Duration::from_millis(50)));
        }
        assert_eq!(pool.len(), 2, "the third went over the cap and was closed");
        let t0 = Instant::now();
        assert!(until(|| t0.elapsed() >= Duration::from_millis(50)).await);
        assert!(pool.take(7).is_none(), "expired connections are not reused");
        assert_eq!(pool.len(), 0);
    }
}

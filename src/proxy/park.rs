//! Parked client connections: idle ones held as a bare socket, not a task.
//!
//! A plain-TCP client connection that has waited `server.park_idle_after`
//! for its next request (or, new, for its first bytes) is taken off its
//! task. Its socket, as a duplicate descriptor, joins an epoll set owned by
//! this worker thread's [`Parker`], with what the connection needs to carry
//! on ([`Resume`], its keep-alive deadline, its client address): about 90
//! bytes per connection.
//! The task, its future and Pingora's stream around the socket (with its
//! write buffer), about 4 KB, are freed.
//!
//! When the client sends again (or hangs up), the parker takes the socket
//! out of its set, registers it with the runtime again and spawns a task to
//! serve it, on the same thread. The parker closes the sockets whose
//! keep-alive time runs out (checked every second) and, on shutdown, all of
//! them at once.
//!
//! Cost: parking is a `dup`, an `epoll_ctl` to add the duplicate here, and
//! the runtime's `epoll_ctl` and `close` of the original; waking is an
//! `epoll_wait`, two `epoll_ctl` and a task spawn. Only a connection idle for
//! longer than `park_idle_after` pays it, once per idle period.

use super::{L4Stream, ProxyApp, RequestGauge};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use pingora::server::ShutdownWatch;
use slab::Slab;
use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// How often parked connections are checked against their deadline.
const SWEEP: Duration = Duration::from_secs(1);

/// Readiness events taken per `epoll_wait`.
const BATCH: usize = 256;

/// Connections parked within one sweep interval after which the thread's
/// allocator is asked to return freed memory (about 1 MB of freed tasks),
/// unless many were woken as well: connections that come and go keep
/// reusing that memory, and returning it would only cost page faults when
/// their tasks are allocated again.
const COLLECT_AFTER: usize = 256;

/// Where a connection carries on when it wakes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Resume {
    /// Requests it may still serve (None: no limit).
    pub remaining: Option<u32>,
    /// No request yet: on an h2c listener, HTTP/2 is still possible.
    pub fresh: bool,
}

/// A parked connection: a descriptor of its socket, and what it carries on
/// with.
pub(super) struct Parked {
    fd: OwnedFd,
    resume: Resume,
    deadline: Instant,
    /// Its client (so that waking it asks the kernel nothing).
    peer: Option<std::net::SocketAddr>,
    /// Keeps it counted in `switchyard_downstream_connections`.
    conn: RequestGauge,
    /// And in `switchyard_downstream_connections_parked`.
    _parked: RequestGauge,
}

impl Parked {
    /// A connection to park: its socket (a duplicate, the stream's own
    /// descriptor is closed with it), where it carries on, when it is
    /// closed if its client sends nothing, its client, and its gauges.
    pub(super) fn new(
        fd: OwnedFd,
        resume: Resume,
        deadline: Instant,
        peer: Option<std::net::SocketAddr>,
        conn: RequestGauge,
        parked: &prometheus::IntGauge,
    ) -> Parked {
        parked.inc();
        Parked {
            fd,
            resume,
            deadline,
            peer,
            conn,
            _parked: RequestGauge(parked.clone()),
        }
    }
}

struct Slots {
    parked: Slab<Parked>,
    /// Shut down: park nothing more.
    closed: bool,
    /// Connections parked since the last sweep.
    newly_parked: usize,
    /// Connections woken since the last sweep.
    woken: usize,
}

/// One worker thread's parked connections, for one [`ProxyApp`].
pub(super) struct Parker {
    registry: Registry,
    slots: Mutex<Slots>,
}

thread_local! {
    /// This thread's parkers, one per app. The `Weak` keeps the app's
    /// address from being reused while its entry exists.
    static PARKERS: RefCell<Vec<(Weak<ProxyApp>, Arc<Parker>)>> = const { RefCell::new(Vec::new()) };
}

impl Parker {
    /// This thread's parker for `app`, started (a task on this runtime) on
    /// first use. None if its epoll set cannot be created.
    pub(super) fn of(app: &Arc<ProxyApp>, shutdown: &ShutdownWatch) -> Option<Arc<Parker>> {
        PARKERS.with_borrow_mut(|parkers| {
            let key = Arc::downgrade(app);
            if let Some((_, p)) = parkers.iter().find(|(a, _)| a.ptr_eq(&key)) {
                return Some(p.clone());
            }
            let poll = Poll::new().ok()?;
            let registry = poll.registry().try_clone().ok()?;
            // SAFETY: the epoll descriptor is owned by `poll`, which the
            // `AsyncFd` owns for as long as it is registered.
            let events = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }.ok()?;
            let parker = Arc::new(Parker {
                registry,
                slots: Mutex::new(Slots {
                    parked: Slab::new(),
                    closed: false,
                    newly_parked: 0,
                    woken: 0,
                }),
            });
            tokio::spawn(parker.clone().run(events, app.clone(), shutdown.clone()));
            parkers.push((key, parker.clone()));
            Some(parker)
        })
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        // Nothing panics while holding the lock; a poisoned one is still consistent.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Park `tcp` (its socket as `p.fd`, a duplicate) until its client
    /// sends again, its deadline passes or the server shuts down. The caller
    /// must have found nothing to read (so no bytes are buffered in `tcp`).
    /// Err: not parked, the stream and its open-connection gauge handed
    /// back.
    pub(super) fn park(&self, tcp: Box<L4Stream>, p: Parked) -> Result<(), (Box<L4Stream>, RequestGauge)> {
        {
            let mut guard = self.slots();
            let slots = &mut *guard;
            if slots.closed {
                return Err((tcp, p.conn));
            }
            let entry = slots.parked.vacant_entry();
            let token = Token(entry.key());
            if self.registry.register(&mut SourceFd(&p.fd.as_raw_fd()), token, Interest::READABLE).is_err() {
                return Err((tcp, p.conn));
            }
            entry.insert(p);
            slots.newly_parked += 1;
        }
        // Closes the original descriptor, after removing it from the
        // runtime's reactor.
        drop(tcp);
        Ok(())
    }

    /// Wake parked connections as their clients send, close expired ones,
    /// until shutdown; then close every parked connection.
    async fn run(self: Arc<Self>, mut epoll: AsyncFd<Poll>, app: Arc<ProxyApp>, shutdown: ShutdownWatch) {
        let mut events = Events::with_capacity(BATCH);
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sd = shutdown.clone();
        while !*sd.borrow() {
            tokio::select! {
                ready = epoll.readable_mut() => {
                    let Ok(mut guard) = ready else { break };
                    match guard.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                        Ok(()) if events.is_empty() => {
                            guard.clear_ready();
                            continue;
                        }
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!(error = %e, "parked connections: epoll_wait failed; closing them, and parking no more on this thread");
                            break;
                        }
                    }
                    for ev in events.iter() {
                        let Some(p) = self.take(ev.token().0) else { continue };
                        let tcp = std::net::TcpStream::from(p.fd);
                        // A client that hung up is closed here, without a
                        // task; anything else is served again.
                        if !matches!(tcp.peek(&mut [0u8; 1]), Ok(0)) {
                            app.resume(tcp, p.resume, p.deadline, p.conn, p.peer, &shutdown);
                        }
                    }
                }
                _ = sweep.tick() => self.sweep(Instant::now()),
                r = sd.changed() => if r.is_err() { break },
            }
        }
        let mut slots = self.slots();
        slots.closed = true;
        // Dropping closes them (a FIN to each client) and uncounts them.
        slots.parked.clear();
    }

    /// Take a woken connection out of the set.
    fn take(&self, key: usize) -> Option<Parked> {
        let p = {
            let mut slots = self.slots();
            let p = slots.parked.try_remove(key)?;
            slots.woken += 1;
            p
        };
        // Its descriptor lives on: without this, the set would keep
        // reporting its events.
        let _ = self.registry.deregister(&mut SourceFd(&p.fd.as_raw_fd()));
        Some(p)
    }

    /// Close the parked connections whose keep-alive time has run out and,
    /// if many were parked since the last sweep, hand the memory their tasks
    /// held back to the system.
    fn sweep(&self, now: Instant) {
        let mut slots = self.slots();
        // Closing a descriptor takes it out of the set: it is the only one.
        slots.parked.retain(|_, p| p.deadline > now);
        if slots.parked.len() < slots.parked.capacity() / 4 {
            slots.parked.shrink_to_fit();
        }
        let parked = std::mem::take(&mut slots.newly_parked);
        let woken = std::mem::take(&mut slots.woken);
        drop(slots);
        if parked >= COLLECT_AFTER && woken < parked / 4 {
            crate::alloc::release_free_memory();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn parker() -> (Poll, Parker) {
        let poll = Poll::new().unwrap();
        let registry = poll.registry().try_clone().unwrap();
        let slots = Mutex::new(Slots { parked: Slab::new(), closed: false, newly_parked: 0, woken: 0 });
        (poll, Parker { registry, slots })
    }

    const AT: Resume = Resume { remaining: None, fresh: false };

    /// Park one server-side connection of a new loopback pair.
    async fn park_one(
        parker: &Parker,
        listener: &tokio::net::TcpListener,
        deadline: Instant,
        gauges: &(prometheus::IntGauge, prometheus::IntGauge),
    ) -> std::net::TcpStream {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().await.unwrap();
        gauges.0.inc();
        let conn = RequestGauge(gauges.0.clone());
        let peer = Some(client.local_addr().unwrap());
        let server = Box::new(L4Stream::from(server));
        let fd = super::super::dup_socket(&server).unwrap();
        assert!(parker.park(server, Parked::new(fd, AT, deadline, peer, conn, &gauges.1)).is_ok());
        client
    }

    fn gauges() -> (prometheus::IntGauge, prometheus::IntGauge) {
        (prometheus::IntGauge::new("open", "open").unwrap(), prometheus::IntGauge::new("parked", "parked").unwrap())
    }

    #[tokio::test]
    async fn sweep_closes_the_connections_past_their_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_poll, parker) = parker();
        let g = gauges();
        let now = Instant::now();
        let mut early = park_one(&parker, &listener, now + Duration::from_secs(10), &g).await;
        let mut late = park_one(&parker, &listener, now + Duration::from_secs(20), &g).await;
        assert_eq!((parker.slots().parked.len(), g.0.get(), g.1.get()), (2, 2, 2));
        parker.sweep(now + Duration::from_secs(15));
        assert_eq!((parker.slots().parked.len(), g.0.get(), g.1.get()), (1, 1, 1));
        early.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(early.read(&mut [0u8; 1]).unwrap(), 0, "the expired connection is closed");
        late.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let e = late.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "the other one stays open");
        parker.sweep(now + Duration::from_secs(25));
        assert_eq!((parker.slots().parked.len(), g.0.get(), g.1.get()), (0, 0, 0));
        late.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(late.read(&mut [0u8; 1]).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_woken_connection_leaves_the_set_and_stays_open() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut poll, parker) = parker();
        let g = gauges();
        let mut client = park_one(&parker, &listener, Instant::now() + Duration::from_secs(60), &g).await;
        let mut events = Events::with_capacity(8);
        client.write_all(b"G").unwrap();
        poll.poll(&mut events, Some(Duration::from_secs(5))).unwrap();
        let key = events.iter().next().expect("an event for the parked connection").token().0;
        let Parked { fd, conn, peer, .. } = parker.take(key).expect("parked under its token");
        assert_eq!((parker.slots().parked.len(), g.1.get(), g.0.get()), (0, 0, 1), "still counted as open");
        assert_eq!(peer, Some(client.local_addr().unwrap()), "its client is kept");
        // Taken out of the set: more bytes raise no event.
        client.write_all(b"ET").unwrap();
        poll.poll(&mut events, Some(Duration::from_millis(200))).unwrap();
        assert!(events.is_empty(), "{events:?}");
        // The socket itself is untouched: everything sent is there to read.
        let mut server = std::net::TcpStream::from(fd);
        server.set_nonblocking(false).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 3];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"GET");
        drop(conn);
        assert_eq!(g.0.get(), 0);
    }
}

//! The access log: one structured line per request, written off the hot path.
//!
//! The proxy hands an owned [`AccessRecord`] to a bounded queue and moves on;
//! a dedicated thread formats and writes. When the queue is full the line is
//! dropped and counted (`switchyard_access_log_dropped_total`) rather than
//! making a request wait on a slow disk. The file is reopened on SIGHUP (for
//! external rotation) and rotated by size when `max_bytes` is set.

use crate::config::{AccessLogSettings, LogFormat, LogTarget};
use crate::metrics::Metrics;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::SystemTime;

#[derive(Debug, Serialize)]
pub struct AccessRecord {
    /// RFC 3339 UTC, millisecond precision.
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    pub client: Option<IpAddr>,
    pub method: String,
    pub host: String,
    pub path: String,
    pub status: u16,
    pub route: Option<Arc<str>>,
    pub cluster: Option<Arc<str>>,
    pub backend: Option<SocketAddr>,
    /// Seconds from sending to the backend until its response was done.
    pub upstream_duration: Option<f64>,
    /// Seconds from the request's arrival until the response was done.
    pub duration: f64,
    pub bytes_in: usize,
    pub bytes_out: usize,
    pub attempts: u32,
    pub request_id: String,
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

impl AccessRecord {
    fn write_text(&self, w: &mut impl Write) -> io::Result<()> {
        let dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
        writeln!(
            w,
            "{} {} \"{} {} {}\" {} route={} cluster={} backend={} upstream={} total={:.6} in={} out={} attempts={} id={}",
            humantime::format_rfc3339_millis(self.time),
            dash(self.client.map(|c| c.to_string())),
            self.method,
            self.host,
            self.path,
            self.status,
            dash(self.route.as_ref().map(|r| r.to_string())),
            dash(self.cluster.as_ref().map(|c| c.to_string())),
            dash(self.backend.map(|b| b.to_string())),
            dash(self.upstream_duration.map(|d| format!("{d:.6}"))),
            self.duration,
            self.bytes_in,
            self.bytes_out,
            self.attempts,
            self.request_id,
        )
    }
}

enum Msg {
    Line(Box<AccessRecord>),
    Reopen,
    Flush(SyncSender<()>),
}

/// Cheap to clone; `None` inside when the log is off.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<Msg>>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        AccessLog { tx: None, metrics }
    }

    /// Start the writer thread. Fails if the log file can't be opened.
    pub fn start(settings: &AccessLogSettings, metrics: Arc<Metrics>) -> io::Result<Self> {
        if !settings.enabled {
            return Ok(Self::disabled(metrics));
        }
        let sink = Sink::open(settings)?;
        let (tx, rx) = sync_channel(settings.buffer_lines);
        let format = settings.format.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, sink, format))?;
        Ok(AccessLog { tx: Some(tx), metrics })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queue a line; never blocks.
    pub fn log(&self, record: AccessRecord) {
        if let Some(tx) = &self.tx {
            match tx.try_send(Msg::Line(Box::new(record))) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.metrics.access_log_dropped.inc()
                }
            }
        }
    }

    /// Reopen the file (after an external rotation). Never blocks.
    pub fn reopen(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(Msg::Reopen);
        }
    }

    /// Wait (bounded) until everything queued so far is written.
    pub fn flush(&self, timeout: std::time::Duration) {
        if let Some(tx) = &self.tx {
            let (done_tx, done_rx) = sync_channel(1);
            if tx.send(Msg::Flush(done_tx)).is_ok() {
                let _ = done_rx.recv_timeout(timeout);
            }
        }
    }
}

enum Sink {
    Stdout(BufWriter<io::Stdout>),
    File {
        path: PathBuf,
        out: BufWriter<File>,
        written: u64,
        max_bytes: u64,
        keep: u32,
    },
}

impl Sink {
    fn open(settings: &AccessLogSettings) -> io::Result<Sink> {
        Ok(match &settings.target {
            LogTarget::Stdout => Sink::Stdout(BufWriter::with_capacity(64 * 1024, io::stdout())),
            LogTarget::File { path, max_bytes, keep } => {
                let (out, written) = open_append(path)?;
                Sink::File {
                    path: path.clone(),
                    out,
                    written,
                    max_bytes: *max_bytes,
                    keep: *keep,
                }
            }
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(w) => w,
            Sink::File { out, .. } => out,
        }
    }

    fn after_write(&mut self, n: u64) {
        if let Sink::File { path, out, written, max_bytes, keep } = self {
            *written += n;
            if *max_bytes > 0 && *written >= *max_bytes {
                let _ = out.flush();
                rotate(path, *keep);
                match open_append(path) {
                    Ok((f, w)) => {
                        *out = f;
                        *written = w;
                    }
                    Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot reopen access log after rotation"),
                }
            }
        }
    }

    fn reopen(&mut self) {
        if let Sink::File { path, out, written, .. } = self {
            let _ = out.flush();
            match open_append(path) {
                Ok((f, w)) => {
                    *out = f;
                    *written = w;
                    tracing::info!(path = %path.display(), "access log reopened");
                }
                Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot reopen access log; still writing to the old file"),
            }
        }
    }
}

fn open_append(path: &Path) -> io::Result<(BufWriter<File>, u64)> {
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((BufWriter::with_capacity(64 * 1024, f), len))
}

/// path.(keep-1) → path.keep, …, path → path.1
fn rotate(path: &Path, keep: u32) {
    let numbered = |i: u32| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    };
    if keep == 0 {
        let _ = std::fs::remove_file(path);
        return;
    }
    for i in (1..keep).rev() {
        let _ = std::fs::rename(numbered(i), numbered(i + 1));
    }
    let _ = std::fs::rename(path, numbered(1));
}

/// How long the writer lets lines gather between writes while traffic flows.
///
/// While the writer is parked on the queue, every queued line would wake it
/// (a futex call on the proxy thread, a context switch and a `write` per
/// request: about 12 µs of CPU per request under load). Instead it parks only
/// when idle; while lines keep coming it sleeps this long, then writes and
/// flushes everything queued in one go. Lines reach the file at most this
/// much later; the queue (`buffer_lines`) holds this long's worth of traffic
/// many times over.
const GATHER: std::time::Duration = std::time::Duration::from_millis(10);

fn writer(rx: Receiver<Msg>, mut sink: Sink, format: LogFormat) {
    let mut line = Vec::with_capacity(512);
    let mut handle = |msg: Msg, sink: &mut Sink| match msg {
        Msg::Line(rec) => {
            line.clear();
            let ok = match format {
                LogFormat::Json => serde_json::to_writer(&mut line, &rec).is_ok() && {
                    line.push(b'\n');
                    true
                },
                LogFormat::Text => rec.write_text(&mut line).is_ok(),
            };
            if ok && sink.writer().write_all(&line).is_ok() {
                sink.after_write(line.len() as u64);
            }
        }
        Msg::Reopen => sink.reopen(),
        Msg::Flush(done) => {
            let _ = sink.writer().flush();
            let _ = done.try_send(());
        }
    };
    // Parked only while idle.
    while let Ok(msg) = rx.recv() {
        handle(msg, &mut sink);
        loop {
            while let Ok(msg) = rx.try_recv() {
                handle(msg, &mut sink);
            }
            let _ = sink.writer().flush();
            std::thread::sleep(GATHER);
            match rx.try_recv() {
                Ok(msg) => handle(msg, &mut sink),
                Err(_) => break, // idle (or closed): back to waiting
            }
        }
    }
    let _ = sink.writer().flush();
}

//! Follows the requests a client sends on a connection Pingora reads, byte
//! for byte as they arrive and before Pingora sees them: each head, then
//! its body (so many bytes, or chunked), then the next head.
//!
//! Pingora's parsers are lenient where a backend's may not be: a NUL in a
//! request target is forwarded percent-encoded, and its chunk parser reads
//! `5 \r\n` as 5, skips the bytes of a chunk extension unread, and takes an
//! empty line for a chunk size. Where the bytes are all in hand before
//! Pingora reads them (a cleartext head, read ahead in
//! [`super::ProxyApp`]), the checks run there; a TLS connection's bytes are
//! read by Pingora itself, and so is a chunked body after its first read:
//! this is what checks those. What it refuses ends the connection (with a
//! `400` if nothing was answered yet, see [`super::head::HeadClock`]).
//!
//! A head that does not parse here, or is over the head limit, is left to
//! Pingora (which refuses it). After a `CONNECT` the bytes are a tunnel's
//! and are no longer looked at; after a request asking for an upgrade, what
//! follows waits for the answer: a tunnel's after `101`, the next
//! request's after any other.

use super::h1::Chunked;
use super::head::HeadEnd;
use super::strict;

// Longest head looked at: Pingora's limit (it refuses longer ones).
use super::HEAD_MAX;
/// Most header fields parsed here (Pingora's own limit is larger, and the
/// `[limits]` count is checked after it: a head with more is left to them).
const MAX_FIELDS: usize = 256;

/// Where a connection's request stream is.
#[derive(Debug, Default)]
pub struct Inbound {
    state: State,
    /// The current head, when it did not come in one read.
    head: Vec<u8>,
    /// A chunk-size or trailer line not yet whole.
    line: Vec<u8>,
    /// Requests ended so far (the one being read is this one).
    current: u32,
    /// Where in the current read the last of them ended.
    ended_at: usize,
}

#[derive(Debug, Default)]
enum State {
    /// In a head (or before one).
    #[default]
    Head,
    HeadScan(HeadEnd),
    /// So many body bytes to come.
    Fixed(u64),
    Chunked(Chunked),
    /// After a request asking for an upgrade: what follows is a tunnel's
    /// if the answer is `101`, the next request's otherwise
    /// ([`Inbound::answered`]).
    Upgrade,
    /// A tunnel, or a head left to Pingora: nothing more is checked.
    Off,
}

/// Why the stream is refused, as the `reason` of
/// `switchyard_requests_rejected_total`.
pub type Refusal = &'static str;

/// Bytes [`Inbound::feed`] refused, and where the refused request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub reason: Refusal,
    /// Where it starts in these bytes (the bytes before it are whole
    /// requests, and may be passed on); None: it started before them.
    pub start: Option<usize>,
    /// Its head was passed on before these bytes: it is being proxied.
    pub in_flight: bool,
}

impl Inbound {
    /// Follow the next bytes of the stream: how many were followed (fewer
    /// than all when a request asking for an upgrade ends within them: the
    /// rest waits for its answer). Err: they are refused.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, Refused> {
        let fresh = matches!(self.state, State::Head);
        let in_flight = matches!(self.state, State::Fixed(_) | State::Chunked(_));
        let first = self.current;
        self.ended_at = 0;
        self.run(bytes).map_err(|reason| {
            if self.current != first {
                Refused { reason, start: Some(self.ended_at), in_flight: false }
            } else {
                Refused { reason, start: fresh.then_some(0), in_flight }
            }
        })
    }

    fn run(&mut self, mut bytes: &[u8]) -> Result<usize, Refusal> {
        let total = bytes.len();
        while !bytes.is_empty() {
            match &mut self.state {
                State::Off => return Ok(total),
                State::Upgrade => return Ok(total - bytes.len()),
                State::Head => {
                    let mut scan = HeadEnd::default();
                    match scan.feed(bytes) {
                        // The common case: a whole head in one read.
                        Some(n) => {
                            let next = if n > HEAD_MAX { State::Off } else { body_of(&bytes[..n])? };
                            bytes = &bytes[n..];
                            self.after_head(next, total - bytes.len());
                        }
                        None => {
                            self.head.clear();
                            self.keep_head(bytes);
                            self.state = State::HeadScan(scan);
                            return Ok(total);
                        }
                    }
                }
                State::HeadScan(scan) => match scan.feed(bytes) {
                    Some(n) => {
                        self.keep_head(&bytes[..n]);
                        let next = if self.head.len() > HEAD_MAX { State::Off } else { body_of(&self.head)? };
                        self.head.clear();
                        if self.head.capacity() > 64 * 1024 {
                            self.head = Vec::new();
                        }
                        bytes = &bytes[n..];
                        self.after_head(next, total - bytes.len());
                    }
                    None => {
                        self.keep_head(bytes);
                        return Ok(total);
                    }
                },
                State::Fixed(left) => {
                    let n = bytes.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.state = State::Head;
                        self.ended(total - bytes.len());
                    }
                }
                State::Chunked(chunked) => {
                    let bad = |_| strict::BAD_FRAMING;
                    if self.line.is_empty() {
                        let n = chunked.check(bytes).map_err(bad)?;
                        if !chunked.done() {
                            // A line not whole yet (or nothing): kept until it is.
                            self.line.extend_from_slice(&bytes[n..]);
                            return Ok(total);
                        }
                        bytes = &bytes[n..];
                    } else {
                        // The kept line, then this read: a copy only when a
                        // line was split between reads.
                        let had = self.line.len();
                        self.line.extend_from_slice(bytes);
                        let n = chunked.check(&self.line).map_err(bad)?;
                        if !chunked.done() {
                            self.line.drain(..n);
                            return Ok(total);
                        }
                        self.line.clear();
                        bytes = &bytes[n.saturating_sub(had)..];
                    }
                    self.state = State::Head;
                    self.ended(total - bytes.len());
                }
            }
        }
        Ok(total)
    }

    /// Whether a request asking for an upgrade waits for its answer.
    pub fn awaiting_answer(&self) -> bool {
        matches!(self.state, State::Upgrade)
    }

    /// The status of the answer to a request asking for an upgrade: `101`
    /// makes the rest a tunnel; another final status, the next request's.
    pub fn answered(&mut self, status: u16) {
        if matches!(self.state, State::Upgrade) {
            match status {
                101 => self.state = State::Off,
                100..=199 => {}
                _ => self.state = State::Head,
            }
        }
    }

    /// A head ended `at` bytes into the current read, its body (if any)
    /// follows in `next`.
    fn after_head(&mut self, next: State, at: usize) {
        self.state = next;
        if matches!(self.state, State::Head | State::Upgrade) {
            self.ended(at);
        }
    }

    /// A request ended `at` bytes into the current read.
    fn ended(&mut self, at: usize) {
        self.current = self.current.wrapping_add(1);
        self.ended_at = at;
    }

    fn keep_head(&mut self, bytes: &[u8]) {
        if self.head.len() <= HEAD_MAX {
            self.head.extend_from_slice(&bytes[..bytes.len().min(HEAD_MAX + 1 - self.head.len())]);
        }
    }

    /// The request being read, counted from 0.
    pub fn current(&self) -> u32 {
        self.current
    }

    /// Whether nothing more is checked (a tunnel, or a head left to Pingora).
    pub fn off(&self) -> bool {
        matches!(self.state, State::Off)
    }

    /// Whether the stream is between requests (nothing of a next one read).
    #[cfg(test)]
    fn at_rest(&self) -> bool {
        matches!(self.state, State::Head | State::Off | State::Upgrade)
    }
}

/// The checks on a whole `head`, and where its body takes the stream.
fn body_of(head: &[u8]) -> Result<State, Refusal> {
    if strict::bad_request_line(head) {
        return Err(strict::BAD_REQUEST_LINE);
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else { return Ok(State::Off) };
    if req.method.is_some_and(|m| m.eq_ignore_ascii_case("CONNECT")) {
        return Ok(State::Off);
    }
    // Framing the head parse refuses (more than one length, a length that
    // is not a number, a length with a coding): nothing more to follow,
    // the connection closes after that refusal.
    let (mut chunked, mut length, mut lengths, mut upgrade) = (false, 0u64, 0, false);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Any other coding than one `chunked` is refused too; the
            // body's bytes are followed as chunks until then.
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let Some(n) = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<u64>().ok()) else { return Ok(State::Off) };
            (length, lengths) = (n, lengths + 1);
        }
    }
    if lengths > 1 || (chunked && lengths > 0) {
        return Ok(State::Off);
    }
    Ok(match (chunked, length, upgrade) {
        // An upgrade asked for with a body is rare: what follows it is not
        // looked at.
        (true, _, true) | (false, 1.., true) => State::Off,
        (false, 0, true) => State::Upgrade,
        (true, _, false) => State::Chunked(Chunked::default()),
        (false, 0, false) => State::Head,
        (false, n, false) => State::Fixed(n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(bytes: &[u8], step: usize) -> Result<bool, Refusal> {
        let mut i = Inbound::default();
        for mut piece in bytes.chunks(step) {
            loop {
                let n = i.feed(piece).map_err(|r| r.reason)?;
                // An upgrade asked for is taken (tunnel bytes follow).
                i.answered(101);
                if n == piece.len() {
                    break;
                }
                piece = &piece[n..];
            }
        }
        Ok(i.at_rest())
    }

    #[test]
    fn a_refusal_says_where_the_refused_request_is() {
        let first = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let bad_head = b"GET /\0 HTTP/1.1\r\n\r\n";
        // Behind a whole request in the same read: it starts after it.
        let mut i = Inbound::default();
        let both = [&first[..], &bad_head[..]].concat();
        assert_eq!(i.feed(&both), Err(Refused { reason: strict::BAD_REQUEST_LINE, start: Some(first.len()), in_flight: false }));
        // At the start of a read.
        let mut i = Inbound::default();
        i.feed(first).unwrap();
        assert_eq!(i.feed(bad_head), Err(Refused { reason: strict::BAD_REQUEST_LINE, start: Some(0), in_flight: false }));
        // Its head began in an earlier read.
        let mut i = Inbound::default();
        i.feed(b"GET /").unwrap();
        assert_eq!(i.feed(b"\0 HTTP/1.1\r\n\r\n"), Err(Refused { reason: strict::BAD_REQUEST_LINE, start: None, in_flight: false }));
        // Its body is being proxied.
        let mut i = Inbound::default();
        i.feed(&first[..first.len() - 5]).unwrap();
        assert_eq!(i.feed(b"x\r\n\r\n"), Err(Refused { reason: strict::BAD_FRAMING, start: None, in_flight: true }));
        assert_eq!(i.current(), 0);
    }

    #[test]
    fn well_formed_streams_pass_however_they_are_split() {
        let ok: [&[u8]; 7] = [
            b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b;c=\"d e\"\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
            // After an upgrade, anything.
            b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x00\x81\r\r",
            b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01\x00",
        ];
        for bytes in ok {
            for step in 1..=bytes.len() {
                assert_eq!(verdict(bytes, step), Ok(true), "{} in pieces of {step}", bytes.escape_ascii());
            }
        }
        // Mid-body: not at rest.
        assert_eq!(verdict(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhel", 4), Ok(false));
        assert_eq!(verdict(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", 4), Ok(false));
    }

    #[test]
    fn what_parsers_could_read_differently_is_refused_however_it_is_split() {
        let te = "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
        let bad: Vec<(Vec<u8>, Refusal)> = vec![
            (b"GET /a\0b HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(), strict::BAD_REQUEST_LINE),
            (b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET /a b HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(), strict::BAD_REQUEST_LINE),
            (format!("{te}5 \r\nhello\r\n0\r\n\r\n").into_bytes(), strict::BAD_FRAMING),
            (format!("{te}\r\nhello\r\n0\r\n\r\n").into_bytes(), strict::BAD_FRAMING),
            (format!("{te}5\r\nhello\r\n\r\n").into_bytes(), strict::BAD_FRAMING),
            (format!("{te}5;a\0b\r\nhello\r\n0\r\n\r\n").into_bytes(), strict::BAD_FRAMING),
            (format!("{te}5;e={}\r\nhello\r\n0\r\n\r\n", "x".repeat(16384)).into_bytes(), strict::BAD_FRAMING),
            (format!("{te}5\nhello\n0\n\n").into_bytes(), strict::BAD_FRAMING),
            (format!("{te}5\r\nhelloXX0\r\n\r\n").into_bytes(), strict::BAD_FRAMING),
            (format!("{te}10000000000000000a\r\nhello\r\n0\r\n\r\n").into_bytes(), strict::BAD_FRAMING),
            (format!("{te}0\r\nT\0: 1\r\n\r\n").into_bytes(), strict::BAD_FRAMING),
            // After a body, the next head is checked too.
            (format!("{te}0\r\n\r\nGET /\0 HTTP/1.1\r\n\r\n").into_bytes(), strict::BAD_REQUEST_LINE),
        ];
        for (bytes, reason) in bad {
            for step in [1, 2, 3, 7, 64, bytes.len()] {
                assert_eq!(verdict(&bytes, step), Err(reason), "{} in pieces of {step}", bytes.escape_ascii());
            }
        }
    }

    #[test]
    fn what_follows_an_upgrade_request_waits_for_its_answer() {
        let ask = b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        let after = b"GET /a\0b HTTP/1.1\r\nHost: h\r\n\r\n";
        let both = [&ask[..], &after[..]].concat();
        // Declined: the bytes after it are the next request, and checked.
        let mut i = Inbound::default();
        assert_eq!(i.feed(&both), Ok(ask.len()));
        assert!(i.awaiting_answer());
        i.answered(100);
        assert!(i.awaiting_answer(), "an interim answer decides nothing");
        i.answered(426);
        assert_eq!(i.feed(after).map_err(|r| r.reason), Err(strict::BAD_REQUEST_LINE));
        // Taken: a tunnel.
        let mut i = Inbound::default();
        assert_eq!(i.feed(&both), Ok(ask.len()));
        i.answered(101);
        assert_eq!(i.feed(after), Ok(after.len()));
        assert!(i.off());
    }

    #[test]
    fn heads_it_cannot_judge_are_left_to_pingora() {
        // A head that does not parse: left to Pingora (which refuses it),
        // as is all after it.
        assert_eq!(verdict(b"GET / HTTP/1.1\r\nno colon\r\n\r\n\0\0\0", 5), Ok(true));
        // A request line with a control byte is refused before that.
        assert_eq!(verdict(b"\x16\x03\x01 hello\r\n\r\n", 5), Err(strict::BAD_REQUEST_LINE));
    }
}

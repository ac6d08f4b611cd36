//! Lets any gRPC client in over the CSI socket, whatever `:authority` it sends.
//!
//! gRPC clients on the C core (Python grpcio, C++, Ruby) may send a Unix socket's path as the
//! `:authority` of every request, e.g. `tmp%2Fcsi.sock`; Go clients send `localhost`. The HTTP/2
//! layer under tonic (h2) parses `:authority` as a URI authority while it decodes the headers, and
//! resets the stream (PROTOCOL_ERROR) when it is not one (a `%` is allowed only in user info), so
//! no service code ever sees the call. A Unix socket has no authority to check, so the bytes a
//! client sends are rewritten before h2 reads them: in each header block, an `:authority` literal
//! that is not plainly a valid authority gets the value `localhost` (or a prefix of it).
//!
//! The header block is HPACK (RFC 7541), whose dynamic table both ends keep in step. The rewrite
//! keeps each representation's kind (so what the client indexed, the server indexes too) and
//! never makes a value longer than the client's: the server's table then holds the same entries,
//! each at most as large, so it evicts no later entry than the client does and every index the
//! client sends names the same entry on both sides. Huffman-coded values are not decoded: their
//! decoded length is bounded from below by their coded length (a symbol is at most 30 bits).
//! Every other frame passes through untouched, as it arrives.

use std::io;

/// The client's connection preface (RFC 9113 §3.4), passed through.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Every HTTP/2 peer accepts frames this large (the least SETTINGS_MAX_FRAME_SIZE).
const MIN_MAX_FRAME: usize = 16_384;
/// A header block larger than this closes the connection (h2 allows far less anyway).
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// `:authority`, entry 1 of HPACK's static table.
const AUTHORITY_INDEX: u64 = 1;
const REPLACEMENT: &[u8] = b"localhost";

/// The client-to-server bytes of one connection, as h2 is to read them.
#[derive(Default)]
pub struct AuthorityRewrite {
    /// Bytes received and not yet handled (an incomplete frame header or header frame).
    input: Vec<u8>,
    /// Bytes ready for h2.
    output: Vec<u8>,
    /// How much of the preface has been passed on.
    preface_seen: usize,
    /// Bytes of a non-header frame's payload still to pass through as they come.
    passing: usize,
    /// A header block split over HEADERS and CONTINUATION frames, until its END_HEADERS.
    block: Option<PendingBlock>,
}

struct PendingBlock {
    stream: [u8; 4],
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl AuthorityRewrite {
    /// Takes bytes read from the client.
    pub fn feed(&mut self, data: &[u8]) -> io::Result<()> {
        self.input.extend_from_slice(data);
        self.process()
    }

    /// Hands at most `max` ready bytes to h2.
    pub fn take(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.output.len());
        self.output.drain(..n).collect()
    }

    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    fn process(&mut self) -> io::Result<()> {
        loop {
            if self.preface_seen < PREFACE.len() {
                let n = (PREFACE.len() - self.preface_seen).min(self.input.len());
                if n == 0 {
                    return Ok(());
                }
                self.output.extend(self.input.drain(..n));
                self.preface_seen += n;
                continue;
            }
            if self.passing > 0 {
                let n = self.passing.min(self.input.len());
                if n == 0 {
                    return Ok(());
                }
                self.output.extend(self.input.drain(..n));
                self.passing -= n;
                continue;
            }
            if self.input.len() < FRAME_HEADER {
                return Ok(());
            }
            let len = usize::from(self.input[0]) << 16 | usize::from(self.input[1]) << 8 | usize::from(self.input[2]);
            let kind = self.input[3];
            // A header block is contiguous (RFC 9113 §6.10): anything else in its middle is a
            // connection error, which h2 would raise too.
            if self.block.is_some() && kind != CONTINUATION {
                return Err(malformed());
            }
            if kind != HEADERS && kind != CONTINUATION {
                self.output.extend(self.input.drain(..FRAME_HEADER));
                self.passing = len;
                continue;
            }
            if self.input.len() < FRAME_HEADER + len {
                if len > MAX_HEADER_BLOCK {
                    return Err(too_large());
                }
                return Ok(());
            }
            let frame: Vec<u8> = self.input.drain(..FRAME_HEADER + len).collect();
            self.header_frame(&frame)?;
        }
    }

    /// A HEADERS or CONTINUATION frame, whole.
    fn header_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let (kind, flags) = (frame[3], frame[4]);
        let stream: [u8; 4] = [frame[5], frame[6], frame[7], frame[8]];
        let mut payload = &frame[FRAME_HEADER..];
        match (kind, self.block.as_mut()) {
            (HEADERS, None) => {
                if flags & PADDED != 0 {
                    let pad = usize::from(*payload.first().ok_or_else(malformed)?);
                    payload = payload
                        .get(1..payload.len().checked_sub(pad).ok_or_else(malformed)?)
                        .ok_or_else(malformed)?;
                }
                let priority = if flags & PRIORITY != 0 {
                    let p: [u8; 5] = payload.get(..5).and_then(|p| p.try_into().ok()).ok_or_else(malformed)?;
                    payload = &payload[5..];
                    Some(p)
                } else {
                    None
                };
                self.block = Some(PendingBlock {
                    stream,
                    flags,
                    priority,
                    fragment: payload.to_vec(),
                });
            }
            (CONTINUATION, Some(block)) => {
                if block.stream != stream {
                    return Err(malformed());
                }
                if block.fragment.len() + payload.len() > MAX_HEADER_BLOCK {
                    return Err(too_large());
                }
                block.fragment.extend_from_slice(payload);
            }
            // A CONTINUATION with no block open: h2 refuses it for what it is.
            _ => {
                self.output.extend_from_slice(frame);
                return Ok(());
            }
        }
        if flags & END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                self.emit(block);
            }
        }
        Ok(())
    }

    /// The header block, rewritten, as one HEADERS frame and as many CONTINUATION frames as its
    /// size needs (padding dropped, priority kept).
    fn emit(&mut self, block: PendingBlock) {
        let fragment = rewrite_block(&block.fragment).unwrap_or(block.fragment);
        let mut first = Vec::with_capacity(5 + fragment.len());
        let mut flags = block.flags & (END_STREAM | PRIORITY);
        if let Some(p) = block.priority {
            first.extend_from_slice(&p);
        }
        let room = MIN_MAX_FRAME - first.len();
        let (head, mut rest) = fragment.split_at(room.min(fragment.len()));
        first.extend_from_slice(head);
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        self.frame(HEADERS, flags, block.stream, &first);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(MIN_MAX_FRAME.min(rest.len()));
            let flags = if tail.is_empty() { END_HEADERS } else { 0 };
            self.frame(CONTINUATION, flags, block.stream, chunk);
            rest = tail;
        }
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: [u8; 4], payload: &[u8]) {
        let len = payload.len();
        self.output
            .extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        self.output.extend_from_slice(&stream);
        self.output.extend_from_slice(payload);
    }
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "a malformed HTTP/2 header frame")
}

fn too_large() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "an HTTP/2 header block over 1 MiB")
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1): its value and how many bytes it took.
fn integer(src: &[u8], n: u8) -> Option<(u64, usize)> {
    let mask = (1u16 << n) - 1;
    let first = u64::from(u16::from(*src.first()?) & mask);
    if first < u64::from(mask) {
        return Some((first, 1));
    }
    let mut value = first;
    let mut shift = 0u32;
    for (i, b) in src.iter().enumerate().skip(1) {
        value = value.checked_add(u64::from(b & 0x7f).checked_shl(shift)?)?;
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
        shift += 7;
        if shift > 56 {
            return None;
        }
    }
    None
}

/// Writes `value` with an `n`-bit prefix whose other bits are `pattern`.
fn put_integer(dst: &mut Vec<u8>, pattern: u8, n: u8, value: u64) {
    let mask = (1u64 << n) - 1;
    if value < mask {
        dst.push(pattern | value as u8);
        return;
    }
    dst.push(pattern | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        dst.push((rest as u8 & 0x7f) | 0x80);
        rest >>= 7;
    }
    dst.push(rest as u8);
}

/// An HPACK string literal (§5.2): whether it is Huffman-coded, its bytes, and its whole length.
fn string(src: &[u8]) -> Option<(bool, &[u8], usize)> {
    let huffman = src.first()? & 0x80 != 0;
    let (len, n) = integer(src, 7)?;
    let end = n.checked_add(usize::try_from(len).ok()?)?;
    Some((huffman, src.get(n..end)?, end))
}

/// Whether a value is plainly a URI authority h2 accepts (a host, maybe a port).
fn plain_authority(value: &[u8]) -> bool {
    !value.is_empty()
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'[' | b']'))
}

/// The header block with every `:authority` that is not plainly valid replaced; `None` when
/// nothing needed it or the block does not parse (h2 then judges it as it is).
pub fn rewrite_block(block: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len());
    let mut changed = false;
    let mut i = 0;
    while i < block.len() {
        let first = block[i];
        if first & 0x80 != 0 {
            // Indexed header field: copied; if it names an :authority entry, that entry was
            // rewritten when it was added.
            let (_, n) = integer(&block[i..], 7)?;
            out.extend_from_slice(&block[i..i + n]);
            i += n;
            continue;
        }
        if first & 0xe0 == 0x20 {
            // Dynamic table size update.
            let (_, n) = integer(&block[i..], 5)?;
            out.extend_from_slice(&block[i..i + n]);
            i += n;
            continue;
        }
        // A literal: with incremental indexing (01), without indexing (0000) or never indexed (0001).
        let (prefix, pattern) = if first & 0xc0 == 0x40 {
            (6, 0x40)
        } else {
            (4, first & 0xf0)
        };
        let start = i;
        let (index, n) = integer(&block[i..], prefix)?;
        i += n;
        let is_authority = if index == 0 {
            let (huffman, name, n) = string(&block[i..])?;
            i += n;
            !huffman && name == b":authority"
        } else {
            index == AUTHORITY_INDEX
        };
        let (huffman, value, n) = string(&block[i..])?;
        i += n;
        if !is_authority || (!huffman && plain_authority(value)) {
            out.extend_from_slice(&block[start..i]);
            continue;
        }
        // No longer than the client's value (see the module's comment): a Huffman symbol is at
        // most 30 bits, and up to 7 bits are padding.
        let shortest = if huffman {
            (value.len() * 8).saturating_sub(7) / 30
        } else {
            value.len()
        };
        let replacement = &REPLACEMENT[..shortest.clamp(1, REPLACEMENT.len())];
        put_integer(&mut out, pattern, prefix, AUTHORITY_INDEX);
        put_integer(&mut out, 0, 7, replacement.len() as u64);
        out.extend_from_slice(replacement);
        changed = true;
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A literal with incremental indexing of `:authority` (static name index 1), raw value.
    fn authority_literal(value: &[u8]) -> Vec<u8> {
        let mut b = vec![0x41];
        put_integer(&mut b, 0, 7, value.len() as u64);
        b.extend_from_slice(value);
        b
    }

    #[test]
    fn a_socket_path_as_authority_becomes_localhost_and_the_rest_is_kept() {
        // :method POST (static 3), :authority tmp%2Fcsi.sock, :path (static 4) /x
        let mut block = vec![0x83];
        block.extend(authority_literal(b"tmp%2Fcsi.sock"));
        block.extend([0x44, 0x02, b'/', b'x']);
        let out = rewrite_block(&block).expect("rewritten");
        let mut want = vec![0x83];
        want.extend(authority_literal(b"localhost"));
        want.extend([0x44, 0x02, b'/', b'x']);
        assert_eq!(out, want);
    }

    #[test]
    fn a_valid_authority_is_left_alone() {
        let mut block = vec![0x83];
        block.extend(authority_literal(b"localhost"));
        block.extend(authority_literal(b"10.0.0.1:8080"));
        assert_eq!(rewrite_block(&block), None);
    }

    #[test]
    fn a_replacement_is_never_longer_than_the_value() {
        let out = rewrite_block(&authority_literal(b"a%b")).expect("rewritten");
        assert_eq!(out, authority_literal(b"loc"));
        // Huffman-coded, 8 bytes: at least (64 - 7) / 30 = 1 symbol.
        let mut huffman = vec![0x41, 0x88];
        huffman.extend([0xaa; 8]);
        assert_eq!(rewrite_block(&huffman).expect("rewritten"), authority_literal(b"l"));
    }

    #[test]
    fn a_literal_kind_and_a_literal_name_are_kept() {
        // Never indexed (0001), name given as a literal string.
        let mut block = vec![0x10, 0x0a];
        block.extend_from_slice(b":authority");
        block.extend([0x03, b'a', b'/', b'b']);
        assert_eq!(
            rewrite_block(&block).expect("rewritten"),
            vec![0x11, 0x03, b'l', b'o', b'c']
        );
    }

    #[test]
    fn another_frame_inside_a_header_block_closes_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend([0, 0, 1, HEADERS, 0, 0, 0, 0, 1, 0x83]);
        input.extend([0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        let e = AuthorityRewrite::default().feed(&input).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_block_that_does_not_parse_is_left_to_h2() {
        assert_eq!(rewrite_block(&[0x41, 0x7f]), None);
    }

    #[test]
    fn integers_round_trip_across_their_prefix() {
        for (n, v) in [(5u8, 30u64), (5, 31), (5, 1337), (7, 127), (4, 1 << 20)] {
            let mut b = Vec::new();
            put_integer(&mut b, 0, n, v);
            assert_eq!(integer(&b, n), Some((v, b.len())), "{n} {v}");
        }
    }

    /// A connection's bytes in arbitrary pieces: the preface and other frames pass unchanged, a
    /// header block split over HEADERS and CONTINUATION comes out whole and rewritten.
    #[test]
    fn frames_pass_through_and_a_split_header_block_is_rewritten() {
        let settings = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
        let block = authority_literal(b"tmp%2Fcsi.sock");
        let (a, b) = block.split_at(5);
        let mut input = PREFACE.to_vec();
        input.extend(settings);
        input.extend([0, 0, a.len() as u8, HEADERS, END_STREAM, 0, 0, 0, 1]);
        input.extend(a);
        input.extend([0, 0, b.len() as u8, CONTINUATION, END_HEADERS, 0, 0, 0, 1]);
        input.extend(b);
        let mut r = AuthorityRewrite::default();
        for byte in &input {
            r.feed(std::slice::from_ref(byte)).expect("feed");
        }
        let out = r.take(usize::MAX);
        let mut want = PREFACE.to_vec();
        want.extend(settings);
        let rewritten = authority_literal(b"localhost");
        want.extend([
            0,
            0,
            rewritten.len() as u8,
            HEADERS,
            END_STREAM | END_HEADERS,
            0,
            0,
            0,
            1,
        ]);
        want.extend(rewritten);
        assert_eq!(out, want);
    }
}

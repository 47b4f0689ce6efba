//! The on-disk encoding of log records and snapshot parts: compact binary, checksummed.
//!
//! A frame is `[len: u32 LE][crc: u32 LE][body: len bytes]`. The CRC (CRC-32/ISO-HDLC, via
//! crc32fast) covers the four length bytes and the body, so a flipped length is caught too.
//! A log record's body is `[seq: u64 LE][payload]`; the payload is
//!
//! ```text
//! varint n_states, n_states x state
//! u8 has_key (0 | 1)
//!   if 1: u8 key_len, key, u64 LE fingerprint, varint created_secs, varint n_result,
//!         n_result x state
//! state = u8 name_len, name, varint on_hand, varint reserved, varint version
//! then, only in records that change holds (PROTOCOL.md "Holds"):
//! u8 HOLDS_SECTION (2), varint n_holds, n_holds x hold
//! hold = u8 name_len, name, u8 kind, then by kind:
//!   1 live:    varint deadline_ms, varint n_lines, n_lines x (u8 name_len, sku, varint units)
//!   2 gone     (committed or released)
//!   3 expired: varint at_ms
//! ```
//!
//! The holds section came after the first logs were written: a record without it is a record
//! of the first format (no hold changed), so old logs recover unchanged. A snapshot stores live
//! holds and expired markers with the same `hold` encoding.
//!
//! Varints are LEB128 (7 bits per byte, low first, at most 10 bytes). Names and keys are at
//! most 128 bytes, so one length byte is enough. Decoding never panics on any input: every
//! malformed body is a [`DecodeError`].

use std::fmt;

use super::{HoldRecord, KeyRecord, LoggedHold, Record};
use crate::stock::Stock;

/// Marks the holds section after a record's key.
pub const HOLDS_SECTION: u8 = 2;
const HOLD_LIVE: u8 = 1;
const HOLD_GONE: u8 = 2;
const HOLD_EXPIRED: u8 = 3;

/// Bytes before a frame's body: length and CRC.
pub const FRAME_HEADER_BYTES: usize = 8;
/// Bytes of a log record's body before its payload: the sequence number.
pub const SEQ_BYTES: usize = 8;
/// Largest frame body accepted. A record is one change (a batch is at most
/// `batch_ops_max` ops, 100 by default), far below this; a length above it in a file is
/// corruption, not a big record.
pub const FRAME_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Longest name or key the encoding can carry (one length byte).
pub const NAME_BYTES_MAX: usize = u8::MAX as usize;

const _: () = assert!(crate::stock::sku::SKU_BYTES_MAX <= NAME_BYTES_MAX);
const _: () = assert!(FRAME_BODY_BYTES_MAX <= u32::MAX as usize);

/// Why a body could not be decoded (its CRC matched, so the writer had a bug or the file was
/// written by something else).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The body ended inside a field.
    Truncated,
    /// A varint ran past 10 bytes or past u64.
    BadVarint,
    /// A name or key is not UTF-8.
    BadText,
    /// A flag byte other than 0 or 1.
    BadFlag(u8),
    /// Bytes left over after the last field.
    TrailingBytes(usize),
    /// A count that cannot fit in the body.
    BadCount(u64),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "body ends inside a field"),
            DecodeError::BadVarint => write!(f, "malformed varint"),
            DecodeError::BadText => write!(f, "name or key is not UTF-8"),
            DecodeError::BadFlag(b) => write!(f, "flag byte {b} is not 0 or 1"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} bytes after the last field"),
            DecodeError::BadCount(n) => write!(f, "count {n} does not fit the body"),
        }
    }
}

/// CRC of a frame: over the length bytes, then the body.
pub fn frame_crc(len_bytes: [u8; 4], body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len_bytes);
    hasher.update(body);
    hasher.finalize()
}

/// Starts a frame at the end of `out`; returns where it starts, for [`end_frame`].
pub fn begin_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    start
}

/// Fills in the header of the frame begun at `start`, whose body is everything after it.
/// Returns the frame's size, or `None` (and removes the frame) if the body is too big.
pub fn end_frame(out: &mut Vec<u8>, start: usize) -> Option<usize> {
    let body_len = out.len() - start - FRAME_HEADER_BYTES;
    if body_len > FRAME_BODY_BYTES_MAX {
        out.truncate(start);
        return None;
    }
    let len_bytes = (body_len as u32).to_le_bytes();
    let crc = frame_crc(len_bytes, &out[start + FRAME_HEADER_BYTES..]);
    out[start..start + 4].copy_from_slice(&len_bytes);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Some(out.len() - start)
}

/// Appends the frame of log record `seq` to `out`. Returns its size in bytes, or `None`
/// (appending nothing) if it would exceed [`FRAME_BODY_BYTES_MAX`].
pub fn encode_record(out: &mut Vec<u8>, seq: u64, record: &Record) -> Option<usize> {
    let start = begin_frame(out);
    out.extend_from_slice(&seq.to_le_bytes());
    put_varint(out, record.states.len() as u64);
    for (name, stock) in &record.states {
        put_state(out, name, *stock);
    }
    match &record.key {
        None => out.push(0),
        Some(key) => {
            out.push(1);
            put_key(out, key);
        }
    }
    if !record.holds.is_empty() {
        out.push(HOLDS_SECTION);
        put_varint(out, record.holds.len() as u64);
        for hold in &record.holds {
            put_hold(out, hold);
        }
    }
    end_frame(out, start)
}

/// Appends one hold's state.
pub fn put_hold(out: &mut Vec<u8>, hold: &HoldRecord) {
    put_name(out, &hold.hold);
    match &hold.state {
        LoggedHold::Live { deadline_ms, lines } => {
            out.push(HOLD_LIVE);
            put_varint(out, *deadline_ms);
            put_varint(out, lines.len() as u64);
            for (sku, units) in lines {
                put_name(out, sku);
                put_varint(out, *units);
            }
        }
        LoggedHold::Gone => out.push(HOLD_GONE),
        LoggedHold::Expired { at_ms } => {
            out.push(HOLD_EXPIRED);
            put_varint(out, *at_ms);
        }
    }
}

/// Decodes a log record's body (after the frame header): its sequence number and record.
pub fn decode_record(body: &[u8]) -> Result<(u64, Record), DecodeError> {
    let mut cursor = Cursor { bytes: body, at: 0 };
    let seq = cursor.u64_le()?;
    let states = cursor.states()?;
    let key = match cursor.u8()? {
        0 => None,
        1 => Some(cursor.key()?),
        other => return Err(DecodeError::BadFlag(other)),
    };
    let holds = cursor.holds_section()?;
    cursor.finish()?;
    Ok((seq, Record { states, key, holds }))
}

/// An idempotency key as encoded in a record: its name, creation time, and its encoding
/// (what [`put_key`] wrote, which is also how a snapshot stores it).
#[derive(Debug, PartialEq, Eq)]
pub struct EncodedKey<'a> {
    pub key: &'a str,
    pub created_secs: u64,
    pub bytes: &'a [u8],
}

/// The idempotency key of a record body, if it has one, without allocating: the states are
/// skipped, and the key's bytes are everything after the flag.
pub fn record_key(body: &[u8]) -> Result<Option<EncodedKey<'_>>, DecodeError> {
    let mut cursor = Cursor { bytes: body, at: 0 };
    cursor.u64_le()?;
    let states = cursor.count(4)?;
    for _ in 0..states {
        cursor.skip_state()?;
    }
    match cursor.u8()? {
        0 => {
            cursor.holds_section()?;
            cursor.finish()?;
            Ok(None)
        }
        1 => {
            // The key's bytes end where the holds section (if any) begins.
            let start = cursor.at;
            cursor.key()?;
            let bytes = &body[start..cursor.at];
            cursor.holds_section()?;
            cursor.finish()?;
            encoded_key(bytes).map(Some)
        }
        other => Err(DecodeError::BadFlag(other)),
    }
}

/// Reads the name and creation time of a key encoded by [`put_key`] (and checks the rest).
pub fn encoded_key(bytes: &[u8]) -> Result<EncodedKey<'_>, DecodeError> {
    let mut cursor = Cursor { bytes, at: 0 };
    let len = usize::from(cursor.u8()?);
    let key = std::str::from_utf8(cursor.take(len)?).map_err(|_| DecodeError::BadText)?;
    cursor.u64_le()?;
    let created_secs = cursor.varint()?;
    let results = cursor.count(4)?;
    for _ in 0..results {
        cursor.skip_state()?;
    }
    cursor.finish()?;
    Ok(EncodedKey {
        key,
        created_secs,
        bytes,
    })
}

/// The sequence number of a record body, without decoding the rest.
pub fn record_seq(body: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = body.get(..SEQ_BYTES)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Appends one SKU state.
pub fn put_state(out: &mut Vec<u8>, name: &str, stock: Stock) {
    put_name(out, name);
    put_varint(out, stock.on_hand);
    put_varint(out, stock.reserved);
    put_varint(out, stock.version);
}

/// Appends an idempotency key with its fingerprint, creation time and result.
pub fn put_key(out: &mut Vec<u8>, key: &KeyRecord) {
    put_key_parts(
        out,
        &key.key,
        key.fingerprint,
        key.created_secs,
        key.result
            .iter()
            .map(|(name, stock)| (name.as_str(), *stock)),
    );
}

/// [`put_key`] from borrowed parts, so snapshots need not build a [`KeyRecord`] per key.
pub fn put_key_parts<'a>(
    out: &mut Vec<u8>,
    key: &str,
    fingerprint: u64,
    created_secs: u64,
    result: impl ExactSizeIterator<Item = (&'a str, Stock)>,
) {
    put_name(out, key);
    out.extend_from_slice(&fingerprint.to_le_bytes());
    put_varint(out, created_secs);
    put_varint(out, result.len() as u64);
    for (name, stock) in result {
        put_state(out, name, stock);
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    // Names and keys are validated (1..=128 bytes) long before they reach the log.
    assert!(name.len() <= NAME_BYTES_MAX, "name of {} bytes", name.len());
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

/// Appends `value` as an LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads fields from a body; every read is bounds-checked.
pub struct Cursor<'a> {
    pub bytes: &'a [u8],
    pub at: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated)?;
        let slice = self.bytes.get(self.at..end).ok_or(DecodeError::Truncated)?;
        self.at = end;
        Ok(slice)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub fn u64_le(&mut self) -> Result<u64, DecodeError> {
        let bytes: [u8; 8] = self.take(8)?.try_into().expect("took 8 bytes");
        Ok(u64::from_le_bytes(bytes))
    }

    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        for index in 0..10 {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if index == 9 && bits > 1 {
                return Err(DecodeError::BadVarint);
            }
            value |= bits << (7 * index);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::BadVarint)
    }

    fn text(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(self.u8()?);
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|_| DecodeError::BadText)
    }

    /// A count of items at least `item_bytes_min` long each, checked against what is left,
    /// so a corrupt count cannot make us allocate gigabytes.
    pub fn count(&mut self, item_bytes_min: usize) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        let left = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(item_bytes_min as u64) > left {
            return Err(DecodeError::BadCount(n));
        }
        Ok(n as usize)
    }

    fn skip_state(&mut self) -> Result<(), DecodeError> {
        let len = usize::from(self.u8()?);
        self.take(len)?;
        for _ in 0..3 {
            self.varint()?;
        }
        Ok(())
    }

    pub fn state(&mut self) -> Result<(String, Stock), DecodeError> {
        let name = self.text()?;
        let on_hand = self.varint()?;
        let reserved = self.varint()?;
        let version = self.varint()?;
        Ok((
            name,
            Stock {
                on_hand,
                reserved,
                version,
            },
        ))
    }

    fn states(&mut self) -> Result<Vec<(String, Stock)>, DecodeError> {
        // A state is at least 4 bytes: name length and three one-byte varints.
        let n = self.count(4)?;
        (0..n).map(|_| self.state()).collect()
    }

    pub fn key(&mut self) -> Result<KeyRecord, DecodeError> {
        let key = self.text()?;
        let fingerprint = self.u64_le()?;
        let created_secs = self.varint()?;
        let result = self.states()?;
        Ok(KeyRecord {
            key,
            fingerprint,
            result,
            created_secs,
        })
    }

    /// One hold's state, as [`put_hold`] wrote it.
    pub fn hold(&mut self) -> Result<HoldRecord, DecodeError> {
        let hold = self.text()?;
        let state = match self.u8()? {
            HOLD_LIVE => {
                let deadline_ms = self.varint()?;
                // A line is at least 3 bytes: name length, a 1-byte name, a 1-byte varint.
                let n = self.count(3)?;
                let lines = (0..n)
                    .map(|_| Ok((self.text()?, self.varint()?)))
                    .collect::<Result<_, DecodeError>>()?;
                LoggedHold::Live { deadline_ms, lines }
            }
            HOLD_GONE => LoggedHold::Gone,
            HOLD_EXPIRED => LoggedHold::Expired {
                at_ms: self.varint()?,
            },
            other => return Err(DecodeError::BadFlag(other)),
        };
        Ok(HoldRecord { hold, state })
    }

    /// The optional holds section at the end of a record (empty when absent: a record of the
    /// first format).
    fn holds_section(&mut self) -> Result<Vec<HoldRecord>, DecodeError> {
        if self.is_done() {
            return Ok(Vec::new());
        }
        match self.u8()? {
            HOLDS_SECTION => {
                // A hold is at least 3 bytes: name length, a 1-byte name, its kind.
                let n = self.count(3)?;
                (0..n).map(|_| self.hold()).collect()
            }
            other => Err(DecodeError::BadFlag(other)),
        }
    }

    pub fn is_done(&self) -> bool {
        self.at == self.bytes.len()
    }

    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.bytes.len() - self.at {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stock(on_hand: u64, reserved: u64, version: u64) -> Stock {
        Stock {
            on_hand,
            reserved,
            version,
        }
    }

    fn sample() -> Record {
        Record {
            holds: Vec::new(),
            states: vec![
                ("sku-1".into(), stock(10, 2, 3)),
                ("b".repeat(128), stock(1_000_000_000_000, 0, u64::MAX)),
            ],
            key: Some(KeyRecord {
                key: "k-1".into(),
                fingerprint: 0xdead_beef_0123_4567,
                result: vec![("sku-1".into(), stock(10, 2, 3))],
                created_secs: 1_700_000_000,
            }),
        }
    }

    #[test]
    fn record_round_trips() {
        let cases = [
            sample(),
            Record {
                holds: Vec::new(),
                states: vec![],
                key: None,
            },
            Record {
                holds: Vec::new(),
                states: vec![("x".into(), stock(0, 0, 1))],
                key: None,
            },
        ];
        for (index, record) in cases.iter().enumerate() {
            let mut out = Vec::new();
            let size = encode_record(&mut out, 42 + index as u64, record).unwrap();
            assert_eq!(size, out.len());
            let len = u32::from_le_bytes(out[0..4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(out[4..8].try_into().unwrap());
            assert_eq!(len, out.len() - FRAME_HEADER_BYTES);
            assert_eq!(crc, frame_crc(out[0..4].try_into().unwrap(), &out[8..]));
            let (seq, decoded) = decode_record(&out[8..]).unwrap();
            assert_eq!(seq, 42 + index as u64);
            assert_eq!(&decoded, record);
        }
    }

    #[test]
    fn the_key_of_a_record_is_found_without_decoding_it() {
        let record = sample();
        let mut out = Vec::new();
        encode_record(&mut out, 3, &record).unwrap();
        let found = record_key(&out[FRAME_HEADER_BYTES..]).unwrap().unwrap();
        let key = record.key.as_ref().unwrap();
        assert_eq!(
            (found.key, found.created_secs),
            (key.key.as_str(), key.created_secs)
        );
        let mut expected = Vec::new();
        put_key(&mut expected, key);
        assert_eq!(found.bytes, &expected[..]);
        let mut keyless = Vec::new();
        let no_key = Record {
            holds: Vec::new(),
            key: None,
            ..record
        };
        encode_record(&mut keyless, 4, &no_key).unwrap();
        assert_eq!(record_key(&keyless[FRAME_HEADER_BYTES..]), Ok(None));
        for cut in FRAME_HEADER_BYTES..out.len() {
            assert!(
                record_key(&out[FRAME_HEADER_BYTES..cut]).is_err(),
                "cut {cut}"
            );
        }
    }

    fn with_holds() -> Record {
        Record {
            holds: vec![
                HoldRecord {
                    hold: "cart-1".into(),
                    state: LoggedHold::Live {
                        deadline_ms: 1_700_000_000_123,
                        lines: vec![("sku-1".into(), 2), ("b".repeat(128), 1_000_000_000)],
                    },
                },
                HoldRecord {
                    hold: "h".repeat(128),
                    state: LoggedHold::Gone,
                },
                HoldRecord {
                    hold: "x".into(),
                    state: LoggedHold::Expired { at_ms: 5 },
                },
            ],
            ..sample()
        }
    }

    #[test]
    fn records_with_holds_round_trip_and_keep_their_key_findable() {
        for record in [
            with_holds(),
            Record {
                key: None,
                ..with_holds()
            },
        ] {
            let mut out = Vec::new();
            encode_record(&mut out, 9, &record).unwrap();
            let body = &out[FRAME_HEADER_BYTES..];
            assert_eq!(decode_record(body).unwrap(), (9, record.clone()));
            let found = record_key(body).unwrap();
            assert_eq!(
                found.map(|k| k.key),
                record.key.as_ref().map(|k| k.key.as_str())
            );
            if let Some(key) = &record.key {
                let mut expected = Vec::new();
                put_key(&mut expected, key);
                assert_eq!(record_key(body).unwrap().unwrap().bytes, &expected[..]);
            }
            for at in 0..body.len() {
                for value in [0u8, 0x7f, 0x80, 0xff] {
                    let mut changed = body.to_vec();
                    changed[at] = value;
                    let _ = decode_record(&changed);
                    let _ = record_key(&changed);
                }
            }
        }
    }

    #[test]
    fn a_record_of_the_first_format_has_no_holds() {
        // Bytes as the first format wrote them: states, key flag, nothing after.
        let mut body = 3u64.to_le_bytes().to_vec();
        put_varint(&mut body, 1);
        put_state(&mut body, "a", stock(1, 0, 1));
        body.push(0);
        let (seq, record) = decode_record(&body).unwrap();
        assert_eq!((seq, record.holds.len(), record.states.len()), (3, 0, 1));
        body.push(9);
        assert_eq!(decode_record(&body), Err(DecodeError::BadFlag(9)));
    }

    #[test]
    fn varint_edges() {
        for value in [0, 1, 127, 128, 16_383, 16_384, u64::MAX - 1, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert!(out.len() <= 10);
            let mut cursor = Cursor::new(&out);
            assert_eq!(cursor.varint().unwrap(), value);
            assert!(cursor.is_done());
        }
        // 11 continuation bytes, and a 10th byte carrying more than u64's top bit.
        let mut too_long = vec![0x80; 10];
        too_long.push(0);
        assert_eq!(Cursor::new(&too_long).varint(), Err(DecodeError::BadVarint));
        let mut overflow = vec![0xff; 9];
        overflow.push(0x02);
        assert_eq!(Cursor::new(&overflow).varint(), Err(DecodeError::BadVarint));
    }

    #[test]
    fn decode_never_panics_on_cut_or_changed_bodies() {
        let mut out = Vec::new();
        encode_record(&mut out, 7, &sample()).unwrap();
        let body = &out[FRAME_HEADER_BYTES..];
        for cut in 0..body.len() {
            assert!(decode_record(&body[..cut]).is_err(), "cut at {cut} decoded");
        }
        for at in 0..body.len() {
            for value in [0u8, 0x7f, 0x80, 0xff] {
                let mut changed = body.to_vec();
                changed[at] = value;
                let _ = decode_record(&changed);
            }
        }
    }

    #[test]
    fn a_huge_count_is_refused_before_allocating() {
        let mut body = 1u64.to_le_bytes().to_vec();
        put_varint(&mut body, u64::MAX / 2);
        assert!(matches!(
            decode_record(&body),
            Err(DecodeError::BadCount(_))
        ));
    }
}

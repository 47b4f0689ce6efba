//! Reading log segments back: whole frames in order, and telling a torn tail from corruption.
//!
//! A crash can leave the last write half done: a partial header, a partial body, or (after a
//! power loss) a tail of zeros or stale bytes. Anything that is not a valid frame and is not
//! followed by one is such a torn tail, and recovery cuts it off. A bad frame *followed by a
//! valid one* cannot come from a crash, since we only ever append, so it is corruption and
//! recovery refuses to start rather than silently drop the records after it.

use super::record::{frame_crc, record_seq, FRAME_BODY_BYTES_MAX, FRAME_HEADER_BYTES, SEQ_BYTES};

/// How far past the last good sequence number a frame found after a bad one may claim to be
/// and still count as "a valid record follows". Real records follow within a few; the bound
/// makes the forward search skip random windows cheaply, before computing any CRC.
const SEQ_AHEAD_MAX: u64 = 1 << 32;

/// Why the bytes at an offset are not a valid frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anomaly {
    PartialHeader,
    BadLength(u32),
    PartialBody { len: u32, available: usize },
    ChecksumMismatch,
}

impl std::fmt::Display for Anomaly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Anomaly::PartialHeader => write!(f, "partial frame header"),
            Anomaly::BadLength(len) => write!(f, "impossible record length {len}"),
            Anomaly::PartialBody { len, available } => {
                write!(f, "record of {len} bytes with only {available} present")
            }
            Anomaly::ChecksumMismatch => write!(f, "checksum mismatch"),
        }
    }
}

/// How a scan ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte belongs to a valid frame.
    Clean,
    /// From `offset` on the bytes are a torn tail (nothing valid follows): cut there.
    TornTail { offset: u64, anomaly: Anomaly },
}

/// A bad frame with a valid one after it: refuse to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corrupt {
    pub offset: u64,
    pub anomaly: Anomaly,
    /// Where a valid frame was found after it.
    pub valid_at: u64,
}

/// Checks the frame at `at`: `Ok(body range end)` or what is wrong with it.
fn check_frame(bytes: &[u8], at: usize) -> Result<(usize, usize), Anomaly> {
    let rest = &bytes[at..];
    if rest.len() < FRAME_HEADER_BYTES {
        return Err(Anomaly::PartialHeader);
    }
    let len_bytes: [u8; 4] = rest[0..4].try_into().expect("4 bytes");
    let len = u32::from_le_bytes(len_bytes);
    let body_len = len as usize;
    if !(SEQ_BYTES + 1..=FRAME_BODY_BYTES_MAX).contains(&body_len) {
        return Err(Anomaly::BadLength(len));
    }
    let available = rest.len() - FRAME_HEADER_BYTES;
    if available < body_len {
        return Err(Anomaly::PartialBody { len, available });
    }
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    let body = &rest[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + body_len];
    if frame_crc(len_bytes, body) != crc {
        return Err(Anomaly::ChecksumMismatch);
    }
    Ok((at + FRAME_HEADER_BYTES, at + FRAME_HEADER_BYTES + body_len))
}

/// The first offset after `from` holding a valid record frame whose sequence number is in
/// `(seq_after, seq_after + SEQ_AHEAD_MAX]`.
fn find_valid_after(bytes: &[u8], from: usize, seq_after: u64) -> Option<usize> {
    let last = bytes
        .len()
        .checked_sub(FRAME_HEADER_BYTES + SEQ_BYTES + 1)?;
    (from + 1..=last).find(|&at| {
        // Cheap filters first: a plausible length and sequence number.
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len < SEQ_BYTES + 1 || len > bytes.len() - at - FRAME_HEADER_BYTES {
            return false;
        }
        let body_at = at + FRAME_HEADER_BYTES;
        let seq = record_seq(&bytes[body_at..]).unwrap_or(0);
        if seq <= seq_after || seq - seq_after > SEQ_AHEAD_MAX {
            return false;
        }
        check_frame(bytes, at).is_ok()
    })
}

/// Walks the record frames of one segment's `bytes` in order, handing `on_record` each frame's
/// offset and body. `seq_before` is the sequence number before this segment's first record
/// (only used to recognise valid records after a bad spot). `on_record` may stop the scan with
/// its own error (a frame whose checksum is right but whose content is wrong is corruption
/// too); that error comes back as `Err(Ok(..))`.
pub fn scan<E>(
    bytes: &[u8],
    seq_before: u64,
    mut on_record: impl FnMut(u64, &[u8]) -> Result<u64, E>,
) -> Result<ScanEnd, Result<E, Corrupt>> {
    let mut at = 0;
    let mut last_seq = seq_before;
    while at < bytes.len() {
        match check_frame(bytes, at) {
            Ok((body_start, body_end)) => {
                last_seq = on_record(at as u64, &bytes[body_start..body_end]).map_err(Ok)?;
                at = body_end;
            }
            Err(anomaly) => {
                return match find_valid_after(bytes, at, last_seq) {
                    Some(valid_at) => Err(Err(Corrupt {
                        offset: at as u64,
                        anomaly,
                        valid_at: valid_at as u64,
                    })),
                    None => Ok(ScanEnd::TornTail {
                        offset: at as u64,
                        anomaly,
                    }),
                };
            }
        }
    }
    Ok(ScanEnd::Clean)
}

#[cfg(test)]
mod tests {
    use super::super::record::{decode_record, encode_record};
    use super::super::{KeyRecord, Record};
    use super::*;
    use crate::stock::Stock;
    use proptest::prelude::*;

    fn record(i: u64) -> Record {
        Record {
            holds: Vec::new(),
            states: vec![(
                format!("sku-{}", i % 7),
                Stock {
                    on_hand: i * 3,
                    reserved: i,
                    version: i,
                },
            )],
            key: (i % 2 == 0).then(|| KeyRecord {
                key: format!("key-{i}"),
                fingerprint: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                result: vec![],
                created_secs: 1000 + i,
            }),
        }
    }

    /// A segment of `n` records from seq 1, with the offset where each ends.
    fn segment(n: u64) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for seq in 1..=n {
            encode_record(&mut bytes, seq, &record(seq)).unwrap();
            ends.push(bytes.len());
        }
        (bytes, ends)
    }

    /// Scans like recovery does: decodes, checks the sequence, collects.
    type ReadAll = Result<(Vec<(u64, Record)>, ScanEnd), Result<String, Corrupt>>;

    fn read_all(bytes: &[u8]) -> ReadAll {
        let mut records = Vec::new();
        let end = scan(bytes, 0, |_, body| {
            let (seq, record) = decode_record(body).map_err(|e| e.to_string())?;
            if seq != records.len() as u64 + 1 {
                return Err(format!("sequence {seq} out of order"));
            }
            records.push((seq, record));
            Ok(seq)
        })?;
        Ok((records, end))
    }

    #[test]
    fn a_clean_segment_reads_whole() {
        let (bytes, _) = segment(20);
        let (records, end) = read_all(&bytes).unwrap();
        assert_eq!(end, ScanEnd::Clean);
        assert_eq!(records.len(), 20);
        for (seq, record) in records {
            assert_eq!(record, super::tests::record(seq));
        }
    }

    #[test]
    fn zeros_after_the_last_record_are_a_torn_tail() {
        let (mut bytes, ends) = segment(5);
        bytes.extend_from_slice(&[0; 4096]);
        let (records, end) = read_all(&bytes).unwrap();
        assert_eq!(records.len(), 5);
        assert!(matches!(end, ScanEnd::TornTail { offset, .. } if offset as usize == ends[4]));
    }

    #[test]
    fn a_flipped_byte_in_the_middle_is_corruption_at_that_record() {
        let (bytes, ends) = segment(10);
        for record in 0..9 {
            let start = if record == 0 { 0 } else { ends[record - 1] };
            for at in start..ends[record] {
                let mut changed = bytes.clone();
                changed[at] ^= 0x5a;
                match read_all(&changed) {
                    Err(Err(corrupt)) => {
                        assert_eq!(corrupt.offset as usize, start, "flip at {at}");
                        assert!(corrupt.valid_at as usize > start);
                    }
                    other => panic!("flip at {at} gave {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_flipped_byte_in_the_last_record_is_a_torn_tail() {
        let (bytes, ends) = segment(10);
        for at in ends[8]..ends[9] {
            let mut changed = bytes.clone();
            changed[at] ^= 0x01;
            let (records, end) = read_all(&changed).unwrap();
            assert_eq!(records.len(), 9, "flip at {at}");
            assert!(matches!(end, ScanEnd::TornTail { offset, .. } if offset as usize == ends[8]));
        }
    }

    proptest! {
        /// The style guide's property: a log cut at any byte recovers a clean prefix, never
        /// a half record, and nothing that was whole before the cut is lost.
        #[test]
        fn a_log_cut_at_any_byte_recovers_a_clean_prefix(n in 1u64..40, cut_fraction in 0.0f64..=1.0) {
            let (bytes, ends) = segment(n);
            let cut = ((bytes.len() as f64) * cut_fraction) as usize;
            let (records, end) = read_all(&bytes[..cut]).unwrap();
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            prop_assert_eq!(records.len(), whole);
            for (index, (seq, record)) in records.iter().enumerate() {
                prop_assert_eq!(*seq, index as u64 + 1);
                prop_assert_eq!(record, &super::tests::record(*seq));
            }
            let clean_end = if whole == 0 { 0 } else { ends[whole - 1] };
            match end {
                ScanEnd::Clean => prop_assert_eq!(cut, clean_end),
                ScanEnd::TornTail { offset, .. } => prop_assert_eq!(offset as usize, clean_end),
            }
        }
    }

    #[test]
    fn every_cut_of_a_small_log_is_a_clean_prefix() {
        let (bytes, ends) = segment(6);
        for cut in 0..=bytes.len() {
            let (records, _) = read_all(&bytes[..cut]).unwrap();
            assert_eq!(records.len(), ends.iter().filter(|&&e| e <= cut).count());
        }
    }
}

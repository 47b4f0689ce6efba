//! Payload masking (RFC 6455 §5.3).
//!
//! Masking is an XOR of the payload with a 4-byte key, repeated: byte `i` is XORed with `key[i % 4]`.
//! The same operation masks and unmasks. Every client frame is masked, so this runs over every byte a
//! client sends; [`apply_mask`] does it a machine word at a time and [`apply_mask_plain`] is the
//! obviously-correct reference it is tested against.

/// Bytes XORed per step by [`apply_mask`].
const WORD_BYTES: usize = 8;

/// XORs `buf` with `key` repeated, starting at key index 0 (RFC 6455 §5.3), eight bytes at a time.
///
/// Same result as [`apply_mask_plain`]. Because a word is a multiple of the 4-byte key, the key
/// repeated twice lines up with every word, and the tail (fewer than 8 bytes) starts at key index 0.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let [k0, k1, k2, k3] = key;
    // Native byte order on both sides: the word is only ever XORed and stored back, never interpreted
    // as a number, so byte `j` of the word meets byte `j` of the doubled key on any endianness.
    let key_word = u64::from_ne_bytes([k0, k1, k2, k3, k0, k1, k2, k3]);
    let mut words = buf.chunks_exact_mut(WORD_BYTES);
    for chunk in &mut words {
        let word: &mut [u8; WORD_BYTES] = chunk
            .try_into()
            .expect("chunks_exact_mut(WORD_BYTES) yields chunks of exactly WORD_BYTES bytes");
        *word = (u64::from_ne_bytes(*word) ^ key_word).to_ne_bytes();
    }
    apply_mask_plain(words.into_remainder(), key);
}

/// XORs `buf` with `key` repeated, starting at key index 0 (RFC 6455 §5.3), one byte at a time.
pub fn apply_mask_plain(buf: &mut [u8], key: [u8; 4]) {
    for (index, byte) in buf.iter_mut().enumerate() {
        *byte ^= key[index % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic, non-repeating-looking bytes so a wrong key index shows up.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ 0x5a)
            .collect()
    }

    #[test]
    fn rfc_6455_section_5_7_masked_hello() {
        let mut payload = *b"Hello";
        apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(payload, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    }

    #[test]
    fn fast_matches_plain_at_every_length_alignment_and_key_rotation() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in 0..=70 {
            // Offsets 0..WORD_BYTES move the slice's start across every alignment of a u64.
            for offset in 0..WORD_BYTES {
                for rotation in 0..4 {
                    let mut rotated = key;
                    rotated.rotate_left(rotation);
                    let source = pattern(offset + len, len as u8);
                    let mut fast = source.clone();
                    let mut plain = source.clone();
                    apply_mask(&mut fast[offset..], rotated);
                    apply_mask_plain(&mut plain[offset..], rotated);
                    assert_eq!(fast, plain, "len {len} offset {offset} rotation {rotation}");
                    assert_eq!(
                        fast[..offset],
                        source[..offset],
                        "bytes before the slice untouched"
                    );
                }
            }
        }
    }

    #[test]
    fn masking_a_suffix_with_the_rotated_key_matches_masking_the_whole() {
        // The key index of a byte is its offset in the payload, so masking `payload[offset..]` alone
        // needs the key rotated by `offset % 4`. Pins that `apply_mask` always starts at key index 0.
        let key = [0xa1, 0xb2, 0xc3, 0xd4];
        for len in 0..=70 {
            let source = pattern(len, 7);
            let mut whole = source.clone();
            apply_mask(&mut whole, key);
            for offset in 0..=len {
                let mut rotated = key;
                rotated.rotate_left(offset % 4);
                let mut suffix = source[offset..].to_vec();
                apply_mask(&mut suffix, rotated);
                assert_eq!(suffix, whole[offset..], "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn masking_twice_is_identity() {
        let source = pattern(1000, 3);
        let mut buf = source.clone();
        apply_mask(&mut buf, [9, 8, 7, 6]);
        assert_ne!(buf, source);
        apply_mask(&mut buf, [9, 8, 7, 6]);
        assert_eq!(buf, source);
    }
}

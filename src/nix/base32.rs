//! Nix's own base-32: a 32-letter alphabet without `e o u t`, written least significant
//! digit last, as in store path hashes and `sha256:` narinfo hashes.

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

pub fn encoded_len(bytes: usize) -> usize {
    (bytes * 8).div_ceil(5)
}

pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let low = bytes[i] as u16 >> j;
        let high = if i + 1 < bytes.len() {
            (bytes[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((low | high) & 0x1f) as usize] as char);
    }
    out
}

/// Whether `c` is in the alphabet (on every request path: no scan of the alphabet).
pub fn is_digit(c: u8) -> bool {
    matches!(c, b'0'..=b'9' | b'a'..=b'z') && !matches!(c, b'e' | b'o' | b'u' | b't')
}

/// Decodes into exactly `out_len` bytes; `None` for a wrong length, a letter outside the
/// alphabet, or bits beyond `out_len`.
pub fn decode(text: &str, out_len: usize) -> Option<Vec<u8>> {
    if text.len() != encoded_len(out_len) {
        return None;
    }
    let mut out = vec![0u8; out_len];
    for (n, c) in text.bytes().rev().enumerate() {
        let digit = ALPHABET.iter().position(|&a| a == c)? as u16;
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        if i + 1 < out_len {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_digit_is_exactly_the_alphabet() {
        for c in 0..=255u8 {
            assert_eq!(is_digit(c), ALPHABET.contains(&c), "{c}");
        }
    }

    #[test]
    fn known_vector_sha256_of_empty_string() {
        // `nix hash to-base32 sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855`
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let text = encode(&bytes);
        assert_eq!(text, "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(decode(&text, 32).unwrap(), bytes);
    }

    #[test]
    fn rejects_bad_letters_lengths_and_overflow() {
        assert!(decode("e", 1).is_none());
        assert!(decode("000", 1).is_none());
        assert!(decode("zz", 1).is_none()); // 10 bits do not fit in one byte
        assert_eq!(decode("0z", 1), Some(vec![31]));
    }

    #[test]
    fn round_trips_every_length() {
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(decode(&encode(&bytes), len).unwrap(), bytes);
        }
    }
}

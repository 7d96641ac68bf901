//! The domain-separated encoding every MAC, HMAC and AEAD input uses: an ASCII tag, a zero byte, then each field as
//! a 4-byte big-endian length followed by its bytes.

/// Encodes `fields` under `tag`. Fields longer than 4 GiB cannot occur here: every
/// caller bounds its inputs far below that.
pub fn domain_separated(tag: &str, fields: &[&[u8]]) -> Vec<u8> {
    let len = tag.len() + 1 + fields.iter().map(|f| 4 + f.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(tag.as_bytes());
    out.push(0);
    for f in fields {
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let e = domain_separated("keyward/v1/x", &[b"ab", b""]);
        assert_eq!(e, b"keyward/v1/x\0\0\0\0\x02ab\0\0\0\0".to_vec());
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        assert_ne!(domain_separated("t", &[b"ab", b"c"]), domain_separated("t", &[b"a", b"bc"]));
    }
}

//! Deterministic message ids. A handler that publishes may run more than
//! once for one event (a failed commit, a crash), so its messages need ids
//! that come out the same every time: derived from what a message is about
//! (a stop, a product, an action), never from the attempt or the clock.
//! Consumers drop duplicates by them.

pub use uuid::Uuid;

/// The UUIDv5 (RFC 9562, SHA-1) of `parts` in `namespace`. The name hashed
/// is each part as its UTF-8 byte length in decimal, `:`, and the part, all
/// concatenated (`["ab", "c"]` → `2:ab1:c`), so no two lists of parts share
/// a name; a consumer can recompute an id the same way.
pub fn uuid_v5(namespace: &Uuid, parts: &[&str]) -> Uuid {
    let mut name = Vec::new();
    for p in parts {
        name.extend_from_slice(p.len().to_string().as_bytes());
        name.push(b':');
        name.extend_from_slice(p.as_bytes());
    }
    Uuid::new_v5(namespace, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_unambiguous() {
        let ns = Uuid::NAMESPACE_OID;
        let a = uuid_v5(&ns, &["stop-1", "product-1", "0"]);
        assert_eq!(a, uuid_v5(&ns, &["stop-1", "product-1", "0"]));
        assert_eq!(a.get_version_num(), 5);
        assert_ne!(a, uuid_v5(&ns, &["stop-1", "product-1", "1"]));
        assert_ne!(uuid_v5(&ns, &["ab", "c"]), uuid_v5(&ns, &["a", "bc"]));
        // The documented name encoding.
        assert_eq!(uuid_v5(&ns, &["ab", "c"]), Uuid::new_v5(&ns, b"2:ab1:c"));
        assert_ne!(
            a,
            uuid_v5(&Uuid::NAMESPACE_URL, &["stop-1", "product-1", "0"])
        );
    }
}

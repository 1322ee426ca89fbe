//! Formatting helpers built on registry crates.
use std::hash::Hasher;

/// `n` in decimal, via itoa.
pub fn decimal(n: u64) -> String {
    let mut buffer = itoa::Buffer::new();
    buffer.format(n).to_owned()
}

/// Hex of an FNV-1a hash of `text`.
pub fn fingerprint(text: &str) -> String {
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(text.as_bytes());
    hex::encode(hasher.finish().to_be_bytes())
}

/// How many times `needle` occurs in `haystack`.
pub fn count(haystack: &str, needle: u8) -> usize {
    memchr::memchr_iter(needle, haystack.as_bytes()).count()
}

/// A label, louder with the `shout` feature.
pub fn label(text: &str) -> String {
    if cfg!(feature = "shout") {
        text.to_uppercase()
    } else {
        text.to_owned()
    }
}

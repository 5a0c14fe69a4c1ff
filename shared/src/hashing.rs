//! Keyed hashes of the client IP and User-Agent, and of the sites' customer ids.
//!
//! A plain SHA-256 of an IPv4 address is reversible by trying all 2^32 addresses, so only
//! HMAC-SHA-256 under a secret key is ever stored, together with the key's id so the key
//! can be rotated (rows hashed under the old key keep its id). The key is never logged:
//! `Debug` prints the id only.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest key accepted: 256 bits, as long as the HMAC-SHA-256 output.
pub const MIN_KEY_BYTES: usize = 32;

/// A 32-byte keyed hash.
pub type Digest = [u8; 32];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the hash key must be at least {MIN_KEY_BYTES} bytes (got {0})")]
    TooShort(usize),
    #[error("the key id must be 1 to 32 characters of A-Za-z0-9_-")]
    BadKeyId,
}

#[derive(Clone)]
pub struct KeyedHasher {
    /// The MAC with the key already absorbed: cloning it skips the key schedule per hash.
    prepared: Hmac<Sha256>,
    key_id: String,
}

impl KeyedHasher {
    pub fn new(key: &[u8], key_id: &str) -> Result<Self, KeyError> {
        if key.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort(key.len()));
        }
        if !is_valid_key_id(key_id) {
            return Err(KeyError::BadKeyId);
        }
        let prepared =
            Hmac::<Sha256>::new_from_slice(key).map_err(|_| KeyError::TooShort(key.len()))?;
        Ok(Self {
            prepared,
            key_id: key_id.to_owned(),
        })
    }

    pub fn hash(&self, data: &[u8]) -> Digest {
        let mut mac = self.prepared.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The keyed hash of a site's customer id, scoped to its account and in a domain of
    /// its own: the same e-mail in two accounts gives two unrelated hashes, and a customer
    /// id equal to an IP address's text does not hash to that address's `ip_hash`. Account
    /// ids hold no NUL (`A-Za-z0-9_-`), so the message is unambiguous.
    pub fn hash_customer(&self, account_id: &str, customer_id: &str) -> Digest {
        let mut mac = self.prepared.clone();
        mac.update(CUSTOMER_DOMAIN);
        mac.update(account_id.as_bytes());
        mac.update(b"\0");
        mac.update(customer_id.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// What a customer hash's message starts with (see [`KeyedHasher::hash_customer`]).
const CUSTOMER_DOMAIN: &[u8] = b"referral customer v1\0";

impl fmt::Debug for KeyedHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedHasher")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

pub fn is_valid_key_id(key_id: &str) -> bool {
    (1..=32).contains(&key_id.len())
        && key_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn matches_rfc4231_known_answers() {
        // RFC 4231 test cases 6 and 7: the ones whose key (131 bytes of 0xaa) is long
        // enough for this hasher, which refuses keys under 32 bytes.
        let key = [0xaa_u8; 131];
        let h = KeyedHasher::new(&key, "k1").expect("key");
        let case_6 = b"Test Using Larger Than Block-Size Key - Hash Key First";
        assert_eq!(
            hex::encode(h.hash(case_6)),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        let case_7: &[u8] = b"This is a test using a larger than block-size key and a larger \
than block-size data. The key needs to be hashed before being used by the HMAC algorithm.";
        assert_eq!(
            hex::encode(h.hash(case_7)),
            "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"
        );
    }

    #[test]
    fn keyed_hash_is_not_the_plain_sha256() {
        let h = KeyedHasher::new(KEY, "k1").expect("key");
        let plain: [u8; 32] = sha2::Sha256::digest(b"203.0.113.7").into();
        assert_ne!(h.hash(b"203.0.113.7"), plain);
    }

    #[test]
    fn different_keys_give_different_hashes() {
        let a = KeyedHasher::new(KEY, "k1").expect("key");
        let b = KeyedHasher::new(b"another-key-another-key-another-key", "k2").expect("key");
        assert_ne!(a.hash(b"ua"), b.hash(b"ua"));
        assert_eq!(a.hash(b"ua"), a.hash(b"ua"));
    }

    #[test]
    fn short_keys_and_bad_ids_are_refused() {
        assert_eq!(
            KeyedHasher::new(b"short", "k1").err(),
            Some(KeyError::TooShort(5))
        );
        assert_eq!(KeyedHasher::new(KEY, "").err(), Some(KeyError::BadKeyId));
        assert_eq!(KeyedHasher::new(KEY, "k 1").err(), Some(KeyError::BadKeyId));
    }

    #[test]
    fn customer_hashes_are_scoped_to_the_account_and_apart_from_ip_hashes() {
        let h = KeyedHasher::new(KEY, "k1").expect("key");
        let ann = h.hash_customer("acct_a", "ann@example.com");
        assert_eq!(ann, h.hash_customer("acct_a", "ann@example.com"));
        assert_ne!(ann, h.hash_customer("acct_b", "ann@example.com"));
        assert_ne!(
            h.hash_customer("acct_a", "203.0.113.7"),
            h.hash(b"203.0.113.7")
        );
        // The account and the id cannot trade bytes.
        assert_ne!(h.hash_customer("a", "bc"), h.hash_customer("ab", "c"));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let h = KeyedHasher::new(KEY, "k1").expect("key");
        let shown = format!("{h:?}");
        assert!(shown.contains("k1") && !shown.contains("0123456789"));
    }
}

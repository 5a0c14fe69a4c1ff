//! API keys of the conversions endpoint: the `referral_keys` compacted topic (key: the
//! key's public id) and the secrets behind it.
//!
//! Invariants:
//! * a secret is shown once, by the command that makes it, and stored nowhere: the topic
//!   holds its SHA-256 (a secret has 192 random bits, so a fast hash is enough: nobody can
//!   try 2^192 candidates), the key's public id, its account, name and status;
//! * the secret names its key (`rk_<id>_<random>`), so a presented secret is checked against
//!   one stored hash, compared in constant time;
//! * every malformed, unknown or revoked secret gets the same answer from [`KeyId::of_secret`]
//!   and [`KeyRecord::accepts`] callers: the caller cannot tell which check failed.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::registry::{check_account_id, RecordError, RECORD_VERSION};

/// Prefix of every secret.
pub const SECRET_PREFIX: &str = "rk_";
/// Random bytes of a secret (192 bits).
const SECRET_RANDOM_BYTES: usize = 24;
/// Random bytes of a key id (64 bits: ids only need to be unique, not secret).
const ID_RANDOM_BYTES: usize = 8;
/// Longest key name an operator may give.
pub const MAX_NAME_LEN: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Revoked,
}

/// The value of a `referral_keys` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub v: u32,
    pub account: String,
    pub name: String,
    pub status: KeyStatus,
    /// SHA-256 of the secret, lower-case hex.
    pub secret_sha256: String,
    pub created_at_ms: u64,
    #[serde(default)]
    pub updated_at_ms: u64,
}

/// A key's public id: `key_` and 16 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId(String);

impl KeyId {
    pub fn parse(id: &str) -> Result<Self, String> {
        let ok = id.len() == 20
            && id.starts_with("key_")
            && id[4..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Self(id.to_owned()))
        } else {
            Err("a key id is `key_` and 16 hex digits".into())
        }
    }

    /// The id a presented secret names, or `None` for anything that is not a secret's shape.
    pub fn of_secret(secret: &str) -> Option<Self> {
        let rest = secret.strip_prefix(SECRET_PREFIX)?;
        let (id, random) = rest.split_once('_')?;
        let random_ok = random.len() == 32
            && random
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !random_ok {
            return None;
        }
        Self::parse(&format!("key_{id}")).ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A new key: its id, and the secret to show once.
pub struct NewKey {
    pub id: KeyId,
    pub secret: String,
    pub record: KeyRecord,
}

/// Makes a key for `account` (checked), named `name`.
pub fn new_key(account: &str, name: &str) -> Result<NewKey, String> {
    check_account_id(account)?;
    check_name(name)?;
    let id_bytes: [u8; ID_RANDOM_BYTES] = rand::random();
    let hex_id = hex::encode(id_bytes);
    let random: [u8; SECRET_RANDOM_BYTES] = rand::random();
    let secret = format!(
        "{SECRET_PREFIX}{hex_id}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    );
    let now = crate::now_ms();
    Ok(NewKey {
        id: KeyId(format!("key_{hex_id}")),
        record: KeyRecord {
            v: RECORD_VERSION,
            account: account.to_owned(),
            name: name.to_owned(),
            status: KeyStatus::Active,
            secret_sha256: sha256_hex(&secret),
            created_at_ms: now,
            updated_at_ms: now,
        },
        secret,
    })
}

/// A name: printable, no control or format characters, at most [`MAX_NAME_LEN`].
pub fn check_name(name: &str) -> Result<(), String> {
    if name.chars().count() > MAX_NAME_LEN {
        return Err(format!("a key name is at most {MAX_NAME_LEN} characters"));
    }
    if name.chars().any(crate::click::is_control_or_invisible) {
        return Err("a key name has no control or invisible format characters".into());
    }
    Ok(())
}

fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl KeyRecord {
    pub fn decode(value: &[u8]) -> Result<Self, RecordError> {
        let record: Self = crate::registry::decode_record(value)?;
        check_account_id(&record.account).map_err(RecordError::Malformed)?;
        check_name(&record.name).map_err(RecordError::Malformed)?;
        let hash_ok = record.secret_sha256.len() == 64
            && record.secret_sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !hash_ok {
            return Err(RecordError::Malformed(
                "secret_sha256 is not a SHA-256".into(),
            ));
        }
        Ok(record)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The same key, revoked now.
    pub fn revoked(&self) -> Self {
        Self {
            status: KeyStatus::Revoked,
            updated_at_ms: crate::now_ms(),
            ..self.clone()
        }
    }

    /// Whether `secret` is this key's and the key is active. The hashes are compared in
    /// constant time.
    pub fn accepts(&self, secret: &str) -> bool {
        let presented = Sha256::digest(secret.as_bytes());
        let Ok(stored) = hex::decode(&self.secret_sha256) else {
            return false;
        };
        let same: bool = presented.as_slice().ct_eq(&stored).into();
        same && self.status == KeyStatus::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_is_stored_without_its_secret_and_accepts_only_it() {
        let key = new_key("acct_1", "checkout server").expect("key");
        assert!(key.secret.starts_with("rk_"));
        assert_eq!(KeyId::of_secret(&key.secret), Some(key.id.clone()));
        let stored = String::from_utf8(key.record.encode()).expect("json");
        assert!(!stored.contains(&key.secret), "{stored}");
        // The random part: after `rk_`, 16 hex digits and `_` (it may hold `_` itself).
        let random = &key.secret[20..];
        assert_eq!(random.len(), 32);
        assert!(!stored.contains(random), "{stored}");
        let record = KeyRecord::decode(stored.as_bytes()).expect("decodes");
        assert!(record.accepts(&key.secret));
        let mut other = key.secret.clone();
        other.pop();
        other.push(if key.secret.ends_with('A') { 'B' } else { 'A' });
        assert!(!record.accepts(&other));
        assert!(!record.revoked().accepts(&key.secret));
    }

    #[test]
    fn secrets_and_ids_are_unique_and_well_formed() {
        let a = new_key("acct_1", "").expect("key");
        let b = new_key("acct_1", "").expect("key");
        assert_ne!(a.id, b.id);
        // The random parts, not the whole secrets (which differ by their ids anyway).
        assert_ne!(a.secret[20..], b.secret[20..]);
        assert_eq!(&a.secret[3..19], &a.id.as_str()[4..]);
        // `rk_` + 16 hex + `_` + 32 URL-safe characters (192 bits).
        assert_eq!(a.secret.len(), 3 + 16 + 1 + 32);
        assert!(KeyId::parse(a.id.as_str()).is_ok());
    }

    #[test]
    fn anything_else_names_no_key() {
        for bad in [
            "",
            "rk_",
            "Bearer rk_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "rk_0123456789ABCDEF_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "rk_0123456789abcdef_AAAA",
            "rk_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA!",
            "sk_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(KeyId::of_secret(bad), None, "{bad}");
        }
        assert!(KeyId::parse("key_0123456789abcdef").is_ok());
        assert!(KeyId::parse("key_0123").is_err());
    }

    #[test]
    fn a_record_with_a_bad_field_is_refused() {
        let key = new_key("acct_1", "n").expect("key");
        let mut record = key.record.clone();
        record.secret_sha256 = "plaintext".into();
        assert!(KeyRecord::decode(&record.encode()).is_err());
        let mut record = key.record;
        record.account = "bad id!".into();
        assert!(KeyRecord::decode(&record.encode()).is_err());
        assert!(check_name("line\nbreak").is_err());
        // Invisible format characters: a right-to-left override, a zero-width space.
        assert!(check_name("pay\u{202E}lortnoc").is_err());
        assert!(check_name("check\u{200B}out").is_err());
        assert!(check_name("checkout server ✓").is_ok());
        assert!(new_key("acct_1", &"x".repeat(101)).is_err());
    }
}

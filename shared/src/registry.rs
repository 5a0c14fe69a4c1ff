//! The referral-program registry: accounts and codes (consumer/README.md, "The registry").
//!
//! Two compacted Kafka topics hold it, and any backend may write them:
//! * `referral_accounts`, key = account id, value = [`AccountRecord`] as JSON;
//! * `referral_codes`, key = the normalized code, value = [`CodeRecord`] as JSON;
//! * `referral_keys`, key = an API key's public id, value = [`KeyRecord`] as JSON (the
//!   conversions endpoint's keys: a hash of the secret, never the secret);
//!
//! a message without a value (a tombstone) deletes its key. `v` is the major version, as
//! in the click event: unknown fields are ignored within it, another major is refused.
//!
//! [`Registry`] is the in-memory view every ingest instance holds: applying the topics'
//! messages in order gives the latest state of every key. Invariants: a malformed message
//! changes nothing (the caller logs and counts it and goes on with the next one); a code
//! resolves only while it is active, its account exists, is active and has a plan of the
//! catalogue. Memory: a code of up to 12 characters (the default length) is a 64-bit key,
//! up to 24 characters a 128-bit key, so no code costs an allocation; about 17–34 bytes
//! per code of up to 12 characters, depending on where the hash table is in its growth
//! (measured in tests/README.md).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::click::MAX_CODE_LEN;
use crate::keys::{KeyId, KeyRecord};
use crate::plans::Catalogue;

pub const ACCOUNTS_TOPIC: &str = "referral_accounts";
pub const CODES_TOPIC: &str = "referral_codes";
/// The API keys of the conversions endpoint (`crate::keys`).
pub const KEYS_TOPIC: &str = "referral_keys";
/// Where ingest publishes accepted conversions.
pub const CONVERSIONS_TOPIC: &str = "referral_conversions";
/// Refused-click counts per account and limit, published by ingest (not the clicks).
pub const REFUSALS_TOPIC: &str = "referral_refusals";
pub const RECORD_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    Active,
    Suspended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodeStatus {
    Active,
    Disabled,
}

/// The value of a `referral_accounts` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub v: u32,
    pub plan: String,
    pub overage: bool,
    pub status: AccountStatus,
    /// When the writer made this version, Unix milliseconds (informational).
    #[serde(default)]
    pub updated_at_ms: u64,
    /// How long after a click a conversion is attributed to it, in days. Added within
    /// v1: absent in older records, which means [`DEFAULT_ATTRIBUTION_WINDOW_DAYS`].
    #[serde(default = "default_window")]
    pub attribution_window_days: u16,
}

/// The attribution window of an account that did not set one.
pub const DEFAULT_ATTRIBUTION_WINDOW_DAYS: u16 = 90;
/// The longest attribution window (conversions may be 400 days old).
pub const MAX_ATTRIBUTION_WINDOW_DAYS: u16 = 400;

fn default_window() -> u16 {
    DEFAULT_ATTRIBUTION_WINDOW_DAYS
}

/// The value of a `referral_codes` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRecord {
    pub v: u32,
    pub account: String,
    pub status: CodeStatus,
    #[serde(default)]
    pub updated_at_ms: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("malformed key: {0}")]
    Key(String),
    #[error("malformed value: {0}")]
    Malformed(String),
    #[error("unsupported record version {0}")]
    Version(u32),
    #[error("unknown plan {0:?}")]
    UnknownPlan(String),
}

impl RecordError {
    /// A low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Key(_) => "key",
            Self::Malformed(_) => "malformed",
            Self::Version(_) => "version",
            Self::UnknownPlan(_) => "unknown_plan",
        }
    }
}

/// 1–64 of `A-Za-z0-9_-`: safe in logs, URLs, SQL literals and Redis keys.
pub fn check_account_id(id: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err("an account id must be 1 to 64 of A-Za-z0-9_-".into())
    }
}

/// A stored code: upper-case letters and digits, 1 to [`MAX_CODE_LEN`].
pub fn check_code(code: &str) -> Result<(), String> {
    crate::click::ReferralCode::parse_normalized(code).map(drop)
}

fn decode<T: for<'de> Deserialize<'de>>(value: &[u8]) -> Result<T, RecordError> {
    #[derive(Deserialize)]
    struct Major {
        v: u32,
    }
    let position = |e: serde_json::Error| {
        RecordError::Malformed(format!(
            "line {} column {}: {:?}",
            e.line(),
            e.column(),
            e.classify()
        ))
    };
    let major: Major = serde_json::from_slice(value).map_err(position)?;
    if major.v != RECORD_VERSION {
        return Err(RecordError::Version(major.v));
    }
    serde_json::from_slice(value).map_err(position)
}

/// [`decode`] for the other versioned records of this crate (the keys topic).
pub(crate) fn decode_record<T: for<'de> Deserialize<'de>>(value: &[u8]) -> Result<T, RecordError> {
    decode(value)
}

impl AccountRecord {
    pub fn new(plan: &str, overage: bool, status: AccountStatus) -> Self {
        Self {
            v: RECORD_VERSION,
            plan: plan.to_owned(),
            overage,
            status,
            updated_at_ms: crate::now_ms(),
            attribution_window_days: DEFAULT_ATTRIBUTION_WINDOW_DAYS,
        }
    }

    pub fn decode(value: &[u8]) -> Result<Self, RecordError> {
        let record: Self = decode(value)?;
        if !(1..=MAX_ATTRIBUTION_WINDOW_DAYS).contains(&record.attribution_window_days) {
            return Err(RecordError::Malformed(format!(
                "attribution_window_days must be 1 to {MAX_ATTRIBUTION_WINDOW_DAYS}"
            )));
        }
        Ok(record)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl CodeRecord {
    pub fn new(account: &str, status: CodeStatus) -> Self {
        Self {
            v: RECORD_VERSION,
            account: account.to_owned(),
            status,
            updated_at_ms: crate::now_ms(),
        }
    }

    pub fn decode(value: &[u8]) -> Result<Self, RecordError> {
        let record: Self = decode(value)?;
        check_account_id(&record.account).map_err(RecordError::Malformed)?;
        Ok(record)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A `referral_refusals` message: how many clicks one ingest instance refused for one
/// account and limit in one window (counts, never the clicks). `id` is unique per message,
/// so a message read twice is stored once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalCount {
    pub v: u32,
    pub id: String,
    /// Empty for the per-IP limit, which refuses before the body (and the code) is read.
    pub account_id: String,
    /// Empty for the per-IP limit.
    pub plan: String,
    /// `ip`, `plan_rate`, `daily_cap` or `monthly_credits`.
    pub limit: String,
    /// Start of the counting window, Unix milliseconds.
    pub window_start_ms: u64,
    pub count: u64,
}

pub const LIMIT_NAMES: [&str; 4] = ["ip", "plan_rate", "daily_cap", "monthly_credits"];

impl RefusalCount {
    pub fn decode(value: &[u8]) -> Result<Self, RecordError> {
        let r: Self = decode(value)?;
        if !r.account_id.is_empty() {
            check_account_id(&r.account_id).map_err(RecordError::Malformed)?;
        }
        if !LIMIT_NAMES.contains(&r.limit.as_str()) {
            return Err(RecordError::Malformed(format!(
                "unknown limit {:?}",
                r.limit
            )));
        }
        if r.id.is_empty() || r.id.len() > 128 || r.plan.len() > 32 {
            return Err(RecordError::Malformed("id or plan out of range".into()));
        }
        Ok(r)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

fn key_str(key: Option<&[u8]>) -> Result<&str, RecordError> {
    std::str::from_utf8(key.unwrap_or_default()).map_err(|_| RecordError::Key("not UTF-8".into()))
}

/// A registry message's place in the one order every reader applies, whatever order its
/// partitions are read in: the newer Kafka timestamp wins; on equal timestamps, the higher
/// partition; within one partition, the later offset (a partition is read in order, and a
/// message replaces one of an equal version). Any backend may write the registry, with any
/// partitioner, and an operator may add partitions: one key's messages can then sit in
/// several partitions, and without one order instances would disagree.
pub fn message_version(timestamp_ms: Option<i64>, partition: i32) -> u64 {
    const TS_BITS: u32 = 44; // milliseconds until the year 2527
    let ts = timestamp_ms
        .filter(|t| *t > 0)
        .map_or(0, |t| (t as u64).min((1 << TS_BITS) - 1));
    let partition = u64::try_from(partition).unwrap_or(0).min((1 << 20) - 1);
    (ts << 20) | partition
}

/// What a click's code resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub account_id: Arc<str>,
    /// The account's stable position in this registry: a compact key for per-account state
    /// (slots are never reused while the process runs).
    pub account: u32,
    /// Index into the [`Catalogue`].
    pub plan: usize,
    pub overage: bool,
}

#[derive(Debug, Clone, Copy)]
struct AccountState {
    plan: u32,
    overage: bool,
    active: bool,
}

#[derive(Debug)]
struct AccountSlot {
    id: Arc<str>,
    state: Option<AccountState>,
    /// Of the message that set `state` ([`message_version`]).
    version: u64,
}

/// A code's account slot, with the code's status in the top bit.
#[derive(Debug, Clone, Copy)]
struct CodeEntry(u32);

const ACTIVE_BIT: u32 = 1 << 31;

/// A code and the version of the message that set it. A deleted code (tombstone) stays as
/// [`CodeEntry::DELETED`], so an older message read later cannot bring it back. Held as
/// 32-bit words (12 bytes, 4-aligned): with a short code's key, also two 32-bit words, a
/// table slot is 20 bytes instead of the 24 a `u64` would pad it to.
#[derive(Debug, Clone, Copy)]
struct Versioned {
    entry: CodeEntry,
    version: [u32; 2],
}

impl Versioned {
    fn new(entry: CodeEntry, version: u64) -> Self {
        Self {
            entry,
            version: [(version >> 32) as u32, version as u32],
        }
    }

    fn version(&self) -> u64 {
        (u64::from(self.version[0]) << 32) | u64::from(self.version[1])
    }
}

/// A short code's packed value as the table's key (two 32-bit words, see [`Versioned`]).
fn short_key(k: u64) -> [u32; 2] {
    [(k >> 32) as u32, k as u32]
}

/// Puts `new` unless the map holds a newer version; the entry it replaced (or `None` when
/// there was none), or `Err` when `new` is older than what is there.
fn put<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Versioned>,
    key: K,
    new: Versioned,
) -> Result<Option<Versioned>, ()> {
    use std::collections::hash_map::Entry;
    match map.entry(key) {
        Entry::Occupied(mut o) if o.get().version() <= new.version() => Ok(Some(o.insert(new))),
        Entry::Occupied(_) => Err(()),
        Entry::Vacant(v) => {
            v.insert(new);
            Ok(None)
        }
    }
}

impl CodeEntry {
    const DELETED: Self = Self(!ACTIVE_BIT);

    fn is_deleted(self) -> bool {
        self.0 == Self::DELETED.0
    }

    fn new(slot: u32, active: bool) -> Self {
        Self(slot | if active { ACTIVE_BIT } else { 0 })
    }
    fn slot(self) -> usize {
        (self.0 & !ACTIVE_BIT) as usize
    }
    fn active(self) -> bool {
        self.0 & ACTIVE_BIT != 0
    }
}

/// A code as a hash-map key: base 37 (A-Z 1–26, 0-9 27–36), so different codes never share
/// a key. 12 characters fit in 64 bits (37^12 < 2^63), 24 in 128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Packed {
    Short(u64),
    Wide([u64; 2]),
}

fn pack(code: &str) -> Option<Packed> {
    if code.len() > 24 {
        return None;
    }
    let mut n: u128 = 0;
    for b in code.bytes() {
        let digit = match b {
            b'A'..=b'Z' => b - b'A' + 1,
            b'0'..=b'9' => b - b'0' + 27,
            _ => return None,
        };
        n = n * 37 + u128::from(digit);
    }
    Some(if code.len() <= 12 {
        Packed::Short(n as u64)
    } else {
        Packed::Wide([(n >> 64) as u64, n as u64])
    })
}

#[derive(Debug, Default)]
pub struct Registry {
    accounts: Vec<AccountSlot>,
    account_index: HashMap<Arc<str>, u32>,
    short_codes: HashMap<[u32; 2], Versioned>,
    wide_codes: HashMap<[u64; 2], Versioned>,
    long_codes: HashMap<Box<str>, Versioned>,
    /// Entries of deleted codes (kept for their version).
    deleted_codes: usize,
    /// API keys by public id (a deleted key stays as `None`, for its version).
    keys: HashMap<Box<str>, (Option<StoredKey>, u64)>,
}

/// An API key as ingest holds it: never the secret, only its hash.
#[derive(Debug, Clone)]
struct StoredKey {
    account: u32,
    record: KeyRecord,
}

/// What a presented secret authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub account_id: Arc<str>,
    pub key_id: Arc<str>,
}

impl Registry {
    /// Applies one `referral_accounts` message of `version` ([`message_version`]); an older
    /// one than the account's is ignored. On error nothing changes.
    pub fn apply_account(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        catalogue: &Catalogue,
        version: u64,
    ) -> Result<(), RecordError> {
        let id = key_str(key)?;
        check_account_id(id).map_err(RecordError::Key)?;
        let state = match value {
            None => None,
            Some(v) => {
                let record = AccountRecord::decode(v)?;
                let plan = catalogue
                    .index_of(&record.plan)
                    .ok_or_else(|| RecordError::UnknownPlan(record.plan.clone()))?;
                Some(AccountState {
                    plan: plan as u32,
                    overage: record.overage,
                    active: record.status == AccountStatus::Active,
                })
            }
        };
        let i = self.slot_of(id) as usize;
        let slot = &mut self.accounts[i];
        if slot.version <= version {
            slot.state = state;
            slot.version = version;
        }
        Ok(())
    }

    /// Applies one `referral_codes` message of `version` ([`message_version`]); an older one
    /// than the code's is ignored. On error nothing changes.
    pub fn apply_code(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        version: u64,
    ) -> Result<(), RecordError> {
        let code = key_str(key)?;
        check_code(code).map_err(RecordError::Key)?;
        let entry = match value {
            None => CodeEntry::DELETED,
            Some(v) => {
                let record = CodeRecord::decode(v)?;
                let slot = self.slot_of(&record.account);
                CodeEntry::new(slot, record.status == CodeStatus::Active)
            }
        };
        self.put_code(code, Versioned::new(entry, version));
        Ok(())
    }

    /// Sets a code's state directly (a snapshot of the topic, e.g. from ClickHouse's
    /// mirror, with the version of the message it came from), with the checks `apply_code`
    /// makes. On error nothing changes.
    pub fn set_code(
        &mut self,
        code: &str,
        account: &str,
        active: bool,
        version: u64,
    ) -> Result<(), RecordError> {
        check_code(code).map_err(RecordError::Key)?;
        check_account_id(account).map_err(RecordError::Malformed)?;
        let entry = CodeEntry::new(self.slot_of(account), active);
        self.put_code(code, Versioned::new(entry, version));
        Ok(())
    }

    fn put_code(&mut self, code: &str, new: Versioned) {
        let replaced = match pack(code) {
            Some(Packed::Short(k)) => put(&mut self.short_codes, short_key(k), new),
            Some(Packed::Wide(k)) => put(&mut self.wide_codes, k, new),
            None => put(&mut self.long_codes, code.into(), new),
        };
        // An older message changes nothing.
        let Ok(old) = replaced else { return };
        let was_deleted = old.is_some_and(|o| o.entry.is_deleted());
        match (was_deleted, new.entry.is_deleted()) {
            (false, true) => self.deleted_codes += 1,
            (true, false) => self.deleted_codes -= 1,
            _ => {}
        }
    }

    /// Applies one `referral_keys` message of `version` ([`message_version`]); an older one
    /// than the key's is ignored. On error nothing changes.
    pub fn apply_key(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        version: u64,
    ) -> Result<(), RecordError> {
        let id = key_str(key)?;
        KeyId::parse(id).map_err(RecordError::Key)?;
        let stored = match value {
            None => None,
            Some(v) => {
                let record = KeyRecord::decode(v)?;
                Some(StoredKey {
                    account: self.slot_of(&record.account),
                    record,
                })
            }
        };
        match self.keys.get_mut(id) {
            Some(entry) if entry.1 > version => {}
            Some(entry) => *entry = (stored, version),
            None => {
                self.keys.insert(id.into(), (stored, version));
            }
        }
        Ok(())
    }

    /// The account and key a presented secret belongs to, when the key is active and its
    /// account exists and is active; `None` for everything else (one answer for all). The
    /// secret's hash is compared with the stored one in constant time.
    pub fn authenticate(&self, secret: &str) -> Option<Authenticated> {
        let id = KeyId::of_secret(secret)?;
        let (Some(key), _) = self.keys.get(id.as_str())? else {
            return None;
        };
        if !key.record.accepts(secret) {
            return None;
        }
        let slot = self.accounts.get(key.account as usize)?;
        slot.state.filter(|s| s.active)?;
        Some(Authenticated {
            account_id: Arc::clone(&slot.id),
            key_id: id.as_str().into(),
        })
    }

    /// Active keys held.
    pub fn key_count(&self) -> usize {
        self.keys
            .values()
            .filter(|(k, _)| {
                k.as_ref()
                    .is_some_and(|k| k.record.status == crate::keys::KeyStatus::Active)
            })
            .count()
    }

    fn slot_of(&mut self, id: &str) -> u32 {
        if let Some(&slot) = self.account_index.get(id) {
            return slot;
        }
        let slot = self.accounts.len() as u32;
        let id: Arc<str> = id.into();
        self.accounts.push(AccountSlot {
            id: Arc::clone(&id),
            state: None,
            version: 0,
        });
        self.account_index.insert(id, slot);
        slot
    }

    /// The account of an active code whose account is active; `None` for an unknown or
    /// disabled code and for a suspended or deleted account (one answer for all).
    pub fn resolve(&self, code: &str) -> Option<Resolved> {
        let entry = self.entry(code)?;
        if !entry.active() {
            return None;
        }
        let slot = self.accounts.get(entry.slot())?;
        let state = slot.state.filter(|s| s.active)?;
        Some(Resolved {
            account_id: Arc::clone(&slot.id),
            account: entry.slot() as u32,
            plan: state.plan as usize,
            overage: state.overage,
        })
    }

    fn entry(&self, code: &str) -> Option<&CodeEntry> {
        let found = match pack(code) {
            Some(Packed::Short(k)) => self.short_codes.get(&short_key(k)),
            Some(Packed::Wide(k)) => self.wide_codes.get(&k),
            None if code.len() <= MAX_CODE_LEN => self.long_codes.get(code),
            None => None,
        };
        found.map(|v| &v.entry).filter(|e| !e.is_deleted())
    }

    /// The id of the account in `slot` (see [`Resolved::account`]).
    pub fn account_id(&self, slot: u32) -> Option<&Arc<str>> {
        self.accounts.get(slot as usize).map(|a| &a.id)
    }

    /// Whether the account exists (any status): the operator commands' check.
    pub fn has_account(&self, id: &str) -> bool {
        self.account_index
            .get(id)
            .is_some_and(|&s| self.accounts[s as usize].state.is_some())
    }

    /// Whether the code exists (any status).
    pub fn has_code(&self, code: &str) -> bool {
        self.entry(code).is_some()
    }

    /// Makes room for `n` more codes of up to 12 characters at once: a table that grows by
    /// doubling while a million codes are read leaves its old copies to the allocator
    /// (measured: tens of MB that stay resident), one sized table does not.
    pub fn reserve_codes(&mut self, n: usize) {
        self.short_codes.reserve(n);
    }

    pub fn code_count(&self) -> usize {
        self.short_codes.len() + self.wide_codes.len() + self.long_codes.len() - self.deleted_codes
    }

    pub fn account_count(&self) -> usize {
        self.accounts.iter().filter(|a| a.state.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogue() -> Catalogue {
        Catalogue::parse(include_bytes!("../../deploy/plans/catalogue.json")).expect("catalogue")
    }

    fn account(plan: &str, status: &str) -> Vec<u8> {
        format!(r#"{{"v":1,"plan":"{plan}","overage":false,"status":"{status}"}}"#).into_bytes()
    }

    fn code(account: &str, status: &str) -> Vec<u8> {
        format!(r#"{{"v":1,"account":"{account}","status":"{status}"}}"#).into_bytes()
    }

    #[test]
    fn a_key_authenticates_only_while_it_and_its_account_are_active() {
        let c = catalogue();
        let mut r = Registry::default();
        let key = crate::keys::new_key("acct_1", "server").expect("key");
        let id = Some(key.id.as_str().as_bytes());
        r.apply_key(id, Some(&key.record.encode()), 10)
            .expect("key");
        // The key before its account: no account, no answer.
        assert_eq!(r.authenticate(&key.secret), None);
        r.apply_account(Some(b"acct_1"), Some(&account("pro", "active")), &c, 0)
            .expect("account");
        let got = r.authenticate(&key.secret).expect("authenticates");
        assert_eq!(
            (&*got.account_id, &*got.key_id),
            ("acct_1", key.id.as_str())
        );
        assert_eq!(r.key_count(), 1);
        // Another secret of the same id, a malformed one: nothing.
        let mut forged = key.secret.clone();
        forged.replace_range(forged.len() - 4.., "AAAA");
        assert_eq!(r.authenticate(&forged), None);
        assert_eq!(r.authenticate("Bearer x"), None);
        // Suspended account: refused; active again: accepted.
        r.apply_account(Some(b"acct_1"), Some(&account("pro", "suspended")), &c, 1)
            .expect("account");
        assert_eq!(r.authenticate(&key.secret), None);
        r.apply_account(Some(b"acct_1"), Some(&account("pro", "active")), &c, 2)
            .expect("account");
        // Revoked by a newer message; an older message read later does not bring it back.
        r.apply_key(id, Some(&key.record.revoked().encode()), 20)
            .expect("revoke");
        assert_eq!(r.authenticate(&key.secret), None);
        r.apply_key(id, Some(&key.record.encode()), 15)
            .expect("older");
        assert_eq!(r.authenticate(&key.secret), None);
        assert_eq!(r.key_count(), 0);
        // A tombstone deletes; a bad id changes nothing.
        r.apply_key(id, None, 30).expect("tombstone");
        assert_eq!(r.authenticate(&key.secret), None);
        assert!(r
            .apply_key(Some(b"nope"), Some(&key.record.encode()), 40)
            .is_err());
    }

    #[test]
    fn an_account_window_defaults_and_is_bounded() {
        let old = AccountRecord::decode(&account("pro", "active")).expect("old record");
        assert_eq!(old.attribution_window_days, DEFAULT_ATTRIBUTION_WINDOW_DAYS);
        let bad = br#"{"v":1,"plan":"pro","overage":false,"status":"active","attribution_window_days":0}"#;
        assert!(AccountRecord::decode(bad).is_err());
    }

    #[test]
    fn a_code_resolves_only_while_it_and_its_account_are_active() {
        let c = catalogue();
        let mut r = Registry::default();
        let k = Some(&b"A1B2C3D4E5F6"[..]);
        // Code before its account (topics are read independently): not resolvable yet.
        r.apply_code(k, Some(&code("acct_1", "active")), 0)
            .expect("code");
        assert_eq!(r.resolve("A1B2C3D4E5F6"), None);
        r.apply_account(Some(b"acct_1"), Some(&account("pro", "active")), &c, 0)
            .expect("account");
        let got = r.resolve("A1B2C3D4E5F6").expect("resolves");
        assert_eq!(
            (&*got.account_id, got.plan),
            ("acct_1", c.index_of("pro").expect("pro"))
        );

        r.apply_code(k, Some(&code("acct_1", "disabled")), 0)
            .expect("disable");
        assert_eq!(r.resolve("A1B2C3D4E5F6"), None);
        r.apply_code(k, Some(&code("acct_1", "active")), 0)
            .expect("re-activate");
        r.apply_account(Some(b"acct_1"), Some(&account("pro", "suspended")), &c, 0)
            .expect("suspend");
        assert_eq!(r.resolve("A1B2C3D4E5F6"), None);
        r.apply_account(Some(b"acct_1"), Some(&account("free", "active")), &c, 0)
            .expect("reinstate");
        assert!(r.resolve("A1B2C3D4E5F6").is_some());
        r.apply_account(Some(b"acct_1"), None, &c, 0)
            .expect("account tombstone");
        assert_eq!(r.resolve("A1B2C3D4E5F6"), None);
        assert!(r.has_code("A1B2C3D4E5F6"));
        r.apply_code(k, None, 0).expect("code tombstone");
        assert!(!r.has_code("A1B2C3D4E5F6"));
        assert_eq!(r.resolve("UNKNOWNCODE1"), None);
    }

    /// One code's add and disable in two partitions (another writer's partitioner, or
    /// partitions added): every read order gives the newer message's answer, a tombstone
    /// is not undone by an older add read after it, and within a partition the later
    /// message wins a tie.
    #[test]
    fn the_newest_message_wins_whatever_order_partitions_are_read_in() {
        let c = catalogue();
        let add = |p: i32, ts: i64| (message_version(Some(ts), p), Some(code("a", "active")));
        let disable = |p: i32, ts: i64| (message_version(Some(ts), p), Some(code("a", "disabled")));
        /// A message: its version and value (`None`: a tombstone).
        type Message = (u64, Option<Vec<u8>>);
        let cases: Vec<(&str, Vec<Message>, bool)> = vec![
            (
                "add p0, newer disable p1",
                vec![add(0, 1_000), disable(1, 2_000)],
                false,
            ),
            (
                "disable p0, newer add p1",
                vec![disable(0, 1_000), add(1, 2_000)],
                true,
            ),
            (
                "newer disable p0, add p1",
                vec![disable(0, 2_000), add(1, 1_000)],
                false,
            ),
            (
                "same time: the higher partition",
                vec![add(3, 1_000), disable(1, 1_000)],
                true,
            ),
            (
                "tombstone, older add elsewhere",
                vec![(message_version(Some(2_000), 0), None), add(1, 1_000)],
                false,
            ),
        ];
        for (what, messages, active) in cases {
            for order in [messages.clone(), messages.iter().rev().cloned().collect()] {
                let mut r = Registry::default();
                r.apply_account(Some(b"a"), Some(&account("pro", "active")), &c, 0)
                    .expect("account");
                for (version, value) in &order {
                    r.apply_code(Some(b"CODE1"), value.as_deref(), *version)
                        .expect("code");
                }
                assert_eq!(r.resolve("CODE1").is_some(), active, "{what}");
            }
        }
        // One partition, one timestamp: read in order, the later message wins.
        let mut r = Registry::default();
        let v = message_version(Some(5_000), 2);
        r.apply_account(Some(b"a"), Some(&account("pro", "active")), &c, v)
            .expect("account");
        r.apply_code(Some(b"CODE1"), Some(&code("a", "active")), v)
            .expect("add");
        r.apply_code(Some(b"CODE1"), Some(&code("a", "disabled")), v)
            .expect("disable");
        assert!(r.resolve("CODE1").is_none());
        // A deleted code is not counted, and an add newer than its tombstone brings it back.
        r.apply_code(Some(b"CODE1"), None, v + (1 << 20))
            .expect("tombstone");
        assert_eq!((r.code_count(), r.has_code("CODE1")), (0, false));
        r.apply_code(Some(b"CODE1"), Some(&code("a", "active")), v + (2 << 20))
            .expect("add");
        assert_eq!(r.code_count(), 1);
        // Accounts likewise: an older suspension read later changes nothing.
        r.apply_account(
            Some(b"a"),
            Some(&account("pro", "suspended")),
            &c,
            v - (1 << 20),
        )
        .expect("older");
        assert!(r.resolve("CODE1").is_some());
    }

    #[test]
    fn malformed_messages_change_nothing() {
        let c = catalogue();
        let mut r = Registry::default();
        r.apply_account(Some(b"acct_1"), Some(&account("pro", "active")), &c, 0)
            .expect("account");
        r.apply_code(Some(b"CODE1"), Some(&code("acct_1", "active")), 0)
            .expect("code");
        let errors = [
            r.apply_account(Some(b"acct_1"), Some(b"{not json"), &c, 0),
            r.apply_account(Some(b"acct_1"), Some(&account("platinum", "active")), &c, 0),
            r.apply_account(Some(b"acct_1"), Some(br#"{"v":2,"plan":"free"}"#), &c, 0),
            r.apply_account(Some(b"bad id!"), Some(&account("pro", "active")), &c, 0),
            r.apply_account(None, Some(&account("pro", "active")), &c, 0),
            r.apply_code(Some(b"CODE1"), Some(&code("acct_1", "gone")), 0),
            r.apply_code(Some(b"CODE1"), Some(&code("bad id!", "active")), 0),
            r.apply_code(Some(b"lower"), Some(&code("acct_1", "active")), 0),
            r.apply_code(Some(&[0xff, 0xfe]), None, 0),
        ];
        let labels: Vec<_> = errors
            .iter()
            .map(|e| e.as_ref().expect_err("refused").label())
            .collect();
        assert_eq!(
            labels,
            [
                "malformed",
                "unknown_plan",
                "version",
                "key",
                "key",
                "malformed",
                "malformed",
                "key",
                "key"
            ]
        );
        let got = r.resolve("CODE1").expect("unchanged");
        assert_eq!(got.plan, c.index_of("pro").expect("pro"));
        // Unknown fields within the major version are fine (a newer writer).
        r.apply_account(
            Some(b"acct_1"),
            Some(br#"{"v":1,"plan":"free","overage":false,"status":"active","region":"eu"}"#),
            &c,
            0,
        )
        .expect("newer minor");
    }

    #[test]
    fn a_short_codes_table_slot_stays_20_bytes() {
        assert_eq!(std::mem::size_of::<([u32; 2], Versioned)>(), 20);
    }

    #[test]
    fn long_and_short_codes_are_kept_apart_and_packing_is_injective() {
        let mut r = Registry::default();
        let c = catalogue();
        r.apply_account(Some(b"a"), Some(&account("pro", "active")), &c, 0)
            .expect("account");
        let long = "Z".repeat(40);
        for k in [
            "A",
            "AA",
            "A0",
            "0A",
            "Z9",
            &"9".repeat(13),
            &"9".repeat(24),
            &long,
        ] {
            r.apply_code(Some(k.as_bytes()), Some(&code("a", "active")), 0)
                .expect(k);
        }
        assert_eq!(r.code_count(), 8);
        r.set_code("SNAP01", "a", false, 0).expect("set");
        assert!(r.has_code("SNAP01") && r.resolve("SNAP01").is_none());
        r.set_code("SNAP01", "a", true, 0).expect("set");
        assert!(r.resolve("SNAP01").is_some());
        assert!(
            r.set_code("lower", "a", true, 0).is_err()
                && r.set_code("SNAP02", "bad id!", true, 0).is_err()
        );
        r.apply_code(Some(b"SNAP01"), None, 0).expect("tombstone");
        assert!(r.resolve(&"9".repeat(13)).is_some() && r.resolve(&"9".repeat(12)).is_none());
        assert!(r.resolve(&long).is_some() && r.resolve(&"Z".repeat(39)).is_none());
        assert!(r.resolve("AAA").is_none() && r.resolve("B").is_none());
        assert_ne!(pack("A0"), pack("0A"));
        assert_ne!(pack("A"), pack("AA"));
        assert!(matches!(pack(&"9".repeat(12)), Some(Packed::Short(_))));
        assert!(matches!(pack(&"9".repeat(13)), Some(Packed::Wide(_))));
    }
}

//! [`MemoryStore`]: the lease script of [`super::RedisStore`] run in process, for tests.
//!
//! The script (`lease.lua`) runs unchanged in an embedded Lua 5.1, the Lua of Redis,
//! against `memory_redis.lua`, an emulation of the dozen Redis commands it calls. So the
//! limiter's unit tests exercise the production rules without a Redis server, and there is
//! no second copy of them to drift apart: the end-to-end suite holds the emulation to the
//! real Redis (`tests/tests/limit_store.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use mlua::{Function, Lua};

use super::{
    parse_lease_reply, LeaseAnswer, LeaseCall, LeaseRequest, QuotaStore, StoreError,
    INSTANCE_TTL_MS, LEASE_SCRIPT,
};

const EMULATION: &str = include_str!("memory_redis.lua");

/// The script and its key space, behind one lock: like Redis, one script at a time.
struct Interpreter {
    lua: Lua,
    lease: Function,
}

impl Interpreter {
    fn new() -> mlua::Result<Self> {
        let lua = Lua::new();
        lua.load(EMULATION).set_name("memory_redis.lua").exec()?;
        let lease = lua
            .load(LEASE_SCRIPT)
            .set_name("lease.lua")
            .into_function()?;
        Ok(Self { lua, lease })
    }

    fn run(&self, call: &LeaseCall, now_ms: u64) -> mlua::Result<Vec<i64>> {
        let globals = self.lua.globals();
        globals.set("NOW", now_ms)?;
        globals.set("KEYS", call.keys.to_vec())?;
        // Redis hands a script its arguments as strings.
        let args: Vec<String> = call.args.iter().map(i64::to_string).collect();
        globals.set("ARGV", args)?;
        // Redis turns the Lua numbers of a reply into integers by truncation.
        let reply: Vec<f64> = self.lease.call(())?;
        Ok(reply.into_iter().map(|v| v.trunc() as i64).collect())
    }
}

/// The lease script run in process, for tests (several limiters may share one).
pub struct MemoryStore {
    interpreter: Mutex<Interpreter>,
    instances: Mutex<HashMap<String, u64>>,
    /// While set, every call fails (a Redis outage in tests).
    pub failing: AtomicBool,
    /// Lease calls made through [`QuotaStore::lease`].
    pub calls: AtomicU64,
    /// The most arguments one lease call carried.
    pub max_args: AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            interpreter: Mutex::new(
                // Both scripts are part of this crate: a failure here is a bug in them.
                Interpreter::new().unwrap_or_else(|e| panic!("lease script: {e}")),
            ),
            instances: Mutex::new(HashMap::new()),
            failing: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            max_args: AtomicU64::new(0),
        }
    }
}

impl MemoryStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(StoreError("unreachable (test)".into()))
        } else {
            Ok(())
        }
    }

    /// The store's answer to a lease call, at once.
    pub fn lease_now(&self, req: &LeaseRequest<'_>) -> Result<LeaseAnswer, StoreError> {
        self.check()?;
        let interpreter = self
            .interpreter
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?;
        // The script reads the time with TIME, which the emulation answers with `NOW`.
        let call = LeaseCall::new("", req, false);
        self.max_args
            .fetch_max(call.args.len() as u64, Ordering::SeqCst);
        let reply = interpreter
            .run(&call, req.now_ms)
            .map_err(|e| StoreError(format!("lease script: {e}")))?;
        parse_lease_reply(&reply)
    }

    /// The keys that exist at `now_ms` (expired ones are gone, as in Redis).
    pub fn keys(&self, now_ms: u64) -> Vec<String> {
        let Ok(interpreter) = self.interpreter.lock() else {
            return Vec::new();
        };
        let run = || -> mlua::Result<Vec<String>> {
            interpreter.lua.globals().set("NOW", now_ms)?;
            let keys: Function = interpreter.lua.globals().get("memory_keys")?;
            keys.call(())
        };
        let mut keys = run().unwrap_or_default();
        keys.sort();
        keys
    }
}

impl QuotaStore for MemoryStore {
    async fn lease(&self, req: LeaseRequest<'_>) -> Result<LeaseAnswer, StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.lease_now(&req)
    }

    async fn heartbeat(&self, instance: &str, now_ms: u64) -> Result<u32, StoreError> {
        self.check()?;
        let mut all = self
            .instances
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?;
        all.insert(instance.to_owned(), now_ms);
        all.retain(|_, at| *at + INSTANCE_TTL_MS > now_ms);
        Ok(all.len().max(1) as u32)
    }

    async fn leave(&self, instance: &str) {
        if let Ok(mut all) = self.instances.lock() {
            all.remove(instance);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::{calendar, GiveBack, LocalSpends, Urgency, WINDOW_SLOTS};
    use super::*;
    use crate::limits::{AccountLimits, Limit};

    fn limits(rate: u32, day: Option<u64>, month: Option<u64>) -> AccountLimits {
        AccountLimits {
            rate_per_minute: rate,
            daily_cap: day,
            monthly: month,
        }
    }

    fn req(now_ms: u64, want: u32, l: AccountLimits) -> LeaseRequest<'static> {
        LeaseRequest {
            account: "a",
            now_ms,
            want,
            limits: l,
            instances: 1,
            give_back: None,
            spends: None,
            urgent: Urgency::new(true),
        }
    }

    #[test]
    fn limits_are_checked_in_order_with_give_backs() {
        let s = MemoryStore::default();
        let t0 = 1_796_212_800_000;
        let l = limits(5, Some(8), Some(10));
        assert!(matches!(
            s.lease_now(&req(t0, 3, l)),
            Ok(LeaseAnswer::Granted { tokens: 3, .. })
        ));
        assert!(matches!(
            s.lease_now(&req(t0 + 10, 9, l)),
            Ok(LeaseAnswer::Granted { tokens: 2, .. })
        ));
        // The window is full: retry when slot t0 leaves it (63 s of slots).
        match s.lease_now(&req(t0 + 500, 1, l)) {
            Ok(LeaseAnswer::Refused {
                limit: Limit::PlanRate,
                retry_after_ms,
                ..
            }) => assert_eq!(retry_after_ms, WINDOW_SLOTS * 1000 - 500),
            other => panic!("{other:?}"),
        }
        // Two unused tokens go back: two more pass.
        let mut r = req(t0 + 900, 5, l);
        r.give_back = Some(GiveBack {
            slot: t0 / 1000,
            day: calendar::day(t0),
            month: calendar::month(t0),
            tokens: 2,
        });
        assert!(matches!(
            s.lease_now(&r),
            Ok(LeaseAnswer::Granted {
                tokens: 2,
                day_used: 5,
                ..
            })
        ));
        // After the window: the daily cap (8) is next, then nothing more today.
        let later = t0 + WINDOW_SLOTS * 1000;
        assert!(matches!(
            s.lease_now(&req(later, 5, l)),
            Ok(LeaseAnswer::Granted {
                tokens: 3,
                day_used: 8,
                ..
            })
        ));
        assert!(matches!(
            s.lease_now(&req(later + 1, 1, l)),
            Ok(LeaseAnswer::Refused {
                limit: Limit::DailyCap,
                ..
            })
        ));
        // The next day: the monthly limit (10) ends it after 2 more.
        let tomorrow = t0 + calendar::DAY_MS;
        assert!(matches!(
            s.lease_now(&req(tomorrow, 5, l)),
            Ok(LeaseAnswer::Granted {
                tokens: 2,
                month_used: 10,
                ..
            })
        ));
        assert!(matches!(
            s.lease_now(&req(tomorrow + 1, 1, l)),
            Ok(LeaseAnswer::Refused {
                limit: Limit::MonthlyCredits,
                ..
            })
        ));
    }

    #[test]
    fn a_grant_is_at_most_an_even_share_and_spends_are_added() {
        let s = MemoryStore::default();
        let t0 = 1_796_212_800_000;
        let mut r = req(t0, 100, limits(30, None, None));
        r.instances = 3;
        assert!(matches!(
            s.lease_now(&r),
            Ok(LeaseAnswer::Granted { tokens: 10, .. })
        ));
        let spends = LocalSpends {
            day: calendar::day(t0),
            month: calendar::month(t0),
            slots: BTreeMap::from([(t0 / 1000 + 1, 15)]),
            total: 15,
        };
        let mut r = req(t0 + 2000, 100, limits(30, None, None));
        r.spends = Some(&spends);
        // 10 + 15 used: 5 left, shared by 1 instance.
        assert!(matches!(
            s.lease_now(&r),
            Ok(LeaseAnswer::Granted {
                tokens: 5,
                day_used: 30,
                ..
            })
        ));
    }

    #[test]
    fn keys_expire_as_in_redis() {
        let s = MemoryStore::default();
        let t0 = 1_796_212_800_000;
        assert!(matches!(
            s.lease_now(&req(t0, 3, limits(5, Some(8), Some(10)))),
            Ok(LeaseAnswer::Granted { tokens: 3, .. })
        ));
        let day = calendar::day(t0);
        let month = calendar::month(t0);
        assert_eq!(
            s.keys(t0),
            [
                format!("{{a}}:d{day}"),
                format!("{{a}}:m{month}"),
                "{a}:w2".to_owned()
            ]
        );
        // The window lives 180 s, a day counter 2 days, a month counter 40.
        assert_eq!(s.keys(t0 + 180_000).len(), 2);
        assert_eq!(s.keys(t0 + 2 * calendar::DAY_MS).len(), 1);
        assert!(s.keys(t0 + 40 * calendar::DAY_MS).is_empty());
        // A grant after its counters expired starts them anew.
        assert!(matches!(
            s.lease_now(&req(
                t0 + 40 * calendar::DAY_MS,
                3,
                limits(5, Some(8), Some(10))
            )),
            Ok(LeaseAnswer::Granted {
                tokens: 3,
                day_used: 3,
                month_used: 3
            })
        ));
    }
}

//! The plan limits' Lua script on the real Redis against the same rules in process
//! (`MemoryStore`, which the limiter's unit tests use), and the batching of lease calls.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use e2e::{unique, PrivateRedis};
use ingest::limits::calendar;
use ingest::limits::store::{
    GiveBack, LeaseAnswer, LeaseRequest, LocalSpends, MemoryStore, QuotaStore, RedisStore, Urgency,
};
use ingest::limits::AccountLimits;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A grant made earlier, whose unused tokens a later call may give back.
#[derive(Clone, Copy)]
struct Grant {
    account: usize,
    slot: u64,
    day: u32,
    month: u32,
    tokens: u32,
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lua_script_and_the_in_process_rules_agree_and_every_key_expires() {
    let redis = PrivateRedis::start().await;
    let prefix = format!("{}:", unique("store"));
    let store = RedisStore::new(&redis.url(), &prefix, Duration::from_secs(2))
        .expect("store")
        .with_caller_time();
    let memory = MemoryStore::default();
    let accounts = ["a1", "a2", "a3"];
    let limits = [
        AccountLimits {
            rate_per_minute: 40,
            daily_cap: Some(150),
            monthly: Some(400),
        },
        AccountLimits {
            rate_per_minute: 500,
            daily_cap: None,
            monthly: Some(900),
        },
        AccountLimits {
            rate_per_minute: 25,
            daily_cap: None,
            monthly: None,
        },
    ];
    let mut rng = StdRng::seed_from_u64(12);
    // Starts an hour before a UTC midnight that is also a month's end.
    let mut now_ms: u64 = 1_798_761_600_000 - 3_600_000;
    let mut grants: Vec<Grant> = Vec::new();
    let (mut granted, mut refused, mut gave_back, mut spent) = (0, 0, 0, 0);
    for step in 0..1500 {
        now_ms += match rng.random_range(0..100) {
            0..=59 => rng.random_range(0..400),
            60..=94 => rng.random_range(400..4000),
            95..=98 => rng.random_range(20_000..70_000),
            _ => rng.random_range(200_000..900_000),
        };
        let a = rng.random_range(0..accounts.len());
        let give_back = if rng.random_bool(0.4) {
            grants
                .iter()
                .rposition(|g| g.account == a && g.tokens > 0)
                .map(|i| {
                    let g = &mut grants[i];
                    let tokens = rng.random_range(1..=g.tokens);
                    g.tokens -= tokens;
                    GiveBack {
                        slot: g.slot,
                        day: g.day,
                        month: g.month,
                        tokens,
                    }
                })
        } else {
            None
        };
        let spends = rng.random_bool(0.15).then(|| {
            let slot = now_ms / 1000 - rng.random_range(0..90);
            let n = rng.random_range(1..20);
            LocalSpends {
                day: calendar::day(slot * 1000),
                month: calendar::month(slot * 1000),
                slots: BTreeMap::from([(slot, n)]),
                total: n,
            }
        });
        let req = LeaseRequest {
            account: accounts[a],
            now_ms,
            want: if rng.random_bool(0.1) {
                0
            } else {
                rng.random_range(1..60)
            },
            limits: limits[a],
            instances: rng.random_range(1..4),
            give_back,
            spends: spends.as_ref(),
            // Mostly urgent: a call alone waits the whole linger otherwise.
            urgent: Urgency::new(rng.random_bool(0.95)),
        };
        let expected = memory.lease_now(&req).expect("memory store");
        let got = store.lease(req.clone()).await.expect("redis store");
        assert_eq!(got, expected, "step {step}: {req:?}");
        gave_back += u32::from(give_back.is_some());
        spent += u32::from(spends.is_some());
        match got {
            LeaseAnswer::Granted { tokens, .. } if tokens > 0 => {
                granted += 1;
                grants.push(Grant {
                    account: a,
                    slot: now_ms / 1000,
                    day: calendar::day(now_ms),
                    month: calendar::month(now_ms),
                    tokens,
                });
            }
            LeaseAnswer::Refused { .. } => refused += 1,
            LeaseAnswer::Granted { .. } => {}
        }
    }
    // The sequence covered what it is for.
    assert!(
        granted > 300 && refused > 100,
        "granted {granted}, refused {refused}"
    );
    assert!(
        gave_back > 200 && spent > 100,
        "give-backs {gave_back}, spends {spent}"
    );

    // No key without a TTL: counters and windows of idle accounts go away by themselves.
    let client = redis::Client::open(redis.url()).expect("client");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut con)
        .await
        .expect("keys");
    assert!(keys.len() > 10, "{keys:?}");
    for key in keys {
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut con)
            .await
            .expect("ttl");
        assert!(ttl > 0, "{key} has no TTL ({ttl})");
    }
}

/// A lease of 6 tokens for `acct{i}`, in a task of its own.
fn spawn_lease(
    store: &Arc<RedisStore>,
    i: u32,
    now_ms: u64,
    limits: AccountLimits,
    urgent: bool,
) -> tokio::task::JoinHandle<Result<LeaseAnswer, ingest::limits::store::StoreError>> {
    let store = Arc::clone(store);
    tokio::spawn(async move {
        let account = format!("acct{i}");
        store
            .lease(LeaseRequest {
                account: &account,
                now_ms,
                want: 6,
                limits,
                instances: 1,
                give_back: None,
                spends: None,
                urgent: Urgency::new(urgent),
            })
            .await
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_lease_calls_share_round_trips_and_survive_an_emptied_script_cache() {
    let redis = PrivateRedis::start().await;
    let prefix = format!("{}:", unique("batch"));
    let store =
        Arc::new(RedisStore::new(&redis.url(), &prefix, Duration::from_secs(2)).expect("store"));
    let limits = AccountLimits {
        rate_per_minute: 10,
        daily_cap: None,
        monthly: None,
    };
    let now_ms = shared::now_ms();
    let client = redis::Client::open(redis.url()).expect("client");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let calls = |accounts: std::ops::Range<u32>, urgent: bool| {
        let tasks: Vec<_> = accounts
            .map(|i| spawn_lease(&store, i, now_ms, limits, urgent))
            .collect();
        futures::future::join_all(tasks)
    };
    // One field of a command's statistics (`cmdstat_evalsha:calls=…,failed_calls=…`).
    let stat = |info: &str, command: &str, field: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:")))
            .and_then(|fields| {
                fields
                    .split(',')
                    .filter_map(|f| f.split_once('='))
                    .find(|(k, _)| *k == field)
                    .and_then(|(_, v)| v.parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    let info = || async {
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let s: String = redis::cmd("INFO")
            .arg("all")
            .query_async(&mut con)
            .await
            .expect("info");
        s
    };

    // Not urgent: 300 calls made together wait at most the linger, and each is answered
    // as if alone. The script cache is empty (a fresh Redis): the first calls come back
    // NOSCRIPT, are sent again after SCRIPT LOAD, and still run once each.
    let reads = |info: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("total_reads_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("total_reads_processed")
    };
    let started = std::time::Instant::now();
    for answer in calls(0..300, false).await {
        assert!(
            matches!(
                answer.expect("task").expect("lease"),
                LeaseAnswer::Granted {
                    tokens: 6,
                    day_used: 6,
                    ..
                }
            ),
            "every account alone: 6 tokens, 6 used today"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(2));

    // Calls made 1 ms apart, none urgent: they wait for each other (up to the linger) and
    // reach Redis in a few pipelines, not 40 round trips.
    let before = info().await;
    let mut spaced = Vec::new();
    for i in 1000..1040 {
        spaced.push(spawn_lease(&store, i, now_ms, limits, false));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for answer in futures::future::join_all(spaced).await {
        assert!(matches!(
            answer.expect("task").expect("lease"),
            LeaseAnswer::Granted { tokens: 6, .. }
        ));
    }
    // The INFO connection's own reads (its handshake and INFO) included.
    let read = reads(&info().await) - reads(&before);
    assert!(read <= 12, "{read} reads for 40 lease calls 1 ms apart");

    // The same accounts again, now urgent: the window allows 4 more each, once.
    for answer in calls(0..300, true).await {
        assert!(matches!(
            answer.expect("task").expect("lease"),
            LeaseAnswer::Granted {
                tokens: 4,
                day_used: 10,
                ..
            }
        ));
    }

    // An emptied cache mid-run (Redis restarted or flushed): answered, applied once.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut con)
        .await
        .expect("flush");
    let before = info().await;
    for answer in calls(0..300, false).await {
        assert!(matches!(
            answer.expect("task").expect("lease"),
            LeaseAnswer::Refused { day_used: 10, .. }
        ));
    }
    // Each call ran exactly once: some were answered NOSCRIPT first (those sent before the
    // SCRIPT LOAD, one per batch that met the empty cache) and sent again.
    let after = info().await;
    let delta = |command, field| stat(&after, command, field) - stat(&before, command, field);
    let noscript = delta("evalsha", "failed_calls");
    assert_eq!(delta("evalsha", "calls") - noscript, 300, "EVALSHA runs");
    assert!((1..=300).contains(&noscript), "{noscript} NOSCRIPT answers");
    assert!(
        (1..=2).contains(&delta("script|load", "calls")),
        "SCRIPT LOADs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_a_click_starts_waiting_for_goes_at_once_whenever_the_wait_starts() {
    let redis = PrivateRedis::start().await;
    let prefix = format!("{}:", unique("hurry"));
    // A linger far longer than any answer: only urgency makes a call go before it.
    let linger = Duration::from_secs(30);
    let store = Arc::new(
        RedisStore::new(&redis.url(), &prefix, Duration::from_secs(2))
            .expect("store")
            .with_linger(linger),
    );
    let limits = AccountLimits {
        rate_per_minute: 100,
        daily_cap: None,
        monthly: None,
    };
    let lease = |account: &'static str, urgent: Urgency| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            store
                .lease(LeaseRequest {
                    account,
                    now_ms: shared::now_ms(),
                    want: 5,
                    limits,
                    instances: 1,
                    give_back: None,
                    spends: None,
                    urgent,
                })
                .await
        })
    };
    let answered = |task: tokio::task::JoinHandle<_>| async move {
        let answer: Result<LeaseAnswer, _> = tokio::time::timeout(linger / 3, task)
            .await
            .expect("answered long before the linger")
            .expect("task");
        assert!(matches!(
            answer.expect("lease"),
            LeaseAnswer::Granted { tokens: 5, .. }
        ));
    };
    // Urgent from the start.
    answered(lease("a", Urgency::new(true))).await;
    // Made ahead of need; a click starts waiting after it was queued: hurried.
    let urgency = Urgency::new(false);
    let call = lease("b", urgency.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    urgency.set();
    store.hurry();
    answered(call).await;
    // The click starts waiting before the call reached the queue (its task had not run):
    // the hurry finds nothing to send, the call is urgent when it arrives.
    let urgency = Urgency::new(false);
    urgency.set();
    store.hurry();
    answered(lease("c", urgency)).await;
    // Nobody waits: it lingers.
    let idle = lease("d", Urgency::new(false));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!idle.is_finished(), "a call nobody waits for lingers");
    idle.abort();
}

/// Two instances whose clocks differ by 90 s (each limiter's clock is the test's, one
/// shifted) share one Redis: a free account (5 a minute) clicked through both, several
/// times a second for 20 s, gets 5 clicks in all, and both count each other as alive.
/// With each caller's clock as the time, the instance ahead moved the window's low mark
/// past the other's slots, whose grants then never counted.
#[tokio::test(flavor = "multi_thread")]
async fn instances_whose_clocks_differ_by_90_s_share_one_rate_limit() {
    use ingest::limits::{LimiterOptions, PlanLimiter};
    let redis = PrivateRedis::start().await;
    let prefix = format!("{}:", unique("skew"));
    let store =
        Arc::new(RedisStore::new(&redis.url(), &prefix, Duration::from_secs(2)).expect("store"));
    let catalogue = Arc::new(shared::plans::Catalogue::load_or_builtin(None).expect("catalogue"));
    let free = catalogue.index_of("free").expect("free plan");
    let who = shared::registry::Resolved {
        account_id: Arc::from("acct_skew"),
        account: 0,
        plan: free,
        overage: false,
    };
    let limiter = |skew_ms: u64| {
        PlanLimiter::with_clock(
            Arc::clone(&store),
            Arc::clone(&catalogue),
            LimiterOptions {
                wait_budget: Duration::from_millis(200),
                store_timeout: Duration::from_secs(2),
                expected_instances: 1,
            },
            Arc::new(move || shared::now_ms() + skew_ms),
        )
    };
    let limiters = [Arc::new(limiter(90_000)), Arc::new(limiter(0))];
    for l in &limiters {
        l.heartbeat().await;
    }
    for l in &limiters {
        l.heartbeat().await;
        assert_eq!(l.instances(), 2, "each instance sees the other");
    }
    let started = std::time::Instant::now();
    let mut accepted = [0u32; 2];
    let mut attempts = 0;
    while started.elapsed() < Duration::from_secs(20) {
        for (i, l) in limiters.iter().enumerate() {
            if l.check(&who).await.is_ok() {
                accepted[i] += 1;
            }
            attempts += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(attempts >= 100, "{attempts} attempts");
    assert_eq!(
        accepted.iter().sum::<u32>(),
        5,
        "accepted per instance (ahead, behind): {accepted:?}"
    );
}

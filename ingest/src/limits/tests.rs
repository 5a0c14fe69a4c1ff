//! The limiter against the in-process store, several instances sharing it, on a simulated
//! clock: the overshoot bounds of the module doc, checked window by window.

use super::*;
use store::MemoryStore;

const T0: u64 = 1_796_212_800_000; // 2026-12-02 12:00:00 UTC

fn catalogue() -> Arc<Catalogue> {
    let json = br#"{"v":1,"plans":[
      {"name":"small","price_usd_month":0,"included_credits_month":1000000,"daily_cap":null,"rate_limit_per_minute":5,"overage_usd_per_1000":null,"overage_default":false},
      {"name":"big","price_usd_month":0,"included_credits_month":10000000,"daily_cap":null,"rate_limit_per_minute":1000,"overage_usd_per_1000":0.1,"overage_default":true},
      {"name":"capped","price_usd_month":0,"included_credits_month":25,"daily_cap":12,"rate_limit_per_minute":600,"overage_usd_per_1000":0.5,"overage_default":false}
    ]}"#;
    Arc::new(Catalogue::parse(json).expect("catalogue"))
}

fn account(c: &Catalogue, plan: &str, overage: bool) -> Resolved {
    Resolved {
        account_id: Arc::from(format!("acct_{plan}")),
        account: c.index_of(plan).expect("plan") as u32,
        plan: c.index_of(plan).expect("plan"),
        overage,
    }
}

/// A simulated wall clock, one per test (tests run in parallel).
type Sim = Arc<std::sync::atomic::AtomicU64>;

fn sim() -> Sim {
    Arc::new(std::sync::atomic::AtomicU64::new(T0))
}

fn instances(store: &Arc<MemoryStore>, n: u32, clock: &Sim) -> Vec<Arc<PlanLimiter<MemoryStore>>> {
    let c = catalogue();
    (0..n)
        .map(|_| {
            let clock = Arc::clone(clock);
            PlanLimiter::with_clock(
                Arc::clone(store),
                Arc::clone(&c),
                LimiterOptions {
                    wait_budget: Duration::from_millis(20),
                    store_timeout: Duration::from_millis(500),
                    expected_instances: n,
                },
                Arc::new(move || clock.load(std::sync::atomic::Ordering::SeqCst)),
            )
        })
        .collect()
}

fn set(clock: &Sim, t: u64) {
    clock.store(t, std::sync::atomic::Ordering::SeqCst);
}

/// `check` at simulated time `t`.
async fn check_at(
    clock: &Sim,
    l: &Arc<PlanLimiter<MemoryStore>>,
    who: &Resolved,
    t: u64,
) -> Result<Ticket, Refusal> {
    set(clock, t);
    l.check(who).await
}

fn sweep_at(clock: &Sim, l: &Arc<PlanLimiter<MemoryStore>>, t: u64) {
    set(clock, t);
    l.sweep();
}

/// Lets the lease calls spawned so far run and answer (the store answers at once).
async fn settle(ms: u64) {
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The most accepted clicks in any window `[t, t + 60 s)`.
fn max_per_minute(times: &[u64]) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi] >= times[lo] + 60_000 {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// Sends `per_minute` clicks a minute for `secs`, round-robin over the instances; the
/// accepted times and the refusals.
async fn load(
    clock: &Sim,
    limiters: &[Arc<PlanLimiter<MemoryStore>>],
    who: &Resolved,
    per_minute: u64,
    secs: u64,
    start: u64,
) -> (Vec<u64>, Vec<Refusal>) {
    let step = 60_000 / per_minute;
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    let mut t = start;
    let mut i = 0;
    while t < start + secs * 1000 {
        let limiter = &limiters[i % limiters.len()];
        match check_at(clock, limiter, who, t).await {
            Ok(ticket) => accepted.push(ticket.at_ms()),
            Err(r) => refused.push(r),
        }
        for l in limiters {
            sweep_at(clock, l, t);
        }
        t += step;
        i += 1;
    }
    (accepted, refused)
}

#[tokio::test(start_paused = true)]
async fn three_instances_at_three_times_the_rate_never_exceed_it() {
    let c = catalogue();
    for (plan, rate) in [("small", 5u64), ("big", 1000)] {
        let store = Arc::new(MemoryStore::default());
        let clock = sim();
        let limiters = instances(&store, 3, &clock);
        let who = account(&c, plan, true);
        let (accepted, refused) = load(&clock, &limiters, &who, rate * 3, 180, T0).await;
        let worst = max_per_minute(&accepted);
        assert!(
            worst as u64 <= rate,
            "{plan}: {worst} in one minute, limit {rate}"
        );
        // And not needlessly strict: a steady sender gets the limit per 63 s window.
        let expected = rate * 180 / store::WINDOW_SLOTS;
        assert!(
            accepted.len() as u64 >= expected * 9 / 10,
            "{plan}: only {} accepted of about {expected}",
            accepted.len()
        );
        let r = &refused[0];
        assert_eq!(
            (r.limit, r.plan.as_deref(), r.quota, r.window_secs),
            (Limit::PlanRate, Some(plan), rate, 60)
        );
        assert!(
            r.retry_after <= Duration::from_secs(store::WINDOW_SLOTS)
                && r.retry_after > Duration::ZERO
        );
    }
}

#[tokio::test(start_paused = true)]
async fn daily_cap_then_monthly_credits_then_overage() {
    let c = catalogue();
    let store = Arc::new(MemoryStore::default());
    let clock = sim();
    let limiters = instances(&store, 3, &clock);
    // capped: 12 a day, 25 a month without overage.
    let who = account(&c, "capped", false);
    let (day1, refused) = load(&clock, &limiters, &who, 120, 60, T0).await;
    assert_eq!(day1.len(), 12);
    let last = refused.last().expect("refused");
    assert_eq!(
        (last.limit, last.quota, last.window_secs),
        (Limit::DailyCap, 12, 86_400)
    );
    // Until the next UTC midnight (12 h after T0, the last refusal a minute later) plus a
    // few seconds of jitter.
    let secs = last.retry_after.as_secs();
    assert!((43_140..=43_206).contains(&secs), "{secs}");
    let (day2, _) = load(&clock, &limiters, &who, 120, 60, T0 + calendar::DAY_MS).await;
    assert_eq!(day2.len(), 12);
    let (day3, refused) = load(&clock, &limiters, &who, 120, 60, T0 + 2 * calendar::DAY_MS).await;
    assert_eq!(day3.len(), 1, "25 a month: 1 left on the third day");
    let last = refused.last().expect("refused");
    assert_eq!((last.limit, last.quota), (Limit::MonthlyCredits, 25));
    assert_eq!(last.window_secs, 31 * 86_400);
    // The overage switch on: the month no longer limits, the daily cap still does.
    let who = account(&c, "capped", true);
    let (day4, refused) = load(&clock, &limiters, &who, 120, 60, T0 + 3 * calendar::DAY_MS).await;
    assert_eq!(day4.len(), 12);
    assert_eq!(refused.last().map(|r| r.limit), Some(Limit::DailyCap));
}

#[tokio::test(start_paused = true)]
async fn without_the_store_each_instance_takes_its_share_and_catches_up_later() {
    let c = catalogue();
    let store = Arc::new(MemoryStore::default());
    let clock = sim();
    let limiters = instances(&store, 3, &clock);
    let who = account(&c, "capped", false); // 600/min, 12 a day
                                            // One click through the store, so the instances know what the day holds.
    assert!(check_at(&clock, &limiters[0], &who, T0).await.is_ok());
    for l in &limiters {
        set(&clock, T0);
        l.heartbeat().await;
        sweep_at(&clock, l, T0 + 5000);
    }
    store
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut per_instance = [0usize; 3];
    let mut t = T0 + 10_000;
    for i in 0..300 {
        if check_at(&clock, &limiters[i % 3], &who, t).await.is_ok() {
            per_instance[i % 3] += 1;
        }
        t += 50;
    }
    assert!(limiters.iter().all(|l| l.is_degraded()));
    // Instance 0 knows 11 of the day's 12 are left: ceil(11 / 3) = 4. The others never
    // heard from the store about this account and take ceil(12 / 3) = 4: one click over the
    // cap in all (the documented bound is cap + n - 1).
    assert_eq!(per_instance, [4, 4, 4]);
    let total: usize = per_instance.iter().sum();
    // The store answers again: the clicks accepted alone are added to its day counter.
    store
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    for l in &limiters {
        set(&clock, t);
        l.heartbeat().await;
        assert!(!l.is_degraded());
        sweep_at(&clock, l, t);
    }
    settle(10).await;
    let day = match store.lease_now(&LeaseRequest {
        account: &who.account_id,
        now_ms: t,
        want: 0,
        limits: limiters[0].limits_of(&who),
        instances: 3,
        give_back: None,
        spends: None,
        urgent: Urgency::new(true),
    }) {
        Ok(LeaseAnswer::Granted { day_used, .. }) => day_used,
        other => panic!("{other:?}"),
    };
    assert_eq!(day, 1 + total as u64);
}

#[tokio::test(start_paused = true)]
async fn a_refunded_token_is_spent_again_and_unused_tokens_go_back() {
    let c = catalogue();
    let store = Arc::new(MemoryStore::default());
    let clock = sim();
    let limiter = instances(&store, 1, &clock).remove(0);
    let who = account(&c, "small", false); // 5 a minute
    let mut tickets = Vec::new();
    for i in 0..5 {
        tickets.push(
            check_at(&clock, &limiter, &who, T0 + i)
                .await
                .expect("within the limit"),
        );
    }
    assert!(check_at(&clock, &limiter, &who, T0 + 10).await.is_err());
    limiter.refund(tickets.pop().expect("ticket"));
    // The refusal is remembered for up to a second; after it, the refunded token passes.
    assert!(check_at(&clock, &limiter, &who, T0 + 1100).await.is_ok());
    // A big lease that goes unused is given back by the sweeper.
    let big = account(&c, "big", true);
    for i in 0..50 {
        check_at(&clock, &limiter, &big, T0 + 5000 + i)
            .await
            .expect("ok");
    }
    sweep_at(&clock, &limiter, T0 + 5000 + 2 * LEASE_MS);
    settle(10).await;
    let used = match store.lease_now(&LeaseRequest {
        account: &big.account_id,
        now_ms: T0 + 8000,
        want: 0,
        limits: limiter.limits_of(&big),
        instances: 1,
        give_back: None,
        spends: None,
        urgent: Urgency::new(true),
    }) {
        Ok(LeaseAnswer::Granted { day_used, .. }) => day_used,
        other => panic!("{other:?}"),
    };
    assert_eq!(used, 50, "what was not spent went back");
}

#[tokio::test(start_paused = true)]
async fn a_busy_accounts_give_back_waits_for_its_next_lease_and_a_quiet_ones_is_paid() {
    let c = catalogue();
    let store = Arc::new(MemoryStore::default());
    let clock = sim();
    let limiter = instances(&store, 1, &clock).remove(0);
    let big = account(&c, "big", true);
    let granted = || match store.lease_now(&LeaseRequest {
        account: &big.account_id,
        now_ms: T0 + 20_000,
        want: 0,
        limits: limiter.limits_of(&big),
        instances: 1,
        give_back: None,
        spends: None,
        urgent: Urgency::new(true),
    }) {
        Ok(LeaseAnswer::Granted { day_used, .. }) => day_used,
        other => panic!("{other:?}"),
    };
    for i in 0..50 {
        check_at(&clock, &limiter, &big, T0 + i).await.expect("ok");
    }
    check_at(&clock, &limiter, &big, T0 + 1900)
        .await
        .expect("ok");
    settle(10).await;
    let leased = granted();
    assert!(leased > 51, "a lease larger than the clicks ({leased})");
    // The first leases have expired with tokens left, but the account was used 200 ms ago:
    // its next lease call carries them, so the sweeper makes no call of its own.
    sweep_at(&clock, &limiter, T0 + 2100);
    settle(10).await;
    assert_eq!(granted(), leased, "no give-back call for a busy account");
    // Quiet for a lease's length: the sweeper pays what is owed, one give-back a call.
    for k in 0..8 {
        sweep_at(&clock, &limiter, T0 + 6000 + k * 250);
        settle(10).await;
    }
    assert_eq!(granted(), 51, "what was not spent went back");
}

#[test]
fn the_sweeper_pays_at_once_only_local_spends_a_quiet_account_or_an_old_give_back() {
    let now = T0 + 10_000;
    let give_back = |slot: u64| GiveBack {
        slot,
        day: calendar::day(now),
        month: calendar::month(now),
        tokens: 3,
    };
    let busy = |give_backs: Vec<GiveBack>| Inner {
        give_back: give_backs,
        last_used_ms: now - 100,
        ..Inner::default()
    };
    assert!(!busy(Vec::new()).owes_now(now), "nothing owed");
    // Granted in the slot before `now`: expired at most a lease's length ago.
    assert!(!busy(vec![give_back(now / 1000 - 1)]).owes_now(now));
    // Granted early enough that it has waited a lease's length since it expired.
    let old = (now - 2 * LEASE_MS) / 1000 - 1;
    assert!(busy(vec![give_back(old)]).owes_now(now));
    let quiet = Inner {
        last_used_ms: now - LEASE_MS,
        ..busy(vec![give_back(now / 1000 - 1)])
    };
    assert!(quiet.owes_now(now));
    let local = Inner {
        local: vec![LocalSpends::default()],
        ..busy(Vec::new())
    };
    assert!(local.owes_now(now));
}

/// A click that finds the lease in hand spent or expired waits for a lease call; a steady
/// account's clicks never do, at any rate: the click that takes the last token of a small
/// lease asks for the next one, and the sweeper asks for the successor of a lease that no
/// click reached in its last moments. Once the account is quiet, its calls stop.
#[tokio::test(start_paused = true)]
async fn a_steady_account_never_waits_for_a_lease_and_a_quiet_one_stops_asking() {
    use std::sync::atomic::Ordering::SeqCst;
    let c = catalogue();
    let store = Arc::new(MemoryStore::default());
    let clock = sim();
    let limiter = instances(&store, 1, &clock).remove(0);
    let big = account(&c, "big", true);
    // One click every 900 ms (leases of one or two tokens), every 330 ms, every 40 ms, then
    // bursts of 5 clicks every 2.1 s (no click in a lease's last moments); the sweeper runs
    // every 250 ms as in production.
    let bursts_from = 39_200;
    let times: Vec<u64> = (0..20)
        .map(|i| i * 900)
        .chain((0..40).map(|i| 18_000 + i * 330))
        .chain((0..200).map(|i| 31_200 + i * 40))
        .chain((0..40).map(|i| bursts_from + (i / 5) * 2100 + (i % 5) * 10))
        .map(|t| T0 + t)
        .collect();
    let mut next_sweep = T0;
    let mut waited = Vec::new();
    for &at in &times {
        while next_sweep <= at {
            sweep_at(&clock, &limiter, next_sweep);
            settle(1).await;
            next_sweep += SWEEP_MS;
        }
        set(&clock, at);
        let mut check = std::pin::pin!(limiter.check(&big));
        match futures::poll!(check.as_mut()) {
            std::task::Poll::Ready(r) => {
                r.expect("accepted");
            }
            std::task::Poll::Pending => {
                waited.push(at - T0);
                check.await.expect("accepted");
            }
        }
        settle(1).await;
    }
    assert_eq!(waited, vec![0], "only the account's first click waits");
    // Quiet: the last lease's successor and the give-backs, then no call at all.
    let calls_during_clicks = store.calls.load(SeqCst);
    assert!(
        calls_during_clicks < times.len() as u64 / 2,
        "{calls_during_clicks} lease calls for {} clicks",
        times.len()
    );
    let mut calls_after = Vec::new();
    let quiet_sweeps = 20_000 / SWEEP_MS;
    for k in 1..=quiet_sweeps {
        sweep_at(&clock, &limiter, times[times.len() - 1] + k * SWEEP_MS);
        settle(1).await;
        calls_after.push(store.calls.load(SeqCst));
    }
    // After 5 s of quiet, nothing more (20 s of sweeps).
    let at_5s = calls_after[(5_000 / SWEEP_MS) as usize];
    assert_eq!(at_5s, calls_after[calls_after.len() - 1], "{calls_after:?}");
    assert!(at_5s - calls_during_clicks <= 4, "{calls_after:?}");
    println!(
        "{} clicks: {calls_during_clicks} lease calls; quiet after: {} more",
        times.len(),
        at_5s - calls_during_clicks
    );
}

fn granted(tokens: u32, day_used: u64, month_used: u64) -> LeaseAnswer {
    LeaseAnswer::Granted {
        tokens,
        day_used,
        month_used,
    }
}

const LIMITS: AccountLimits = AccountLimits {
    rate_per_minute: 60,
    daily_cap: Some(100),
    monthly: Some(1000),
};

#[test]
fn a_grant_becomes_the_lease_or_the_next_one_or_goes_back_when_too_late() {
    let mut s = Inner::default();
    s.apply_answer(granted(5, 5, 5), None, LIMITS, T0, T0 + 3, 0);
    assert_eq!((s.lease.left, s.lease.expires_ms), (5, T0 + LEASE_MS));
    assert_eq!((s.seen.day_used, s.seen.month_used), (5, 5));
    // Asked for ahead of need while tokens are left: it waits as the next lease.
    s.apply_answer(granted(7, 12, 12), None, LIMITS, T0 + 500, T0 + 510, 0);
    assert_eq!((s.lease.left, s.next.left), (5, 7));
    assert!(s.next.serial > s.lease.serial);
    // An answer that arrives after its lease would have expired goes straight back.
    s.apply_answer(
        granted(4, 16, 16),
        None,
        LIMITS,
        T0 + 600,
        T0 + 600 + LEASE_MS,
        0,
    );
    let back = s.give_back.last().expect("given back");
    assert_eq!((back.tokens, back.slot), (4, (T0 + 600) / 1000));
    // A grant of nothing changes no lease, but what the store said is kept.
    let before = (s.lease.left, s.next.left, s.serial);
    s.apply_answer(granted(0, 16, 16), None, LIMITS, T0 + 700, T0 + 701, 0);
    assert_eq!((s.lease.left, s.next.left, s.serial), before);
    assert_eq!(s.seen.at_ms, T0 + 700);
}

#[test]
fn a_refusal_is_cached_until_it_can_pass_and_reused_at_most_a_second() {
    let mut s = Inner::default();
    let refused = |limit, retry_after_ms| LeaseAnswer::Refused {
        limit,
        retry_after_ms,
        day_used: 100,
        month_used: 500,
    };
    s.apply_answer(refused(Limit::PlanRate, 4200), None, LIMITS, T0, T0, 0);
    let r = s.refused.expect("cached");
    assert_eq!(
        (r.retry_at_ms, r.until_ms),
        (T0 + 4200, T0 + REFUSAL_REUSE_MS)
    );
    // The daily cap: retry at the next UTC midnight plus the jitter.
    s.apply_answer(refused(Limit::DailyCap, 0), None, LIMITS, T0, T0, 3000);
    let r = s.refused.expect("cached");
    assert_eq!(r.retry_at_ms, T0 + calendar::ms_to_next_day(T0) + 3000);
    assert_eq!(r.limit, Limit::DailyCap);
    // A grant clears it.
    s.apply_answer(granted(1, 100, 500), None, LIMITS, T0 + 10, T0 + 11, 0);
    assert!(s.refused.is_none());
}

#[test]
fn spends_the_answer_carried_are_settled_and_later_ones_stay() {
    let day = calendar::day(T0);
    let month = calendar::month(T0);
    let mut s = Inner::default();
    s.local.push(LocalSpends {
        day,
        month,
        slots: std::collections::BTreeMap::from([(T0 / 1000, 3), (T0 / 1000 + 1, 2)]),
        total: 5,
    });
    // The call carried the first 3; 2 more were accepted alone while it was in flight.
    let sent = LocalSpends {
        day,
        month,
        slots: std::collections::BTreeMap::from([(T0 / 1000, 3)]),
        total: 3,
    };
    s.apply_answer(granted(1, 9, 9), Some(&sent), LIMITS, T0, T0 + 1, 0);
    assert_eq!(s.local.len(), 1);
    assert_eq!(s.local[0].total, 2);
    assert_eq!(
        s.local[0].slots,
        std::collections::BTreeMap::from([(T0 / 1000 + 1, 2)])
    );
    // Settling the rest empties the list.
    let rest = s.local[0].clone();
    s.apply_answer(granted(1, 10, 10), Some(&rest), LIMITS, T0 + 2, T0 + 3, 0);
    assert!(s.local.is_empty());
}

/// An outage of 8 hours across a UTC midnight at 1,000 accounts, each clicked once a minute
/// on one instance: the spends it keeps stay within the rolling window's slots per account,
/// and once the store answers each account pays its outage back in one call per UTC day,
/// each carrying at most a window's slots; the day counters then hold every click.
#[tokio::test(start_paused = true)]
async fn an_eight_hour_outage_stays_bounded_and_is_paid_back_in_a_few_calls() {
    const ACCOUNTS: u32 = 1000;
    const MINUTES: u64 = 8 * 60;
    let c = catalogue();
    let store = Arc::new(MemoryStore::default());
    let clock = sim();
    let limiter = instances(&store, 1, &clock).remove(0);
    let big = c.index_of("big").expect("plan");
    let accounts: Vec<Resolved> = (0..ACCOUNTS)
        .map(|i| Resolved {
            account_id: Arc::from(format!("acct_{i}")),
            account: i,
            plan: big,
            overage: true,
        })
        .collect();
    store
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let start = T0 + 8 * 3_600_000; // 20:00 UTC: the outage ends at 04:00 the next day
    let mut accepted_after_midnight = 0u64;
    for minute in 0..MINUTES {
        for (i, who) in accounts.iter().enumerate() {
            let t = start + minute * 60_000 + i as u64 * 50;
            assert!(check_at(&clock, &limiter, who, t).await.is_ok());
            if calendar::day(t) != calendar::day(start) && i == 0 {
                accepted_after_midnight += 1;
            }
        }
    }
    let (most, all) = {
        let map = limiter.accounts.read().expect("accounts");
        let per_account: Vec<usize> = map
            .values()
            .map(|a| a.lock().local.iter().map(|g| g.slots.len()).sum())
            .collect();
        (
            per_account.iter().copied().max().unwrap_or(0),
            per_account.iter().sum::<usize>(),
        )
    };
    // One click a minute: at most 2 of an account's slots are within 63 s of the last.
    assert!(most <= 2, "an account kept {most} slots");
    assert!(all <= 2 * ACCOUNTS as usize, "{all} slots kept in all");

    store
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let end = start + MINUTES * 60_000;
    set(&clock, end);
    limiter.heartbeat().await;
    let before = store.calls.load(std::sync::atomic::Ordering::SeqCst);
    for round in 0..4 {
        sweep_at(&clock, &limiter, end + round * 1000);
        settle(10).await;
    }
    let calls = store.calls.load(std::sync::atomic::Ordering::SeqCst) - before;
    // Two UTC days of spends: two calls an account.
    assert!(
        calls <= 2 * u64::from(ACCOUNTS),
        "{calls} calls to pay back"
    );
    let max_args = store.max_args.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        max_args <= 10 + 2 * WINDOW_SLOTS,
        "a call carried {max_args} arguments"
    );
    let owed: usize = limiter
        .accounts
        .read()
        .expect("accounts")
        .values()
        .map(|a| a.lock().local.len())
        .sum();
    assert_eq!(owed, 0, "spends still owed after the pay-back");
    let who = &accounts[7];
    match store.lease_now(&LeaseRequest {
        account: &who.account_id,
        now_ms: end,
        want: 0,
        limits: limiter.limits_of(who),
        instances: 1,
        give_back: None,
        spends: None,
        urgent: Urgency::new(true),
    }) {
        Ok(LeaseAnswer::Granted {
            day_used,
            month_used,
            ..
        }) => {
            assert_eq!(day_used, accepted_after_midnight);
            assert_eq!(month_used, MINUTES);
        }
        other => panic!("{other:?}"),
    }
}

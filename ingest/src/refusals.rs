//! Refused clicks per account and limit, counted in memory and published every few seconds
//! to the refusals topic (counts, never the clicks: a refused click is not data to keep).
//! The consumer writes them to ClickHouse for the billing dashboard.
//!
//! Each message has a unique id (`instance-sequence`), so a message read twice is one row.
//! Counts of a window whose publish fails are kept and sent with the next one; on shutdown
//! the last window is published before the producer is flushed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use shared::registry::{RefusalCount, RECORD_VERSION};

use crate::limits::Limit;

#[derive(Default)]
struct Window {
    start_ms: u64,
    /// (account id, plan, limit) -> refusals; the per-IP limit has no account and plan.
    counts: HashMap<(Arc<str>, Arc<str>, Limit), u64>,
}

pub struct RefusalCounts {
    window: Mutex<Window>,
    instance: String,
    sequence: AtomicU64,
}

impl RefusalCounts {
    pub fn new() -> Self {
        Self {
            window: Mutex::new(Window::default()),
            instance: format!("{:016x}", rand::random::<u64>()),
            sequence: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        match self.window.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// One refused click. `account`: (id, plan); `None` for the per-IP limit.
    pub fn record(&self, account: Option<(&Arc<str>, &str)>, limit: Limit, now_ms: u64) {
        let empty: Arc<str> = Arc::from("");
        let (id, plan) = match account {
            Some((id, plan)) => (Arc::clone(id), Arc::from(plan)),
            None => (Arc::clone(&empty), empty),
        };
        let mut w = self.lock();
        if w.counts.is_empty() {
            w.start_ms = now_ms;
        }
        *w.counts.entry((id, plan, limit)).or_default() += 1;
    }

    /// The counts so far as messages; the window starts anew.
    pub fn take(&self) -> Vec<(String, Vec<u8>)> {
        let w = std::mem::take(&mut *self.lock());
        w.counts
            .into_iter()
            .map(|((account, plan, limit), count)| {
                let id = format!(
                    "{}-{}",
                    self.instance,
                    self.sequence.fetch_add(1, Ordering::Relaxed)
                );
                let msg = RefusalCount {
                    v: RECORD_VERSION,
                    id: id.clone(),
                    account_id: account.to_string(),
                    plan: plan.to_string(),
                    limit: limit.name().to_owned(),
                    window_start_ms: w.start_ms,
                    count,
                };
                (id, msg.encode())
            })
            .collect()
    }

    /// Puts counts that could not be published back (they go with the next window).
    pub fn restore(&self, messages: &[(String, Vec<u8>)]) {
        let mut w = self.lock();
        for (_, payload) in messages {
            if let Ok(r) = RefusalCount::decode(payload) {
                let limit = match r.limit.as_str() {
                    "ip" => Limit::Ip,
                    "plan_rate" => Limit::PlanRate,
                    "daily_cap" => Limit::DailyCap,
                    _ => Limit::MonthlyCredits,
                };
                if w.counts.is_empty() || r.window_start_ms < w.start_ms {
                    w.start_ms = r.window_start_ms;
                }
                *w.counts
                    .entry((Arc::from(r.account_id), Arc::from(r.plan), limit))
                    .or_default() += r.count;
            }
        }
    }
}

impl Default for RefusalCounts {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_account_and_limit_with_unique_ids() {
        let c = RefusalCounts::new();
        let a: Arc<str> = Arc::from("acct_1");
        for _ in 0..3 {
            c.record(Some((&a, "free")), Limit::PlanRate, 1000);
        }
        c.record(Some((&a, "free")), Limit::DailyCap, 2000);
        c.record(None, Limit::Ip, 3000);
        let mut msgs: Vec<RefusalCount> = c
            .take()
            .iter()
            .map(|(_, p)| RefusalCount::decode(p).expect("valid"))
            .collect();
        msgs.sort_by(|x, y| x.limit.cmp(&y.limit));
        let got: Vec<_> = msgs
            .iter()
            .map(|m| {
                (
                    m.account_id.as_str(),
                    m.plan.as_str(),
                    m.limit.as_str(),
                    m.count,
                    m.window_start_ms,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("acct_1", "free", "daily_cap", 1, 1000),
                ("", "", "ip", 1, 1000),
                ("acct_1", "free", "plan_rate", 3, 1000)
            ]
        );
        let ids: std::collections::HashSet<_> = msgs.iter().map(|m| m.id.clone()).collect();
        assert_eq!(ids.len(), 3);
        assert!(c.take().is_empty());
        // A failed publish: the counts come back in the next window.
        c.record(None, Limit::Ip, 9000);
        let failed = c.take();
        c.restore(&failed);
        c.record(None, Limit::Ip, 9500);
        let again = c.take();
        assert_eq!(again.len(), 1);
        let r = RefusalCount::decode(&again[0].1).expect("valid");
        assert_eq!((r.count, r.window_start_ms), (2, 9000));
    }
}

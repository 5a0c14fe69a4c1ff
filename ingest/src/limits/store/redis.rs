//! [`RedisStore`]: the lease script and the instance heartbeats in Redis, shared by every
//! ingest instance, with lease calls pipelined.

use std::time::Duration;

use super::{
    parse_lease_reply, LeaseAnswer, LeaseCall, LeaseRequest, QuotaStore, StoreError, Urgency,
    HEARTBEAT_SCRIPT, INSTANCE_TTL_MS, LEASE_SCRIPT,
};

enum Msg {
    Call(Queued),
    /// Send the batch being collected now.
    Hurry,
}

/// A lease call waiting for its batch: the EVALSHA, and where its answer goes.
struct Queued {
    cmd: redis::Cmd,
    urgent: Urgency,
    reply: tokio::sync::oneshot::Sender<Result<Vec<i64>, StoreError>>,
}

/// How long a call no click waits for may wait for others to share its round trip. A
/// lease is asked for ahead of need at least [`super::AHEAD_MS`] before it is needed, so this
/// delays no click.
pub const BATCH_LINGER_MS: u64 = 20;
/// At most this many lease calls in one pipeline.
const MAX_BATCH: usize = 256;

/// The shared counters in Redis, through one multiplexed, self-reconnecting connection.
///
/// Lease calls are pipelined: calls made within [`BATCH_LINGER_MS`] of each other go to
/// Redis in one write and come back in one read (each still its own atomic script), and a
/// call a click waits for goes at once, taking along whatever is queued. Measured with
/// `redis-benchmark` on this machine: 40 µs of Redis CPU per lease call one at a time, 22–30
/// µs pipelined by 4–16; ingest saves the same per-call socket work.
pub struct RedisStore {
    shared: std::sync::Arc<RedisShared>,
    batches: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Msg>>,
    linger: Duration,
    /// The scripts take the caller's clock as the time (tests only, see [`LeaseCall::new`]).
    caller_time: bool,
}

struct RedisShared {
    client: redis::Client,
    prefix: String,
    connection: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    lease: redis::Script,
    heartbeat: redis::Script,
    timeout: Duration,
}

impl RedisStore {
    /// Parses the URL; connects lazily (Redis may come up after ingest).
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        Ok(Self {
            shared: std::sync::Arc::new(RedisShared {
                client,
                prefix: prefix.to_owned(),
                connection: tokio::sync::Mutex::new(None),
                lease: redis::Script::new(LEASE_SCRIPT),
                heartbeat: redis::Script::new(HEARTBEAT_SCRIPT),
                timeout,
            }),
            batches: std::sync::OnceLock::new(),
            linger: Duration::from_millis(BATCH_LINGER_MS),
            caller_time: false,
        })
    }

    /// The scripts take each request's `now_ms` as the time instead of the server's clock:
    /// for tests that simulate days against the real Redis.
    #[cfg(any(test, feature = "memory-store"))]
    pub fn with_caller_time(mut self) -> Self {
        self.caller_time = true;
        self
    }

    /// Another linger than [`BATCH_LINGER_MS`] (tests make it long to see what hurries).
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// The batcher's queue; the batcher starts with the first call (inside the runtime).
    fn queue(&self) -> &tokio::sync::mpsc::UnboundedSender<Msg> {
        self.batches.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(batch_calls(
                std::sync::Arc::clone(&self.shared),
                rx,
                self.linger,
            ));
            tx
        })
    }
}

impl RedisShared {
    async fn connection(&self) -> Result<redis::aio::ConnectionManager, StoreError> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(2)
            .set_max_delay(1000);
        let manager = tokio::time::timeout(
            self.timeout * 2,
            redis::aio::ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| StoreError("connect timed out".into()))?
        .map_err(|e| StoreError(e.to_string()))?;
        *slot = Some(manager.clone());
        Ok(manager)
    }

    /// Sends one pipeline and answers every call in it. A call Redis answers NOSCRIPT (its
    /// script cache was emptied, e.g. by a restart) did not run: the script is loaded and
    /// those calls alone are sent again, so no call runs twice.
    async fn send(&self, batch: Vec<Queued>) {
        let (cmds, replies): (Vec<redis::Cmd>, Vec<_>) =
            batch.into_iter().map(|q| (q.cmd, q.reply)).unzip();
        let mut pending: Vec<(redis::Cmd, _)> = cmds.into_iter().zip(replies).collect();
        for attempt in 0..2 {
            let answers = match self.pipeline(pending.iter().map(|(c, _)| c)).await {
                Ok(answers) => answers,
                Err(e) => {
                    for (_, reply) in pending {
                        let _ = reply.send(Err(StoreError(e.0.clone())));
                    }
                    return;
                }
            };
            let mut again = Vec::new();
            for ((cmd, reply), answer) in pending.into_iter().zip(answers) {
                match answer {
                    redis::Value::ServerError(e) if e.code() == "NOSCRIPT" && attempt == 0 => {
                        again.push((cmd, reply));
                    }
                    redis::Value::ServerError(e) => {
                        let _ = reply.send(Err(StoreError(format!("{}: {e:?}", e.code()))));
                    }
                    value => {
                        let _ = reply.send(
                            redis::from_owned_redis_value::<Vec<i64>>(value)
                                .map_err(|e| StoreError(e.to_string())),
                        );
                    }
                }
            }
            if again.is_empty() {
                return;
            }
            if let Err(e) = self.load_lease_script().await {
                for (_, reply) in again {
                    let _ = reply.send(Err(StoreError(e.0.clone())));
                }
                return;
            }
            pending = again;
        }
        for (_, reply) in pending {
            let _ = reply.send(Err(StoreError("NOSCRIPT after SCRIPT LOAD".into())));
        }
    }

    async fn pipeline<'a>(
        &self,
        cmds: impl Iterator<Item = &'a redis::Cmd>,
    ) -> Result<Vec<redis::Value>, StoreError> {
        use redis::aio::ConnectionLike as _;
        let mut pipe = redis::pipe();
        for cmd in cmds {
            pipe.add_command(cmd.clone());
        }
        let mut con = self.connection().await?;
        metrics::counter!(shared::metric_names::LIMITS_LEASE_PIPELINES_TOTAL).increment(1);
        let answers = con
            .req_packed_commands(&pipe, 0, pipe.len())
            .await
            .map_err(|e| StoreError(e.to_string()))?;
        if answers.len() != pipe.len() {
            return Err(StoreError(format!(
                "{} answers to {} lease calls",
                answers.len(),
                pipe.len()
            )));
        }
        Ok(answers)
    }

    async fn load_lease_script(&self) -> Result<(), StoreError> {
        let mut con = self.connection().await?;
        self.lease
            .load_async(&mut con)
            .await
            .map(|_| ())
            .map_err(|e| StoreError(e.to_string()))
    }
}

/// Collects lease calls into pipelines until the store is dropped: a batch goes when a call
/// in it has a click waiting (an [`Urgency`] set when it arrives, or a hurry while it
/// waits), when its oldest call has waited the linger, or when it is full. Batches are sent concurrently (one connection; Redis runs them in order).
async fn batch_calls(
    shared: std::sync::Arc<RedisShared>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Msg>,
    linger: Duration,
) {
    while let Some(msg) = rx.recv().await {
        let Msg::Call(first) = msg else {
            continue; // nothing collected to hurry
        };
        let deadline = tokio::time::Instant::now() + linger;
        let mut urgent = first.urgent.is_set();
        let mut batch = vec![first];
        while !urgent && batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Msg::Call(q))) => {
                    urgent = q.urgent.is_set();
                    batch.push(q);
                }
                Ok(Some(Msg::Hurry)) => urgent = true,
                Ok(None) | Err(_) => break,
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Call(q)) => batch.push(q),
                Ok(Msg::Hurry) => {}
                Err(_) => break,
            }
        }
        let shared = std::sync::Arc::clone(&shared);
        tokio::spawn(async move { shared.send(batch).await });
    }
}

impl QuotaStore for RedisStore {
    async fn lease(&self, req: LeaseRequest<'_>) -> Result<LeaseAnswer, StoreError> {
        let call = LeaseCall::new(&self.shared.prefix, &req, self.caller_time);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.shared.lease.get_hash()).arg(call.keys.len());
        for key in &call.keys {
            cmd.arg(key);
        }
        for arg in &call.args {
            cmd.arg(*arg);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queue()
            .send(Msg::Call(Queued {
                cmd,
                urgent: req.urgent.clone(),
                reply: tx,
            }))
            .map_err(|_| StoreError("lease batcher stopped".into()))?;
        let reply = rx
            .await
            .map_err(|_| StoreError("lease batcher dropped the call".into()))??;
        parse_lease_reply(&reply)
    }

    async fn heartbeat(&self, instance: &str, now_ms: u64) -> Result<u32, StoreError> {
        let mut con = self.shared.connection().await?;
        let n: i64 = self
            .shared
            .heartbeat
            .key(format!("{}instances", self.shared.prefix))
            .arg(now_ms)
            .arg(instance)
            .arg(INSTANCE_TTL_MS)
            .arg(i64::from(self.caller_time))
            .invoke_async(&mut con)
            .await
            .map_err(|e| StoreError(e.to_string()))?;
        Ok(u32::try_from(n.max(1)).unwrap_or(1))
    }

    fn hurry(&self) {
        if let Some(queue) = self.batches.get() {
            let _ = queue.send(Msg::Hurry);
        }
    }

    async fn leave(&self, instance: &str) {
        if let Ok(mut con) = self.shared.connection().await {
            let _: Result<i64, _> = redis::cmd("ZREM")
                .arg(format!("{}instances", self.shared.prefix))
                .arg(instance)
                .query_async(&mut con)
                .await;
        }
    }
}

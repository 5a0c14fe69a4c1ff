//! HTTP clients posting clicks.

use crate::*;
use std::time::Duration;

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

pub async fn post_click(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    let json = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// Posts a valid click with a fresh random click id; returns the id and the status.
pub async fn post_fresh_click(client: &reqwest::Client, url: &str) -> (String, u16) {
    let id = random_click_id();
    let (status, _) = post_click(
        client,
        url,
        &serde_json::json!({"code": "A1B2C3D4E5F6", "click_id": id}),
    )
    .await;
    (id, status)
}

/// Lets a test take the broker down while an HTTP load is idle: [`LoadGate::enter`] before
/// each post holds the load while the gate is closed, and [`LoadGate::close`] returns once
/// no post is in flight. Ingest answers 200 only after the broker's acknowledgement, so an
/// idle load means nothing is in flight to the broker either. A broker stopped then sees no
/// request time out in flight: tansu 0.6 cannot take an idempotent producer's retry of such
/// a request (consumer/README.md, known limits).
#[derive(Default)]
pub struct LoadGate {
    closed: std::sync::atomic::AtomicBool,
    in_flight: std::sync::atomic::AtomicUsize,
}

/// A post in flight through a [`LoadGate`]; dropping it ends the post.
pub struct InFlight<'a>(&'a LoadGate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl LoadGate {
    /// Waits while the gate is closed, then counts a post in flight until the guard drops.
    pub async fn enter(&self) -> InFlight<'_> {
        use std::sync::atomic::Ordering::SeqCst;
        loop {
            while self.closed.load(SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            self.in_flight.fetch_add(1, SeqCst);
            if !self.closed.load(SeqCst) {
                return InFlight(self);
            }
            self.in_flight.fetch_sub(1, SeqCst);
        }
    }

    /// Holds new posts and waits until none is in flight.
    pub async fn close(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.closed.store(true, SeqCst);
        while self.in_flight.load(SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn open(&self) {
        self.closed
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

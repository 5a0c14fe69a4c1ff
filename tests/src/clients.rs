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

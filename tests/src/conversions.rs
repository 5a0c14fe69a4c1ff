//! Conversions in tests: API keys made with the operator command, and posting.

use crate::*;
use std::time::Duration;

pub const CONVERSIONS_PATH: &str = "/api/v1/referrals/conversions";

/// What ingest answered a conversion with.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub www_authenticate: Option<String>,
    pub retry_after: Option<String>,
    pub text: String,
    pub json: serde_json::Value,
}

/// Posts a conversion body (any JSON text) with `Authorization` set to `authorization`.
pub async fn post_conversion_raw(
    client: &reqwest::Client,
    ingest: &Ingest,
    authorization: Option<&str>,
    body: &str,
) -> Answer {
    let mut request = client
        .post(ingest.url(CONVERSIONS_PATH))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(a) = authorization {
        request = request.header("authorization", a);
    }
    let r = request.send().await.expect("post");
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (status, www_authenticate, retry_after) = (
        r.status().as_u16(),
        header("www-authenticate"),
        header("retry-after"),
    );
    let text = r.text().await.unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    Answer {
        status,
        www_authenticate,
        retry_after,
        text,
        json,
    }
}

/// Posts a conversion with a bearer secret.
pub async fn post_conversion(
    client: &reqwest::Client,
    ingest: &Ingest,
    secret: &str,
    body: &serde_json::Value,
) -> Answer {
    post_conversion_raw(
        client,
        ingest,
        Some(&format!("Bearer {secret}")),
        &body.to_string(),
    )
    .await
}

impl Scope {
    /// `consumer keys create ACCOUNT`: the key's id and its secret.
    pub async fn create_key(&self, account: &str) -> (String, String) {
        let (code, out) = self
            .consumer_command(&["keys", "create", account], &test_catalogue())
            .await;
        assert_eq!(code, 0, "{out}");
        let word = |prefix: &str| {
            out.split_whitespace()
                .find(|w| w.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {out}"))
                .to_owned()
        };
        (word("key_"), word("rk_"))
    }

    /// Sets an account through the operator command (`extra`: more flags).
    pub async fn set_account(&self, account: &str, extra: &[&str]) {
        let mut args = vec!["accounts", "set", account, "--plan", TEST_PLAN];
        args.extend_from_slice(extra);
        let (code, out) = self.consumer_command(&args, &test_catalogue()).await;
        assert_eq!(code, 0, "{out}");
    }
}

/// A click event as ingest publishes it, accepted at `at_ms` for `account`.
pub fn click_event(click_id: &str, code: &str, account: &str, at_ms: u64) -> Vec<u8> {
    shared::event::ClickEvent {
        v: 1,
        click_id: click_id.to_owned(),
        code: code.to_owned(),
        landing_path: "/pricing".into(),
        utm_source: "news".into(),
        utm_medium: "email".into(),
        utm_campaign: "late".into(),
        ip_hash: format!("{:064x}", rand::random::<u128>()),
        ua_hash: format!("{:064x}", rand::random::<u128>()),
        key_id: "e2e1".into(),
        is_bot: false,
        received_at_ms: at_ms,
        account_id: account.to_owned(),
    }
    .encode()
}

/// The attribution of each conversion of `account`: event id → (attribution, click id).
pub async fn attributions(
    scope: &Scope,
    account: &str,
) -> std::collections::BTreeMap<String, (String, String)> {
    scope
        .ch
        .rows(&format!(
            "SELECT event_id, attribution, click_id FROM {}.conversions_attributed \
             WHERE account_id = '{account}' ORDER BY event_id",
            scope.database
        ))
        .await
        .into_iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (s("event_id"), (s("attribution"), s("click_id")))
        })
        .collect()
}

pub async fn wait_attribution(scope: &Scope, event: &str, expected: (&str, &str)) {
    eventually(
        &format!("{event} attributed as {expected:?}"),
        Duration::from_secs(30),
        || async {
            let got = attributions(scope, &scope.account).await;
            (got.get(event).map(|(a, c)| (a.as_str(), c.as_str())) == Some(expected)).then_some(())
        },
    )
    .await;
}

//! Black-box tests of `POST /api/v1/referrals/click` against the real ingest binary and the
//! real broker: every status of the contract, headers, and what reaches the topic.

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};

use e2e::*;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PATH: &str = "/api/v1/referrals/click";

async fn start(name: &str, env: &[(&str, &str)]) -> (Scope, Ingest) {
    let scope = Scope::new(name, 2).await;
    let mut opts = scope.ingest_options();
    opts.extra_env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let ingest = Ingest::start(&opts);
    ingest.ready().await;
    (scope, ingest)
}

/// The `ip_hash` of each published event.
fn ip_hashes_of(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(&r.payload).expect("event")["ip_hash"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

async fn send(req: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = req.send().await.expect("send");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON envelope")
    };
    (status, headers, body)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// Every error has the envelope, status == code, and nothing rejected is published.
#[tokio::test(flavor = "multi_thread")]
async fn errors_use_the_envelope_and_publish_nothing() {
    let (scope, ingest) = start("contract_errors", &[("INGEST_RATE_LIMIT_BURST", "1000")]).await;
    let c = http();
    let url = ingest.url(PATH);
    let json_post = |body: String| {
        c.post(&url)
            .header("content-type", "application/json")
            .body(body)
    };

    // 400: bad JSON, non-object, wrong types (all listed), missing and invalid code.
    let cases: Vec<(String, Vec<&str>)> = vec![
        ("{not json".into(), vec!["body"]),
        ("[1,2]".into(), vec!["body"]),
        ("".into(), vec!["body"]),
        (
            r#"{"code":1,"click_id":true,"landing_path":[],"utm_source":{}}"#.into(),
            vec!["code", "click_id", "landing_path", "utm_source"],
        ),
        (r#"{"landing_path":"/x"}"#.into(), vec!["code"]),
        (r#"{"code":"TOO-SHORT"}"#.into(), vec!["code"]),
        (
            r#"{"code":"A1B2C3D4E5F6","click_id":"nope"}"#.into(),
            vec!["click_id"],
        ),
        (
            r#"{"code":"A1B2C3D4E5F6","landing_path":"//evil.example/x"}"#.into(),
            vec!["landing_path"],
        ),
        (
            format!(
                r#"{{"code":"A1B2C3D4E5F6","utm_campaign":"{}"}}"#,
                "x".repeat(257)
            ),
            vec!["utm_campaign"],
        ),
        (
            r#"{"code":"<script>alert(1)</script>"}"#.into(),
            vec!["code"],
        ),
    ];
    for (body, fields) in cases {
        let (status, headers, env) = send(json_post(body.clone())).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(env["code"], 400);
        assert_eq!(env["msg"], "invalid params");
        let got: Vec<&str> = env["data"]["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .map(|e| e["field"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(got, fields, "{body}");
        assert!(!env.to_string().contains("<script>"), "input echoed: {env}");
        assert!(headers.contains_key("x-request-id"));
    }

    // 404, 405 with Allow.
    let (status, _, env) = send(c.post(ingest.url("/api/v1/referrals/other"))).await;
    assert_eq!((status, env["msg"].as_str()), (404, Some("not found")));
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let (status, headers, env) = send(c.request(method, &url)).await;
        assert_eq!((status, env["code"].as_u64()), (405, Some(405)));
        assert_eq!(headers["allow"], "OPTIONS, POST");
    }

    // 415: other media types, charsets and encodings.
    for (ct, ce) in [
        ("application/x-www-form-urlencoded", ""),
        ("text/plain; charset=iso-8859-1", ""),
        ("application/json", "br"),
    ] {
        let mut req = c
            .post(&url)
            .header("content-type", ct)
            .body(r#"{"code":"A1B2C3D4E5F6"}"#);
        if !ce.is_empty() {
            req = req.header("content-encoding", ce);
        }
        let (status, _, env) = send(req).await;
        assert_eq!(
            (status, env["msg"].as_str()),
            (415, Some("unsupported media type")),
            "{ct} {ce}"
        );
    }

    // 413: declared, streamed (chunked) and gzip-bomb bodies over 16 KiB.
    let big = format!(
        r#"{{"code":"A1B2C3D4E5F6","pad":"{}"}}"#,
        "x".repeat(17 * 1024)
    );
    let (status, _, env) = send(json_post(big.clone())).await;
    assert_eq!(
        (status, env["msg"].as_str()),
        (413, Some("payload too large"))
    );
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(big.clone().into_bytes())]);
    let (status, _, _) = send(
        c.post(&url)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(stream)),
    )
    .await;
    assert_eq!(status, 413);
    let bomb = gzip(
        format!(
            r#"{{"code":"A1B2C3D4E5F6","pad":"{}"}}"#,
            " ".repeat(8 << 20)
        )
        .as_bytes(),
    );
    let (status, _, _) = send(
        c.post(&url)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(bomb),
    )
    .await;
    assert_eq!(status, 413);
    let (status, _, env) = send(
        c.post(&url)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body("not gzip"),
    )
    .await;
    assert_eq!(
        (status, env["data"]["errors"][0]["field"].as_str()),
        (400, Some("body"))
    );

    // Accepted: JSON, sendBeacon's text/plain, gzip, null fields.
    let mut accepted = Vec::new();
    let ok_bodies: Vec<reqwest::RequestBuilder> = vec![
        json_post(json!({"code":"A1B2C3D4E5F6"}).to_string()),
        c.post(&url)
            .header("content-type", "text/plain;charset=UTF-8")
            .body(json!({"code":"a1b2c3d4e5f6","utm_source":null}).to_string()),
        c.post(&url)
            .header("content-type", "application/json; charset=utf-8")
            .header("content-encoding", "gzip")
            .body(gzip(
                json!({"code":"A1B2C3D4E5F6","landing_path":"/gz"})
                    .to_string()
                    .as_bytes(),
            )),
    ];
    for req in ok_bodies {
        let (status, _, env) = send(req).await;
        assert_eq!(status, 200, "{env}");
        assert_eq!(env["data"]["code"], "A1B2C3D4E5F6");
        let id = env["data"]["click_id"].as_str().expect("id").to_owned();
        assert!(id.starts_with("refclk_") && id.len() >= 7 + 22, "{id}");
        accepted.push(id);
    }

    // Exactly the accepted clicks are in the topic.
    let records = read_topic(
        &scope.brokers,
        &scope.topic,
        accepted.len() + 1,
        Duration::from_secs(5),
    );
    let mut published: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect();
    published.sort();
    accepted.sort();
    assert_eq!(published, accepted);
}

#[tokio::test(flavor = "multi_thread")]
async fn request_ids_cors_and_cookie() {
    let (_scope, ingest) = start(
        "contract_headers",
        &[
            ("INGEST_CORS_ORIGINS", "https://shop.example"),
            ("INGEST_COOKIE_NAME", "ref_click"),
            ("INGEST_COOKIE_DOMAIN", "shop.example"),
            ("INGEST_COOKIE_MAX_AGE_SECS", "600"),
        ],
    )
    .await;
    let c = http();
    let url = ingest.url(PATH);

    let (status, headers, env) = send(
        c.post(&url)
            .header("content-type", "application/json")
            .header("origin", "https://shop.example")
            .header("x-request-id", "trace-42.a_b:c")
            .body(r#"{"code":"A1B2C3D4E5F6","click_id":"refclk_cookie1"}"#),
    )
    .await;
    assert_eq!(status, 200, "{env}");
    assert_eq!(headers["x-request-id"], "trace-42.a_b:c");
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://shop.example"
    );
    assert_eq!(headers["access-control-allow-credentials"], "true");
    assert_eq!(
        headers["set-cookie"],
        "ref_click=refclk_cookie1; Max-Age=600; Path=/; Domain=shop.example; SameSite=Lax; Secure"
    );

    // An insane request id is replaced, not echoed.
    let (_, headers, _) = send(
        c.get(ingest.url("/healthz"))
            .header("x-request-id", "<bad id>"),
    )
    .await;
    let id = headers["x-request-id"].to_str().expect("id");
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );

    // Preflight: allowed origin gets CORS headers, others none.
    let r = c
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .expect("preflight");
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    assert!(r.headers()["access-control-allow-methods"]
        .to_str()
        .expect("v")
        .contains("POST"));
    assert!(r.headers()["access-control-allow-headers"]
        .to_str()
        .expect("v")
        .contains("content-type"));
    // Another origin: `*` by default, which browsers honour only without credentials, so
    // a page anywhere can read whether its click was accepted, never with the visitor's
    // cookies.
    async fn unlisted(c: &reqwest::Client, url: &str) -> (HeaderMap, HeaderMap) {
        let r = c
            .request(reqwest::Method::OPTIONS, url)
            .header("origin", "https://evil.example")
            .header("access-control-request-method", "POST")
            .send()
            .await
            .expect("preflight");
        assert_eq!(r.status(), 204);
        let preflight = r.headers().clone();
        let (_, headers, _) = send(
            c.post(url)
                .header("content-type", "application/json")
                .header("origin", "https://evil.example")
                .body(r#"{"code":"A1B2C3D4E5F6"}"#),
        )
        .await;
        (preflight, headers)
    }
    for headers in <[HeaderMap; 2]>::from(unlisted(&c, &url).await) {
        assert_eq!(headers["access-control-allow-origin"], "*");
        assert!(!headers.contains_key("access-control-allow-credentials"));
    }
    // Turned off: only the listed origins get an answer they can read.
    let (_scope, narrow) = start(
        "contract_headers_narrow",
        &[
            ("INGEST_CORS_ORIGINS", "https://shop.example"),
            ("INGEST_CORS_ANY_ORIGIN", "off"),
        ],
    )
    .await;
    for headers in <[HeaderMap; 2]>::from(unlisted(&c, &narrow.url(PATH)).await) {
        assert!(!headers.contains_key("access-control-allow-origin"));
    }
    let (_, headers, _) = send(
        c.post(narrow.url(PATH))
            .header("content-type", "application/json")
            .header("origin", "https://shop.example")
            .body(r#"{"code":"A1B2C3D4E5F6"}"#),
    )
    .await;
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://shop.example"
    );
}

/// From an untrusted peer, X-Forwarded-For changes neither the hash nor the rate limit;
/// behind a trusted proxy, the forwarded address is the client.
#[tokio::test(flavor = "multi_thread")]
async fn forwarded_headers_only_count_from_trusted_proxies() {
    async fn ip_hashes(ingest: &Ingest, scope: &Scope, xffs: &[&str]) -> Vec<String> {
        let c = http();
        for xff in xffs {
            let (status, _, env) = send(
                c.post(ingest.url(PATH))
                    .header("content-type", "application/json")
                    .header("x-forwarded-for", *xff)
                    .body(json!({"code":"A1B2C3D4E5F6","click_id": random_click_id()}).to_string()),
            )
            .await;
            assert_eq!(status, 200, "{env}");
        }
        ip_hashes_of(&read_topic(
            &scope.brokers,
            &scope.topic,
            xffs.len(),
            Duration::from_secs(5),
        ))
    }

    let (scope, ingest) = start(
        "contract_xff_untrusted",
        &[
            ("INGEST_RATE_LIMIT_BURST", "3"),
            ("INGEST_RATE_LIMIT_PER_MINUTE", "1"),
        ],
    )
    .await;
    let hashes = ip_hashes(&ingest, &scope, &["1.1.1.1", "2.2.2.2", "3.3.3.3"]).await;
    assert_eq!(hashes.len(), 3);
    assert!(
        hashes.iter().all(|h| h == &hashes[0]),
        "spoofed XFF changed the hash: {hashes:?}"
    );
    // The bucket of the real peer is empty now, whatever address is claimed.
    let (status, headers, env) = send(
        http()
            .post(ingest.url(PATH))
            .header("content-type", "application/json")
            .header("x-forwarded-for", "9.9.9.9")
            .body(r#"{"code":"A1B2C3D4E5F6"}"#),
    )
    .await;
    assert_eq!(
        (status, env["msg"].as_str()),
        (429, Some("rate limit exceeded"))
    );
    let retry: u64 = headers["retry-after"]
        .to_str()
        .expect("v")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");

    let (scope, ingest) = start(
        "contract_xff_trusted",
        &[("INGEST_TRUSTED_PROXIES", "127.0.0.0/8")],
    )
    .await;
    let hashes = ip_hashes(&ingest, &scope, &["6.6.6.6, 1.1.1.1", "2.2.2.2"]).await;
    assert_eq!(hashes.len(), 2);
    assert_ne!(hashes[0], hashes[1]);
}

/// A flood from one IP gets 429s with Retry-After (not charged, not published); other
/// clients (here: other addresses behind a trusted proxy) are unaffected.
#[tokio::test(flavor = "multi_thread")]
async fn flood_from_one_ip_is_limited_others_are_not() {
    let (scope, ingest) = start(
        "contract_flood",
        &[
            ("INGEST_TRUSTED_PROXIES", "127.0.0.1/32"),
            ("INGEST_RATE_LIMIT_BURST", "20"),
            ("INGEST_RATE_LIMIT_PER_MINUTE", "120"),
        ],
    )
    .await;
    let c = http();
    let post = |ip: &'static str| {
        c.post(ingest.url(PATH))
            .header("content-type", "application/json")
            .header("x-forwarded-for", ip)
            .body(r#"{"code":"A1B2C3D4E5F6"}"#)
    };
    let mut ok = 0;
    let mut limited = 0;
    // The click ids answered 200, from the answers themselves.
    let mut answered = HashSet::new();
    for _ in 0..200 {
        let (status, headers, env) = send(post("198.51.100.1")).await;
        match status {
            200 => {
                ok += 1;
                answered.insert(
                    env["data"]["click_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
            429 => {
                assert!(headers.contains_key("retry-after"));
                limited += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    for ip in ["198.51.100.2", "198.51.100.3"] {
        let (status, _, env) = send(post(ip)).await;
        assert_eq!(status, 200, "{ip} must not be limited");
        answered.insert(
            env["data"]["click_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    // Measured before anything is asserted: the whole topic against the answers.
    let records = read_whole_topic(&scope.brokers, &scope.topic, Duration::from_secs(5));
    let keys: HashSet<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect();
    let lost = answered.iter().filter(|id| !keys.contains(*id)).count();
    report(&FaultRow {
        fault: "flood from one IP (rate limit 120/min, burst 20); rows = messages in Kafka",
        load: "200 sequential posts + 2 from other IPs",
        sent: 202,
        accepted: ok + 2,
        rows: Some(records.len() as u64),
        duplicates: Some((records.len() - keys.len()) as u64),
        lost: Some(lost as u64),
    });
    // Burst 20 plus at most a few refills (2 a second) while the loop ran.
    assert!((20..=30).contains(&ok), "{ok} accepted");
    assert_eq!(ok + limited, 200);
    assert_eq!(answered.len(), ok + 2, "distinct click ids answered");
    assert_eq!(records.len(), ok + 2, "429 answers must publish nothing");
    assert_eq!((records.len() - keys.len(), lost), (0, 0));
    let m = metric_value(&ingest.url("/metrics"), "ingest_rate_limited_total").await;
    assert_eq!(m as usize, limited);
}

/// Slow and oversized clients are cut off quickly, without taking the server down.
#[tokio::test(flavor = "multi_thread")]
async fn slow_and_oversized_clients_are_bounded() {
    let (_scope, ingest) = start(
        "contract_slow",
        &[
            ("INGEST_HEADER_TIMEOUT_MS", "500"),
            ("INGEST_BODY_TIMEOUT_MS", "500"),
        ],
    )
    .await;

    // Slowloris: headers that never end. The server closes the connection.
    let started = Instant::now();
    let mut s = TcpStream::connect(ingest.addr).await.expect("connect");
    s.write_all(b"POST /api/v1/referrals/click HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("server must close the connection");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Slow body: declared 100 bytes, sends 10. Answer 408 in the envelope.
    let started = Instant::now();
    let mut s = TcpStream::connect(ingest.addr).await.expect("connect");
    s.write_all(b"POST /api/v1/referrals/click HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"code\":\"A").await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains(r#""code":408"#), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // Huge headers: refused by the HTTP layer with a 431, or the connection closed; at
    // once either way. Over a raw socket, so no client-side error can pass for either.
    let started = Instant::now();
    let mut s = TcpStream::connect(ingest.addr).await.expect("connect");
    let request = format!(
        "POST /api/v1/referrals/click HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\n{{}}",
        "a".repeat(64 * 1024)
    );
    // The server may close before it has read everything: a failed write is a close.
    let written = s.write_all(request.as_bytes()).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the server must answer or close within 5 s");
    let text = String::from_utf8_lossy(&buf);
    // A close: the read ended within the timeout above (an end of stream, or a reset) with
    // nothing read. Anything read must be the 431.
    let closed = buf.is_empty();
    assert!(
        text.starts_with("HTTP/1.1 431") || closed,
        "64 KiB of headers: neither a 431 nor a close: {text:?} (write: {written:?}, read: {read:?})"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "64 KiB of headers took {:?}",
        started.elapsed()
    );

    // The server still answers.
    assert_eq!(send(http().get(ingest.url("/healthz"))).await.0, 200);
}

/// Bot User-Agents are classified at ingest and the flag travels in the event.
#[tokio::test(flavor = "multi_thread")]
async fn bots_are_flagged() {
    let (scope, ingest) = start("contract_bots", &[]).await;
    let c = http();
    for ua in ["Googlebot/2.1 (+http://www.google.com/bot.html)", "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15"] {
        let (status, _, _) = send(c.post(ingest.url(PATH)).header("content-type", "application/json").header("user-agent", ua).body(r#"{"code":"A1B2C3D4E5F6"}"#)).await;
        assert_eq!(status, 200);
    }
    let mut flags: Vec<bool> = read_topic(&scope.brokers, &scope.topic, 2, Duration::from_secs(5))
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(&r.payload).expect("event")["is_bot"]
                .as_bool()
                .expect("bool")
        })
        .collect();
    flags.sort();
    assert_eq!(flags, vec![false, true]);
}

/// Broker down at start: ingest starts, is not ready, answers 503 with Retry-After;
/// when the broker comes, it recovers by itself.
#[tokio::test(flavor = "multi_thread")]
async fn broker_down_at_start_then_recovers() {
    let addr = free_addr();
    let opts = IngestOptions::new(&addr.to_string(), "referral_clicks");
    let ingest = Ingest::start(&opts);
    let c = http();
    eventually("ingest listening", Duration::from_secs(20), || {
        let c = c.clone();
        let url = ingest.url("/healthz");
        async move { c.get(url).send().await.ok().map(|_| ()) }
    })
    .await;
    assert_eq!(send(c.get(ingest.url("/readyz"))).await.0, 503);
    let started = Instant::now();
    let (status, headers, env) = send(
        c.post(ingest.url(PATH))
            .header("content-type", "application/json")
            .body(r#"{"code":"A1B2C3D4E5F6"}"#),
    )
    .await;
    assert_eq!(
        (status, env["msg"].as_str()),
        (503, Some("service unavailable"))
    );
    assert!(headers.contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once when the broker is known down"
    );

    // The broker arrives on that address.
    let _broker = PrivateBroker::start_with(addr, addr, false).await;
    create_topic(&addr.to_string(), "referral_clicks", 2).await;
    opts.seed_registry().await;

    ingest.ready().await;
    let (status, _, env) = send(
        c.post(ingest.url(PATH))
            .header("content-type", "application/json")
            .body(r#"{"code":"A1B2C3D4E5F6"}"#),
    )
    .await;
    assert_eq!(status, 200, "{env}");
}

/// SIGTERM under load: in-flight requests are answered, every 200 is in the topic.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_answers_in_flight_requests_and_delivers_them() {
    // A 200 ms linger keeps every request in flight for about that long, so at SIGTERM
    // each client has a request the server is working on.
    let (scope, mut ingest) = start(
        "contract_sigterm",
        &[
            ("INGEST_RATE_LIMIT_BURST", "100000"),
            ("INGEST_RATE_LIMIT_PER_MINUTE", "100000"),
            ("INGEST_LINGER_MS", "200"),
        ],
    )
    .await;
    let c = http();
    let url = ingest.url(PATH);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            let mut refused = 0;
            // When each failed request was started, and why it failed.
            let mut failed = Vec::new();
            for _ in 0..20 {
                let id = random_click_id();
                let started = Instant::now();
                match c
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(json!({"code":"A1B2C3D4E5F6","click_id": id}).to_string())
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => ok.push(id),
                    Ok(r) => assert!(r.status() == 503, "unexpected {}", r.status()),
                    // The listener had closed: the server never got this request.
                    Err(e) if e.is_connect() => refused += 1,
                    Err(e) => failed.push((started, format!("{e:?}"))),
                }
            }
            (ok, refused, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let sigterm = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let s = ingest.proc.terminate(Duration::from_secs(30));
        (s, ingest)
    })
    .await
    .expect("join");
    assert!(
        status.0.is_some_and(|s| s.success()),
        "ingest must exit cleanly on SIGTERM: {:?}",
        status.0
    );
    let mut accepted = Vec::new();
    let mut refused_total = 0;
    let mut failures = Vec::new();
    for t in tasks {
        let (ok, refused, failed) = t.await.expect("task");
        accepted.extend(ok);
        refused_total += refused;
        failures.extend(failed);
    }
    assert!(!accepted.is_empty());
    // A request sent before SIGTERM was in flight (see the linger above) and must be
    // answered. Only a request written at the very moment the server closed an idle
    // keep-alive connection may fail otherwise (HTTP/1.1 allows that close): it was
    // started at most a few milliseconds before the signal.
    let dropped: Vec<_> = failures
        .iter()
        .filter(|(started, _)| *started + Duration::from_millis(5) < sigterm)
        .collect();
    assert!(
        dropped.is_empty(),
        "requests sent before SIGTERM got no answer: {dropped:?}"
    );
    // The whole topic, past the accepted count: a click published twice shows here.
    let records = read_whole_topic(&scope.brokers, &scope.topic, Duration::from_secs(20));
    let published: std::collections::HashSet<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect();
    let missing = accepted
        .iter()
        .filter(|id| !published.contains(*id))
        .count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} answered 200 but not in Kafka",
        accepted.len()
    );
    assert_eq!(
        records.len(),
        published.len(),
        "clicks published twice: {} records of {} click ids",
        records.len(),
        published.len()
    );
    report(&FaultRow {
        fault: "ingest SIGTERM under load (unanswered = connection refused after close); rows = messages in Kafka",
        load: "8 concurrent clients, each request in flight for 200 ms",
        sent: accepted.len() + refused_total + failures.len(),
        accepted: accepted.len(),
        rows: Some(records.len() as u64),
        duplicates: Some((records.len() - published.len()) as u64),
        lost: Some(missing as u64),
    });
}

/// The broker hangs (connections open, nothing answered): requests are answered 503 with
/// Retry-After within the produce timeout — at once when the producer queue is full — and
/// never hang.
#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_broker_fills_the_queue_and_gets_503_not_a_hang() {
    let proxy_addr = free_addr();
    let broker = PrivateBroker::start_advertising(proxy_addr).await;
    let proxy = CutProxy::start_on(proxy_addr, broker.addr).await;
    let brokers = proxy_addr.to_string();
    create_topic(&brokers, "referral_clicks", 2).await;
    let mut opts = IngestOptions::new(&brokers, "referral_clicks");
    opts.seed_registry().await;
    opts.extra_env = vec![
        ("INGEST_QUEUE_MAX_MESSAGES".into(), "5".into()),
        ("INGEST_PRODUCE_TIMEOUT_MS".into(), "2000".into()),
        ("INGEST_RATE_LIMIT_BURST".into(), "100000".into()),
    ];
    let ingest = Ingest::start(&opts);
    ingest.ready().await;
    let c = http();
    let url = ingest.url(PATH);
    let (status, _, _) = send(
        c.post(&url)
            .header("content-type", "application/json")
            .body(r#"{"code":"A1B2C3D4E5F6","click_id":"refclk_before"}"#),
    )
    .await;
    assert_eq!(status, 200);

    proxy.stall();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let body =
                json!({"code":"A1B2C3D4E5F6","click_id": format!("refclk_stall{i}")}).to_string();
            let (status, headers, env) = send(
                c.post(&url)
                    .header("content-type", "application/json")
                    .body(body),
            )
            .await;
            (
                status,
                headers.contains_key("retry-after"),
                env["msg"].as_str().map(str::to_owned),
                t.elapsed(),
            )
        }));
    }
    let mut fast_503 = 0;
    let mut ok = 0;
    for t in tasks {
        let (status, retry_after, msg, took) = t.await.expect("task");
        match status {
            503 => {
                assert!(retry_after, "503 without Retry-After");
                assert_eq!(msg.as_deref(), Some("service unavailable"));
                if took < Duration::from_millis(500) {
                    fast_503 += 1;
                }
            }
            200 => ok += 1,
            s => panic!("unexpected status {s}"),
        }
        assert!(took < Duration::from_secs(5), "a request hung for {took:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(
        fast_503 >= 20,
        "a full queue must refuse at once; {fast_503} fast 503s"
    );
    assert_eq!(ok, 0, "nothing can be acknowledged by a hanging broker");
    report(&FaultRow {
        fault: "broker hangs, producer queue (5) fills: every request answered 503 + Retry-After within 5 s, none hung",
        load: "40 concurrent posts",
        sent: 40,
        accepted: ok,
        // Not measured: the topic cannot be read through the stalled broker.
        rows: None,
        duplicates: None,
        lost: None,
    });

    // Recovery after a hang is not asserted here: tansu 0.6's sqlite storage panics
    // (lite.rs:503, "more or less than one row", in idempotent_message_check) when the
    // idempotent producer retries the requests that timed out in flight, and stays broken
    // even across a restart while that producer retries. Recovery from a broker that is
    // down or restarted is tested in broker_down_at_start_then_recovers and
    // exactly_once::broker_restart_under_load_loses_nothing.
    drop(broker);
}

/// `INGEST_CORS_ORIGINS=*` answers `*` and never allows credentials; a cross-site
/// tracking domain gets `SameSite=None; Secure` (what a browser needs to store and send the
/// cookie on a credentialed cross-site fetch).
#[tokio::test(flavor = "multi_thread")]
async fn any_origin_gets_star_without_credentials_and_samesite_none_is_secure() {
    let (_scope, ingest) = start(
        "contract_cors_any",
        &[
            ("INGEST_CORS_ORIGINS", "*"),
            ("INGEST_COOKIE_NAME", "ref_click"),
            ("INGEST_COOKIE_SAMESITE", "none"),
        ],
    )
    .await;
    let c = http();
    let url = ingest.url(PATH);
    let (status, headers, env) = send(
        c.post(&url)
            .header("content-type", "application/json")
            .header("origin", "https://anyone.example")
            .body(r#"{"code":"A1B2C3D4E5F6","click_id":"refclk_star1"}"#),
    )
    .await;
    assert_eq!(status, 200, "{env}");
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert!(!headers.contains_key("access-control-allow-credentials"));
    let cookie = headers["set-cookie"].to_str().expect("cookie");
    assert!(cookie.ends_with("; SameSite=None; Secure"), "{cookie}");
    let r = c
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://anyone.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("preflight");
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(!r.headers().contains_key("access-control-allow-credentials"));
}

/// Behind a trusted proxy that writes only `Forwarded`, a client-sent `X-Forwarded-For`
/// picks neither the hash nor the rate bucket.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_configured_forwarding_header_is_believed() {
    let (scope, ingest) = start(
        "contract_fwd_only",
        &[
            ("INGEST_TRUSTED_PROXIES", "127.0.0.0/8"),
            ("INGEST_CLIENT_IP_HEADER", "forwarded"),
            ("INGEST_RATE_LIMIT_BURST", "2"),
            ("INGEST_RATE_LIMIT_PER_MINUTE", "1"),
        ],
    )
    .await;
    let c = http();
    // The proxy says the client is 198.51.100.7; the client claims other addresses.
    let mut statuses = Vec::new();
    for claim in ["1.1.1.1", "2.2.2.2", "3.3.3.3"] {
        let (status, _, _) = send(
            c.post(ingest.url(PATH))
                .header("content-type", "application/json")
                .header("x-forwarded-for", claim)
                .header("forwarded", "for=198.51.100.7;proto=https")
                .body(json!({"code":"A1B2C3D4E5F6","click_id": random_click_id()}).to_string()),
        )
        .await;
        statuses.push(status);
    }
    assert_eq!(statuses, vec![200, 200, 429]);
    let events = read_topic(&scope.brokers, &scope.topic, 2, Duration::from_secs(5));
    let hashes = ip_hashes_of(&events);
    assert_eq!(hashes.len(), 2);
    assert_eq!(hashes[0], hashes[1], "X-Forwarded-For changed the hash");
    // Another client behind the same proxy has its own bucket.
    let (status, _, _) = send(
        c.post(ingest.url(PATH))
            .header("content-type", "application/json")
            .header("forwarded", "for=198.51.100.8")
            .body(r#"{"code":"A1B2C3D4E5F6"}"#),
    )
    .await;
    assert_eq!(status, 200);
}

/// Properties the delivery guarantee depends on cannot be overridden from the environment.
#[tokio::test(flavor = "multi_thread")]
async fn protected_kafka_properties_stop_start_up_with_a_clear_message() {
    let scope = Scope::new("contract_props", 1).await;
    let mut opts = scope.ingest_options();
    opts.extra_env = vec![("INGEST_KAFKA_PROPERTIES".into(), "acks=1".into())];
    let mut ingest = Ingest::start(&opts);
    let log = ingest.proc.refused_start().await;
    assert!(
        log.contains("INGEST_KAFKA_PROPERTIES: `acks` cannot be set"),
        "{log}"
    );

    let mut opts = scope.consumer_options();
    opts.extra_env = vec![(
        "CONSUMER_KAFKA_PROPERTIES".into(),
        "enable.auto.commit=true".into(),
    )];
    let mut consumer = ConsumerProc::start(&opts);
    let log = consumer.proc.refused_start().await;
    assert!(
        log.contains("CONSUMER_KAFKA_PROPERTIES: `enable.auto.commit` cannot be set"),
        "{log}"
    );
}

/// A value out of its range, set in the environment, stops start-up with a message that
/// names the variable (clap alone would name only the flag) and the range.
#[tokio::test(flavor = "multi_thread")]
async fn an_out_of_range_setting_names_its_environment_variable() {
    let scope = Scope::new("contract_ranges", 1).await;
    let mut opts = scope.ingest_options();
    opts.extra_env = vec![("INGEST_PRODUCE_TIMEOUT_MS".into(), "5".into())];
    let mut ingest = Ingest::start(&opts);
    let log = ingest.proc.refused_start().await;
    assert!(
        log.contains("INGEST_PRODUCE_TIMEOUT_MS (--produce-timeout-ms): invalid value `5`: must be at least 100"),
        "{log}"
    );

    let mut opts = scope.consumer_options();
    opts.extra_env = vec![("CONSUMER_SHUTDOWN_GRACE_SECS".into(), "soon".into())];
    let mut consumer = ConsumerProc::start(&opts);
    let log = consumer.proc.refused_start().await;
    assert!(
        log.contains("CONSUMER_SHUTDOWN_GRACE_SECS (--shutdown-grace-secs): invalid value `soon`"),
        "{log}"
    );
}

/// One address opens more connections than the global cap and keeps each busy with a
/// `GET /healthz` every 500 ms; a click from another address is still answered at once.
/// Past its share (`INGEST_MAX_CONNECTIONS_PER_CLIENT`, 256 by default) the busy
/// address's connections are closed at accept. (With the global cap alone, the busy
/// address held every connection and the other client's click got no answer.)
#[tokio::test(flavor = "multi_thread")]
async fn one_client_cannot_hold_every_connection() {
    let (_scope, ingest) = start(
        "contract_per_client",
        &[
            ("INGEST_MAX_CONNECTIONS", "300"),
            ("INGEST_HEADER_TIMEOUT_MS", "60000"),
        ],
    )
    .await;
    let addr = ingest.addr;
    let busy: Vec<_> = (0..400)
        .map(|_| {
            tokio::spawn(async move {
                let Ok(Ok(mut stream)) =
                    tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
                else {
                    return 0u32;
                };
                let mut served = 0;
                let mut buf = [0u8; 1024];
                loop {
                    let request = b"GET /healthz HTTP/1.1\r\nhost: ingest\r\n\r\n";
                    if stream.write_all(request).await.is_err() {
                        return served;
                    }
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200") => served += 1,
                        _ => return served,
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        other
            .post(ingest.url(PATH))
            .header("content-type", "application/json")
            .body(r#"{"code":"A1B2C3D4E5F6"}"#)
            .send(),
    )
    .await;
    let waited = started.elapsed();
    // Read from the other address: 127.0.0.1 has no connection to spare.
    let text = other
        .get(ingest.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let open = metric_in(&text, "ingest_open_connections", "").expect("open connections");
    let refused = metric_in(&text, "ingest_connections_refused_total", "").expect("refused");
    for task in &busy {
        task.abort();
    }
    let status = answer
        .expect("the other client is answered within 5 s")
        .expect("response")
        .status();
    assert_eq!(status, 200);
    assert!(waited < Duration::from_secs(1), "answered after {waited:?}");
    assert!((256.0..=258.0).contains(&open), "{open} connections open");
    assert!(refused >= 100.0, "{refused} refused at accept");
}

/// A connection is closed with its `INGEST_MAX_REQUESTS_PER_CONNECTION`th answer, and with
/// a 429: a client refused for its rate does not keep the connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_ends_after_its_requests_or_a_429() {
    let (_scope, ingest) = start(
        "contract_conn_requests",
        &[
            ("INGEST_MAX_REQUESTS_PER_CONNECTION", "3"),
            ("INGEST_RATE_LIMIT_PER_MINUTE", "1"),
            ("INGEST_RATE_LIMIT_BURST", "1"),
        ],
    )
    .await;
    /// Sends each request on one connection; the status and `connection` header of each
    /// answer, then whether the server closed the connection.
    async fn exchange(addr: std::net::SocketAddr, requests: &[&str]) -> (Vec<(u16, bool)>, bool) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut answers = Vec::new();
        let mut buf = vec![0u8; 4096];
        for request in requests {
            stream.write_all(request.as_bytes()).await.expect("write");
            let n = stream.read(&mut buf).await.expect("read");
            let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
            let status = head[9..12].parse().expect("status");
            answers.push((status, head.contains("\r\nconnection: close\r\n")));
        }
        let closed = matches!(
            tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await,
            Ok(Ok(0))
        );
        (answers, closed)
    }
    let health = "GET /healthz HTTP/1.1\r\nhost: ingest\r\n\r\n";
    let (answers, closed) = exchange(ingest.addr, &[health, health, health]).await;
    assert_eq!(answers, vec![(200, false), (200, false), (200, true)]);
    assert!(closed, "closed after the third answer");

    let body = r#"{"code":"A1B2C3D4E5F6"}"#;
    let click = format!(
        "POST {PATH} HTTP/1.1\r\nhost: ingest\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (answers, closed) = exchange(ingest.addr, &[&click, &click]).await;
    assert_eq!(answers, vec![(200, false), (429, true)]);
    assert!(closed, "closed after the 429");
}

/// Far more connections than `INGEST_MAX_CONNECTIONS`: the excess waits (the process never
/// holds more), and requests are served again as soon as connections close.
#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_wait_and_the_cap_holds() {
    let (_scope, ingest) = start(
        "contract_conn_cap",
        &[
            ("INGEST_MAX_CONNECTIONS", "10"),
            ("INGEST_HEADER_TIMEOUT_MS", "60000"),
        ],
    )
    .await;
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let pid = ingest.proc.child.id();
    let baseline = fds(pid);
    // 300 idle connections at once: 10 are taken, the rest wait in the listen backlog
    // (past the backlog the kernel leaves them unanswered: bounded here by a timeout).
    let addr = ingest.addr;
    let attempts = (0..300).map(|_| async move {
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .ok()
            .and_then(Result::ok)
    });
    let idle: Vec<TcpStream> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(idle.len() > 10, "only {} connections opened", idle.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = fds(pid);
    assert!(
        held <= baseline + 10,
        "ingest holds {held} descriptors (baseline {baseline}, cap 10)"
    );
    let waiting = tokio::time::timeout(
        Duration::from_secs(1),
        http().get(ingest.url("/healthz")).send(),
    )
    .await;
    assert!(
        waiting.is_err(),
        "a request past the cap was served at once"
    );
    drop(idle);
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        http().get(ingest.url("/healthz")).send(),
    )
    .await
    .expect("served once connections closed")
    .expect("response");
    assert_eq!(r.status(), 200);
    let open = metric_value(&ingest.url("/metrics"), "ingest_open_connections").await;
    assert!((1.0..=10.0).contains(&open), "{open}");
}

/// A flood of a million distinct source addresses (through a trusted proxy's header) keeps
/// ingest's memory under its 64 MiB target, and another client keeps being served. The
/// release binary, driven by wrk: the debug build could not take a million requests in
/// reasonable time.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_a_million_fresh_addresses_keeps_memory_bounded_and_others_served() {
    let scope = Scope::new("contract_flood_1m", 2).await;
    let mut opts = scope.ingest_options();
    opts.extra_env = vec![
        ("INGEST_TRUSTED_PROXIES".into(), "127.0.0.1/32".into()),
        ("LOG_LEVEL".into(), "warn".into()),
    ];
    let ingest = Ingest::start_binary(release_bin("ingest"), &opts);
    ingest.ready().await;
    let pid = ingest.proc.child.id();
    let script = std::env::temp_dir().join(format!("{}.lua", unique("flood")));
    // Each wrk thread walks its own half of 10.0.0.0/8: every request a fresh address.
    std::fs::write(
        &script,
        r#"
local threads = 0
function setup(thread) thread:set("id", threads); threads = threads + 1 end
local counter, base, quota = 0, 0, 0
function init(args)
  base = 167772160 + tonumber(wrk.thread:get("id")) * 8388608
  quota = tonumber(args[1])
end
function request()
  counter = counter + 1
  local n = base + counter
  local ip = string.format("%d.%d.%d.%d", math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256)
  return wrk.format("POST", "/api/v1/referrals/click", {["X-Forwarded-For"] = ip, ["Content-Type"] = "application/json"}, '{"code":"not-a-code"}')
end
function response(status, headers, body)
  if counter >= quota then wrk.thread:stop() end
end
"#,
    )
    .expect("script");
    let url = ingest.url(PATH);
    let metrics = ingest.url("/metrics");
    // wrk's threads stop after their quota, wrk itself waits out -d: it is interrupted
    // (it reports on SIGINT) once ingest has answered the million.
    let wrk = std::process::Command::new("wrk")
        .args(["-t2", "-c64", "-d600s", "-s"])
        .arg(&script)
        .arg(&url)
        .args(["--", "520000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wrk (deploy/local/test installs it)");
    // Meanwhile, another client posts real clicks, within its own per-IP limit.
    let c = http();
    let mut served = 0;
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    while metric_value(&metrics, "ingest_http_requests_total").await
        < 1_020_000.0 + f64::from(served)
    {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the flood did not finish"
        );
        let t = Instant::now();
        let (status, _, body) = send(
            c.post(&url)
                .header("content-type", "application/json")
                .header("x-forwarded-for", "192.0.2.7")
                .body(json!({"code": "A1B2C3D4E5F6", "click_id": random_click_id()}).to_string()),
        )
        .await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(status, 200, "{body}");
        served += 1;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let _ = std::process::Command::new("kill")
        .arg("-INT")
        .arg(wrk.id().to_string())
        .status();
    let out = tokio::task::spawn_blocking(move || wrk.wait_with_output())
        .await
        .expect("join")
        .expect("wrk output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let requests: u64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("wrk output: {text}"));
    assert!(requests >= 1_000_000, "{requests} requests: {text}");
    let peak = peak_rss_mib(pid);
    let tracked = metric_where(
        &metrics,
        "ingest_rate_limit_tracked_keys",
        r#"table="addresses""#,
    )
    .await;
    println!(
        "flood: {requests} requests from distinct addresses; ingest peak RSS {peak:.1} MiB; {served} clicks of another client served, slowest {slowest:?}; addresses tracked after {tracked}"
    );
    assert!(peak < 64.0, "peak RSS {peak:.1} MiB");
    assert!(tracked <= 100_064.0, "{tracked}");
    assert!(
        served > 0 && slowest < Duration::from_secs(2),
        "{served} served, slowest {slowest:?}"
    );
}

/// A metadata probe that is slow (held 3 s by a Kafka-aware proxy, the probe gives up
/// after 2 s) while produce requests are acknowledged as usual: ingest stays ready and
/// every click is answered 200. (Readiness used to follow the probe alone: every click
/// became a 503.)
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_metadata_probe_does_not_turn_clicks_into_503s() {
    let proxy_addr = free_addr();
    let broker = PrivateBroker::start_advertising(proxy_addr).await;
    let proxy = KafkaProxy::start_on(proxy_addr, broker.addr, Duration::from_secs(3)).await;
    let scope = Scope::with_brokers("contract_slow_meta", 2, &proxy_addr.to_string()).await;
    let mut opts = scope.ingest_options();
    opts.extra_env = vec![("INGEST_RATE_LIMIT_BURST".into(), "100000".into())];
    let ingest = Ingest::start(&opts);
    ingest.ready().await;
    let c = http();
    let url = ingest.url(PATH);
    let metrics = ingest.url("/metrics");
    let mut statuses = std::collections::BTreeMap::new();
    let mut probe_failed = false;
    let mut unready = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(14) {
        let t = started.elapsed();
        proxy.slow_metadata(t > Duration::from_secs(2) && t < Duration::from_secs(12));
        let (_, status) = post_fresh_click(&c, &url).await;
        *statuses.entry(status).or_insert(0) += 1;
        if send(c.get(ingest.url("/readyz"))).await.0 != 200 {
            unready += 1;
        }
        // Only a gauge that is there and reads 0 shows a failed probe: an unreachable
        // /metrics fails the test, a missing series proves nothing.
        let text = metrics_text(&metrics).await;
        probe_failed |= metric_in(&text, "ingest_broker_probe_ok", "") == Some(0.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        probe_failed,
        "the metadata probe was never slow enough to fail"
    );
    assert_eq!(
        statuses.keys().copied().collect::<Vec<u16>>(),
        [200],
        "{statuses:?}"
    );
    assert_eq!(unready, 0, "/readyz answered 503 {unready} times");
    let accepted = statuses[&200];
    let records = read_topic(
        &scope.brokers,
        &scope.topic,
        accepted,
        Duration::from_secs(10),
    );
    assert_eq!(records.len(), accepted);
}

//! The browser script (`GET /referral.js`) in a real headless Chromium, against the real
//! ingest, broker and ClickHouse, with the landing pages served from another site
//! (`localhost`) than ingest (`127.0.0.1`).

use std::time::Duration;

use e2e::*;

const CLICK_ROUTE: &str = "route=\"click\"";

fn tag(ingest: &Ingest, attrs: &str) -> String {
    format!(
        "<script async src=\"{}\" {attrs}></script>",
        ingest.url("/referral.js")
    )
}

/// Requests the click route answered so far, whatever their status (0 before the first).
async fn click_requests(ingest: &Ingest) -> f64 {
    metric_or_zero(
        &ingest.url("/metrics"),
        "ingest_http_requests_total",
        CLICK_ROUTE,
    )
    .await
}

async fn stored_click(scope: &Scope, click_id: &str) -> serde_json::Value {
    let sql = format!(
        "SELECT code, landing_path, utm_source, utm_medium, utm_campaign FROM {} \
         WHERE click_id = '{click_id}' FORMAT JSONEachRow",
        scope.table
    );
    let rows = eventually(
        &format!("{click_id} in {}", scope.table),
        Duration::from_secs(30),
        || async {
            let rows = scope.ch.try_query(&sql).await.ok()?;
            (!rows.trim().is_empty()).then_some(rows)
        },
    )
    .await;
    let rows: Vec<serde_json::Value> = rows
        .lines()
        .map(|l| serde_json::from_str(l).expect("row"))
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows.into_iter().next().expect("one row")
}

fn is_click_id(id: &str) -> bool {
    id.strip_prefix("refclk_").is_some_and(|r| {
        r.len() == 22
            && r.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

async fn pipeline(name: &str, ingest_env: &[(&str, &str)]) -> (Scope, Ingest, ConsumerProc) {
    let scope = Scope::new(name, 2).await;
    let mut opts = scope.ingest_options();
    opts.extra_env = ingest_env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let ingest = Ingest::start(&opts);
    let mut copts = scope.consumer_options();
    copts
        .extra_env
        .push(("CONSUMER_BATCH_MAX_AGE_MS".into(), "100".into()));
    let consumer = ConsumerProc::start(&copts);
    ingest.ready().await;
    consumer.ready().await;
    (scope, ingest, consumer)
}

/// A landing page with the parameter and utm values: one row with the code, the path
/// (query and fragment dropped) and the utm values; the page's own cookie holds the row's
/// click id; a reload posts the same click again and it stays one row.
#[tokio::test(flavor = "multi_thread")]
async fn a_landing_page_records_one_click_and_a_reload_keeps_its_id() {
    let (scope, ingest, consumer) = pipeline("browser_landing", &[]).await;
    let page = PageServer::start(&tag(&ingest, "")).await;
    let browser = Browser::start().await;

    let landing = browser
        .land(&page.url(
            "/pricing/plan?ref=a1b2c3d4e5f6&utm_source=news&utm_medium=email&utm_campaign=spring&email=x%40y.z#signup",
        ))
        .await;
    assert!(landing.errors.is_empty(), "{landing:?}");
    let id = landing
        .ready
        .clone()
        .expect("ready resolves to the kept click id");
    assert!(is_click_id(&id), "{id}");
    assert_eq!(landing.cookie("refclk"), Some(id.as_str()), "{landing:?}");
    assert_eq!(landing.click_id.as_deref(), Some(id.as_str()));
    let row = stored_click(&scope, &id).await;
    assert_eq!(
        row,
        serde_json::json!({"code": DOCS_CODE, "landing_path": "/pricing/plan",
            "utm_source": "news", "utm_medium": "email", "utm_campaign": "spring"})
    );

    let again = browser.reload().await;
    assert_eq!(again.ready.as_deref(), Some(id.as_str()), "{again:?}");
    assert_eq!(again.cookie("refclk"), Some(id.as_str()));
    // The reload did post (a second accepted click at ingest) and the consumer saw it as a
    // retry of the stored click: still one row.
    assert_eq!(
        metric_where(
            &ingest.url("/metrics"),
            "ingest_http_requests_total",
            "route=\"click\",status=\"200\""
        )
        .await,
        2.0
    );
    eventually(
        "the reload's click skipped as a retry",
        Duration::from_secs(30),
        || async {
            (consumer.metric("consumer_duplicates_skipped_total").await >= 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        scope
            .ch
            .scalar(&format!(
                "SELECT count() FROM {} WHERE code = '{DOCS_CODE}'",
                scope.table
            ))
            .await,
        1
    );
    browser.close().await;
    scope.drop_database().await;
}

/// An unknown code: the 400 is readable from any origin (`*`), so no cookie is kept. A
/// page without the parameter, or with Global Privacy Control when the tag asks to honour
/// it, sends no request at all.
#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_code_keeps_nothing_and_pages_without_a_click_send_nothing() {
    let (scope, ingest, _consumer) = pipeline("browser_refused", &[]).await;
    let page = PageServer::start(&tag(&ingest, "")).await;
    let browser = Browser::start().await;

    let landing = browser.land(&page.url("/?ref=ZZZZZZZZZZZZ")).await;
    assert!(landing.errors.is_empty(), "{landing:?}");
    assert_eq!(landing.ready, None, "{landing:?}");
    assert_eq!(landing.cookie("refclk"), None, "{landing:?}");
    assert_eq!(
        metric_where(
            &ingest.url("/metrics"),
            "ingest_http_requests_total",
            "route=\"click\",status=\"400\""
        )
        .await,
        1.0
    );

    let before = click_requests(&ingest).await;
    let landing = browser.land(&page.url("/pricing?utm_source=news")).await;
    assert_eq!((landing.ready, landing.errors.len()), (None, 0));
    let gpc = PageServer::start(&format!(
        "<script>Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {{get: function () {{ return true; }}}});</script>{}",
        tag(&ingest, "data-respect-gpc")
    ))
    .await;
    let landing = browser.land(&gpc.url("/?ref=A1B2C3D4E5F6")).await;
    assert_eq!((landing.ready.as_deref(), landing.errors.len()), (None, 0));
    assert_eq!(landing.cookie("refclk"), None);
    // The same tag without data-respect-gpc records the click.
    let no_gpc = PageServer::start(&format!(
        "<script>Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {{get: function () {{ return true; }}}});</script>{}",
        tag(&ingest, "")
    ))
    .await;
    let landing = browser.land(&no_gpc.url("/?ref=A1B2C3D4E5F6")).await;
    assert!(landing.ready.is_some(), "{landing:?}");
    assert_eq!(click_requests(&ingest).await, before + 1.0);
    browser.close().await;
    scope.drop_database().await;
}

/// `data-attribution="first"` keeps an existing cookie; the default (`last`) replaces it.
/// Both pages are on `localhost`, so they share the site's cookie.
#[tokio::test(flavor = "multi_thread")]
async fn first_attribution_keeps_the_first_cookie_and_last_replaces_it() {
    let (scope, ingest, _consumer) = pipeline("browser_attribution", &[]).await;
    scope.register_codes(&["SECOND000002"]).await;
    eventually("the new code in force", Duration::from_secs(10), || async {
        let (status, _) = post_click(
            &http(),
            &ingest.url("/api/v1/referrals/click"),
            &serde_json::json!({"code": "SECOND000002", "click_id": "refclk_probe"}),
        )
        .await;
        (status == 200).then_some(())
    })
    .await;
    let first = PageServer::start(&tag(&ingest, "data-attribution=\"first\"")).await;
    let last = PageServer::start(&tag(&ingest, "")).await;
    let browser = Browser::start().await;

    let one = browser.land(&first.url("/?ref=A1B2C3D4E5F6")).await;
    let kept = one.cookie("refclk").expect("first click kept").to_owned();
    let before = click_requests(&ingest).await;
    let two = browser.land(&first.url("/?ref=SECOND000002")).await;
    assert_eq!(two.cookie("refclk"), Some(kept.as_str()), "{two:?}");
    assert_eq!(two.ready.as_deref(), Some(kept.as_str()));
    // The second click is still recorded; only the attribution stays with the first.
    assert_eq!(click_requests(&ingest).await, before + 1.0);

    let three = browser.land(&last.url("/?ref=SECOND000002")).await;
    let replaced = three.cookie("refclk").expect("a cookie").to_owned();
    assert_ne!(replaced, kept, "{three:?}");
    assert!(is_click_id(&replaced));
    browser.close().await;
    scope.drop_database().await;
}

/// `data-param` with two names, `data-endpoint` pointing at another ingest, and that ingest
/// with the `*` answer turned off and the page's origin not listed: the answer is opaque to
/// the page, the click is still recorded and its id kept.
#[tokio::test(flavor = "multi_thread")]
async fn custom_parameters_endpoint_and_an_unreadable_answer_still_record_the_click() {
    let (scope, script_host, _consumer) = pipeline("browser_endpoint", &[]).await;
    let mut opts = scope.ingest_options();
    opts.extra_env = vec![
        ("INGEST_CORS_ANY_ORIGIN".into(), "off".into()),
        ("INGEST_CORS_ORIGINS".into(), "https://shop.example".into()),
    ];
    let narrow = Ingest::start(&opts);
    narrow.ready().await;
    let page = PageServer::start(&tag(
        &script_host,
        &format!(
            "data-param=\"ref,via\" data-endpoint=\"{}\"",
            narrow.url("/api/v1/referrals/click")
        ),
    ))
    .await;
    let browser = Browser::start().await;

    let landing = browser.land(&page.url("/welcome?via=A1B2C3D4E5F6")).await;
    assert!(landing.errors.is_empty(), "{landing:?}");
    let id = landing.cookie("refclk").expect("the id is kept").to_owned();
    assert_eq!(stored_click(&scope, &id).await["landing_path"], "/welcome");
    assert_eq!(
        click_requests(&script_host).await,
        0.0,
        "data-endpoint is where clicks go"
    );
    assert!(click_requests(&narrow).await >= 1.0);
    browser.close().await;
    scope.drop_database().await;
}

/// The script with its headers (type, ETag, caching, CORS), 304 on `If-None-Match`, HEAD;
/// and a page whose ingest is down: no error in the page, `ready` settles, no cookie.
#[tokio::test(flavor = "multi_thread")]
async fn the_script_is_served_cacheable_and_an_unreachable_ingest_leaves_the_page_alone() {
    let (scope, ingest, _consumer) = pipeline("browser_script", &[]).await;
    let c = http();
    let url = ingest.url("/referral.js");
    let r = c.get(&url).send().await.expect("GET");
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(h["cache-control"].to_str().expect("v").contains("max-age="));
    let etag = h["etag"].to_str().expect("etag").to_owned();
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ingest/referral.js"
    ))
    .expect("ingest/referral.js");
    assert_eq!(r.text().await.expect("body"), source);
    let r = c
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"].to_str().expect("etag"), etag);
    assert!(r.bytes().await.expect("body").is_empty());
    let r = c.head(&url).send().await.expect("HEAD");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        source.len().to_string().as_str()
    );
    let r = c.post(&url).send().await.expect("POST");
    assert_eq!(r.status(), 405);
    // Fetching the script is not a click: nothing published, nothing charged.
    assert_eq!(click_requests(&ingest).await, 0.0);

    let down = free_addr();
    let page = PageServer::start(&tag(
        &ingest,
        &format!("data-endpoint=\"http://{down}/api/v1/referrals/click\""),
    ))
    .await;
    let browser = Browser::start().await;
    let landing = browser.land(&page.url("/?ref=A1B2C3D4E5F6")).await;
    assert!(landing.errors.is_empty(), "{landing:?}");
    assert_eq!(landing.ready, None);
    assert_eq!(landing.cookie("refclk"), None);
    browser.close().await;
    scope.drop_database().await;
}

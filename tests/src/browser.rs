//! A real browser for the tests of the browser script: headless Chromium driven over
//! WebDriver (`fantoccini`) through the `chromedriver` that `deploy/local/test` starts, and
//! a page server on another origin than ingest (`localhost` against ingest's `127.0.0.1`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::unique;

pub fn webdriver_url() -> String {
    std::env::var("E2E_WEBDRIVER_URL").unwrap_or_else(|_| "http://127.0.0.1:9515".into())
}

/// Serves one HTML page at every path (but `/favicon.ico`): `head` goes into its `<head>`,
/// after a script that records every error and unhandled rejection in `window.__errors`,
/// so a test sees anything the page's scripts throw.
pub struct PageServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl PageServer {
    pub async fn start(head: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let page = format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>landing</title>\
             <script>window.__errors = [];\
             addEventListener('error', function (e) {{ __errors.push('error: ' + e.message); }});\
             addEventListener('unhandledrejection', function (e) {{ __errors.push('rejection: ' + e.reason); }});\
             </script>{head}</head><body><h1>landing</h1></body></html>"
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let page = page.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&request);
                    let path = line.split(' ').nth(1).unwrap_or("/");
                    let response = if path.starts_with("/favicon.ico") {
                        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            .to_owned()
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n\
                             cache-control: no-store\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                            page.len()
                        )
                    };
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        Self { addr, task }
    }

    /// The page's URL on `localhost` (another site than ingest's `127.0.0.1`).
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://localhost:{}{path_and_query}", self.addr.port())
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a page's script left behind once `window.referral.ready` settled.
#[derive(Debug)]
pub struct Landing {
    /// What `ready` resolved to (the kept click id, or null).
    pub ready: Option<String>,
    /// `window.referral.clickId()` afterwards.
    pub click_id: Option<String>,
    /// `document.cookie` of the page.
    pub cookies: String,
    /// Errors and unhandled rejections the page saw, and what the console logged from
    /// JavaScript (a cross-origin script's rejections are hidden from the page itself).
    pub errors: Vec<String>,
}

impl Landing {
    /// The value of the cookie `name`, if the page has it.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies
            .split(';')
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// One headless Chromium with a fresh profile.
pub struct Browser {
    pub client: Client,
    profile: PathBuf,
}

impl Browser {
    pub async fn start() -> Self {
        let profile = std::env::temp_dir().join(unique("e2e_chromium"));
        std::fs::create_dir_all(&profile).expect("profile dir");
        let caps = json!({
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        });
        let Value::Object(caps) = caps else {
            unreachable!("an object literal")
        };
        let url = webdriver_url();
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .unwrap_or_else(|e| {
                panic!("no WebDriver session at {url} (deploy/local/test starts chromedriver): {e}")
            });
        Self { client, profile }
    }

    /// Opens `url` and waits until the script's `ready` settled (at most 20 s).
    pub async fn land(&self, url: &str) -> Landing {
        self.client.goto(url).await.expect("goto");
        self.settled().await
    }

    /// Reloads the page and waits until the script's `ready` settled.
    pub async fn reload(&self) -> Landing {
        self.client.refresh().await.expect("refresh");
        self.settled().await
    }

    async fn settled(&self) -> Landing {
        let script = r#"
            const done = arguments[arguments.length - 1];
            const started = Date.now();
            (function wait() {
              if (window.referral && window.referral.ready) {
                // Errors and rejections are reported in later tasks: give them time.
                window.referral.ready.then(function (v) {
                  setTimeout(function () {
                    done({ready: v, click_id: window.referral.clickId(),
                          cookies: document.cookie, errors: window.__errors});
                  }, 300);
                });
              } else if (Date.now() - started > 20000) {
                done({timeout: true, errors: window.__errors || []});
              } else {
                setTimeout(wait, 20);
              }
            })();
        "#;
        let v = tokio::time::timeout(
            Duration::from_secs(40),
            self.client.execute_async(script, vec![]),
        )
        .await
        .expect("the page answered within 40 s")
        .expect("execute_async");
        assert!(
            v.get("timeout").is_none(),
            "window.referral.ready never appeared: {v}"
        );
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let mut errors: Vec<String> = v
            .get("errors")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(Value::to_string).collect())
            .unwrap_or_default();
        errors.extend(self.script_errors().await);
        Landing {
            ready: text("ready"),
            click_id: text("click_id"),
            cookies: text("cookies").unwrap_or_default(),
            errors,
        }
    }

    /// What the browser's console logged since the last call: uncaught exceptions and
    /// unhandled rejections of every script, the cross-origin ones included. Left out: what
    /// the browser itself reports about a request, which no script can prevent: a network
    /// failure (a refused connection) and an answer withheld by CORS (an operator who
    /// narrowed CORS: the script then keeps the id without reading the answer).
    pub async fn script_errors(&self) -> Vec<String> {
        let log = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .expect("browser log");
        log.as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter(|e| e["source"] != "network")
                    .filter(|e| {
                        !e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("has been blocked by CORS policy"))
                    })
                    .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
                    .map(|e| format!("{} {}", e["source"], e["message"]))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn close(self) {
        let _ = self.client.close().await;
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// ChromeDriver's log command (not in the W3C standard, so not in fantoccini's API).
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (hyper::Method, Option<String>) {
        (hyper::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

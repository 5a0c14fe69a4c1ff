//! The hyper 1 accept loop and graceful shutdown.
//!
//! On shutdown: stop accepting, let in-flight requests finish (bounded by the grace
//! period), then flush the producer so every click answered 200 is delivered. Slow
//! clients are bounded by the header read timeout here and the body timeout in the
//! handler; headers larger than 16 KiB are refused by hyper (431).
//!
//! Open connections are capped (`INGEST_MAX_CONNECTIONS`), as in mini-redis: a connection
//! holds a semaphore permit for its lifetime and the loop accepts only with a permit in
//! hand, so past the cap new connections wait in the kernel's listen backlog (and are
//! refused by the kernel when that is full) instead of costing memory and descriptors.
//!
//! So that one host cannot hold every permit (and keep them busy with cheap requests while
//! every other client waits), each client address (an IPv6 /64) may hold at most
//! `INGEST_MAX_CONNECTIONS_PER_CLIENT`; a connection past that is closed at accept. Trusted
//! proxies are exempt (behind one, every connection is the proxy's). A connection is
//! closed with its `INGEST_MAX_REQUESTS_PER_CONNECTION`th answer and with any 429, so a
//! client refused for its rate does not keep its connection either.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::{HeaderValue, CONNECTION};
use hyper::StatusCode;
use ipnet::IpNet;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use shared::metric_names as m;

use crate::http::App;
use crate::producer::ClickSink;

pub struct ServerOptions {
    pub header_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub max_requests_per_connection: u32,
    /// Peers the per-client cap does not apply to (the trusted proxies).
    pub uncapped_peers: Vec<IpNet>,
}

/// Open connections per client address (IPv4 address, IPv6 /64).
struct PerClient {
    cap: usize,
    uncapped: Vec<IpNet>,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection of a capped client; gives its place back when dropped.
struct ClientSlot {
    clients: Arc<PerClient>,
    key: IpAddr,
}

impl PerClient {
    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
            v4 => v4,
        }
    }

    /// A place for a new connection from `ip`: `Ok(None)` for an uncapped peer, `Err` when
    /// the client holds its cap already.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Option<ClientSlot>, ()> {
        if self.uncapped.iter().any(|net| net.contains(&ip)) {
            return Ok(None);
        }
        let key = Self::key(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_default();
        if *n >= self.cap {
            return Err(());
        }
        *n += 1;
        Ok(Some(ClientSlot {
            clients: Arc::clone(self),
            key,
        }))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

pub async fn serve<S: ClickSink>(
    listener: TcpListener,
    app: Arc<App<S>>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        .max_buf_size(16 * 1024)
        .keep_alive(true);
    let permits = Arc::new(Semaphore::new(options.max_connections));
    let clients = Arc::new(PerClient {
        cap: options.max_connections_per_client,
        uncapped: options.uncapped_peers.clone(),
        open: Mutex::new(HashMap::new()),
    });
    let max_requests = options.max_requests_per_connection;
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = clients.admit(peer.ip()) else {
                    metrics::counter!(m::CONNECTIONS_REFUSED_TOTAL).increment(1);
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let app = Arc::clone(&app);
                let served = Arc::new(AtomicU32::new(0));
                let service = service_fn(move |req| {
                    let app = Arc::clone(&app);
                    let served = Arc::clone(&served);
                    async move {
                        let mut response = app.serve(req, peer).await?;
                        let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                        if n >= max_requests || response.status() == StatusCode::TOO_MANY_REQUESTS {
                            response
                                .headers_mut()
                                .insert(CONNECTION, HeaderValue::from_static("close"));
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                metrics::gauge!(m::OPEN_CONNECTIONS).increment(1.0);
                tokio::spawn(async move {
                    // Client resets and timeouts end a connection; nothing to report.
                    let _ = conn.await;
                    metrics::gauge!(m::OPEN_CONNECTIONS).decrement(1.0);
                    drop(slot);
                    drop(permit);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    if tokio::time::timeout(options.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?options.shutdown_grace, "in-flight requests did not finish in time");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients(cap: usize, uncapped: &[&str]) -> Arc<PerClient> {
        Arc::new(PerClient {
            cap,
            uncapped: uncapped.iter().map(|n| n.parse().expect("net")).collect(),
            open: Mutex::new(HashMap::new()),
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_client_gets_its_share_and_gets_it_back_when_a_connection_closes() {
        let c = clients(2, &[]);
        let a1 = c.admit(ip("192.0.2.1")).expect("first");
        let _a2 = c.admit(ip("192.0.2.1")).expect("second");
        assert!(c.admit(ip("192.0.2.1")).is_err(), "third over the cap");
        assert!(
            c.admit(ip("192.0.2.2")).is_ok(),
            "another address has its own"
        );
        drop(a1);
        assert!(c.admit(ip("192.0.2.1")).is_ok(), "a place came back");
    }

    #[test]
    fn an_ipv6_64_is_one_client_and_a_mapped_ipv4_is_its_ipv4() {
        let c = clients(1, &[]);
        let _a = c.admit(ip("2001:db8:1:2::1")).expect("first");
        assert!(c.admit(ip("2001:db8:1:2:ffff::9")).is_err(), "same /64");
        let _b = c.admit(ip("2001:db8:1:3::1")).expect("another /64");
        let _v4 = c.admit(ip("198.51.100.7")).expect("v4");
        assert!(
            c.admit(ip("::ffff:198.51.100.7")).is_err(),
            "mapped is the same"
        );
        assert_eq!(c.open.lock().expect("lock").len(), 3);
    }

    #[test]
    fn trusted_proxies_are_not_capped() {
        let c = clients(1, &["10.0.0.0/8"]);
        let held: Vec<_> = (0..5)
            .map(|_| c.admit(ip("10.1.2.3")).expect("uncapped"))
            .collect();
        assert!(held.iter().all(Option::is_none));
        assert!(c.open.lock().expect("lock").is_empty());
    }
}

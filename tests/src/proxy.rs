//! TCP proxies a test can cut or stall, and a Kafka-aware one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Forwards connections from a local port to `target`. While `down`, it refuses new
/// connections and resets open ones, like a server that went away. While `stalled`, it
/// keeps connections open but forwards nothing, like a server that hangs.
pub struct CutProxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl CutProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        Self::serve(listener, target)
    }

    /// A proxy on a chosen (free) address, e.g. one a broker advertises.
    pub async fn start_on(addr: SocketAddr, target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        Self::serve(listener, target)
    }

    fn serve(listener: tokio::net::TcpListener, target: SocketAddr) -> Self {
        let addr = listener.local_addr().expect("addr");
        let down = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (d, st, g) = (
            Arc::clone(&down),
            Arc::clone(&stalled),
            Arc::clone(&generation),
        );
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let (d, st, g) = (Arc::clone(&d), Arc::clone(&st), Arc::clone(&g));
                tokio::spawn(async move {
                    let my_gen = g.load(Ordering::SeqCst);
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let alive = {
                        let (d, g) = (Arc::clone(&d), Arc::clone(&g));
                        move || !d.load(Ordering::SeqCst) && g.load(Ordering::SeqCst) == my_gen
                    };
                    let up = pump(ri, wo, Arc::clone(&st), alive.clone());
                    let back = pump(ro, wi, st, alive);
                    tokio::select! { () = up => {}, () = back => {} }
                });
            }
        });
        Self {
            addr,
            down,
            stalled,
            generation,
        }
    }

    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
        self.stalled.store(false, Ordering::SeqCst);
    }

    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Copies one direction, pausing while `stalled` and ending when `alive()` turns false.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
    alive: impl Fn() -> bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                if !alive() { return; }
                continue;
            }
        };
        while stalled.load(Ordering::SeqCst) {
            if !alive() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !alive() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A TCP proxy in front of a Kafka broker that understands request framing (a 4-byte
/// size, then the API key): while `slow_metadata` is set it holds every Metadata request
/// (API key 3) for `delay` and forwards everything else at once. librdkafka matches
/// responses to requests by correlation id, so produce requests overtake a held Metadata
/// request: the metadata probe is slow while producing works.
pub struct KafkaProxy {
    pub addr: SocketAddr,
    slow: Arc<AtomicBool>,
}

impl KafkaProxy {
    pub async fn start_on(addr: SocketAddr, target: SocketAddr, delay: Duration) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let slow = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&slow);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let flag = Arc::clone(&flag);
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
                    let writer = tokio::spawn(async move {
                        while let Some(frame) = rx.recv().await {
                            if wo.write_all(&frame).await.is_err() {
                                return;
                            }
                        }
                    });
                    let reader = async move {
                        loop {
                            let mut size = [0u8; 4];
                            if ri.read_exact(&mut size).await.is_err() {
                                return;
                            }
                            let n = u32::from_be_bytes(size) as usize;
                            let mut frame = size.to_vec();
                            frame.resize(4 + n, 0);
                            if ri.read_exact(&mut frame[4..]).await.is_err() {
                                return;
                            }
                            let api_key = i16::from_be_bytes([frame[4], frame[5]]);
                            if api_key == 3 && flag.load(Ordering::SeqCst) {
                                let tx = tx.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(delay).await;
                                    let _ = tx.send(frame);
                                });
                            } else if tx.send(frame).is_err() {
                                return;
                            }
                        }
                    };
                    let back = async move {
                        let _ = tokio::io::copy(&mut ro, &mut wi).await;
                    };
                    tokio::select! { () = reader => {}, () = back => {} }
                    writer.abort();
                });
            }
        });
        Self { addr, slow }
    }

    pub fn slow_metadata(&self, on: bool) {
        self.slow.store(on, Ordering::SeqCst);
    }
}

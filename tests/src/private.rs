//! Private servers of one test (broker, ClickHouse, Redis), for faults that stop them.

use crate::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// How to start a service on an address (its working directory is set for it).
type CommandFor = Box<dyn Fn(SocketAddr) -> Command + Send + Sync>;

/// A server process of a test's own on a free port, with a scratch directory as its
/// working directory: started, stopped and restarted on the same port and data, and
/// removed with its directory when dropped. Ready when its port accepts connections.
pub struct PrivateService {
    name: &'static str,
    pub proc: Option<Proc>,
    pub addr: SocketAddr,
    dir: PathBuf,
    command: CommandFor,
}

impl PrivateService {
    pub async fn start(
        name: &'static str,
        addr: SocketAddr,
        command: impl Fn(SocketAddr) -> Command + Send + Sync + 'static,
    ) -> Self {
        let dir = std::env::temp_dir().join(unique(name));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut service = Self {
            name,
            proc: None,
            addr,
            dir,
            command: Box::new(command),
        };
        service.restart().await;
        service
    }

    pub async fn restart(&mut self) {
        self.stop();
        let mut cmd = (self.command)(self.addr);
        cmd.current_dir(&self.dir);
        self.proc = Some(Proc::spawn(self.name, cmd));
        let addr = self.addr;
        eventually(
            &format!("private {} port", self.name),
            Duration::from_secs(20),
            || async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) },
        )
        .await;
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

impl Drop for PrivateService {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tansu_bin() -> String {
    std::env::var("TANSU_BIN").unwrap_or_else(|_| {
        let home = std::env::var("CARGO_HOME")
            .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
        let installed = format!("{home}/bin/tansu");
        if std::path::Path::new(&installed).exists() {
            installed
        } else {
            "tansu".into()
        }
    })
}

/// A private tansu broker on a free port with its own sqlite file, for fault tests that
/// restart the broker.
pub struct PrivateBroker {
    pub service: PrivateService,
    pub addr: SocketAddr,
    /// What the broker tells clients to connect to (a proxy, in some fault tests).
    pub advertised: SocketAddr,
}

impl PrivateBroker {
    pub async fn start() -> Self {
        let addr = free_addr();
        Self::start_with(addr, addr, false).await
    }

    /// A broker that advertises `advertised` (e.g. a proxy in front of it).
    pub async fn start_advertising(advertised: SocketAddr) -> Self {
        Self::start_with(free_addr(), advertised, false).await
    }

    /// `memory`: `memory://` storage (benchmarks of our binaries) instead of durable sqlite.
    pub async fn start_with(addr: SocketAddr, advertised: SocketAddr, memory: bool) -> Self {
        let service = PrivateService::start("tansu", addr, move |addr| {
            let mut cmd = Command::new(tansu_bin());
            cmd.args([
                "broker",
                "--listener-url",
                &format!("tcp://{addr}"),
                "--advertised-listener-url",
                &format!("tcp://{advertised}"),
                "--storage-engine",
                if memory {
                    "memory://tansu/"
                } else {
                    "sqlite://tansu.db"
                },
            ]);
            cmd
        })
        .await;
        Self {
            service,
            addr,
            advertised,
        }
    }

    pub fn brokers(&self) -> String {
        self.addr.to_string()
    }

    pub fn pid(&self) -> Option<u32> {
        self.service.proc.as_ref().map(|p| p.child.id())
    }

    pub async fn restart(&mut self) {
        self.service.restart().await;
    }

    pub fn stop(&mut self) {
        self.service.stop();
    }
}

/// A private ClickHouse 26.9 (the local stack's launcher, `deploy/local/clickhouse/serve.py`)
/// on free ports with its own data directory, for fault tests that stop the server itself.
/// The Python of the chdb-core virtual environment comes from `E2E_CHDB_PYTHON`
/// (`deploy/local/test` sets it).
pub struct PrivateClickHouse {
    pub proc: Proc,
    pub http: SocketAddr,
    dir: PathBuf,
}

impl PrivateClickHouse {
    pub async fn start() -> Self {
        let python = std::env::var("E2E_CHDB_PYTHON").expect(
            "E2E_CHDB_PYTHON: the Python of the chdb-core environment (deploy/local/test sets it)",
        );
        let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/clickhouse");
        let dir = std::env::temp_dir().join(unique("clickhouse"));
        for sub in ["data", "tmp", "user_files", "format_schemas", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("dir");
        }
        let (http, tcp) = (free_addr(), free_addr());
        let config = std::fs::read_to_string(deploy.join("config.xml.in"))
            .expect("config template")
            .replace("@STATE@", &dir.display().to_string())
            .replace("@HTTP_PORT@", &http.port().to_string())
            .replace("@TCP_PORT@", &tcp.port().to_string());
        std::fs::write(dir.join("config.xml"), config).expect("config");
        std::fs::copy(deploy.join("users.xml"), dir.join("users.xml")).expect("users");
        let mut cmd = Command::new(python);
        cmd.arg(deploy.join("serve.py")).arg(&dir).env("TZ", "UTC");
        let proc = Proc::spawn("clickhouse", cmd);
        let ping = format!("http://{http}/ping");
        wait_ready(&ping, Duration::from_secs(60)).await;
        Self { proc, http, dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }
}

impl Drop for PrivateClickHouse {
    fn drop(&mut self) {
        self.proc.signal("CONT");
        self.proc.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis (Debian's `redis-server`) on a free port, without persistence, for
/// tests that stop it.
pub struct PrivateRedis {
    pub service: PrivateService,
    pub addr: SocketAddr,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let addr = free_addr();
        let service = PrivateService::start("redis", addr, |addr| {
            let mut cmd = Command::new("redis-server");
            cmd.args([
                "--port",
                &addr.port().to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]);
            cmd
        })
        .await;
        Self { service, addr }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub async fn restart(&mut self) {
        self.service.restart().await;
    }

    pub fn stop(&mut self) {
        self.service.stop();
    }
}

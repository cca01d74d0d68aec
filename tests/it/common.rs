//! Shared harness: start and stop servers, in-process or as the real binary.

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use changetoken::{
    proto::{
        ChangeTokenStatus, GetChangeTokenStatusRequest,
        change_token_service_client::ChangeTokenServiceClient,
    },
    server::{Config, Server},
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpListener,
    process::{Child, Command},
    sync::oneshot,
    task::JoinHandle,
};
use tonic::{Status, transport::Channel};
use tonic_types::StatusExt;

pub type Client = ChangeTokenServiceClient<Channel>;

/// The path of the `changetoken` binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_changetoken");

/// A server running in this process on a loopback port chosen by the OS.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

/// A config over `dir` with no propagation delay.
pub fn config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_owned(),
        ..Config::default()
    }
}

impl TestServer {
    /// Starts a server on a fresh temporary data directory, with `tweak`
    /// applied to the default config.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config(dir.path());
        tweak(&mut config);
        let mut server = Self::start_with(config).await;
        server._dir = Some(dir);
        server
    }

    /// Starts a server with `config` as given.
    pub async fn start_with(config: Config) -> TestServer {
        let server = Server::open(config).expect("open data dir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            server
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
                .expect("server failed");
        });
        TestServer {
            addr,
            shutdown: Some(tx),
            handle: Some(handle),
            _dir: None,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        connect(&self.endpoint()).await
    }

    /// Begins graceful shutdown and waits until the server has stopped and
    /// released its database.
    pub async fn stop(mut self) {
        self.stop_in_place().await;
    }

    async fn stop_in_place(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.expect("server task panicked");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn connect(endpoint: &str) -> Client {
    let channel = Channel::from_shared(endpoint.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    ChangeTokenServiceClient::new(channel)
}

/// The `ErrorInfo` reason of a failed call.
pub fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| {
            assert_eq!(info.domain, "changetoken", "unexpected ErrorInfo domain");
            info.reason
        })
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"))
}

/// Polls `check` until it returns `Some`, failing after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The real `changetoken serve` binary as a child process.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    /// Set once the process logged that it replayed its write-ahead log.
    pub replayed_log: Arc<AtomicBool>,
}

impl Process {
    /// Starts `changetoken serve` on `data_dir` with a free loopback port and
    /// `extra` flags; returns once it is listening.
    pub async fn serve(data_dir: &Path, extra: &[&str]) -> Process {
        Self::serve_on("127.0.0.1:0", data_dir, extra).await
    }

    /// Like [`Process::serve`], on the given address (for restarts on the
    /// same port, which clients reconnect to).
    pub async fn serve_on(listen: &str, data_dir: &Path, extra: &[&str]) -> Process {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", listen, "--log-format", "json"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("CHANGETOKEN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn changetoken");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let replayed_log = Arc::new(AtomicBool::new(false));
        let replayed = replayed_log.clone();
        let note = move |line: &str| {
            if line.contains("replayed the write-ahead log") {
                replayed.store(true, Ordering::Relaxed);
            }
        };
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read stderr") {
                note(&line);
                if let Some(addr) = listening_addr(&line) {
                    return addr;
                }
            }
            panic!("changetoken exited before listening");
        })
        .await
        .expect("changetoken did not start listening within 30 s");
        // Keep draining stderr so the child never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                note(&line);
            }
        });
        Process {
            child,
            addr,
            replayed_log,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }
}

fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("\"listening\"") {
        return None;
    }
    let start = line.find("\"addr\":\"")? + "\"addr\":\"".len();
    let end = start + line[start..].find('"')?;
    line[start..end].parse().ok()
}

/// A directory that outlives one server, for restart tests.
pub fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("data");
    (dir, path)
}

/// The token's status; panics on any error.
pub async fn status_of(client: &mut Client, token: &str) -> ChangeTokenStatus {
    let request = GetChangeTokenStatusRequest {
        change_token: token.to_owned(),
    };
    let response = client
        .get_change_token_status(request)
        .await
        .expect("GetChangeTokenStatus");
    response.into_inner().change_token_status()
}

/// Waits until the token is INSYNC, failing after 30 s.
pub async fn wait_insync(client: &Client, token: &str) {
    eventually(Duration::from_secs(30), "INSYNC", || {
        let mut client = client.clone();
        async move {
            (status_of(&mut client, token).await == ChangeTokenStatus::Insync).then_some(())
        }
    })
    .await;
}

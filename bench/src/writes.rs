//! Workload 2, durable writes: GetChangeToken + SubmitChange pairs per
//! second against changetoken, and puts per second against etcd (also
//! durable: it fsyncs its WAL before answering), at 1, 16 and 256
//! concurrent clients. A third system bounds what any server could do here:
//! the echo server answering two GetChangeTokenStatus calls per pair, through
//! the same client, transport and cores, with no storage at all.
//!
//! Both sides get the same generator: N tasks, each looping one operation
//! until a deadline and counting the ones that completed before it. Every
//! changetoken client writes its own scope; every etcd client puts its own
//! distinct keys; both carry a 32-byte value. Clients share one connection
//! per [`CLIENTS_PER_CONNECTION`]. At each concurrency both systems get a
//! warm-up, then they take turns, in a rotating order, for [`ROUNDS`] rounds
//! of [`RUN`].
//!
//! changetoken's server-side submit count, logged on SIGTERM, must cover
//! every pair the clients counted, with no failed call on either side.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    process::Stdio,
    time::Duration,
};

use changetoken::proto::{
    GetChangeTokenRequest, GetChangeTokenStatusRequest, SubmitChangeRequest,
    change_token_service_client::ChangeTokenServiceClient,
};
use etcd_client::{Client as EtcdClient, KvClient};
use tokio::{process::Child, time::Instant};
use tonic::transport::Channel;

use crate::util::{Row, Server, TempDir, failed_row, median, served};

const WORKLOAD: &str = "writes";
const CONCURRENCY: [usize; 3] = [1, 16, 256];
const ROUNDS: usize = 3;
/// One measured run.
const RUN: Duration = Duration::from_secs(3);
/// The run before the measured ones at each concurrency, on each system.
const WARMUP: Duration = Duration::from_millis(500);
const CLIENTS_PER_CONNECTION: usize = 16;
/// The systems measured, by index.
const SYSTEMS: [&str; 3] = ["changetoken", "etcd", "echo ceiling"];
const CHANGETOKEN: usize = 0;
const ETCD: usize = 1;
/// An operation that takes longer than this counts as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// The payload of a change, and the value of a put.
const VALUE: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

pub async fn run() -> Vec<Row> {
    let dir = TempDir::new("writes");
    let changetoken = Server::changetoken(&dir.path().join("changetoken"), &[]).await;
    let echo = Server::echo().await;
    let etcd = match Etcd::start(&dir.path().join("etcd")).await {
        Ok(etcd) => etcd,
        Err(err) => {
            let _ = changetoken.stop().await;
            let _ = echo.stop().await;
            return vec![failed_row(WORKLOAD, &format!("cannot start etcd: {err}"))];
        }
    };
    eprintln!(
        "writes: changetoken on {}, etcd on {}, echo on {}",
        changetoken.addr, etcd.endpoint, echo.addr
    );

    let mut problems = Vec::new();
    // Pairs that completed, before their deadline and in all.
    let mut counted_pairs = 0u64;
    let mut all_pairs = 0u64;
    let mut rates = Vec::new();
    for n in CONCURRENCY {
        let connections = n.div_ceil(CLIENTS_PER_CONNECTION);
        let (channels, echo_channels, etcd_clients) =
            match connect(&changetoken, &echo, &etcd, connections).await {
                Ok(all) => all,
                Err(err) => {
                    problems.push(format!("{n} clients: {err}"));
                    continue;
                }
            };
        let ours = |i: usize| ChangeTokenOp {
            client: ChangeTokenServiceClient::new(channels[i / CLIENTS_PER_CONNECTION].clone()),
            scope: format!("bench/c{n}/{i}"),
        };
        let ceiling = |i: usize| EchoOp {
            client: ChangeTokenServiceClient::new(
                echo_channels[i / CLIENTS_PER_CONNECTION].clone(),
            ),
        };
        let etcd_clients = &etcd_clients;
        // Keys are distinct across rounds too: each round starts its counters at 0.
        let theirs = |round: usize| {
            move |i: usize| EtcdOp {
                kv: etcd_clients[i / CLIENTS_PER_CONNECTION].kv_client(),
                prefix: format!("bench/c{n}/r{round}/{i}/"),
                seq: 0,
            }
        };

        let mut measured: [Vec<f64>; 3] = Default::default();
        for round in 0..=ROUNDS {
            let (duration, label) = if round == 0 {
                (WARMUP, "warm-up".to_string())
            } else {
                (RUN, format!("round {round}"))
            };
            for turn in 0..SYSTEMS.len() {
                let system = (turn + round) % SYSTEMS.len();
                let load = match system {
                    CHANGETOKEN => drive(n, duration, ours).await,
                    ETCD => drive(n, duration, theirs(round)).await,
                    _ => drive(n, duration, ceiling).await,
                };
                let name = SYSTEMS[system];
                let rate = load.counted as f64 / duration.as_secs_f64();
                eprintln!(
                    "writes: {n} clients, {label}, {name}: {rate:.0}/s ({} errors)",
                    load.errors
                );
                if let Some(err) = &load.first_error {
                    problems.push(format!(
                        "{name}, {n} clients, {label}: {} errors, first: {err}",
                        load.errors
                    ));
                }
                if system == CHANGETOKEN {
                    counted_pairs += load.counted;
                    all_pairs += load.completed;
                }
                if round > 0 {
                    measured[system].push(rate);
                }
            }
        }
        rates.push((n, measured.map(|m| median(&m))));
    }

    let ct_log = changetoken.stop().await;
    let _ = echo.stop().await;
    etcd.stop().await;
    let submit_ok = served(&ct_log, "submit_ok");
    let submit_failed = served(&ct_log, "submit_failed");
    let get_failed = served(&ct_log, "get_change_token_failed");
    match (submit_ok, submit_failed, get_failed) {
        (Some(ok), Some(failed), Some(get_failed)) => {
            if ok < counted_pairs || failed != 0 || get_failed != 0 {
                problems.push(format!(
                    "changetoken answered submit_ok {ok} (clients counted {counted_pairs}), \
                     submit_failed {failed}, get_change_token_failed {get_failed}"
                ));
            }
        }
        _ => problems.push("changetoken logged no \"requests served\" line".into()),
    }
    for p in &problems {
        eprintln!("writes: CHECK FAILED: {p}");
    }

    let flag = if problems.is_empty() {
        ""
    } else {
        " (CHECK FAILED)"
    };
    let mut rows = Vec::new();
    for &(n, [ours, theirs, ceiling]) in &rates {
        rows.push(Row::new(
            WORKLOAD,
            &format!("GetChangeToken+SubmitChange pairs/s vs etcd puts/s, {n} clients"),
            format!("{ours:.0}{flag}"),
            format!("{theirs:.0}"),
            format!("{:.2}x", ours / theirs),
            if n >= 16 { "≥ 2x" } else { "" },
        ));
        rows.push(Row::new(
            WORKLOAD,
            &format!("  ceiling: two echo calls per pair, {n} clients (vs pairs/s)"),
            format!("{ours:.0}"),
            format!("{ceiling:.0}"),
            format!("{:.2} of ceiling", ours / ceiling),
            if n >= 16 {
                if ceiling >= 2.0 * theirs {
                    "2x etcd is below the ceiling"
                } else {
                    "2x etcd is above the ceiling"
                }
            } else {
                ""
            },
        ));
    }
    let count = |v: Option<u64>| v.map_or("none".to_string(), |n| n.to_string());
    rows.push(Row::new(
        WORKLOAD,
        "server-side check: submit_ok ≥ pairs counted, no failed call",
        format!(
            "submit_ok {} ≥ {counted_pairs} ({all_pairs} completed), failed {}",
            count(submit_ok),
            count(submit_failed)
        ),
        String::new(),
        String::new(),
        if problems.is_empty() {
            "passed"
        } else {
            "**FAILED**"
        },
    ));
    if !problems.is_empty() {
        rows.push(failed_row(WORKLOAD, &problems.join("; ")));
    }
    rows
}

/// `connections` tonic channels to changetoken and to the echo server, and
/// as many etcd clients, each connected before the clock starts.
async fn connect(
    changetoken: &Server,
    echo: &Server,
    etcd: &Etcd,
    connections: usize,
) -> Result<(Vec<Channel>, Vec<Channel>, Vec<EtcdClient>), String> {
    let channel = |endpoint: String| async move {
        Channel::from_shared(endpoint)
            .map_err(|e| e.to_string())?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| e.to_string())
    };
    let mut channels = Vec::with_capacity(connections);
    let mut echo_channels = Vec::with_capacity(connections);
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        let ours = channel(changetoken.endpoint()).await;
        channels.push(ours.map_err(|e| format!("connect to changetoken: {e}"))?);
        let ceiling = channel(echo.endpoint()).await;
        echo_channels.push(ceiling.map_err(|e| format!("connect to echo: {e}"))?);
        let client = EtcdClient::connect([etcd.endpoint.as_str()], None)
            .await
            .map_err(|e| format!("connect to etcd: {e}"))?;
        clients.push(client);
    }
    Ok((channels, echo_channels, clients))
}

/// One client's repeated operation.
trait Op: Send + 'static {
    fn once(&mut self) -> impl Future<Output = Result<(), String>> + Send;
}

/// GetChangeToken then SubmitChange on the client's own scope.
struct ChangeTokenOp {
    client: ChangeTokenServiceClient<Channel>,
    scope: String,
}

impl Op for ChangeTokenOp {
    async fn once(&mut self) -> Result<(), String> {
        let token = self
            .client
            .get_change_token(GetChangeTokenRequest {
                scope: self.scope.clone(),
            })
            .await
            .map_err(|e| format!("GetChangeToken: {e}"))?
            .into_inner()
            .change_token;
        self.client
            .submit_change(SubmitChangeRequest {
                change_token: token,
                payload: VALUE.to_vec(),
                description: String::new(),
            })
            .await
            .map_err(|e| format!("SubmitChange: {e}"))?;
        Ok(())
    }
}

/// Two GetChangeTokenStatus calls to the echo server: the same number of
/// unary calls as a pair, with nothing behind them.
struct EchoOp {
    client: ChangeTokenServiceClient<Channel>,
}

impl Op for EchoOp {
    async fn once(&mut self) -> Result<(), String> {
        for _ in 0..2 {
            self.client
                .get_change_token_status(GetChangeTokenStatusRequest {
                    change_token: ECHO_TOKEN.to_owned(),
                })
                .await
                .map_err(|e| format!("echo GetChangeTokenStatus: {e}"))?;
        }
        Ok(())
    }
}

/// Any well-formed token: the echo server does not look at it.
const ECHO_TOKEN: &str = "abcd12f2-46da-4fdb-b8d5-fbd4c466928f";

/// A put of a fresh key under the client's own prefix.
struct EtcdOp {
    kv: KvClient,
    prefix: String,
    seq: u64,
}

impl Op for EtcdOp {
    async fn once(&mut self) -> Result<(), String> {
        self.seq += 1;
        let key = format!("{}{}", self.prefix, self.seq);
        self.kv
            .put(key, VALUE.to_vec(), None)
            .await
            .map_err(|e| format!("put: {e}"))?;
        Ok(())
    }
}

/// What the clients of one run did.
#[derive(Default)]
struct Load {
    /// Operations that completed before the deadline.
    counted: u64,
    /// Operations that completed, including those in flight at the deadline.
    completed: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Runs `n` clients made by `make` for `duration`.
async fn drive<O: Op>(n: usize, duration: Duration, make: impl Fn(usize) -> O) -> Load {
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(client_loop(make(i), deadline)))
        .collect();
    let mut total = Load::default();
    for task in tasks {
        match task.await {
            Ok(load) => {
                total.counted += load.counted;
                total.completed += load.completed;
                total.errors += load.errors;
                if total.first_error.is_none() {
                    total.first_error = load.first_error;
                }
            }
            Err(err) => {
                total.errors += 1;
                total
                    .first_error
                    .get_or_insert_with(|| format!("client task: {err}"));
            }
        }
    }
    total
}

/// Repeats `op` until `deadline`.
async fn client_loop<O: Op>(mut op: O, deadline: Instant) -> Load {
    let mut load = Load::default();
    while Instant::now() < deadline {
        match tokio::time::timeout(OP_TIMEOUT, op.once()).await {
            Ok(Ok(())) => {
                load.completed += 1;
                if Instant::now() <= deadline {
                    load.counted += 1;
                }
            }
            outcome => {
                load.errors += 1;
                load.first_error.get_or_insert_with(|| match outcome {
                    Ok(Err(err)) => err,
                    _ => format!("no answer within {OP_TIMEOUT:?}"),
                });
                // Do not spin on a server that refuses everything.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    load
}

/// An etcd 3.4 single-member cluster in a child process.
struct Etcd {
    child: Child,
    endpoint: String,
}

impl Etcd {
    /// Starts etcd over `data_dir` on free loopback ports and waits until a
    /// put succeeds.
    async fn start(data_dir: &std::path::Path) -> Result<Etcd, String> {
        let client_url = format!("http://127.0.0.1:{}", free_port()?);
        let peer_url = format!("http://127.0.0.1:{}", free_port()?);
        let log = std::fs::File::create(data_dir.with_extension("log"))
            .map_err(|e| format!("etcd log: {e}"))?;
        let child = tokio::process::Command::new("etcd")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--name", "default"])
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .arg("--initial-cluster")
            .arg(format!("default={peer_url}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawn etcd: {e}"))?;
        let etcd = Etcd {
            child,
            endpoint: client_url,
        };
        let give_up = Instant::now() + Duration::from_secs(30);
        let mut last_error = String::new();
        while Instant::now() < give_up {
            let attempt = async {
                let mut client = EtcdClient::connect([etcd.endpoint.as_str()], None).await?;
                client.put("bench/ready", "1", None).await
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(_)) => return Ok(etcd),
                Ok(Err(err)) => last_error = err.to_string(),
                Err(_) => last_error = "no answer within 2 s".into(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        etcd.stop().await;
        Err(format!("no put succeeded within 30 s: {last_error}"))
    }

    /// SIGTERM, then SIGKILL if it has not exited within 10 s.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(|e| format!("find a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("find a free port: {e}"))
}

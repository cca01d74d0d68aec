//! Workload 3: watch fan-out.
//!
//! N `WatchToken` streams on one PROVISIONED token (the service runs with
//! `--propagation-delay 1h`, so the measured transition is the only one),
//! then one `SubmitChange`: the server's memory per open watcher and the
//! delay until each watcher has the PENDING message. Anchor: etcd 3.4 with N
//! watch streams on one key, one watcher per stream as in changetoken (whose
//! API has one stream per watch), then one put.
//!
//! The watchers are spread over connections of `PER_CONNECTION` streams (the
//! service and etcd both leave HTTP/2 concurrent streams unlimited), the same
//! for both. Delay is measured from the start of the write call (SubmitChange
//! or Put, both durable before they answer) to the moment the watcher's task
//! holds the message, so it includes the write's fsync and the decoding of N
//! messages in this process, on the same two cores as the server. Memory is
//! the server's RSS with the watchers open minus before any was connected,
//! divided by N: it includes the connections' share.

use std::{
    any::Any,
    net::TcpListener,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use changetoken::proto::{
    ChangeTokenStatus, GetChangeTokenRequest, SubmitChangeRequest, WatchTokenRequest,
    change_token_service_client::ChangeTokenServiceClient,
};
use tokio::{
    process::{Child, Command},
    sync::{Semaphore, mpsc},
    task::JoinSet,
};

use crate::util::{Row, Server, connect, median, percentile, rss_of, scratch_dir};

/// Watcher counts, each with how many alternating rounds (changetoken, etcd
/// with one watcher per stream, and if the flag is set etcd with
/// `PER_CONNECTION` watchers per stream).
const COUNTS: [(usize, usize, bool); 2] = [(10_000, 3, true), (100_000, 1, false)];
/// Watch streams per HTTP/2 connection.
const PER_CONNECTION: usize = 1_000;
/// Watch calls in flight while opening.
const OPENING: usize = 256;
/// The longest the opening of all watchers may take; whatever is open by then
/// is measured.
const OPEN_DEADLINE: Duration = Duration::from_secs(60);
/// The longest to wait for every watcher to see the transition.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(30);
/// Pause before reading RSS, so that the server's allocations settle.
const SETTLE: Duration = Duration::from_millis(1_000);
/// The etcd key watched.
const KEY: &str = "bench/watch";

/// What one round measured.
struct Round {
    /// Watchers open when the write was made.
    opened: usize,
    /// Seconds to open them.
    open_secs: f64,
    /// Server RSS growth per open watcher.
    bytes_per_watcher: f64,
    /// Write start → message held by the watcher, in ms, one per delivery.
    delays_ms: Vec<f64>,
    /// For changetoken: receipt wall clock − `changed_at` of the message, in ms.
    since_changed_ms: Vec<f64>,
    /// Write call latency, in ms.
    write_ms: f64,
    /// CPU time the server and this process used from the write to the last
    /// delivery, in ms (10 ms resolution).
    server_cpu_ms: f64,
    client_cpu_ms: f64,
}

/// One watcher's delivery: when it held the message, the wall-clock time
/// since the message's `changed_at` in ms (if it has one), and its stream,
/// kept open until the round ends.
type Delivery = (Instant, Option<f64>, Box<dyn Any + Send>);

/// Counters and channels shared by the watcher tasks of a round.
struct Fanout {
    ready: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    opening: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Delivery>,
    rx: mpsc::UnboundedReceiver<Delivery>,
    tasks: JoinSet<()>,
}

impl Fanout {
    fn new() -> Fanout {
        let (tx, rx) = mpsc::unbounded_channel();
        Fanout {
            ready: Arc::default(),
            failed: Arc::default(),
            opening: Arc::new(Semaphore::new(OPENING)),
            tx,
            rx,
            tasks: JoinSet::new(),
        }
    }

    /// Waits until `n` watchers are open or failed, or the deadline; then
    /// stops opening more. Returns (open, seconds taken).
    async fn wait_open(&self, n: usize, started: Instant, label: &str) -> (usize, f64) {
        let mut last_report = Instant::now();
        loop {
            let (ready, failed) = (
                self.ready.load(Ordering::SeqCst),
                self.failed.load(Ordering::SeqCst),
            );
            if ready + failed >= n {
                break;
            }
            if started.elapsed() > OPEN_DEADLINE {
                eprintln!("  {label}: open deadline reached at {ready} of {n} watchers");
                self.opening.close();
                // Let the calls in flight finish or fail.
                tokio::time::sleep(Duration::from_secs(2)).await;
                break;
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                eprintln!("  {label}: {ready} of {n} watchers open");
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let failed = self.failed.load(Ordering::SeqCst);
        if failed > 0 {
            eprintln!("  {label}: {failed} watch calls failed");
        }
        (self.ready.load(Ordering::SeqCst), secs)
    }

    /// Collects the deliveries of `expected` watchers made after `t0`.
    async fn collect(&mut self, expected: usize, t0: Instant, label: &str) -> Collected {
        let deadline = tokio::time::Instant::now() + DELIVERY_DEADLINE;
        let mut out = Collected::default();
        while out.delays_ms.len() < expected {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((at, since_changed, stream))) => {
                    let delay = at.saturating_duration_since(t0);
                    out.delays_ms.push(delay.as_secs_f64() * 1e3);
                    out.since_changed_ms.extend(since_changed);
                    out.streams.push(stream);
                }
                _ => {
                    eprintln!(
                        "  {label}: {} of {expected} watchers saw the transition in time",
                        out.delays_ms.len()
                    );
                    break;
                }
            }
        }
        out
    }
}

#[derive(Default)]
struct Collected {
    delays_ms: Vec<f64>,
    since_changed_ms: Vec<f64>,
    streams: Vec<Box<dyn Any + Send>>,
}

/// CPU time (user + system) process `pid` has used, in ms.
fn cpu_ms(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which ends with the last ')': state is
    // field 3, utime and stime are fields 14 and 15, in 1/100 s.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) * 10.0
}

/// Milliseconds from `t` to now on the wall clock.
fn ms_since(t: &prost_types::Timestamp) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let then = t.seconds as f64 + t.nanos as f64 / 1e9;
    (now.as_secs_f64() - then) * 1e3
}

/// One changetoken round with `n` watchers.
async fn changetoken_round(n: usize) -> Round {
    let label = format!("changetoken {n}");
    let dir = scratch_dir("watch");
    let server = Server::changetoken(&dir, &["--propagation-delay", "1h"]).await;
    let endpoint = server.endpoint();
    let mut client = ChangeTokenServiceClient::new(connect(&endpoint).await);
    let token = client
        .get_change_token(GetChangeTokenRequest {
            scope: "bench/watch".into(),
        })
        .await
        .expect("GetChangeToken")
        .into_inner()
        .change_token;
    tokio::time::sleep(SETTLE).await;
    let before = server.rss();

    let started = Instant::now();
    let mut fanout = Fanout::new();
    let mut channel = None;
    for i in 0..n {
        if i.is_multiple_of(PER_CONNECTION) {
            channel = Some(connect(&endpoint).await);
        }
        let mut watcher = ChangeTokenServiceClient::new(channel.clone().expect("channel"));
        let request = WatchTokenRequest {
            change_token: token.clone(),
        };
        let (ready, failed, opening, tx) = (
            fanout.ready.clone(),
            fanout.failed.clone(),
            fanout.opening.clone(),
            fanout.tx.clone(),
        );
        fanout.tasks.spawn(async move {
            let opened = async {
                let _permit = opening.acquire().await.ok()?;
                let mut stream = watcher.watch_token(request).await.ok()?.into_inner();
                let first = stream.message().await.ok()??;
                (first.change_token_status() == ChangeTokenStatus::Provisioned).then_some(stream)
            };
            let Some(mut stream) = opened.await else {
                failed.fetch_add(1, Ordering::SeqCst);
                return;
            };
            ready.fetch_add(1, Ordering::SeqCst);
            if let Ok(Some(message)) = stream.message().await
                && message.change_token_status() == ChangeTokenStatus::Pending
            {
                let at = Instant::now();
                let since_changed = message.changed_at.as_ref().map(ms_since);
                let _ = tx.send((at, since_changed, Box::new(stream)));
            }
        });
    }
    let (opened, open_secs) = fanout.wait_open(n, started, &label).await;
    tokio::time::sleep(SETTLE).await;
    let after = server.rss();

    let pid = server.pid().to_string();
    let cpu_before = (cpu_ms(&pid), cpu_ms("self"));
    let t0 = Instant::now();
    client
        .submit_change(SubmitChangeRequest {
            change_token: token,
            payload: vec![b'x'; 64],
            description: "watch fan-out".into(),
        })
        .await
        .expect("SubmitChange");
    let write_ms = t0.elapsed().as_secs_f64() * 1e3;
    let collected = fanout.collect(opened, t0, &label).await;
    let cpu = (cpu_ms(&pid) - cpu_before.0, cpu_ms("self") - cpu_before.1);

    fanout.tasks.abort_all();
    drop(collected.streams);
    drop(fanout);
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Round {
        opened,
        open_secs,
        bytes_per_watcher: after.saturating_sub(before) as f64 / opened.max(1) as f64,
        delays_ms: collected.delays_ms,
        since_changed_ms: collected.since_changed_ms,
        write_ms,
        server_cpu_ms: cpu.0,
        client_cpu_ms: cpu.1,
    }
}

/// etcd on free loopback ports, killed on drop.
struct Etcd {
    child: Child,
    endpoint: String,
    dir: PathBuf,
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

impl Etcd {
    async fn start(dir: &Path) -> (Etcd, etcd_client::Client) {
        let (client_port, peer_port) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir)
            .args(["--name", "default"])
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn etcd (is /usr/bin/etcd installed?)");
        let etcd = Etcd {
            child,
            endpoint: client_url,
            dir: dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut client) = etcd_client::Client::connect([&etcd.endpoint], None).await
                && client.put(KEY, "v0", None).await.is_ok()
            {
                return (etcd, client);
            }
            assert!(Instant::now() < deadline, "etcd did not answer within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn rss(&self) -> u64 {
        self.child.id().map_or(0, rss_of)
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One etcd round with `n` watchers, `per_stream` watchers on each watch
/// stream: 1 (as changetoken, one stream per watch) or `PER_CONNECTION` (all
/// the watchers of a connection on one stream, as Go's clientv3 shares one).
async fn etcd_round(n: usize, per_stream: usize) -> Round {
    let label = format!("etcd {n} ({per_stream}/stream)");
    let dir = scratch_dir("watch-etcd");
    let (etcd, mut client) = Etcd::start(&dir).await;
    tokio::time::sleep(SETTLE).await;
    let before = etcd.rss();

    let started = Instant::now();
    let mut fanout = Fanout::new();
    let mut connection = None;
    for i in (0..n).step_by(per_stream) {
        if i.is_multiple_of(PER_CONNECTION) {
            connection = Some(
                etcd_client::Client::connect([&etcd.endpoint], None)
                    .await
                    .expect("connect to etcd"),
            );
        }
        let watchers = per_stream.min(n - i);
        let mut watcher = connection.as_ref().expect("client").watch_client();
        let (ready, failed, opening, tx) = (
            fanout.ready.clone(),
            fanout.failed.clone(),
            fanout.opening.clone(),
            fanout.tx.clone(),
        );
        fanout.tasks.spawn(async move {
            let mut created = 0;
            let opened = async {
                let _permit = opening.acquire().await.ok()?;
                let mut stream = watcher.watch(KEY, None).await.ok()?;
                for _ in 1..watchers {
                    stream.watch(KEY, None).await.ok()?;
                }
                while created < watchers {
                    let message = stream.message().await.ok()??;
                    if !message.created() {
                        return None;
                    }
                    created += 1;
                    ready.fetch_add(1, Ordering::SeqCst);
                }
                Some(stream)
            };
            let Some(mut stream) = opened.await else {
                failed.fetch_add(watchers - created, Ordering::SeqCst);
                return;
            };
            // One delivery per watcher, each when the response for its
            // watch id arrives; the stream goes with the last one.
            let mut seen = std::collections::HashSet::new();
            while let Ok(Some(message)) = stream.message().await {
                if !message.events().is_empty() && seen.insert(message.watch_id()) {
                    let at = Instant::now();
                    if seen.len() == watchers {
                        let _ = tx.send((at, None, Box::new(stream)));
                        return;
                    }
                    let _ = tx.send((at, None, Box::new(())));
                }
            }
        });
    }
    let (opened, open_secs) = fanout.wait_open(n, started, &label).await;
    tokio::time::sleep(SETTLE).await;
    let after = etcd.rss();

    let pid = etcd.child.id().unwrap_or(0).to_string();
    let cpu_before = (cpu_ms(&pid), cpu_ms("self"));
    let t0 = Instant::now();
    client
        .put(KEY, vec![b'x'; 64], None)
        .await
        .expect("etcd put");
    let write_ms = t0.elapsed().as_secs_f64() * 1e3;
    let collected = fanout.collect(opened, t0, &label).await;
    let cpu = (cpu_ms(&pid) - cpu_before.0, cpu_ms("self") - cpu_before.1);

    fanout.tasks.abort_all();
    drop(collected.streams);
    drop(fanout);
    etcd.stop().await;
    Round {
        opened,
        open_secs,
        bytes_per_watcher: after.saturating_sub(before) as f64 / opened.max(1) as f64,
        delays_ms: collected.delays_ms,
        since_changed_ms: collected.since_changed_ms,
        write_ms,
        server_cpu_ms: cpu.0,
        client_cpu_ms: cpu.1,
    }
}

/// Percentiles of one round's delays: (p50, p99, max).
fn spread(delays: &[f64]) -> (f64, f64, f64) {
    let mut v = delays.to_vec();
    (
        percentile(&mut v, 50.0),
        percentile(&mut v, 99.0),
        percentile(&mut v, 100.0),
    )
}

fn ratio(ours: f64, anchor: f64) -> String {
    if anchor > 0.0 && ours.is_finite() {
        format!("{:.2}x", ours / anchor)
    } else {
        "n/a".into()
    }
}

fn count_label(n: usize) -> String {
    if n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// A summary over rounds: the median of each round's figure.
struct Summary {
    opened: usize,
    open_secs: f64,
    bytes: f64,
    p50: f64,
    p99: f64,
    max: f64,
    since_changed_p99: f64,
    server_cpu_us: f64,
    client_cpu_us: f64,
    write_ms: f64,
    delivered: usize,
}

fn summarise(rounds: &[Round]) -> Summary {
    let each = |f: &dyn Fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    let spreads: Vec<_> = rounds.iter().map(|r| spread(&r.delays_ms)).collect();
    Summary {
        opened: rounds.iter().map(|r| r.opened).min().unwrap_or(0),
        open_secs: each(&|r| r.open_secs),
        bytes: each(&|r| r.bytes_per_watcher),
        p50: median(&spreads.iter().map(|s| s.0).collect::<Vec<_>>()),
        p99: median(&spreads.iter().map(|s| s.1).collect::<Vec<_>>()),
        max: median(&spreads.iter().map(|s| s.2).collect::<Vec<_>>()),
        since_changed_p99: if rounds.iter().any(|r| r.since_changed_ms.is_empty()) {
            f64::NAN
        } else {
            each(&|r| {
                let mut v = r.since_changed_ms.clone();
                percentile(&mut v, 99.0)
            })
        },
        server_cpu_us: each(&|r| r.server_cpu_ms * 1e3 / r.delays_ms.len().max(1) as f64),
        client_cpu_us: each(&|r| r.client_cpu_ms * 1e3 / r.delays_ms.len().max(1) as f64),
        write_ms: each(&|r| r.write_ms),
        delivered: rounds.iter().map(|r| r.delays_ms.len()).min().unwrap_or(0),
    }
}

pub async fn run() -> Vec<Row> {
    let mut rows = Vec::new();
    for (n, rounds, with_shared) in COUNTS {
        let (mut ours, mut theirs, mut shared) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            eprintln!("watch: {n} watchers, round {round} of {rounds}: changetoken");
            let r = changetoken_round(n).await;
            report("changetoken", &r);
            ours.push(r);
            eprintln!("watch: {n} watchers, round {round} of {rounds}: etcd, 1 per stream");
            let r = etcd_round(n, 1).await;
            report("etcd", &r);
            theirs.push(r);
            if !with_shared {
                continue;
            }
            eprintln!(
                "watch: {n} watchers, round {round} of {rounds}: etcd, {PER_CONNECTION} per stream"
            );
            let r = etcd_round(n, PER_CONNECTION).await;
            report("etcd", &r);
            shared.push(r);
        }
        let (ours, theirs) = (summarise(&ours), summarise(&theirs));
        let shared = (!shared.is_empty()).then(|| summarise(&shared));
        rows.extend(rows_for(n, rounds, &ours, &theirs, shared.as_ref()));
    }
    rows
}

fn report(who: &str, r: &Round) {
    let (p50, p99, max) = spread(&r.delays_ms);
    eprintln!(
        "  {who}: {} open in {:.1} s, {:.0} B/watcher, write {:.1} ms, delivered {} \
         p50 {p50:.1} p99 {p99:.1} max {max:.1} ms, cpu server {:.0} ms, bench {:.0} ms",
        r.opened,
        r.open_secs,
        r.bytes_per_watcher,
        r.write_ms,
        r.delays_ms.len(),
        r.server_cpu_ms,
        r.client_cpu_ms,
    );
}

fn rows_for(
    n: usize,
    rounds: usize,
    ours: &Summary,
    theirs: &Summary,
    shared: Option<&Summary>,
) -> Vec<Row> {
    let workload = format!("watch {}", count_label(n));
    let partial = |s: &Summary| {
        if s.opened < n || s.delivered < s.opened {
            format!(" (only {} open, {} delivered)", s.opened, s.delivered)
        } else {
            String::new()
        }
    };
    let (np, tp) = (partial(ours), partial(theirs));
    let runs = if rounds == 1 {
        "1 run".to_owned()
    } else {
        format!("median of {rounds} runs")
    };
    let ms = |v: f64, p: &str| format!("{v:.1} ms{p}");
    let goal_bytes = if n == 10_000 { "< 2 KiB" } else { "" };
    let goal_p99 = if n == 10_000 { "p99 < 50 ms" } else { "" };
    let mut rows = vec![
        Row::new(
            &workload,
            &format!(
                "server RSS per open watcher ({} streams/connection; etcd: 1 watcher per \
                 stream; {runs})",
                PER_CONNECTION
            ),
            format!("{:.0} B{np}", ours.bytes),
            format!("{:.0} B{tp}", theirs.bytes),
            ratio(ours.bytes, theirs.bytes),
            goal_bytes,
        ),
        Row::new(
            &workload,
            "delivery delay p50 (write call start → message in watcher task)",
            ms(ours.p50, &np),
            ms(theirs.p50, &tp),
            ratio(ours.p50, theirs.p50),
            "",
        ),
        Row::new(
            &workload,
            "delivery delay p99",
            ms(ours.p99, &np),
            ms(theirs.p99, &tp),
            ratio(ours.p99, theirs.p99),
            goal_p99,
        ),
        Row::new(
            &workload,
            "delivery delay max",
            ms(ours.max, &np),
            ms(theirs.max, &tp),
            ratio(ours.max, theirs.max),
            "",
        ),
        Row::new(
            &workload,
            "delivery delay p99 from the message's changed_at (no etcd equivalent)",
            ms(ours.since_changed_p99, &np),
            "n/a".into(),
            "n/a".into(),
            "",
        ),
        Row::new(
            &workload,
            "CPU per delivery from write to last delivery: server / bench client (µs)",
            format!("{:.1} / {:.1}", ours.server_cpu_us, ours.client_cpu_us),
            format!("{:.1} / {:.1}", theirs.server_cpu_us, theirs.client_cpu_us),
            ratio(ours.server_cpu_us, theirs.server_cpu_us),
            "",
        ),
        Row::new(
            &workload,
            "write call (SubmitChange / Put) with the watchers open",
            ms(ours.write_ms, ""),
            ms(theirs.write_ms, ""),
            ratio(ours.write_ms, theirs.write_ms),
            "",
        ),
        Row::new(
            &workload,
            &format!("time to open all watchers ({OPENING} calls in flight)"),
            format!("{:.1} s", ours.open_secs),
            format!("{:.1} s", theirs.open_secs),
            ratio(ours.open_secs, theirs.open_secs),
            "",
        ),
    ];
    if let Some(shared) = shared {
        let sp = partial(shared);
        rows.extend([
            Row::new(
                &workload,
                &format!(
                    "server RSS per open watcher; anchor: etcd with {PER_CONNECTION} watchers per \
                     stream (how Go's clientv3 shares a stream; changetoken has no equivalent)"
                ),
                format!("{:.0} B{np}", ours.bytes),
                format!("{:.0} B{sp}", shared.bytes),
                ratio(ours.bytes, shared.bytes),
                "",
            ),
            Row::new(
                &workload,
                &format!(
                    "delivery delay p99; anchor: etcd with {PER_CONNECTION} watchers per stream"
                ),
                ms(ours.p99, &np),
                ms(shared.p99, &sp),
                ratio(ours.p99, shared.p99),
                "",
            ),
        ]);
    }
    rows
}

//! Workload 1, status reads: h2load hammers GetChangeTokenStatus on one
//! existing token, against changetoken and against the echo server (tonic
//! with a constant reply: the ceiling of the transport on this machine).
//!
//! Both servers stay up for the whole workload. Each gets a warm-up run,
//! then the two alternate for [`ROUNDS`] rounds of the same request count,
//! sized from the warm-up so that a run takes about [`RUN_TARGET`]. The
//! ratio is the median of the rounds' own ratios, each between two runs
//! made one right after the other, so that the machine's drift over the
//! workload cancels out. h2load
//! counts a gRPC error as a success (it is an HTTP 200 with a grpc-status
//! trailer), so the servers' own counts, logged on SIGTERM, are checked
//! against what h2load sent: every request must be an OK status read.

use std::{path::Path, process::Stdio, time::Duration};

use changetoken::proto::{
    GetChangeTokenRequest, GetChangeTokenStatusRequest, SubmitChangeRequest,
    change_token_service_client::ChangeTokenServiceClient,
};
use prost::Message;

use crate::util::{Row, Server, TempDir, failed_row, median, percentile, served};

const WORKLOAD: &str = "reads";
/// h2load connections, and streams in flight per connection.
const CONNECTIONS: u32 = 50;
const STREAMS: u32 = 10;
/// Requests of the warm-up run on each server (also used to size the runs).
const WARMUP_REQUESTS: u64 = 20_000;
/// Measured rounds; each runs both servers.
const ROUNDS: usize = 5;
/// How long a measured run should take on the slower server.
const RUN_TARGET: Duration = Duration::from_secs(3);
/// Bounds on a measured run's request count.
const MIN_REQUESTS: u64 = 20_000;
const MAX_REQUESTS: u64 = 400_000;
/// An h2load run that takes longer than this is killed and reported.
const H2LOAD_TIMEOUT: Duration = Duration::from_secs(30);
const PATH: &str = "/changetoken.v1.ChangeTokenService/GetChangeTokenStatus";

pub async fn run() -> Vec<Row> {
    let dir = TempDir::new("reads");
    let body = dir.path().join("status-request.bin");
    let changetoken = Server::changetoken(&dir.path().join("data"), &[]).await;
    let echo = Server::echo().await;
    eprintln!(
        "reads: changetoken on {}, echo on {}",
        changetoken.addr, echo.addr
    );

    let token = match make_token(&changetoken.endpoint()).await {
        Ok(token) => token,
        Err(err) => {
            let _ = changetoken.stop().await;
            let _ = echo.stop().await;
            return vec![failed_row(
                WORKLOAD,
                &format!("cannot create a token: {err}"),
            )];
        }
    };
    std::fs::write(
        &body,
        grpc_frame(&GetChangeTokenStatusRequest {
            change_token: token,
        }),
    )
    .expect("write the request body");

    let targets = [("changetoken", &changetoken), ("echo", &echo)];
    let mut sent = [0u64; 2];
    let mut problems = Vec::new();
    let mut runs: [Vec<H2Run>; 2] = [Vec::new(), Vec::new()];

    // Warm-up, which also sizes the measured runs.
    let mut slowest = f64::INFINITY;
    for (i, (name, server)) in targets.iter().enumerate() {
        let log = dir.path().join(format!("warmup-{name}.log"));
        match h2load(server, &body, WARMUP_REQUESTS, &log).await {
            Ok(run) => {
                eprintln!("reads: warm-up {name}: {:.0} req/s", run.rps);
                sent[i] += run.succeeded;
                problems.extend(run.problem.iter().map(|p| format!("{name} warm-up: {p}")));
                slowest = slowest.min(run.rps);
            }
            Err(err) => problems.push(format!("{name} warm-up: {err}")),
        }
    }
    let requests = if slowest.is_finite() {
        let n = (slowest * RUN_TARGET.as_secs_f64()) as u64 / 1000 * 1000;
        n.clamp(MIN_REQUESTS, MAX_REQUESTS)
    } else {
        MIN_REQUESTS
    };

    for round in 0..ROUNDS {
        // Alternate which server goes first.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (name, server) = targets[i];
            let log = dir.path().join(format!("round{round}-{name}.log"));
            match h2load(server, &body, requests, &log).await {
                Ok(run) => {
                    eprintln!(
                        "reads: round {} {name}: {requests} req, {:.0} req/s, \
                         p50 {:.2} ms, p99 {:.2} ms",
                        round + 1,
                        run.rps,
                        run.p50_ms,
                        run.p99_ms
                    );
                    sent[i] += run.succeeded;
                    problems.extend(
                        run.problem
                            .iter()
                            .map(|p| format!("{name} round {}: {p}", round + 1)),
                    );
                    runs[i].push(run);
                }
                Err(err) => problems.push(format!("{name} round {}: {err}", round + 1)),
            }
        }
    }

    // Server-side counts.
    let ct_log = changetoken.stop().await;
    let echo_log = echo.stop().await;
    let ct_ok = served(&ct_log, "status_ok");
    let ct_failed = served(&ct_log, "status_failed");
    let echo_ok = served(&echo_log, "status_ok");
    match (ct_ok, ct_failed) {
        (Some(ok), Some(failed)) => {
            if ok != sent[0] || failed != 0 {
                problems.push(format!(
                    "changetoken answered status_ok {ok}, status_failed {failed} to {} requests",
                    sent[0]
                ));
            }
        }
        _ => problems.push("changetoken logged no \"requests served\" line".into()),
    }
    match echo_ok {
        Some(ok) if ok != sent[1] => {
            problems.push(format!(
                "echo answered status_ok {ok} to {} requests",
                sent[1]
            ));
        }
        Some(_) => {}
        None => problems.push("echo logged no \"requests served\" line".into()),
    }
    for p in &problems {
        eprintln!("reads: CHECK FAILED: {p}");
    }

    let stat = |i: usize, f: fn(&H2Run) -> f64| median(&runs[i].iter().map(f).collect::<Vec<_>>());
    let flag = if problems.is_empty() {
        ""
    } else {
        " (CHECK FAILED)"
    };
    let rps = (stat(0, |r| r.rps), stat(1, |r| r.rps));
    let paired: Vec<f64> = runs[0]
        .iter()
        .zip(&runs[1])
        .map(|(ours, echo)| ours.rps / echo.rps)
        .collect();
    let ratio = median(&paired);
    let p50 = (stat(0, |r| r.p50_ms), stat(1, |r| r.p50_ms));
    let p99 = (stat(0, |r| r.p99_ms), stat(1, |r| r.p99_ms));
    let shape = format!("h2load -c {CONNECTIONS} -m {STREAMS}, {requests} req x {ROUNDS}");
    let mut rows = vec![
        Row::new(
            WORKLOAD,
            &format!(
                "GetChangeTokenStatus req/s vs tonic echo ({shape}; medians, ratio: median of the rounds' ratios {})",
                paired
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            format!("{:.0}{flag}", rps.0),
            format!("{:.0}", rps.1),
            format!("{ratio:.2}"),
            "≥ 0.9",
        ),
        Row::new(
            WORKLOAD,
            "p50 latency ms (ratio: changetoken / echo)",
            format!("{:.2}{flag}", p50.0),
            format!("{:.2}", p50.1),
            format!("{:.2}", p50.0 / p50.1),
            "",
        ),
        Row::new(
            WORKLOAD,
            "p99 latency ms (ratio: changetoken / echo)",
            format!("{:.2}{flag}", p99.0),
            format!("{:.2}", p99.1),
            format!("{:.2}", p99.0 / p99.1),
            "",
        ),
    ];
    let count = |ok: Option<u64>| ok.map_or("none".to_string(), |n| n.to_string());
    rows.push(Row::new(
        WORKLOAD,
        "server-side check: status_ok = requests sent, status_failed = 0",
        format!(
            "ok {} / sent {}, failed {}",
            count(ct_ok),
            sent[0],
            count(ct_failed)
        ),
        format!("ok {} / sent {}", count(echo_ok), sent[1]),
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

/// Gets a token and submits a change with it, so that it is PENDING or INSYNC.
async fn make_token(endpoint: &str) -> Result<String, String> {
    let mut client = ChangeTokenServiceClient::connect(endpoint.to_string())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let token = client
        .get_change_token(GetChangeTokenRequest {
            scope: "bench/reads".into(),
        })
        .await
        .map_err(|e| format!("GetChangeToken: {e}"))?
        .into_inner()
        .change_token;
    client
        .submit_change(SubmitChangeRequest {
            change_token: token.clone(),
            payload: b"bench reads".to_vec(),
            description: "status reads benchmark".into(),
        })
        .await
        .map_err(|e| format!("SubmitChange: {e}"))?;
    Ok(token)
}

/// A gRPC length-prefixed message: an uncompressed flag, the big-endian
/// length, then the encoded message.
fn grpc_frame(message: &impl Message) -> Vec<u8> {
    let encoded = message.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + encoded.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(encoded.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&encoded);
    frame
}

/// The outcome of one h2load run.
struct H2Run {
    /// Requests h2load counted as succeeded (HTTP 2xx).
    succeeded: u64,
    /// As h2load reports it on its "finished in" line.
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// What went wrong in a run that still produced figures.
    problem: Option<String>,
}

/// Runs h2load with `requests` POSTs of `body` against `server`, writing
/// the per-request log to `log`.
async fn h2load(server: &Server, body: &Path, requests: u64, log: &Path) -> Result<H2Run, String> {
    let url = format!("http://{}{PATH}", server.addr);
    let mut command = tokio::process::Command::new("h2load");
    command
        .arg("-n")
        .arg(requests.to_string())
        .arg("-c")
        .arg(CONNECTIONS.to_string())
        .arg("-m")
        .arg(STREAMS.to_string())
        .args(["-t", "1", "-d"])
        .arg(body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("--log-file")
        .arg(log)
        .arg(&url)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(H2LOAD_TIMEOUT, command.output())
        .await
        .map_err(|_| format!("h2load did not finish within {H2LOAD_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot run h2load: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "h2load exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }

    // finished in 765.07ms, 26141.36 req/s, 977.62KB/s
    let rps = stdout
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .and_then(|r| r.parse::<f64>().ok())
        .ok_or_else(|| format!("no \"finished in\" line in h2load's output:\n{stdout}"))?;
    // requests: 20000 total, 20000 started, 20000 done, 20000 succeeded, 0 failed, ...
    let counts = stdout
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .ok_or_else(|| format!("no \"requests:\" line in h2load's output:\n{stdout}"))?;
    let count = |what: &str| -> u64 {
        counts
            .split(", ")
            .find_map(|c| c.strip_suffix(what))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let succeeded = count(" succeeded");
    let mut problem = None;
    if succeeded != requests {
        problem = Some(format!("h2load: {counts}"));
    }

    // One line per request: start (µs since the epoch), HTTP status,
    // duration (µs).
    let text = std::fs::read_to_string(log).map_err(|e| format!("h2load log: {e}"))?;
    let mut latencies_ms = Vec::with_capacity(requests as usize);
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        match (
            fields.get(1),
            fields.get(2).and_then(|d| d.parse::<f64>().ok()),
        ) {
            (Some(&"200"), Some(us)) if fields.len() == 3 => latencies_ms.push(us / 1000.0),
            _ => {
                problem.get_or_insert_with(|| format!("h2load log line {line:?}"));
            }
        }
    }
    if latencies_ms.len() as u64 != succeeded {
        problem.get_or_insert_with(|| {
            format!(
                "h2load logged {} requests, counted {succeeded}",
                latencies_ms.len()
            )
        });
    }
    let p50_ms = percentile(&mut latencies_ms, 50.0);
    let p99_ms = percentile(&mut latencies_ms, 99.0);
    let _ = std::fs::remove_file(log);
    Ok(H2Run {
        succeeded,
        rps,
        p50_ms,
        p99_ms,
        problem,
    })
}

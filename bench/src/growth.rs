//! Workload 5: growth.
//!
//! Status latency, server memory and database size with 10^4, 10^5 and 10^6
//! tokens stored. The data directory is populated through the library
//! (`Store::provision` + `Store::submit` from `WRITERS` concurrent tasks, each
//! with its own scope, so that a group commit takes thousands of writes, then
//! `Store::advance` to INSYNC: the steady state of old tokens), grown step by
//! step; at each step the store is closed and the real server started on the
//! directory, asked for the status of `STATUS_CALLS` random known tokens by one
//! sequential client, and stopped. Every token carries a `PAYLOAD`-byte
//! payload and a short description.
//!
//! Then retention: a fresh server with `--retention 2s` takes submissions from
//! `RETENTION_WRITERS` clients for `RETENTION_RUN`, and the database file size
//! is sampled every second: with retention it levels off instead of growing
//! with the number of tokens written.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use changetoken::{
    proto::{
        ChangeTokenStatus, GetChangeTokenRequest, GetChangeTokenStatusRequest, SubmitChangeRequest,
        change_token_service_client::ChangeTokenServiceClient,
    },
    store::{DB_FILE, Store},
    token::{Scope, TokenId},
};
use tokio::task::JoinSet;
use tonic::Code;

use crate::util::{Row, Server, connect, percentile, scratch_dir};

/// Token counts measured, in increasing order.
const STEPS: [usize; 3] = [10_000, 100_000, 1_000_000];
/// Concurrent writers while populating, each with its own scope: enough that
/// every group commit takes the store's largest batch (4096 operations).
const WRITERS: usize = 8_192;
/// The longest population may take over all steps; a step that has not
/// reached its count by then is measured with what it has.
const POPULATE_BUDGET: Duration = Duration::from_secs(130);
/// Payload bytes of every change.
const PAYLOAD: usize = 100;
/// Tokens moved to INSYNC per `advance` call, and how many calls run at once.
const ADVANCE_CHUNK: usize = 4_096;
const ADVANCES_IN_FLIGHT: usize = 8;
/// GetChangeTokenStatus calls per step, sequential, after `WARMUP` calls.
const STATUS_CALLS: usize = 20_000;
const WARMUP: usize = 1_000;
/// Retention run: clients, duration, sampling period.
const RETENTION_WRITERS: usize = 32;
const RETENTION_RUN: Duration = Duration::from_secs(21);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
const RETENTION: &str = "2s";

fn file_size(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(DB_FILE)).map_or(0, |m| m.len())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// splitmix64: a small deterministic generator for picking tokens.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Adds up to `count` INSYNC tokens to the store, fewer if `deadline` passes;
/// returns them.
async fn populate(store: &Store, count: usize, deadline: Instant) -> Vec<TokenId> {
    let mut writers = JoinSet::new();
    for w in 0..WRITERS {
        let share = count / WRITERS + usize::from(w < count % WRITERS);
        if share == 0 {
            continue;
        }
        let store = store.clone();
        let scope = Scope::parse(&format!("growth/{w}")).expect("scope");
        writers.spawn(async move {
            let mut tokens = Vec::with_capacity(share);
            for _ in 0..share {
                if Instant::now() > deadline {
                    break;
                }
                let token = store.provision(&scope).await.expect("provision");
                store
                    .submit(token, vec![b'p'; PAYLOAD], "growth benchmark".into())
                    .await
                    .expect("submit");
                tokens.push(token);
            }
            tokens
        });
    }
    let mut tokens = Vec::with_capacity(count);
    while let Some(done) = writers.join_next().await {
        tokens.extend(done.expect("writer"));
    }

    let mut advances = JoinSet::new();
    let mut moved = 0;
    for chunk in tokens.chunks(ADVANCE_CHUNK) {
        if advances.len() == ADVANCES_IN_FLIGHT {
            moved += advances
                .join_next()
                .await
                .expect("advance")
                .expect("advance");
        }
        let (store, chunk) = (store.clone(), chunk.to_vec());
        advances.spawn(async move {
            store
                .advance(chunk, Vec::new())
                .await
                .expect("advance")
                .len()
        });
    }
    while let Some(done) = advances.join_next().await {
        moved += done.expect("advance");
    }
    assert_eq!(moved, tokens.len(), "every new token moved to INSYNC");
    tokens
}

/// What one step measured.
struct Step {
    /// The count aimed at, and the count reached.
    target: usize,
    tokens: usize,
    /// Tokens this step added.
    added: usize,
    populate_secs: f64,
    start_secs: f64,
    p50_us: f64,
    p99_us: f64,
    rss_idle: u64,
    rss_after: u64,
    file: u64,
}

/// Starts the server on `dir`, measures status latency and memory, stops it.
async fn measure(dir: &Path, tokens: &[TokenId], rng: &mut Rng) -> (f64, f64, f64, u64, u64) {
    let started = Instant::now();
    let server = Server::changetoken(dir, &[]).await;
    let start_secs = started.elapsed().as_secs_f64();
    let mut client = ChangeTokenServiceClient::new(connect(&server.endpoint()).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = server.rss();
    let mut latencies = Vec::with_capacity(STATUS_CALLS);
    let mut wrong = 0;
    for i in 0..WARMUP + STATUS_CALLS {
        let token = tokens[rng.below(tokens.len())];
        let request = GetChangeTokenStatusRequest {
            change_token: token.to_string(),
        };
        let t0 = Instant::now();
        let reply = client.get_change_token_status(request).await;
        let took = t0.elapsed();
        match reply {
            Ok(r) if r.get_ref().change_token_status() == ChangeTokenStatus::Insync => {}
            _ => wrong += 1,
        }
        if i >= WARMUP {
            latencies.push(took.as_secs_f64() * 1e6);
        }
    }
    assert_eq!(wrong, 0, "every known token answers INSYNC");
    let rss_after = server.rss();
    server.stop().await;
    (
        start_secs,
        percentile(&mut latencies, 50.0),
        percentile(&mut latencies, 99.0),
        rss_idle,
        rss_after,
    )
}

async fn steps() -> Vec<Step> {
    let dir = scratch_dir("growth");
    let mut rng = Rng(0x5eed);
    let mut tokens: Vec<TokenId> = Vec::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + POPULATE_BUDGET;
    for target in STEPS {
        let store = Store::open(&dir, changetoken::store::Settle::Worker).expect("open the store");
        let add = target - tokens.len();
        eprintln!("growth: populating {add} tokens (to {target}) through the library");
        let t0 = Instant::now();
        let new = populate(&store, add, deadline).await;
        let populate_secs = t0.elapsed().as_secs_f64();
        let added = new.len();
        tokens.extend(new);
        drop(store);
        eprintln!(
            "  {added} tokens in {populate_secs:.1} s ({:.0}/s); measuring the server",
            added as f64 / populate_secs
        );
        if added < add {
            eprintln!(
                "  population budget reached: {} tokens instead of {target}",
                tokens.len()
            );
        }
        let (start_secs, p50_us, p99_us, rss_idle, rss_after) =
            measure(&dir, &tokens, &mut rng).await;
        let step = Step {
            target,
            tokens: tokens.len(),
            added,
            populate_secs,
            start_secs,
            p50_us,
            p99_us,
            rss_idle,
            rss_after,
            file: file_size(&dir),
        };
        eprintln!(
            "  {} tokens: start {:.2} s, status p50 {:.0} µs p99 {:.0} µs, RSS {} idle, \
             {} after, file {} ({:.0} B/token)",
            step.tokens,
            step.start_secs,
            step.p50_us,
            step.p99_us,
            mib(step.rss_idle),
            mib(step.rss_after),
            mib(step.file),
            step.file as f64 / step.tokens as f64
        );
        out.push(step);
        if step_short(&out) {
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// Whether the last step fell short of its count (no later step can reach
/// its own).
fn step_short(steps: &[Step]) -> bool {
    steps.last().is_some_and(|s| s.tokens < s.target)
}

/// What the retention run measured.
struct Retention {
    /// (seconds since start, file size, tokens written so far).
    samples: Vec<(f64, u64, usize)>,
    written: usize,
    /// Whether the first token written was gone (NOT_FOUND) at the end.
    first_deleted: bool,
}

async fn retention() -> Retention {
    let dir = scratch_dir("growth-retention");
    let server = Server::changetoken(&dir, &["--retention", RETENTION]).await;
    let endpoint = server.endpoint();
    eprintln!("growth: retention {RETENTION}: {RETENTION_WRITERS} writers for {RETENTION_RUN:?}");
    let written = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = JoinSet::new();
    let channel = connect(&endpoint).await;
    for w in 0..RETENTION_WRITERS {
        let mut client = ChangeTokenServiceClient::new(channel.clone());
        let (written, stop) = (written.clone(), stop.clone());
        writers.spawn(async move {
            let mut first = None;
            while !stop.load(Ordering::Relaxed) {
                let token = client
                    .get_change_token(GetChangeTokenRequest {
                        scope: format!("retention/{w}"),
                    })
                    .await
                    .expect("GetChangeToken")
                    .into_inner()
                    .change_token;
                client
                    .submit_change(SubmitChangeRequest {
                        change_token: token.clone(),
                        payload: vec![b'p'; PAYLOAD],
                        description: "retention benchmark".into(),
                    })
                    .await
                    .expect("SubmitChange");
                first.get_or_insert(token);
                written.fetch_add(1, Ordering::Relaxed);
            }
            first
        });
    }
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < RETENTION_RUN {
        tokio::time::sleep(SAMPLE_EVERY).await;
        let sample = (
            started.elapsed().as_secs_f64(),
            file_size(&dir),
            written.load(Ordering::Relaxed),
        );
        eprintln!(
            "  {:>4.1} s: {} tokens written, file {}",
            sample.0,
            sample.2,
            mib(sample.1)
        );
        samples.push(sample);
    }
    stop.store(true, Ordering::Relaxed);
    let mut first = None;
    while let Some(done) = writers.join_next().await {
        first = first.or(done.expect("writer"));
    }
    let first_deleted = match first {
        Some(token) => {
            let mut client = ChangeTokenServiceClient::new(channel);
            let reply = client
                .get_change_token_status(GetChangeTokenStatusRequest {
                    change_token: token,
                })
                .await;
            matches!(reply, Err(status) if status.code() == Code::NotFound)
        }
        None => false,
    };
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Retention {
        samples,
        written: written.load(Ordering::Relaxed),
        first_deleted,
    }
}

pub async fn run() -> Vec<Row> {
    let steps = steps().await;
    let kept = retention().await;

    let mut rows = Vec::new();
    let none = || "none".to_owned();
    for s in &steps {
        let mut workload = format!("growth 10^{}", (s.target as f64).log10().round());
        if s.tokens < s.target {
            workload += &format!(
                " (population budget {POPULATE_BUDGET:?} reached at {} tokens)",
                s.tokens
            );
        }
        let row = |metric: &str, value: String| {
            Row::new(&workload, metric, value, none(), String::new(), "")
        };
        rows.push(row(
            &format!("GetChangeTokenStatus p50 / p99 ({STATUS_CALLS} random tokens, sequential)"),
            format!("{:.0} / {:.0} µs", s.p50_us, s.p99_us),
        ));
        rows.push(row(
            "server RSS: idle after start / after the status calls",
            format!("{} / {}", mib(s.rss_idle), mib(s.rss_after)),
        ));
        rows.push(row(
            &format!(
                "database file ({PAYLOAD} B payloads); per token (redb grows the file by \
                 doubling, then by whole regions: an upper bound)"
            ),
            format!("{}; {:.0} B", mib(s.file), s.file as f64 / s.tokens as f64),
        ));
        rows.push(row(
            "server start until listening",
            format!("{:.2} s", s.start_secs),
        ));
        rows.push(row(
            &format!("library population of this step ({WRITERS} writers, own scopes)"),
            format!(
                "{:.1} s for {} tokens ({:.0}/s)",
                s.populate_secs,
                s.added,
                s.added as f64 / s.populate_secs
            ),
        ));
        rows.push(row(
            "tokens in the database when measured",
            s.tokens.to_string(),
        ));
    }

    let per_token = steps
        .last()
        .map_or(0.0, |s| s.file as f64 / s.tokens as f64);
    let at = |fraction: f64| {
        let wanted = RETENTION_RUN.as_secs_f64() * fraction;
        kept.samples
            .iter()
            .find(|s| s.0 >= wanted - 0.5)
            .or(kept.samples.last())
            .copied()
            .unwrap_or_default()
    };
    let (first, last) = (at(1.0 / 3.0), at(1.0));
    let max = kept.samples.iter().map(|s| s.1).max().unwrap_or(0);
    let workload = format!("growth, --retention {RETENTION}");
    rows.push(Row::new(
        &workload,
        &format!(
            "database file after {:.0} s / after {:.0} s of writes ({RETENTION_WRITERS} clients); \
             peak",
            first.0, last.0
        ),
        format!("{} / {}; peak {}", mib(first.1), mib(last.1), mib(max)),
        none(),
        String::new(),
        "stops growing",
    ));
    rows.push(Row::new(
        &workload,
        "tokens written by then (in all); size without retention at the 10^6 step's bytes/token",
        format!(
            "{} / {} ({}); ≈ {} / {}",
            first.2,
            last.2,
            kept.written,
            mib((first.2 as f64 * per_token) as u64),
            mib((last.2 as f64 * per_token) as u64)
        ),
        none(),
        String::new(),
        "",
    ));
    rows.push(Row::new(
        &workload,
        "first token written: NOT_FOUND at the end (deleted by retention)",
        if kept.first_deleted { "yes" } else { "no" }.to_owned(),
        none(),
        String::new(),
        "",
    ));
    rows
}

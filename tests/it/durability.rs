//! Durability (SPEC §6): SIGKILL the real binary at random moments under
//! concurrent load, restart it on the same data directory, and check that all
//! any client was told survived: every token at a status no lower than seen,
//! every change at the revision told, no revision told to two tokens, and
//! every PENDING change going on to INSYNC.

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use changetoken::proto::{
    ChangeTokenStatus, GetChangeTokenRequest, GetChangeTokenStatusRequest, SubmitChangeRequest,
    WatchTokenRequest, WatchTokenResponse,
};
use futures_util::{StreamExt, stream};
use rand::Rng;
use tonic::{Code, Status};

use crate::common::{self, Client, Process};

/// Kill/restart cycles on one data directory.
const CYCLES: usize = 20;
/// Concurrent client tasks; tasks `0..SHARED` share the default scope, so
/// they race for the same token and some get CHANGE_TOKEN_STALE.
const TASKS: usize = 16;
const SHARED: usize = 4;
/// How long after the load starts the process is killed, in milliseconds.
const KILL_AFTER_MS: std::ops::RangeInclusive<u64> = 100..=700;

const PROVISIONED: i32 = ChangeTokenStatus::Provisioned as i32;
const PENDING: i32 = ChangeTokenStatus::Pending as i32;
const INSYNC: i32 = ChangeTokenStatus::Insync as i32;

/// What clients were told about one token.
#[derive(Clone, Default)]
struct Observation {
    /// The highest status any client was told.
    status: i32,
    /// The revision SubmitChange answered, and the request it answered.
    submitted: Option<(u64, Vec<u8>, String)>,
    /// The cycle in which a client last heard of the token.
    cycle: usize,
}

#[derive(Default)]
struct Ledger {
    tokens: HashMap<String, Observation>,
    /// The token each acknowledged revision was told to.
    revisions: HashMap<u64, String>,
    /// Contradictions clients were told while the server was up.
    conflicts: Vec<String>,
}

type Shared = Arc<Mutex<Ledger>>;

impl Ledger {
    fn saw(&mut self, token: &str, status: i32, cycle: usize) -> &mut Observation {
        let obs = self.tokens.entry(token.to_owned()).or_default();
        obs.status = obs.status.max(status);
        obs.cycle = cycle;
        obs
    }

    fn submitted(&mut self, token: &str, change: (u64, Vec<u8>, String), cycle: usize) {
        let revision = change.0;
        if let Some(other) = self.revisions.insert(revision, token.to_owned())
            && other != token
        {
            let msg = format!("revision {revision} told to {other} and to {token}");
            self.conflicts.push(msg);
        }
        let obs = self.saw(token, PENDING, cycle);
        match &obs.submitted {
            Some((told, ..)) if *told != revision => {
                let msg = format!("{token} told revision {told}, then {revision}");
                self.conflicts.push(msg);
            }
            _ => obs.submitted = Some(change),
        }
    }
}

/// Figures over the whole run.
#[derive(Default, Debug)]
struct Totals {
    kills: usize,
    acked_submits: usize,
    fewest_acked_in_a_cycle: usize,
    insync_seen_under_load: usize,
    tokens_in_ledger: usize,
    statuses_checked: usize,
    revisions_checked: usize,
    identical_retries_checked: usize,
    pending_reached_insync: usize,
    restarts_that_replayed_the_log: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let started = Instant::now();
    let (_dir, data) = common::data_dir();
    let ledger = Shared::default();
    let mut totals = Totals {
        fewest_acked_in_a_cycle: usize::MAX,
        ..Totals::default()
    };
    for cycle in 0..=CYCLES {
        // Odd cycles run with the defaults, where a change's own commit makes
        // it INSYNC; even ones keep changes PENDING for a while.
        let flags: &[&str] = if cycle % 2 == 0 {
            &["--propagation-delay", "300ms"]
        } else {
            &[]
        };
        let server = Process::serve(&data, flags).await;
        if server
            .replayed_log
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            totals.restarts_that_replayed_the_log += 1;
        }
        if cycle > 0 {
            verify(&server.endpoint(), &ledger, cycle - 1, &mut totals).await;
        }
        if cycle == CYCLES {
            server.kill().await;
            break;
        }
        load_then_kill(server, &ledger, cycle, &mut totals).await;
    }

    let ledger = ledger.lock().unwrap();
    let conflicts = &ledger.conflicts;
    assert!(conflicts.is_empty(), "contradictions: {conflicts:?}");
    totals.tokens_in_ledger = ledger.tokens.len();
    totals.acked_submits = ledger.revisions.len();
    let insync = ledger.tokens.values().filter(|o| o.status == INSYNC);
    totals.insync_seen_under_load = insync.count();
    eprintln!("durability: {totals:?} in {:.1?}", started.elapsed());
    assert_eq!(totals.kills, CYCLES);
    // Not vacuous: many writes were acknowledged, some PENDING at the kills,
    // and most restarts recovered acknowledged writes from the log alone.
    assert!(totals.acked_submits >= 10 * CYCLES, "{totals:?}");
    assert!(totals.pending_reached_insync >= CYCLES / 4, "{totals:?}");
    assert!(
        totals.restarts_that_replayed_the_log >= CYCLES / 2,
        "{totals:?}"
    );
}

/// Runs `TASKS` clients against `server`, SIGKILLs it after a random delay,
/// and waits for the clients to stop.
async fn load_then_kill(server: Process, ledger: &Shared, cycle: usize, totals: &mut Totals) {
    let acked_before = ledger.lock().unwrap().revisions.len();
    let stop = Arc::new(AtomicBool::new(false));
    let ctx = Ctx {
        cycle,
        ledger: ledger.clone(),
        stop: stop.clone(),
    };
    let mut tasks = Vec::new();
    for id in 0..TASKS {
        let client = common::connect(&server.endpoint()).await;
        tasks.push(tokio::spawn(load(client, id, ctx.clone())));
    }
    let delay = rand::rng().random_range(KILL_AFTER_MS);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    server.kill().await;
    stop.store(true, Ordering::SeqCst);
    totals.kills += 1;
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("a load task did not stop after the kill")
            .expect("a load task panicked");
    }
    let acked = ledger.lock().unwrap().revisions.len() - acked_before;
    totals.fewest_acked_in_a_cycle = totals.fewest_acked_in_a_cycle.min(acked);
}

/// What a load task needs besides its client.
#[derive(Clone)]
struct Ctx {
    cycle: usize,
    ledger: Shared,
    stop: Arc<AtomicBool>,
}

/// One client: get a token, submit a unique change with it, and now and then
/// ask for the status of an earlier token, recording every answer.
async fn load(mut client: Client, id: usize, ctx: Ctx) {
    let (cycle, ledger) = (ctx.cycle, &ctx.ledger);
    let shared = id < SHARED;
    let scope = format!("durability/task-{id}");
    let scope = if shared { "" } else { &scope };
    let mut n = 0;
    let mut history = VecDeque::new();
    while !ctx.stop.load(Ordering::SeqCst) {
        n += 1;
        let token = match get_token(&mut client, scope).await {
            Ok(token) => token,
            Err(status) => {
                back_off(&status).await;
                continue;
            }
        };
        ledger.lock().unwrap().saw(&token, PROVISIONED, cycle);

        let payload = format!("cycle {cycle} task {id} change {n}").into_bytes();
        let description = format!("durability c{cycle} t{id} n{n}");
        match submit(&mut client, &token, &payload, &description).await {
            Ok(revision) => {
                let change = (revision, payload, description);
                ledger.lock().unwrap().submitted(&token, change, cycle);
                history.push_back(token);
                if history.len() > 16 {
                    history.pop_front();
                }
            }
            // A shared-scope task lost the race for this token.
            Err(status) if status.code() == Code::Aborted && shared => {}
            Err(status) => back_off(&status).await,
        }

        let Some(earlier) = history.front().filter(|_| n % 3 == 0) else {
            continue;
        };
        match token_status(&mut client, earlier).await {
            Ok(status) => drop(ledger.lock().unwrap().saw(earlier, status, cycle)),
            Err(status) => back_off(&status).await,
        }
    }
}

/// After an error (the server was just killed), pause so that a task does not
/// spin until it is told to stop.
async fn back_off(status: &Status) {
    let code = status.code();
    let expected = matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled);
    assert!(expected, "unexpected error under load: {status:?}");
    tokio::time::sleep(Duration::from_millis(5)).await;
}

async fn get_token(client: &mut Client, scope: &str) -> Result<String, Status> {
    let scope = scope.to_owned();
    let request = GetChangeTokenRequest { scope };
    let reply = client.get_change_token(request).await?;
    Ok(reply.into_inner().change_token)
}

async fn submit(c: &mut Client, token: &str, payload: &[u8], desc: &str) -> Result<u64, Status> {
    let request = SubmitChangeRequest {
        change_token: token.to_owned(),
        payload: payload.to_vec(),
        description: desc.to_owned(),
    };
    let reply = c.submit_change(request).await?.into_inner();
    assert_eq!(reply.change_token, token, "answered for another token");
    Ok(reply.revision)
}

async fn token_status(client: &mut Client, token: &str) -> Result<i32, Status> {
    let change_token = token.to_owned();
    let request = GetChangeTokenStatusRequest { change_token };
    let reply = client.get_change_token_status(request).await?;
    Ok(reply.into_inner().change_token_status)
}

/// What checking one token after a restart found.
#[derive(Default)]
struct Check {
    revision: Option<u64>,
    was_pending: bool,
    retried: bool,
}

/// Checks every token in the ledger against the restarted server; the changes
/// of tokens last heard of in `last_cycle` are also retried identically.
async fn verify(endpoint: &str, ledger: &Shared, last_cycle: usize, totals: &mut Totals) {
    let client = common::connect(endpoint).await;
    let snapshot = ledger.lock().unwrap().tokens.clone();
    let checks: Vec<(String, Check)> = stream::iter(snapshot)
        .map(|(token, obs)| {
            let client = client.clone();
            let retry = obs.cycle == last_cycle;
            async move {
                let check = check_token(client, &token, obs, retry).await;
                (token, check)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;

    // Revisions as the server reports them, including those of changes whose
    // reply was lost to the kill: still no revision may belong to two tokens.
    let mut owners: HashMap<u64, &str> = HashMap::new();
    for (token, check) in &checks {
        totals.statuses_checked += 1;
        totals.pending_reached_insync += usize::from(check.was_pending);
        totals.identical_retries_checked += usize::from(check.retried);
        if let Some(revision) = check.revision {
            totals.revisions_checked += 1;
            if let Some(other) = owners.insert(revision, token) {
                panic!("after restart, revision {revision} belongs to {other} and {token}");
            }
        }
    }
}

async fn check_token(mut client: Client, token: &str, obs: Observation, retry: bool) -> Check {
    let status = token_status(&mut client, token).await;
    let status = status.unwrap_or_else(|e| panic!("token {token} lost in a restart: {e:?}"));
    let seen = obs.status;
    assert!(status >= seen, "{token} is {status}, was told {seen}");
    if status < PENDING {
        return Check::default();
    }
    let revision = watch_to_insync(&mut client, token).await;
    let mut retried = false;
    if let Some((told, payload, description)) = obs.submitted {
        assert_eq!(revision, told, "{token}: revision changed in a restart");
        if retry {
            let again = submit(&mut client, token, &payload, &description).await;
            let again = again.unwrap_or_else(|e| panic!("identical retry of {token}: {e:?}"));
            assert_eq!(again, told, "identical retry of {token}: other revision");
            retried = true;
        }
    }
    let (revision, was_pending) = (Some(revision), status == PENDING);
    Check {
        revision,
        was_pending,
        retried,
    }
}

/// Watches `token` until its stream ends, which must be after INSYNC and
/// within a bound; returns the revision every message carried.
async fn watch_to_insync(client: &mut Client, token: &str) -> u64 {
    let change_token = token.to_owned();
    let watch = client.watch_token(WatchTokenRequest { change_token }).await;
    let watch = watch.unwrap_or_else(|e| panic!("cannot watch {token}: {e:?}"));
    let mut watch = watch.into_inner();
    let mut messages = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(message) = watch.message().await.expect("watch stream failed") {
            messages.push(message);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{token} not INSYNC 15 s after a restart: {messages:?}"));
    let statuses: Vec<i32> = messages.iter().map(|m| m.change_token_status).collect();
    let steps = statuses.windows(2).all(|w| w[1] == w[0] + 1);
    assert!(steps && statuses.last() == Some(&INSYNC), "{statuses:?}");
    let revision = messages[0].revision;
    let same = |m: &WatchTokenResponse| m.revision == revision && m.change_token == token;
    assert!(revision > 0 && messages.iter().all(same), "{messages:?}");
    revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_in_use_or_unopenable_fails_cleanly() {
    let (dir, data) = common::data_dir();
    let first = Process::serve(&data, &[]).await;
    let mut client = common::connect(&first.endpoint()).await;
    let before = get_token(&mut client, "in-use").await.unwrap();
    let message = refused(&data);
    assert!(message.contains("in use"), "unclear: {message}");
    // The refused instance disturbed nothing.
    assert_eq!(get_token(&mut client, "in-use").await.unwrap(), before);
    first.kill().await;

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let message = refused(&file.join("data"));
    assert!(message.contains("data directory"), "unclear: {message}");
}

/// Runs `changetoken serve` on `data_dir`, which must exit at once with a
/// failure and one line of stderr; returns that line.
fn refused(data_dir: &Path) -> String {
    let mut child = Command::new(common::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env_remove("CHANGETOKEN_LOG")
        .env_remove("CHANGETOKEN_LOG_FORMAT")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn changetoken");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            child.kill().expect("kill");
            panic!("changetoken serve {} kept running", data_dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("collect output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "serve succeeded: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line of stderr: {stderr:?}");
    lines[0].to_owned()
}

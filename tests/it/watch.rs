//! WatchToken against the real server: the sequence every watcher sees, under
//! fan-out, many tokens, races with submission, watchers that never read,
//! refused requests and shutdown.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use changetoken::proto::{
    ChangeTokenStatus::{self, Insync, Pending, Provisioned},
    GetChangeTokenRequest, GetChangeTokenStatusRequest, SubmitChangeRequest, WatchTokenRequest,
    WatchTokenResponse,
};
use tokio::{
    task::JoinSet,
    time::{Instant, timeout},
};
use tonic::{Code, Status, Streaming};

use crate::common::{self, Client, TestServer};

/// The longest any single wait may take.
const BOUND: Duration = Duration::from_secs(20);
const FULL: [ChangeTokenStatus; 3] = [Provisioned, Pending, Insync];

type Stream = Streaming<WatchTokenResponse>;

async fn clients(server: &TestServer, n: usize) -> Vec<Client> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(server.client().await);
    }
    out
}

async fn get_token(mut client: Client, scope: String) -> String {
    let call = client.get_change_token(GetChangeTokenRequest { scope });
    let reply = timeout(BOUND, call).await.expect("GetChangeToken hung");
    reply.expect("GetChangeToken").into_inner().change_token
}

async fn submit(mut client: Client, token: String) -> u64 {
    let call = client.submit_change(SubmitChangeRequest {
        payload: token.as_bytes().to_vec(),
        change_token: token.clone(),
        description: "watch test".into(),
    });
    let reply = timeout(BOUND, call).await.expect("SubmitChange hung");
    let reply = reply.expect("SubmitChange").into_inner();
    assert_eq!(reply.change_token, token);
    assert!(reply.revision > 0, "revisions start at 1");
    reply.revision
}

async fn status_of(client: &mut Client, token: &str) -> ChangeTokenStatus {
    let call = client.get_change_token_status(GetChangeTokenStatusRequest {
        change_token: token.into(),
    });
    let reply = timeout(BOUND, call)
        .await
        .expect("GetChangeTokenStatus hung");
    reply
        .expect("GetChangeTokenStatus")
        .into_inner()
        .change_token_status()
}

async fn watch(client: &mut Client, token: &str) -> Result<Stream, Status> {
    let call = client.watch_token(WatchTokenRequest {
        change_token: token.into(),
    });
    let opened = timeout(BOUND, call).await.expect("WatchToken hung");
    opened.map(|response| response.into_inner())
}

/// The next message, or `None` when the stream ended with OK.
async fn next(stream: &mut Stream) -> Option<WatchTokenResponse> {
    let message = timeout(BOUND, stream.message()).await;
    message
        .expect("no watch message within the bound")
        .expect("watch stream failed")
}

/// Every remaining message, up to the stream's OK end.
async fn collect(mut stream: Stream) -> Vec<WatchTokenResponse> {
    let mut out = Vec::new();
    while let Some(message) = next(&mut stream).await {
        out.push(message);
        assert!(out.len() <= 3, "more than three messages: {out:?}");
    }
    out
}

fn micros(message: &WatchTokenResponse) -> i64 {
    let at = message.changed_at.as_ref().expect("changed_at is set");
    at.seconds * 1_000_000 + i64::from(at.nanos) / 1_000
}

/// `messages` are exactly `expected` for `token`: revision 0 while
/// PROVISIONED and `revision` after, `changed_at` set and non-decreasing.
fn assert_sequence(
    messages: &[WatchTokenResponse],
    token: &str,
    expected: &[ChangeTokenStatus],
    revision: u64,
) {
    let statuses: Vec<_> = messages.iter().map(|m| m.change_token_status()).collect();
    assert_eq!(statuses, expected, "sequence seen by a watcher of {token}");
    let mut last = 0;
    for message in messages {
        assert_eq!(message.change_token, token, "message for another token");
        let provisioned = message.change_token_status() == Provisioned;
        let want = if provisioned { 0 } else { revision };
        assert_eq!(message.revision, want, "revision in {message:?}");
        let at = micros(message);
        assert!(
            at > 1_600_000_000_000_000,
            "changed_at unset in {message:?}"
        );
        assert!(at >= last, "changed_at went backwards: {messages:?}");
        last = at;
    }
}

/// A watch on a token, and its first message if it was read.
type Opened = (String, Stream, Option<WatchTokenResponse>);

/// Opens every `(client, token)` watch concurrently. With `read_first`, reads
/// each first message and checks it is PROVISIONED. Either way every watcher
/// is subscribed on return: the response headers came after the subscription.
async fn open_all(pairs: Vec<(Client, String)>, read_first: bool) -> Vec<Opened> {
    let mut tasks = JoinSet::new();
    for (mut client, token) in pairs {
        tasks.spawn(async move {
            let mut stream = watch(&mut client, &token).await.expect("WatchToken");
            let mut first = None;
            if read_first {
                let message = next(&mut stream).await.expect("a first message");
                assert_eq!(message.change_token_status(), Provisioned, "{message:?}");
                first = Some(message);
            }
            (token, stream, first)
        });
    }
    join(tasks).await
}

/// Reads every opened watch to its end, each in its own task.
fn finish_all(opened: Vec<Opened>) -> JoinSet<(String, Vec<WatchTokenResponse>)> {
    let mut tasks = JoinSet::new();
    for (token, stream, first) in opened {
        tasks.spawn(async move {
            let mut messages: Vec<_> = first.into_iter().collect();
            messages.extend(collect(stream).await);
            (token, messages)
        });
    }
    tasks
}

/// Submits a change with each token concurrently; their revisions.
async fn submit_all(clients: &[Client], tokens: &[String]) -> HashMap<String, u64> {
    let mut tasks = JoinSet::new();
    for (i, token) in tokens.iter().enumerate() {
        let (client, token) = (clients[i % clients.len()].clone(), token.clone());
        tasks.spawn(async move { (token.clone(), submit(client, token).await) });
    }
    join(tasks).await.into_iter().collect()
}

/// A token for each of `scopes`, fetched concurrently.
async fn tokens_in(client: &Client, scopes: impl Iterator<Item = String>) -> Vec<String> {
    let mut tasks = JoinSet::new();
    for scope in scopes {
        tasks.spawn(get_token(client.clone(), scope));
    }
    join(tasks).await
}

async fn join<T: 'static>(mut tasks: JoinSet<T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(done) = tasks.join_next().await {
        out.push(done.expect("task panicked"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_provisioned_token_sees_provisioned_pending_insync_then_ends_ok() {
    let delay = Duration::from_millis(200);
    let server = TestServer::start(|c| c.propagation_delay = delay).await;
    let mut client = server.client().await;
    let token = get_token(client.clone(), String::new()).await;
    let mut stream = watch(&mut client, &token).await.expect("WatchToken");
    let first = next(&mut stream).await.expect("a first message");
    let revision = submit(client, token.clone()).await;

    let mut messages = vec![first];
    messages.extend(collect(stream).await);
    assert_sequence(&messages, &token, &FULL, revision);
    let pending_for = micros(&messages[2]) - micros(&messages[1]);
    assert!(
        pending_for >= 190_000,
        "INSYNC {pending_for} µs after PENDING"
    );
}

/// Standing alone with no delay, the commit of a change makes it INSYNC at
/// once; a watcher still sees PENDING before INSYNC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_insync_once_durable_still_shows_pending_to_watchers() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let token = get_token(client.clone(), String::new()).await;
    let mut stream = watch(&mut client, &token).await.expect("WatchToken");
    let first = next(&mut stream).await.expect("a first message");
    let revision = submit(client.clone(), token.clone()).await;
    assert_eq!(
        status_of(&mut client, &token).await,
        ChangeTokenStatus::Insync
    );

    let mut messages = vec![first];
    messages.extend(collect(stream).await);
    assert_sequence(&messages, &token, &FULL, revision);
    assert_eq!(micros(&messages[1]), micros(&messages[2]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_insync_token_sends_exactly_one_insync_then_ends_ok() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let token = get_token(client.clone(), "done".into()).await;
    let revision = submit(client.clone(), token.clone()).await;
    // A first watcher tells when the token is INSYNC.
    let earlier = collect(watch(&mut client, &token).await.expect("WatchToken")).await;
    let insync = earlier.last().expect("a message");
    assert_eq!(insync.change_token_status(), Insync, "{earlier:?}");
    assert_eq!(status_of(&mut client, &token).await, Insync);

    let messages = collect(watch(&mut client, &token).await.expect("WatchToken")).await;
    assert_sequence(&messages, &token, &[Insync], revision);
    assert_eq!(messages[0].changed_at, insync.changed_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_pending_token_starts_with_pending_at_its_revision() {
    let server = TestServer::start(|c| c.propagation_delay = Duration::from_secs(3600)).await;
    let mut client = server.client().await;
    let token = get_token(client.clone(), "pending".into()).await;
    let revision = submit(client.clone(), token.clone()).await;
    let mut stream = watch(&mut client, &token).await.expect("WatchToken");
    let first = next(&mut stream).await.expect("a first message");
    assert_sequence(&[first], &token, &[Pending], revision);
    assert_eq!(status_of(&mut client, &token).await, Pending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_watchers_of_one_token_over_ten_connections_all_see_every_state() {
    let server = TestServer::start(|_| {}).await;
    let clients = clients(&server, 10).await;
    let token = get_token(clients[0].clone(), "fan-out".into()).await;
    let pairs = (0..500).map(|i| (clients[i % 10].clone(), token.clone()));
    let watchers = finish_all(open_all(pairs.collect(), true).await);
    let revision = submit(clients[0].clone(), token.clone()).await;

    let seen = join(watchers).await;
    assert_eq!(seen.len(), 500);
    let times = |messages: &[WatchTokenResponse]| -> Vec<_> {
        messages.iter().map(|m| m.changed_at).collect()
    };
    for (_, messages) in &seen {
        assert_sequence(messages, &token, &FULL, revision);
        assert_eq!(
            times(messages),
            times(&seen[0].1),
            "watchers disagree on times"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_of_300_tokens_submitted_at_once_each_see_only_their_own_token() {
    let server = TestServer::start(|_| {}).await;
    let clients = clients(&server, 10).await;
    let tokens = tokens_in(&clients[0], (0..300).map(|i| format!("tenant-{i}/acl"))).await;
    assert_eq!(
        tokens.iter().collect::<HashSet<_>>().len(),
        300,
        "scopes share"
    );
    // One watcher per token, two for every other token: 450 streams.
    let conns = &clients;
    let pairs = tokens.iter().enumerate().flat_map(|(i, token)| {
        let copies = 1 + i % 2;
        (0..copies).map(move |c| (conns[(i + c) % 10].clone(), token.clone()))
    });
    let watchers = finish_all(open_all(pairs.collect(), true).await);
    let revisions = submit_all(&clients, &tokens).await;
    let distinct: HashSet<_> = revisions.values().collect();
    assert_eq!(distinct.len(), 300, "revisions are not distinct");

    let seen = join(watchers).await;
    assert_eq!(seen.len(), 450);
    let mut per_token = HashMap::<&str, usize>::new();
    for (token, messages) in &seen {
        assert_sequence(messages, token, &FULL, revisions[token]);
        *per_token.entry(token).or_default() += 1;
    }
    for (i, token) in tokens.iter().enumerate() {
        assert_eq!(per_token.get(token.as_str()), Some(&(1 + i % 2)), "{token}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_opened_while_submitting_sees_a_gapless_suffix_ending_in_insync() {
    let server = TestServer::start(|c| c.propagation_delay = Duration::from_millis(50)).await;
    let (watchers, submitters) = (clients(&server, 2).await, clients(&server, 2).await);
    let mut lanes = JoinSet::new();
    for lane in 0..8 {
        let (watcher, submitter) = (watchers[lane % 2].clone(), submitters[lane % 2].clone());
        lanes.spawn(async move {
            let mut first_states = Vec::new();
            for k in 0..25 {
                let token = get_token(submitter.clone(), format!("race-{lane}-{k}")).await;
                let (mut w, t) = (watcher.clone(), token.clone());
                // Jitter (not synchronisation): spread the watcher's start
                // over the few milliseconds the submit takes to commit.
                let jitter = Duration::from_micros(400 * k);
                let watched = tokio::spawn(async move {
                    tokio::time::sleep(jitter).await;
                    collect(watch(&mut w, &t).await.expect("WatchToken")).await
                });
                let submitted = tokio::spawn(submit(submitter.clone(), token.clone()));
                let revision = submitted.await.expect("submit task");
                let messages = watched.await.expect("watch task");
                let skipped = FULL.len().checked_sub(messages.len()).expect("too many");
                assert_sequence(&messages, &token, &FULL[skipped..], revision);
                first_states.push(messages[0].change_token_status());
            }
            first_states
        });
    }
    let firsts: Vec<_> = join(lanes).await.into_iter().flatten().collect();
    assert_eq!(firsts.len(), 200);
    let count = |s| firsts.iter().filter(|&&f| f == s).count();
    let counts = [count(Provisioned), count(Pending), count(Insync)];
    eprintln!("race: watchers first saw PROVISIONED/PENDING/INSYNC {counts:?} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_that_never_read_hold_up_nobody_and_lose_no_transition() {
    let server = TestServer::start(|c| c.propagation_delay = Duration::from_millis(20)).await;
    let (shared, idle_conn) = (server.client().await, server.client().await);
    let mut control = server.client().await;
    let slow = get_token(control.clone(), "slow".into()).await;
    // 50 streams not read until the end: half on a connection of their own,
    // half on the connection the reading watchers share.
    let conns = (0..50).map(|i| if i % 2 == 0 { &idle_conn } else { &shared });
    let idle = open_all(conns.map(|c| (c.clone(), slow.clone())).collect(), false).await;

    let started = Instant::now();
    let mut tokens = tokens_in(&control, (0..20).map(|i| format!("busy-{i}"))).await;
    tokens.push(slow.clone());
    let mut pairs: Vec<_> = tokens.iter().map(|t| (shared.clone(), t.clone())).collect();
    pairs.extend((0..5).map(|_| (shared.clone(), slow.clone())));
    let readers = finish_all(open_all(pairs, true).await);
    let revisions = submit_all(std::slice::from_ref(&control), &tokens).await;
    for token in &tokens {
        let status = status_of(&mut control, token).await;
        assert!(matches!(status, Pending | Insync), "{token} is {status:?}");
    }
    for (token, messages) in join(readers).await {
        assert_sequence(&messages, &token, &FULL, revisions[&token]);
    }
    let fresh = get_token(control.clone(), "after".into()).await;
    submit(control.clone(), fresh.clone()).await;
    assert_ne!(status_of(&mut control, &fresh).await, Provisioned);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} beside idle watchers"
    );

    let seen = join(finish_all(idle)).await;
    assert_eq!(seen.len(), 50);
    for (_, messages) in seen {
        assert_sequence(&messages, &slow, &FULL, revisions[&slow]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_unknown_token_is_not_found_and_of_malformed_token_invalid_argument() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let Err(status) = watch(&mut client, &unknown).await else {
        panic!("watching never-issued {unknown} succeeded");
    };
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(common::reason(&status), "CHANGE_TOKEN_NOT_FOUND");

    let issued = get_token(client.clone(), String::new()).await;
    for bad in [
        "not-a-token".to_owned(),
        String::new(),
        issued.to_uppercase(),
        issued.replace('-', ""),
        "abcd12f2-46da-1fdb-b8d5-fbd4c466928f".to_owned(),
    ] {
        let Err(status) = watch(&mut client, &bad).await else {
            panic!("watching malformed {bad:?} succeeded");
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
        assert_eq!(common::reason(&status), "INVALID_CHANGE_TOKEN", "{bad:?}");
        assert!(status.message().contains("UUID"), "{:?}", status.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_ends_open_watch_with_unavailable_shutting_down() {
    let server = TestServer::start(|c| {
        c.propagation_delay = Duration::from_secs(3600);
        c.shutdown_grace = Duration::from_secs(60);
    })
    .await;
    let mut client = server.client().await;
    let token = get_token(client.clone(), "stopping".into()).await;
    let revision = submit(client.clone(), token.clone()).await;
    let mut stream = watch(&mut client, &token).await.expect("WatchToken");
    let first = next(&mut stream).await.expect("a first message");
    assert_sequence(&[first], &token, &[Pending], revision);

    let stop = tokio::spawn(server.stop());
    let ended = timeout(BOUND, stream.message()).await;
    let ended = ended.expect("watch still open after shutdown");
    let status = ended.expect_err("watch ended OK at shutdown");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(common::reason(&status), "SHUTTING_DOWN");
    // The open watch did not hold the drain up until the 60 s grace ran out.
    let stopped = timeout(BOUND, stop).await.expect("server still stopping");
    stopped.expect("server stop panicked");
}

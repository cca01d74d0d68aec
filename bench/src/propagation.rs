//! Workload 4: propagation through a fleet.
//!
//! The service with `NODES` in-process Sync nodes, each on its own connection
//! and acknowledging every change as soon as it arrives; then `CHANGES` times,
//! one after another: GetChangeToken, open WatchToken, SubmitChange, and read
//! the stream until INSYNC. Measured: SubmitChange start → INSYNC message
//! received. Reference: the same with no node (standalone, propagation delay
//! 0), where INSYNC needs no acknowledgement. Rounds alternate between the two
//! setups; the percentiles are over every change of every round.

use std::time::{Duration, Instant};

use changetoken::proto::{
    ChangeTokenStatus, GetChangeTokenRequest, ListNodesRequest, SubmitChangeRequest, SyncAck,
    SyncHello, SyncRequest, WatchTokenRequest,
    change_token_service_client::ChangeTokenServiceClient,
    propagation_service_client::PropagationServiceClient, sync_request, sync_response,
};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::util::{Row, Server, connect, percentile, scratch_dir};

/// Fleet size.
const NODES: usize = 100;
/// Sequential changes per round.
const CHANGES: usize = 200;
/// Rounds of each setup, alternating.
const ROUNDS: usize = 3;
/// The longest one change may take to reach INSYNC before it counts as lost.
const CHANGE_DEADLINE: Duration = Duration::from_secs(10);
/// The longest the fleet may take to join.
const JOIN_DEADLINE: Duration = Duration::from_secs(30);

/// A fleet node: says hello as a new node, reports when welcomed, then
/// acknowledges each change on receipt until the stream ends.
async fn node(endpoint: String, id: String, welcomed: mpsc::Sender<()>) {
    let mut client = PropagationServiceClient::new(connect(&endpoint).await)
        .max_decoding_message_size(usize::MAX);
    let (out, rx) = mpsc::channel(16);
    let hello = SyncRequest {
        message: Some(sync_request::Message::Hello(SyncHello {
            node_id: id.clone(),
            applied_revision: None,
        })),
    };
    out.send(hello).await.expect("queue hello");
    let mut inbound = match client.sync(ReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            eprintln!("  node {id}: Sync refused: {status}");
            return;
        }
    };
    while let Ok(Some(message)) = inbound.message().await {
        match message.message {
            Some(sync_response::Message::Welcome(_)) => {
                let _ = welcomed.send(()).await;
            }
            Some(sync_response::Message::Change(change)) => {
                let ack = SyncRequest {
                    message: Some(sync_request::Message::Ack(SyncAck {
                        applied_revision: change.revision,
                    })),
                };
                if out.send(ack).await.is_err() {
                    return;
                }
            }
            None => {}
        }
    }
}

/// One change's timings, in ms from the SubmitChange call's start.
struct Timing {
    reply_ms: f64,
    insync_ms: f64,
}

/// GetChangeToken, WatchToken, SubmitChange, then the stream until INSYNC.
async fn one_change(
    client: &mut ChangeTokenServiceClient<Channel>,
    n: usize,
) -> Result<Timing, String> {
    let token = client
        .get_change_token(GetChangeTokenRequest {
            scope: "bench/propagation".into(),
        })
        .await
        .map_err(|s| format!("GetChangeToken: {s}"))?
        .into_inner()
        .change_token;
    let mut stream = client
        .watch_token(WatchTokenRequest {
            change_token: token.clone(),
        })
        .await
        .map_err(|s| format!("WatchToken: {s}"))?
        .into_inner();
    let first = stream.message().await.map_err(|s| format!("watch: {s}"))?;
    if first.map(|m| m.change_token_status()) != Some(ChangeTokenStatus::Provisioned) {
        return Err("the watch did not start at PROVISIONED".into());
    }
    let t0 = Instant::now();
    client
        .submit_change(SubmitChangeRequest {
            change_token: token,
            payload: format!("change {n}").into_bytes(),
            description: "propagation benchmark".into(),
        })
        .await
        .map_err(|s| format!("SubmitChange: {s}"))?;
    let reply_ms = t0.elapsed().as_secs_f64() * 1e3;
    let insync = async {
        while let Some(message) = stream.message().await.map_err(|s| format!("watch: {s}"))? {
            if message.change_token_status() == ChangeTokenStatus::Insync {
                return Ok(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        Err("the watch ended before INSYNC".to_owned())
    };
    let insync_ms = tokio::time::timeout(CHANGE_DEADLINE, insync)
        .await
        .map_err(|_| format!("no INSYNC within {CHANGE_DEADLINE:?}"))??;
    Ok(Timing {
        reply_ms,
        insync_ms,
    })
}

/// One round: a fresh service with `nodes` nodes, `CHANGES` changes.
async fn round(nodes: usize) -> (Vec<Timing>, usize) {
    let dir = scratch_dir("propagation");
    let server = Server::changetoken(&dir, &[]).await;
    let endpoint = server.endpoint();

    let mut fleet = JoinSet::new();
    let (welcomed, mut welcomes) = mpsc::channel(nodes.max(1));
    for i in 0..nodes {
        fleet.spawn(node(
            endpoint.clone(),
            format!("node-{i}"),
            welcomed.clone(),
        ));
    }
    let joined = tokio::time::timeout(JOIN_DEADLINE, async {
        for _ in 0..nodes {
            welcomes.recv().await;
        }
    })
    .await;
    assert!(
        joined.is_ok(),
        "the fleet did not join within {JOIN_DEADLINE:?}"
    );
    let listed = PropagationServiceClient::new(connect(&endpoint).await)
        .list_nodes(ListNodesRequest {})
        .await
        .expect("ListNodes")
        .into_inner();
    let connected = listed.nodes.iter().filter(|n| n.connected).count();
    assert_eq!(connected, nodes, "members connected");

    let mut client = ChangeTokenServiceClient::new(connect(&endpoint).await);
    let mut timings = Vec::with_capacity(CHANGES);
    let mut lost = 0;
    for n in 0..CHANGES {
        match one_change(&mut client, n).await {
            Ok(t) => timings.push(t),
            Err(err) => {
                lost += 1;
                eprintln!("  change {n}: {err}");
            }
        }
    }

    fleet.abort_all();
    while fleet.join_next().await.is_some() {}
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    (timings, lost)
}

struct Pooled {
    insync: Vec<f64>,
    reply: Vec<f64>,
    lost: usize,
}

fn pooled() -> Pooled {
    Pooled {
        insync: Vec::new(),
        reply: Vec::new(),
        lost: 0,
    }
}

fn report(label: &str, timings: &[Timing], lost: usize) {
    let mut insync: Vec<f64> = timings.iter().map(|t| t.insync_ms).collect();
    let mut reply: Vec<f64> = timings.iter().map(|t| t.reply_ms).collect();
    eprintln!(
        "  {label}: {} changes ({lost} lost): INSYNC p50 {:.1} p99 {:.1} max {:.1} ms; \
         reply p50 {:.1} ms",
        timings.len(),
        percentile(&mut insync, 50.0),
        percentile(&mut insync, 99.0),
        percentile(&mut insync, 100.0),
        percentile(&mut reply, 50.0),
    );
}

pub async fn run() -> Vec<Row> {
    let (mut fleet, mut alone) = (pooled(), pooled());
    for r in 1..=ROUNDS {
        for (nodes, into) in [(NODES, &mut fleet), (0, &mut alone)] {
            eprintln!("propagation: round {r} of {ROUNDS}, {nodes} nodes");
            let (timings, lost) = round(nodes).await;
            report(&format!("{nodes} nodes"), &timings, lost);
            into.insync.extend(timings.iter().map(|t| t.insync_ms));
            into.reply.extend(timings.iter().map(|t| t.reply_ms));
            into.lost += lost;
        }
    }
    let mut rows = Vec::new();
    for (workload, p, goal) in [
        (
            format!("propagation {NODES} nodes"),
            &mut fleet,
            "p99 < 20 ms",
        ),
        (
            "propagation 0 nodes (standalone, delay 0; reference)".to_owned(),
            &mut alone,
            "",
        ),
    ] {
        let count = p.insync.len();
        let lost = if p.lost > 0 {
            format!(" ({} lost)", p.lost)
        } else {
            String::new()
        };
        let ms = |v: f64| format!("{v:.1} ms{lost}");
        let what = format!("{count} sequential changes over {ROUNDS} runs");
        let none = || "none".to_owned();
        let stats = [
            ("p50", percentile(&mut p.insync, 50.0), ""),
            ("p99", percentile(&mut p.insync, 99.0), goal),
            ("max", percentile(&mut p.insync, 100.0), ""),
        ];
        for (name, value, goal) in stats {
            rows.push(Row::new(
                &workload,
                &format!("SubmitChange start → INSYNC message received, {name} ({what})"),
                ms(value),
                none(),
                String::new(),
                goal,
            ));
        }
        rows.push(Row::new(
            &workload,
            "of which SubmitChange reply (durable write), p50",
            ms(percentile(&mut p.reply, 50.0)),
            none(),
            String::new(),
            "",
        ));
    }
    rows
}

//! The fleet through in-process Sync clients: the INSYNC rule, membership,
//! protocol errors, and a hundred nodes.

use std::time::Duration;

use changetoken::proto::{
    Change, ChangeTokenStatus, GetChangeTokenRequest, GetChangeTokenStatusRequest,
    ListNodesRequest, ListNodesResponse, SubmitChangeRequest, SyncAck, SyncHello, SyncRequest,
    SyncResponse, SyncWelcome, propagation_service_client::PropagationServiceClient, sync_request,
    sync_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming, transport::Channel};

use crate::common::{
    Client, TestServer, config, data_dir, eventually, reason, status_of, wait_insync,
};

const WAIT: Duration = Duration::from_secs(20);

/// A fleet node speaking Sync directly.
struct TestNode {
    out: mpsc::Sender<SyncRequest>,
    inbound: Streaming<SyncResponse>,
    welcome: SyncWelcome,
}

async fn propagation(endpoint: &str) -> PropagationServiceClient<Channel> {
    let channel = Channel::from_shared(endpoint.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    PropagationServiceClient::new(channel)
}

async fn open(
    endpoint: &str,
    first: SyncRequest,
) -> Result<(mpsc::Sender<SyncRequest>, Streaming<SyncResponse>), Status> {
    let (out, rx) = mpsc::channel(16);
    out.send(first).await.unwrap();
    let inbound = propagation(endpoint)
        .await
        .sync(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((out, inbound))
}

fn hello(node: &str, applied: Option<u64>) -> SyncRequest {
    SyncRequest {
        message: Some(sync_request::Message::Hello(SyncHello {
            node_id: node.to_owned(),
            applied_revision: applied,
        })),
    }
}

fn ack(revision: u64) -> SyncRequest {
    SyncRequest {
        message: Some(sync_request::Message::Ack(SyncAck {
            applied_revision: revision,
        })),
    }
}

impl TestNode {
    async fn join(endpoint: &str, node: &str, applied: Option<u64>) -> Result<TestNode, Status> {
        let (out, mut inbound) = open(endpoint, hello(node, applied)).await?;
        let first = tokio::time::timeout(WAIT, inbound.message())
            .await
            .expect("no welcome")?;
        let Some(SyncResponse {
            message: Some(sync_response::Message::Welcome(welcome)),
        }) = first
        else {
            panic!("expected a welcome, got {first:?}");
        };
        Ok(TestNode {
            out,
            inbound,
            welcome,
        })
    }

    async fn next(&mut self) -> Result<Option<Change>, Status> {
        let message = tokio::time::timeout(WAIT, self.inbound.message())
            .await
            .expect("no change")?;
        Ok(message.map(|m| match m.message {
            Some(sync_response::Message::Change(change)) => change,
            other => panic!("expected a change, got {other:?}"),
        }))
    }

    async fn change(&mut self) -> Change {
        self.next().await.expect("sync failed").expect("sync ended")
    }

    async fn ack(&self, revision: u64) {
        self.out.send(ack(revision)).await.expect("sync closed");
    }
}

async fn submit(client: &mut Client, scope: &str, payload: &[u8]) -> (String, u64) {
    let request = GetChangeTokenRequest {
        scope: scope.to_owned(),
    };
    let token = client
        .get_change_token(request)
        .await
        .unwrap()
        .into_inner()
        .change_token;
    let request = SubmitChangeRequest {
        change_token: token.clone(),
        payload: payload.to_vec(),
        description: format!("{scope} change"),
    };
    let revision = client
        .submit_change(request)
        .await
        .unwrap()
        .into_inner()
        .revision;
    (token, revision)
}

async fn nodes(endpoint: &str) -> ListNodesResponse {
    propagation(endpoint)
        .await
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_stays_pending_until_the_last_member_acknowledged_it() {
    let server = TestServer::start(|_| {}).await;
    let endpoint = server.endpoint();
    let mut client = server.client().await;
    let mut fleet = Vec::new();
    for id in ["a", "b", "c"] {
        fleet.push(TestNode::join(&endpoint, id, None).await.unwrap());
    }
    let (token, revision) = submit(&mut client, "web", b"rules").await;
    for node in &mut fleet {
        let change = node.change().await;
        assert_eq!(
            (change.revision, change.change_token.as_str()),
            (revision, token.as_str())
        );
        assert_eq!(change.payload, b"rules");
        assert_eq!(change.description, "web change");
        assert!(change.submitted_at.is_some());
    }
    fleet[0].ack(revision).await;
    fleet[1].ack(revision).await;
    let listed = eventually(WAIT, "two acknowledgements", || async {
        let view = nodes(&endpoint).await;
        (view
            .nodes
            .iter()
            .filter(|n| n.acked_revision == revision)
            .count()
            == 2)
            .then_some(view)
    })
    .await;
    assert_eq!(listed.head_revision, revision);
    assert_eq!(
        status_of(&mut client, &token).await,
        ChangeTokenStatus::Pending
    );
    let lagging = listed.nodes.iter().find(|n| n.node_id == "c").unwrap();
    assert_eq!((lagging.lag, lagging.connected), (1, true));

    fleet[2].ack(revision).await;
    wait_insync(&client, &token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_starts_at_the_head_and_a_returning_node_resumes_in_order() {
    let server = TestServer::start(|c| c.member_timeout = Duration::from_secs(60)).await;
    let endpoint = server.endpoint();
    let mut client = server.client().await;
    let (_, before) = submit(&mut client, "early", b"0").await;

    let mut node = TestNode::join(&endpoint, "n", None).await.unwrap();
    assert_eq!(
        node.welcome.start_revision, before,
        "a new node starts at the head"
    );
    let (_, first) = submit(&mut client, "x", b"1").await;
    assert_eq!(
        node.change().await.revision,
        first,
        "changes before the join were sent"
    );
    node.ack(first).await;
    drop(node);

    let mut missed = Vec::new();
    for n in 0..5 {
        missed.push(submit(&mut client, &format!("s{n}"), b"m").await);
    }
    let mut node = TestNode::join(&endpoint, "n", Some(first)).await.unwrap();
    assert_eq!(node.welcome.start_revision, first);
    for (token, revision) in &missed {
        let change = node.change().await;
        assert_eq!((&change.change_token, change.revision), (token, *revision));
        node.ack(change.revision).await;
    }
    for (token, _) in &missed {
        wait_insync(&client, token).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_that_do_not_fit_the_log_are_refused_with_what_to_do() {
    let server = TestServer::start(|c| c.retention = Duration::from_millis(100)).await;
    let endpoint = server.endpoint();
    let mut client = server.client().await;
    let (token, head) = submit(&mut client, "x", b"p").await;

    let err = TestNode::join(&endpoint, "ahead", Some(head + 5))
        .await
        .err()
        .unwrap();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "NODE_AHEAD_OF_LOG")
    );
    assert!(
        err.message().contains("reset the node's state"),
        "{}",
        err.message()
    );

    // Once retention deleted revision 1, a node that applied nothing cannot catch up.
    let check = client.clone();
    eventually(WAIT, "retention", || {
        let mut client = check.clone();
        let token = token.clone();
        async move {
            let request = GetChangeTokenStatusRequest {
                change_token: token,
            };
            client
                .get_change_token_status(request)
                .await
                .err()
                .map(drop)
        }
    })
    .await;
    submit(&mut client, "y", b"q").await;
    let err = TestNode::join(&endpoint, "behind", Some(0))
        .await
        .err()
        .unwrap();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "NODE_BEHIND_LOG")
    );

    let err = TestNode::join(&endpoint, "bad id!", None)
        .await
        .err()
        .unwrap();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "INVALID_NODE_ID")
    );
    let err = open(&endpoint, ack(1)).await.err().unwrap();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "SYNC_PROTOCOL")
    );

    let mut node = TestNode::join(&endpoint, "greedy", None).await.unwrap();
    node.ack(node.welcome.start_revision + 1).await;
    let err = node
        .next()
        .await
        .expect_err("acknowledging an unsent revision must fail");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "SYNC_PROTOCOL")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_id_replaces_the_first() {
    let server = TestServer::start(|_| {}).await;
    let endpoint = server.endpoint();
    let mut first = TestNode::join(&endpoint, "twin", None).await.unwrap();
    let _second = TestNode::join(&endpoint, "twin", None).await.unwrap();
    let err = first
        .next()
        .await
        .expect_err("the replaced stream must end");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Aborted, "NODE_REPLACED")
    );
    let view = nodes(&endpoint).await;
    assert_eq!(view.nodes.len(), 1);
    assert!(
        view.nodes[0].connected,
        "the newer connection is the member"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_member_blocks_until_the_member_timeout_then_is_dropped() {
    let server = TestServer::start(|c| c.member_timeout = Duration::from_millis(700)).await;
    let endpoint = server.endpoint();
    let mut client = server.client().await;
    let node = TestNode::join(&endpoint, "dies", None).await.unwrap();
    drop(node);
    let (token, _) = submit(&mut client, "x", b"p").await;
    let view = eventually(WAIT, "the node to be seen disconnected", || async {
        let view = nodes(&endpoint).await;
        view.nodes
            .first()
            .filter(|n| !n.connected)
            .map(|_| view.clone())
    })
    .await;
    assert!(view.nodes[0].disconnected_since.is_some());
    assert_eq!(
        status_of(&mut client, &token).await,
        ChangeTokenStatus::Pending
    );
    wait_insync(&client, &token).await;
    assert!(
        nodes(&endpoint).await.nodes.is_empty(),
        "the member was not dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_change_is_insync_while_fewer_than_the_minimum_acknowledged_it() {
    let server = TestServer::start(|c| c.min_fleet_size = 2).await;
    let endpoint = server.endpoint();
    let mut client = server.client().await;
    let (token, revision) = submit(&mut client, "x", b"p").await;
    let mut one = TestNode::join(&endpoint, "one", Some(0)).await.unwrap();
    assert_eq!(one.change().await.revision, revision);
    one.ack(revision).await;
    eventually(WAIT, "the acknowledgement", || async {
        (nodes(&endpoint).await.nodes[0].acked_revision == revision).then_some(())
    })
    .await;
    assert_eq!(
        status_of(&mut client, &token).await,
        ChangeTokenStatus::Pending
    );

    let mut two = TestNode::join(&endpoint, "two", Some(0)).await.unwrap();
    assert_eq!(two.change().await.revision, revision);
    assert_eq!(
        status_of(&mut client, &token).await,
        ChangeTokenStatus::Pending
    );
    two.ack(revision).await;
    wait_insync(&client, &token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_and_their_progress_survive_a_restart_of_the_service() {
    let (_keep, dir) = data_dir();
    let start = || {
        let mut config = config(&dir);
        config.member_timeout = Duration::from_secs(60);
        TestServer::start_with(config)
    };
    let server = start().await;
    let mut client = server.client().await;
    let mut node = TestNode::join(&server.endpoint(), "keeper", None)
        .await
        .unwrap();
    let (first, revision) = submit(&mut client, "x", b"1").await;
    assert_eq!(node.change().await.revision, revision);
    node.ack(revision).await;
    wait_insync(&client, &first).await;
    drop((node, client));
    server.stop().await;

    let server = start().await;
    let endpoint = server.endpoint();
    let mut client = server.client().await;
    let view = nodes(&endpoint).await;
    assert_eq!(view.nodes.len(), 1, "the member was forgotten");
    assert_eq!(
        (view.nodes[0].acked_revision, view.nodes[0].connected),
        (revision, false)
    );
    let (second, next) = submit(&mut client, "x", b"2").await;
    assert_eq!(
        status_of(&mut client, &second).await,
        ChangeTokenStatus::Pending
    );
    let mut node = TestNode::join(&endpoint, "keeper", Some(revision))
        .await
        .unwrap();
    assert_eq!(node.change().await.revision, next);
    node.ack(next).await;
    wait_insync(&client, &second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_nodes_see_every_change_once_in_order_and_every_change_reaches_insync() {
    let server = TestServer::start(|_| {}).await;
    let endpoint = server.endpoint();
    let changes = 40;
    let mut tasks = tokio::task::JoinSet::new();
    let (ready_tx, mut ready) = mpsc::channel(100);
    for n in 0..100 {
        let (endpoint, ready_tx) = (endpoint.clone(), ready_tx.clone());
        tasks.spawn(async move {
            let mut node = TestNode::join(&endpoint, &format!("node-{n}"), None)
                .await
                .unwrap();
            ready_tx.send(()).await.unwrap();
            let mut seen = Vec::new();
            while seen.len() < changes {
                let change = node.change().await;
                seen.push(change.revision);
                node.ack(change.revision).await;
            }
            // The node stays connected: a member that left would block INSYNC.
            (seen, node)
        });
    }
    for _ in 0..100 {
        ready.recv().await.unwrap();
    }
    let mut client = server.client().await;
    let mut submitted = Vec::new();
    for n in 0..changes {
        submitted.push(submit(&mut client, &format!("s{}", n % 7), &[n as u8]).await);
    }
    let revisions: Vec<u64> = submitted.iter().map(|(_, r)| *r).collect();
    let mut fleet = Vec::new();
    for (seen, node) in tasks.join_all().await {
        assert_eq!(
            seen, revisions,
            "a node missed, repeated or reordered a change"
        );
        fleet.push(node);
    }
    for (token, _) in &submitted {
        wait_insync(&client, token).await;
    }
    let view = nodes(&endpoint).await;
    assert_eq!(view.nodes.len(), 100);
    assert!(view.nodes.iter().all(|n| n.connected && n.lag == 0));
    drop(fleet);
}

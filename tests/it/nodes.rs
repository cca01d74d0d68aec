//! Real `changetoken node` processes against the real `changetoken serve`
//! binary: failing commands, SIGKILLed nodes, a SIGKILLed service.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use changetoken::proto::{
    ChangeTokenStatus, GetChangeTokenRequest, ListNodesRequest, SubmitChangeRequest,
    propagation_service_client::PropagationServiceClient,
};
use tokio::process::{Child, Command};

use crate::common::{BIN, Client, Process, connect, eventually, status_of, wait_insync};

const WAIT: Duration = Duration::from_secs(30);

/// A `changetoken node` whose command appends `REVISION PAYLOAD` lines to
/// `<dir>/<id>.applied`, and fails while `<dir>/<id>.broken` exists.
struct Node {
    child: Child,
}

impl Node {
    fn start(endpoint: &str, dir: &Path, id: &str) -> Node {
        let applied = dir.join(format!("{id}.applied"));
        let broken = dir.join(format!("{id}.broken"));
        let exec = format!(
            "test ! -e '{}' && echo \"$CHANGETOKEN_REVISION $(cat)\" >> '{}'",
            broken.display(),
            applied.display()
        );
        let child = Command::new(BIN)
            .args(["node", "--endpoint", endpoint, "--id", id, "--exec", &exec])
            .arg("--state-file")
            .arg(dir.join(format!("{id}.state")))
            .env("CHANGETOKEN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn changetoken node");
        Node { child }
    }

    async fn kill(mut self) {
        self.child.kill().await.expect("kill node");
    }
}

/// The `(revision, payload)` lines a node's command recorded, in order.
fn applied(dir: &Path, id: &str) -> Vec<(u64, String)> {
    let text = std::fs::read_to_string(dir.join(format!("{id}.applied"))).unwrap_or_default();
    text.lines()
        .map(|line| {
            let (revision, payload) = line.split_once(' ').expect("REVISION PAYLOAD");
            (revision.parse().expect("revision"), payload.to_owned())
        })
        .collect()
}

async fn submit(client: &mut Client, payload: &str) -> Result<(String, u64), tonic::Status> {
    let request = GetChangeTokenRequest {
        scope: "fleet".into(),
    };
    let token = client
        .get_change_token(request)
        .await?
        .into_inner()
        .change_token;
    let request = SubmitChangeRequest {
        change_token: token.clone(),
        payload: payload.as_bytes().to_vec(),
        description: String::new(),
    };
    let revision = client.submit_change(request).await?.into_inner().revision;
    Ok((token, revision))
}

/// The members of the fleet, as ListNodes reports them.
async fn list_nodes(endpoint: &str) -> Vec<changetoken::proto::Node> {
    let channel = tonic::transport::Channel::from_shared(endpoint.to_owned()).unwrap();
    let mut client = PropagationServiceClient::new(channel.connect().await.unwrap());
    let response = client.list_nodes(ListNodesRequest {}).await.unwrap();
    response.into_inner().nodes
}

async fn members(endpoint: &str) -> Vec<(String, bool)> {
    let nodes = list_nodes(endpoint).await;
    nodes
        .into_iter()
        .map(|n| (n.node_id, n.connected))
        .collect()
}

async fn acked(endpoint: &str, id: &str) -> u64 {
    let nodes = list_nodes(endpoint).await;
    nodes
        .iter()
        .find(|n| n.node_id == id)
        .map_or(0, |n| n.acked_revision)
}

async fn wait_members(endpoint: &str, want: usize) {
    eventually(WAIT, "nodes to connect", || async {
        let listed = members(endpoint).await;
        (listed.len() == want && listed.iter().all(|(_, connected)| *connected)).then_some(())
    })
    .await;
}

fn workdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_owned();
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_pending_until_the_last_node_applied_it_and_a_failing_node_recovers() {
    let (_keep, dir) = workdir();
    let service = Process::serve(&dir.join("data"), &[]).await;
    let endpoint = service.endpoint();
    std::fs::write(dir.join("c.broken"), "").unwrap();
    let _nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|id| Node::start(&endpoint, &dir, id))
        .collect();
    wait_members(&endpoint, 3).await;

    let mut client = connect(&endpoint).await;
    let (token, revision) = submit(&mut client, "first").await.unwrap();
    eventually(WAIT, "a and b to apply", || async {
        let done = |id| applied(&dir, id) == vec![(revision, "first".to_owned())];
        (done("a") && done("b")).then_some(())
    })
    .await;
    assert_eq!(
        status_of(&mut client, &token).await,
        ChangeTokenStatus::Pending
    );
    assert!(applied(&dir, "c").is_empty());

    std::fs::remove_file(dir.join("c.broken")).unwrap();
    wait_insync(&client, &token).await;
    assert_eq!(applied(&dir, "c"), vec![(revision, "first".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_dropped_after_the_member_timeout_and_resumes_without_gaps() {
    let (_keep, dir) = workdir();
    let service = Process::serve(&dir.join("data"), &["--member-timeout", "1500ms"]).await;
    let endpoint = service.endpoint();
    let _a = Node::start(&endpoint, &dir, "a");
    let b = Node::start(&endpoint, &dir, "b");
    wait_members(&endpoint, 2).await;
    let mut client = connect(&endpoint).await;
    let mut expected = Vec::new();
    for n in 0..3 {
        let (token, revision) = submit(&mut client, &format!("before-{n}")).await.unwrap();
        wait_insync(&client, &token).await;
        expected.push((revision, format!("before-{n}")));
    }
    assert_eq!(applied(&dir, "b"), expected);

    b.kill().await;
    let (token, revision) = submit(&mut client, "while-dead").await.unwrap();
    expected.push((revision, "while-dead".to_owned()));
    assert_eq!(
        status_of(&mut client, &token).await,
        ChangeTokenStatus::Pending
    );
    wait_insync(&client, &token).await;
    assert_eq!(
        members(&endpoint).await.len(),
        1,
        "the dead node was not dropped"
    );

    let _b = Node::start(&endpoint, &dir, "b");
    eventually(WAIT, "b to catch up", || async {
        (applied(&dir, "b").len() == expected.len()).then_some(())
    })
    .await;
    assert_eq!(
        applied(&dir, "b"),
        expected,
        "b re-applied or skipped a change"
    );
    wait_members(&endpoint, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resumes_from_its_state_without_reapplying_or_skipping() {
    let (_keep, dir) = workdir();
    let service = Process::serve(&dir.join("data"), &["--member-timeout", "60s"]).await;
    let endpoint = service.endpoint();
    let mut node = Node::start(&endpoint, &dir, "n");
    wait_members(&endpoint, 1).await;
    let mut client = connect(&endpoint).await;
    let mut tokens = Vec::new();
    for round in 0..4 {
        for n in 0..5 {
            tokens.push(submit(&mut client, &format!("r{round}-{n}")).await.unwrap());
        }
        if round == 1 {
            // Killed once the service has its acknowledgement, so the state
            // file is written: the command is not re-run (see the README for
            // the window between the command's exit and the state write).
            let last = tokens.last().unwrap().1;
            eventually(WAIT, "the acknowledgement", || async {
                (acked(&endpoint, "n").await >= last).then_some(())
            })
            .await;
            node.kill().await;
            node = Node::start(&endpoint, &dir, "n");
        }
    }
    for (token, _) in &tokens {
        wait_insync(&client, token).await;
    }
    let revisions: Vec<u64> = applied(&dir, "n").iter().map(|(r, _)| *r).collect();
    let submitted: Vec<u64> = tokens.iter().map(|(_, r)| *r).collect();
    assert_eq!(
        revisions, submitted,
        "the node re-applied or skipped a change"
    );
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_killed_while_nodes_run_loses_nothing() {
    let (_keep, dir) = workdir();
    let data = dir.join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let flags = ["--member-timeout", "60s"];
    let mut service = Process::serve_on(&listen, &data, &flags).await;
    let endpoint = service.endpoint();
    let _nodes: Vec<Node> = ["a", "b"]
        .iter()
        .map(|id| Node::start(&endpoint, &dir, id))
        .collect();
    wait_members(&endpoint, 2).await;

    let mut acknowledged = Vec::new();
    for kill in 0..3 {
        let mut client = connect(&endpoint).await;
        let load = tokio::spawn(async move {
            let mut told = Vec::new();
            for n in 0.. {
                match submit(&mut client, &format!("k{kill}-{n}")).await {
                    Ok(submitted) => told.push(submitted),
                    Err(_) => break,
                }
            }
            told
        });
        tokio::time::sleep(Duration::from_millis(300 + 200 * kill)).await;
        service.kill().await;
        acknowledged.extend(load.await.unwrap());
        service = Process::serve_on(&listen, &data, &flags).await;
    }
    assert!(acknowledged.len() > 10, "too few writes to mean anything");
    let client = connect(&endpoint).await;
    for (token, _) in &acknowledged {
        wait_insync(&client, token).await;
    }
    let told: Vec<u64> = acknowledged.iter().map(|(_, r)| *r).collect();
    for id in ["a", "b"] {
        let revisions: Vec<u64> = applied(&dir, id).iter().map(|(r, _)| *r).collect();
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "{id} re-applied or reordered"
        );
        for revision in &told {
            assert!(
                revisions.contains(revision),
                "{id} never applied revision {revision}"
            );
        }
    }
    eprintln!(
        "fleet restart: 3 service kills, {} acknowledged changes applied by 2 nodes",
        told.len()
    );
}

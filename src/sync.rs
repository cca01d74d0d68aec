//! `PropagationService`: the Sync streams of fleet nodes and `ListNodes`.
//!
//! A Sync stream is two halves. The inbound half runs in its own task and
//! turns the node's acknowledgements into worker events; when it ends, the node
//! is disconnected. The outbound half reads the change log from the store a
//! page at a time and is polled only as fast as the transport can send, so a
//! slow node holds at most one page ([`PAGE_CHANGES`] changes or
//! [`PAGE_BYTES`] of payload) plus the HTTP/2 window, never the backlog.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{Stream, stream};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{
    error::ApiError,
    fleet::parse_node_id,
    propagation::Propagation,
    proto::{
        Change as ProtoChange, ListNodesRequest, ListNodesResponse, Node, SyncRequest,
        SyncResponse, SyncWelcome, propagation_service_server::PropagationService, sync_request,
        sync_response,
    },
    store::{Change, Store},
    watch::timestamp,
};

/// The most changes read from the store at once for one node.
pub const PAGE_CHANGES: usize = 64;
/// The payload bytes after which a page is cut.
pub const PAGE_BYTES: usize = 1 << 20;
/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// The response stream of `Sync`.
pub type SyncStream = Pin<Box<dyn Stream<Item = Result<SyncResponse, Status>> + Send>>;

/// The service's shared state. Cheap to clone.
#[derive(Clone)]
pub struct FleetService {
    store: Store,
    propagation: Propagation,
    shutdown: CancellationToken,
    connections: Arc<AtomicU64>,
}

impl FleetService {
    /// Builds the service over its collaborators.
    pub fn new(store: Store, propagation: Propagation, shutdown: CancellationToken) -> Self {
        FleetService {
            store,
            propagation,
            shutdown,
            connections: Arc::default(),
        }
    }

    /// Validates the hello against the log and returns the revision the node
    /// starts after.
    async fn admit(&self, node: &str, applied: Option<u64>) -> Result<u64, ApiError> {
        let head = self.store.head().await?;
        let Some(applied) = applied else {
            return Ok(head);
        };
        if applied > head {
            return Err(ApiError::NodeAheadOfLog {
                node: node.to_owned(),
                applied,
                head,
            });
        }
        if applied < head {
            let next = self.store.changes_after(applied, 1, 0).await?;
            if next.first().map(|(revision, _)| *revision) != Some(applied + 1) {
                return Err(ApiError::NodeBehindLog {
                    node: node.to_owned(),
                    applied,
                });
            }
        }
        Ok(applied)
    }
}

#[tonic::async_trait]
impl PropagationService for FleetService {
    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<Streaming<SyncRequest>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| ApiError::SyncProtocol("no hello within 30 s".into()))??;
        let Some(SyncRequest {
            message: Some(sync_request::Message::Hello(hello)),
        }) = first
        else {
            return Err(ApiError::SyncProtocol("the first message must be hello".into()).into());
        };
        let node = parse_node_id(&hello.node_id).map_err(ApiError::from)?;
        let start = self.admit(&node, hello.applied_revision).await?;
        let head_changes = self.propagation.head_changes();
        let head = self.store.head().await.map_err(ApiError::from)?;

        let connection = self.connections.fetch_add(1, Ordering::Relaxed);
        let replaced = CancellationToken::new();
        self.propagation
            .join(node.clone(), start, connection, replaced.clone())
            .await?;

        let sent = Arc::new(AtomicU64::new(start));
        let (violation_tx, violation) = oneshot::channel();
        let reader = AckReader {
            propagation: self.propagation.clone(),
            node: node.clone(),
            connection,
            sent: sent.clone(),
        };
        let span = tracing::info_span!("sync", node = %node, connection);
        tokio::spawn(
            reader
                .run(inbound, replaced.clone(), violation_tx)
                .instrument(span),
        );

        let welcome = SyncResponse {
            message: Some(sync_response::Message::Welcome(SyncWelcome {
                start_revision: start,
                head_revision: head.max(start),
            })),
        };
        let sender = Sender {
            store: self.store.clone(),
            node,
            cursor: start,
            sent,
            page: VecDeque::from([welcome]),
            head_changes,
            replaced,
            violation,
            shutdown: self.shutdown.clone(),
            done: false,
        };
        Ok(Response::new(Box::pin(stream::unfold(
            sender,
            Sender::next,
        ))))
    }

    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let view = self.propagation.fleet().await?;
        let nodes = view
            .nodes
            .into_iter()
            .map(|n| Node {
                lag: view.head.saturating_sub(n.acked),
                node_id: n.node,
                acked_revision: n.acked,
                connected: n.connected,
                disconnected_since: n.disconnected_since.map(timestamp),
            })
            .collect();
        Ok(Response::new(ListNodesResponse {
            nodes,
            head_revision: view.head,
        }))
    }
}

/// The inbound half of a Sync stream.
struct AckReader {
    propagation: Propagation,
    node: String,
    connection: u64,
    sent: Arc<AtomicU64>,
}

impl AckReader {
    async fn run(
        self,
        mut inbound: Streaming<SyncRequest>,
        replaced: CancellationToken,
        violation: oneshot::Sender<ApiError>,
    ) {
        loop {
            let message = tokio::select! {
                _ = replaced.cancelled() => break,
                message = inbound.message() => message,
            };
            match message {
                Ok(Some(SyncRequest {
                    message: Some(sync_request::Message::Ack(ack)),
                })) => {
                    let sent = self.sent.load(Ordering::Acquire);
                    if ack.applied_revision > sent {
                        let _ = violation.send(ApiError::SyncProtocol(format!(
                            "acknowledged revision {} but only {sent} was sent",
                            ack.applied_revision
                        )));
                        break;
                    }
                    self.propagation
                        .ack(&self.node, self.connection, ack.applied_revision);
                }
                Ok(Some(_)) => {
                    let message = "after hello, every message must be ack".to_owned();
                    let _ = violation.send(ApiError::SyncProtocol(message));
                    break;
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(%status, "sync stream failed");
                    break;
                }
            }
        }
        self.propagation.left(&self.node, self.connection);
    }
}

/// The outbound half of a Sync stream.
struct Sender {
    store: Store,
    node: String,
    /// The last revision read from the store.
    cursor: u64,
    /// The last revision handed to the transport, shared with the reader.
    sent: Arc<AtomicU64>,
    page: VecDeque<SyncResponse>,
    head_changes: watch::Receiver<u64>,
    replaced: CancellationToken,
    violation: oneshot::Receiver<ApiError>,
    shutdown: CancellationToken,
    done: bool,
}

impl Sender {
    async fn next(mut self) -> Option<(Result<SyncResponse, Status>, Self)> {
        loop {
            if self.done {
                return None;
            }
            if self.shutdown.is_cancelled() {
                return self.end(ApiError::ShuttingDown);
            }
            if self.replaced.is_cancelled() {
                let node = self.node.clone();
                return self.end(ApiError::NodeReplaced(node));
            }
            match self.violation.try_recv() {
                Ok(err) => return self.end(err),
                Err(oneshot::error::TryRecvError::Closed) => return None,
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            if let Some(message) = self.page.pop_front() {
                if let Some(sync_response::Message::Change(change)) = &message.message {
                    self.sent.store(change.revision, Ordering::Release);
                }
                return Some((Ok(message), self));
            }
            // Marking the head as seen before reading the log means a change
            // committed after the read always wakes the wait below.
            self.head_changes.borrow_and_update();
            let page = match self
                .store
                .changes_after(self.cursor, PAGE_CHANGES, PAGE_BYTES)
                .await
            {
                Ok(page) => page,
                Err(err) => return self.end(err.into()),
            };
            if !page.is_empty() {
                for (revision, change) in page {
                    self.cursor = revision;
                    self.page.push_back(change_message(revision, change));
                }
                continue;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return self.end(ApiError::ShuttingDown),
                _ = self.replaced.cancelled() => {
                    let node = self.node.clone();
                    return self.end(ApiError::NodeReplaced(node));
                }
                violation = &mut self.violation => match violation {
                    Ok(err) => return self.end(err),
                    // The node closed its half: it is gone.
                    Err(_) => return None,
                },
                changed = self.head_changes.changed() => {
                    if changed.is_err() {
                        return self.end(ApiError::ShuttingDown);
                    }
                }
            }
        }
    }

    fn end(mut self, err: ApiError) -> Option<(Result<SyncResponse, Status>, Self)> {
        self.done = true;
        Some((Err(err.into()), self))
    }
}

fn change_message(revision: u64, change: Change) -> SyncResponse {
    SyncResponse {
        message: Some(sync_response::Message::Change(ProtoChange {
            change_token: change.token.to_string(),
            revision,
            payload: change.payload,
            description: change.description,
            submitted_at: Some(timestamp(change.submitted_at)),
        })),
    }
}

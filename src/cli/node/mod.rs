//! `changetoken node`: a fleet agent. It follows the change log over `Sync`, runs
//! the operator's command (`sh -c CMD`, payload on stdin) once per change, and
//! acknowledges a change only once the command exited 0 and the state file
//! records it.
//!
//! Invariants:
//! - Changes are applied one at a time, in increasing revision order, and none is
//!   ever skipped. A command that fails is run again for the same change, with
//!   backoff, until it succeeds: the node never moves past a failed change.
//! - The state file holds the highest applied revision as decimal text. It is
//!   replaced atomically and durably (a temporary file in the same directory,
//!   fsync, rename over, fsync of the directory) before the change is
//!   acknowledged, so an acknowledgement never runs ahead of the state file, and
//!   after any restart the node resumes from the revision the file holds.
//! - No state file means a new node: it starts at the head of the log, and the
//!   welcome's start revision is recorded before anything is applied. A state
//!   file that cannot be read or parsed stops the node; it never starts over.
//! - Delivery is at least once. There is one window where a change is applied
//!   twice: if the node is killed after the command exited 0 (or while it runs)
//!   but before the state file was renamed over, the change is applied again on
//!   restart. Commands should therefore be idempotent. A change is never skipped.
//! - Lost connections and service restarts are retried with backoff. Refusals
//!   that a retry cannot fix (the state does not fit the log, an invalid node id,
//!   another process took over the node id) end the command with the service's
//!   message.
//! - On SIGINT or SIGTERM a running command is left to finish, and is recorded
//!   and acknowledged if it succeeded; then the node exits 0. A second signal
//!   exits at once.

use std::{
    io::{self, Write},
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use tokio::{sync::mpsc, time::sleep};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    logging::{self, LogFormat},
    proto::{
        Change, SyncAck, SyncHello, SyncRequest, SyncResponse, SyncWelcome,
        propagation_service_client::PropagationServiceClient, sync_request, sync_response,
    },
};

mod state;

use state::{default_state_file, read_state, write_state};

use super::client::{CliError, Exit, Result, channel};

/// The first pause before a retry, doubled after each failure.
const FIRST_RETRY: Duration = Duration::from_millis(200);
/// The longest pause between two reconnection attempts.
const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(5);
/// The longest pause between two runs of a failing command.
const MAX_APPLY_PAUSE: Duration = Duration::from_secs(10);
/// How long a stopping node waits for the service to end the stream, so its
/// last acknowledgement is delivered.
const STOP_DRAIN: Duration = Duration::from_secs(1);
/// Outbound messages buffered on the Sync stream.
const OUTBOUND_BUFFER: usize = 16;
/// The `ErrorInfo` reason of a stream taken over by another process.
const NODE_REPLACED: &str = "NODE_REPLACED";

/// `node`: follows the change log until SIGINT or SIGTERM, or until the service
/// refuses the node for a reason a retry cannot fix.
pub async fn run(endpoint: &str, id: String, exec: String, state_file: Option<PathBuf>) -> Result {
    logging::init(LogFormat::Text, "info");
    let id = crate::fleet::parse_node_id(&id).map_err(|err| CliError {
        exit: Exit::Usage,
        message: err.to_string(),
    })?;
    let state_file = state_file.unwrap_or_else(|| default_state_file(&id));
    let applied = read_state(&state_file)?;
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone())?;
    let span = info_span!("node", node_id = %id);
    let mut agent = Agent {
        endpoint,
        id,
        exec,
        state_file,
        applied,
        shutdown,
    };
    agent.run().instrument(span).await
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM; exits on the second.
fn watch_signals(shutdown: CancellationToken) -> Result {
    use tokio::signal::unix::{SignalKind, signal};
    let install = |kind| {
        signal(kind).map_err(|err| CliError {
            exit: Exit::Failure,
            message: format!("cannot install the signal handlers: {err}"),
        })
    };
    let mut interrupt = install(SignalKind::interrupt())?;
    let mut terminate = install(SignalKind::terminate())?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            if shutdown.is_cancelled() {
                warn!(
                    signal = name,
                    "second signal; exiting without waiting for the command"
                );
                std::process::exit(130);
            }
            info!(
                signal = name,
                "signal received; stopping after the current change"
            );
            shutdown.cancel();
        }
    });
    Ok(())
}

/// How a Sync stream ended without a fatal error.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// A signal asked the node to stop.
    Stopped,
    /// The stream broke or the service went away; reconnect.
    Lost(String),
}

struct Agent<'a> {
    endpoint: &'a str,
    id: String,
    exec: String,
    state_file: PathBuf,
    /// The highest applied revision; `None` until a new node is welcomed.
    applied: Option<u64>,
    shutdown: CancellationToken,
}

impl Agent<'_> {
    /// Runs Sync streams one after the other until a stop or a fatal error.
    async fn run(&mut self) -> Result {
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RECONNECT_PAUSE);
        loop {
            let reason = match self.session(&mut backoff).await? {
                End::Stopped => return Ok(()),
                End::Lost(reason) => reason,
            };
            let pause = backoff.next();
            warn!(%reason, retry_in = ?pause, applied_revision = self.applied, "sync interrupted");
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = sleep(pause) => {}
            }
        }
    }

    /// One Sync stream: hello, welcome, then the changes.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<End> {
        let connecting = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(End::Stopped),
            connecting = channel(self.endpoint) => connecting,
        };
        let channel = match connecting {
            Ok(channel) => channel,
            Err(err) if err.exit == Exit::Unavailable => return Ok(End::Lost(err.message)),
            Err(err) => return Err(err),
        };
        // The service accepts payloads up to its configured limit; take any of them.
        let mut client =
            PropagationServiceClient::new(channel).max_decoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let hello = sync_request::Message::Hello(SyncHello {
            node_id: self.id.clone(),
            applied_revision: self.applied,
        });
        if tx
            .send(SyncRequest {
                message: Some(hello),
            })
            .await
            .is_err()
        {
            return Ok(End::Lost(
                "the request stream closed before the hello".into(),
            ));
        }
        let opening = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(End::Stopped),
            opening = client.sync(ReceiverStream::new(rx)) => opening,
        };
        let stream = match opening {
            Ok(response) => response.into_inner(),
            Err(status) => return self.ended(status),
        };
        let mut session = Session {
            tx,
            stream,
            pending: None,
            last_received: 0,
        };
        let first = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(End::Stopped),
            first = session.next() => first,
        };
        let welcome = match first {
            Ok(Some(SyncResponse {
                message: Some(sync_response::Message::Welcome(welcome)),
            })) => welcome,
            Ok(Some(_)) => {
                return Ok(End::Lost(
                    "protocol error: the first message is not a welcome".into(),
                ));
            }
            Ok(None) => {
                return Ok(End::Lost(
                    "the service ended the stream before its welcome".into(),
                ));
            }
            Err(status) => return self.ended(status),
        };
        self.welcomed(&welcome)?;
        backoff.reset();
        session.last_received = welcome.start_revision;
        let end = self.follow(&mut session).await?;
        if end == End::Stopped {
            session.stop().await;
        }
        Ok(end)
    }

    /// Checks the welcome against the state file; records a new node's start.
    fn welcomed(&mut self, welcome: &SyncWelcome) -> Result {
        let start = welcome.start_revision;
        match self.applied {
            None => {
                self.record(start)?;
                info!(
                    start_revision = start,
                    head_revision = welcome.head_revision,
                    "joined the fleet as a new node"
                );
            }
            Some(applied) if start > applied => {
                return Err(CliError {
                    exit: Exit::Failure,
                    message: format!(
                        "the service would skip revisions {} to {start} of node {}, which has \
                         applied up to {applied} (state file {})",
                        applied + 1,
                        self.id,
                        self.state_file.display()
                    ),
                });
            }
            Some(applied) => info!(
                applied_revision = applied,
                start_revision = start,
                head_revision = welcome.head_revision,
                "connected"
            ),
        }
        Ok(())
    }

    /// Applies the changes of an open stream in the order received.
    async fn follow(&mut self, session: &mut Session) -> Result<End> {
        loop {
            let next = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => None,
                next = session.next() => Some(next),
            };
            let change = match next {
                None => return Ok(End::Stopped),
                Some(Ok(Some(SyncResponse {
                    message: Some(sync_response::Message::Change(change)),
                }))) => change,
                Some(Ok(Some(_))) => {
                    return Ok(End::Lost("protocol error: expected a change".into()));
                }
                Some(Ok(None)) => return Ok(End::Lost("the service ended the stream".into())),
                Some(Err(status)) => return self.ended(status),
            };
            if change.revision <= session.last_received {
                return Ok(End::Lost(format!(
                    "protocol error: revision {} after revision {}",
                    change.revision, session.last_received
                )));
            }
            session.last_received = change.revision;
            if Some(change.revision) <= self.applied {
                debug!(revision = change.revision, "already applied");
                session.ack(change.revision).await;
                continue;
            }
            if let Some(end) = self.apply(&change, session).await? {
                return Ok(end);
            }
            if self.shutdown.is_cancelled() {
                return Ok(End::Stopped);
            }
        }
    }

    /// Runs the command for `change` until it succeeds, then records and
    /// acknowledges it. Returns how the stream ended if it did so first; the
    /// change is then not applied and comes again on the next stream.
    async fn apply(&mut self, change: &Change, session: &mut Session) -> Result<Option<End>> {
        let revision = change.revision;
        let token = change.change_token.as_str();
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_APPLY_PAUSE);
        loop {
            let outcome = self.run_command(change).await;
            let pause = backoff.next();
            match outcome {
                Ok(status) if status.success() => break,
                Ok(status) => warn!(
                    revision,
                    token = %token,
                    %status,
                    retry_in = ?pause,
                    "command failed; running it again for the same change"
                ),
                Err(err) => warn!(
                    revision,
                    token = %token,
                    error = %err,
                    retry_in = ?pause,
                    "cannot run the command; trying again for the same change"
                ),
            }
            match session.pause(pause, &self.shutdown).await {
                None => {}
                Some(Interrupt::Stopped) => return Ok(Some(End::Stopped)),
                Some(Interrupt::Ended(Ok(()))) => {
                    return Ok(Some(End::Lost("the service ended the stream".into())));
                }
                Some(Interrupt::Ended(Err(status))) => return self.ended(status).map(Some),
            }
        }
        self.record(revision)?;
        info!(revision, token = %token, "applied");
        session.ack(revision).await;
        Ok(None)
    }

    /// Runs `sh -c CMD` once with the change's payload on stdin.
    async fn run_command(&self, change: &Change) -> io::Result<ExitStatus> {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(&self.exec)
            .stdin(Stdio::piped())
            .env("CHANGETOKEN_TOKEN", &change.change_token)
            .env("CHANGETOKEN_REVISION", change.revision.to_string())
            // An environment value cannot hold NUL; drop any rather than fail forever.
            .env(
                "CHANGETOKEN_DESCRIPTION",
                change.description.replace('\0', ""),
            )
            .env("CHANGETOKEN_NODE_ID", &self.id);
        let payload = change.payload.clone();
        tokio::task::spawn_blocking(move || run_to_exit(command, payload))
            .await
            .map_err(io::Error::other)?
    }

    /// Makes `revision` the applied revision, durably.
    fn record(&mut self, revision: u64) -> Result {
        write_state(&self.state_file, revision).map_err(|err| CliError {
            exit: Exit::Failure,
            message: format!(
                "cannot write the state file {}: {err}",
                self.state_file.display()
            ),
        })?;
        self.applied = Some(revision);
        Ok(())
    }

    /// Sorts a failed stream into reconnect or give up.
    fn ended(&self, status: Status) -> Result<End> {
        let reason = status.get_details_error_info().map(|info| info.reason);
        match status.code() {
            Code::Aborted if reason.as_deref() == Some(NODE_REPLACED) => Err(CliError {
                exit: Exit::Failure,
                message: format!(
                    "another process took over node {}: {}",
                    self.id,
                    CliError::from(status).message
                ),
            }),
            Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::PermissionDenied
            | Code::Unauthenticated => {
                let mut err = CliError::from(status);
                err.message = format!("the service refused node {}: {}", self.id, err.message);
                Err(err)
            }
            code => {
                let reason = reason.map(|r| format!(" [{r}]")).unwrap_or_default();
                Ok(End::Lost(format!("{code:?}: {}{reason}", status.message())))
            }
        }
    }
}

/// What cut a pause short.
enum Interrupt {
    /// A signal asked the node to stop.
    Stopped,
    /// The stream ended, cleanly or with an error.
    Ended(std::result::Result<(), Status>),
}

/// An open Sync stream.
struct Session {
    tx: mpsc::Sender<SyncRequest>,
    stream: Streaming<SyncResponse>,
    /// A message read while a failing command was being retried.
    pending: Option<SyncResponse>,
    /// The highest revision received on this stream (the start revision at first).
    last_received: u64,
}

impl Session {
    /// The next message from the service; cancel-safe.
    async fn next(&mut self) -> std::result::Result<Option<SyncResponse>, Status> {
        match self.pending.take() {
            Some(message) => Ok(Some(message)),
            None => self.stream.message().await,
        }
    }

    /// Sends a cumulative acknowledgement. A closed stream is noticed by the
    /// next read, so a failed send is only logged.
    async fn ack(&self, revision: u64) {
        let ack = sync_request::Message::Ack(SyncAck {
            applied_revision: revision,
        });
        if self
            .tx
            .send(SyncRequest { message: Some(ack) })
            .await
            .is_err()
        {
            debug!(
                revision,
                "the stream closed before the acknowledgement was sent"
            );
        }
    }

    /// Waits `pause` while watching for a stop and for the end of the stream.
    /// At most one message is read ahead, so the service's flow control holds.
    async fn pause(&mut self, pause: Duration, shutdown: &CancellationToken) -> Option<Interrupt> {
        let deadline = sleep(pause);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Some(Interrupt::Stopped),
                _ = &mut deadline => return None,
                message = self.stream.message(), if self.pending.is_none() => match message {
                    Ok(Some(message)) => self.pending = Some(message),
                    Ok(None) => return Some(Interrupt::Ended(Ok(()))),
                    Err(status) => return Some(Interrupt::Ended(Err(status))),
                },
            }
        }
    }

    /// Ends the request stream and gives the service a moment to end its side,
    /// so the last acknowledgement goes out before the process exits.
    async fn stop(self) {
        let Session { tx, mut stream, .. } = self;
        drop(tx);
        let drain = async { while let Ok(Some(_)) = stream.message().await {} };
        let _ = tokio::time::timeout(STOP_DRAIN, drain).await;
    }
}

/// Spawns `command`, feeds it `payload` and waits for it to exit. The payload
/// is written from its own thread, so a command that does not read its input
/// cannot block the node (the write then ends with a broken pipe).
fn run_to_exit(mut command: Command, payload: Vec<u8>) -> io::Result<ExitStatus> {
    let mut child = command.spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        std::thread::spawn(move || {
            let _ = stdin.write_all(&payload);
        });
    }
    child.wait()
}

/// Exponential backoff: `first`, doubling up to `max`.
struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    fn next(&mut self) -> Duration {
        let pause = self.next;
        self.next = (pause * 2).min(self.max);
        pause
    }

    fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tonic_types::{ErrorDetails, StatusExt};

    use std::{fs, path::Path};

    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_limit_and_resets() {
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RECONNECT_PAUSE);
        let millis: Vec<_> = (0..8).map(|_| backoff.next().as_millis()).collect();
        assert_eq!(millis, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.next(), FIRST_RETRY);
        let mut apply = Backoff::new(FIRST_RETRY, MAX_APPLY_PAUSE);
        let last = (0..10).map(|_| apply.next()).last();
        assert_eq!(last, Some(MAX_APPLY_PAUSE));
    }

    fn agent(dir: &Path, exec: &str) -> Agent<'static> {
        Agent {
            endpoint: "http://127.0.0.1:1",
            id: "n1".into(),
            exec: exec.into(),
            state_file: dir.join("n1.state"),
            applied: None,
            shutdown: CancellationToken::new(),
        }
    }

    fn change(revision: u64, payload: &[u8]) -> Change {
        Change {
            change_token: "abcd12f2-46da-4fdb-b8d5-fbd4c466928f".into(),
            revision,
            payload: payload.to_vec(),
            description: "add\0 rule".into(),
            submitted_at: None,
        }
    }

    #[tokio::test]
    async fn command_gets_the_payload_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let exec = format!(
            "cat > {0}; printf '|%s|%s|%s|%s' \"$CHANGETOKEN_TOKEN\" \"$CHANGETOKEN_REVISION\" \
             \"$CHANGETOKEN_DESCRIPTION\" \"$CHANGETOKEN_NODE_ID\" >> {0}",
            out.display()
        );
        let status = agent(dir.path(), &exec)
            .run_command(&change(5, b"payload"))
            .await
            .unwrap();
        assert!(status.success());
        assert_eq!(
            fs::read_to_string(&out).unwrap(),
            "payload|abcd12f2-46da-4fdb-b8d5-fbd4c466928f|5|add rule|n1"
        );
    }

    #[tokio::test]
    async fn command_that_ignores_a_large_payload_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let payload = vec![b'x'; 4 << 20];
        let status = agent(dir.path(), "exit 3")
            .run_command(&change(1, &payload))
            .await
            .unwrap();
        assert_eq!(status.code(), Some(3));
    }

    fn with_reason(code: Code, reason: &str) -> Status {
        let details = ErrorDetails::with_error_info(reason, "changetoken", HashMap::new());
        Status::with_error_details(code, "refused", details)
    }

    #[test]
    fn refusals_are_fatal_and_outages_are_retried() {
        let dir = tempfile::tempdir().unwrap();
        let agent = agent(dir.path(), "true");
        let fatal = |status| match agent.ended(status) {
            Ok(end) => panic!("expected a fatal error, got {end:?}"),
            Err(err) => (err.exit, err.message),
        };
        let (exit, message) = fatal(with_reason(Code::FailedPrecondition, "NODE_AHEAD_OF_LOG"));
        assert_eq!(exit, Exit::Failure);
        assert!(message.contains("[NODE_AHEAD_OF_LOG]"), "{message}");
        let (exit, _) = fatal(with_reason(Code::InvalidArgument, "INVALID_NODE_ID"));
        assert_eq!(exit, Exit::Usage);
        let (exit, message) = fatal(with_reason(Code::Aborted, NODE_REPLACED));
        assert_eq!(exit, Exit::Failure);
        assert!(
            message.starts_with("another process took over node n1"),
            "{message}"
        );

        for status in [
            with_reason(Code::Unavailable, "SHUTTING_DOWN"),
            Status::unavailable("connection refused"),
            Status::internal("h2 protocol error"),
            Status::unknown("stream reset"),
            Status::cancelled("cancelled"),
        ] {
            assert!(matches!(agent.ended(status), Ok(End::Lost(_))));
        }
    }
}

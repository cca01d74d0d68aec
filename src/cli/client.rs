//! The client commands. Their standard output is the result alone, one value
//! per line, for scripts; diagnostics go to standard error; the exit code says
//! what went wrong (see `changetoken --help`).

use std::{path::PathBuf, time::Duration};

use tokio::{
    io::AsyncReadExt,
    time::{Instant, sleep},
};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

use crate::proto::{
    ChangeTokenStatus, GetChangeTokenRequest, GetChangeTokenStatusRequest, SubmitChangeRequest,
    WatchTokenRequest, WatchTokenResponse, change_token_service_client::ChangeTokenServiceClient,
};

/// The process exit codes of the client commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Anything not covered below.
    Failure = 1,
    /// Bad usage or `INVALID_ARGUMENT`.
    Usage = 2,
    /// `NOT_FOUND`.
    NotFound = 3,
    /// `ABORTED`: the token is stale.
    Stale = 4,
    /// The timeout ran out.
    Timeout = 5,
    /// The service is unreachable or `UNAVAILABLE`.
    Unavailable = 6,
}

/// A failed client command.
pub struct CliError {
    pub exit: Exit,
    pub message: String,
}

impl From<Status> for CliError {
    fn from(status: Status) -> Self {
        let exit = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => Exit::Usage,
            Code::NotFound => Exit::NotFound,
            Code::Aborted => Exit::Stale,
            Code::Unavailable | Code::DeadlineExceeded => Exit::Unavailable,
            _ => Exit::Failure,
        };
        let reason = status
            .get_details_error_info()
            .map(|info| format!(" [{}]", info.reason))
            .unwrap_or_default();
        CliError {
            exit,
            message: format!("{:?}: {}{reason}", status.code(), status.message()),
        }
    }
}

/// The result of a client command.
pub type Result<T = ()> = std::result::Result<T, CliError>;

/// Connects to `endpoint`, mapping failures to the documented exit codes.
pub async fn channel(endpoint: &str) -> Result<Channel> {
    Channel::from_shared(endpoint.to_owned())
        .map_err(|err| CliError {
            exit: Exit::Usage,
            message: format!("invalid endpoint {endpoint:?}: {err}"),
        })?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|err| CliError {
            exit: Exit::Unavailable,
            message: format!("cannot connect to {endpoint}: {err}"),
        })
}

async fn connect(endpoint: &str) -> Result<ChangeTokenServiceClient<Channel>> {
    Ok(ChangeTokenServiceClient::new(channel(endpoint).await?))
}

/// `token`: prints the scope's outstanding token.
pub async fn token(endpoint: &str, scope: String) -> Result {
    let mut client = connect(endpoint).await?;
    let response = client
        .get_change_token(GetChangeTokenRequest { scope })
        .await?;
    println!("{}", response.into_inner().change_token);
    Ok(())
}

/// `status`: prints PROVISIONED, PENDING or INSYNC.
pub async fn status(endpoint: &str, token: String) -> Result {
    let mut client = connect(endpoint).await?;
    let request = GetChangeTokenStatusRequest {
        change_token: token,
    };
    let response = client.get_change_token_status(request).await?.into_inner();
    println!("{}", status_name(response.change_token_status));
    Ok(())
}

/// `submit`: sends the payload (a file, or standard input) and prints the revision.
pub async fn submit(
    endpoint: &str,
    token: String,
    payload_file: Option<PathBuf>,
    description: String,
) -> Result {
    let payload = match payload_file {
        Some(path) => tokio::fs::read(&path).await.map_err(|err| CliError {
            exit: Exit::Failure,
            message: format!("cannot read payload file {}: {err}", path.display()),
        })?,
        None => {
            let mut buf = Vec::new();
            tokio::io::stdin()
                .read_to_end(&mut buf)
                .await
                .map_err(|err| CliError {
                    exit: Exit::Failure,
                    message: format!("cannot read the payload from standard input: {err}"),
                })?;
            buf
        }
    };
    let mut client = connect(endpoint).await?;
    let request = SubmitChangeRequest {
        change_token: token,
        payload,
        description,
    };
    let response = client.submit_change(request).await?.into_inner();
    println!("{}", response.revision);
    Ok(())
}

/// `watch` (with `print`) and `wait`: follow the token until it is INSYNC,
/// reconnecting while the service is unavailable, until `timeout` runs out.
pub async fn follow(
    endpoint: &str,
    token: String,
    timeout: Option<Duration>,
    print: bool,
) -> Result {
    let deadline = timeout.map(|t| Instant::now() + t);
    let follow = follow_until_insync(endpoint, token.clone(), print);
    match deadline {
        None => follow.await,
        Some(deadline) => match tokio::time::timeout_at(deadline, follow).await {
            Ok(result) => result,
            Err(_) => Err(CliError {
                exit: Exit::Timeout,
                message: format!(
                    "timed out after {:?} before {token} was INSYNC",
                    timeout.unwrap_or_default()
                ),
            }),
        },
    }
}

async fn follow_until_insync(endpoint: &str, token: String, print: bool) -> Result {
    let mut last = ChangeTokenStatus::Unspecified as i32;
    let mut backoff = Duration::from_millis(100);
    loop {
        match watch_once(endpoint, &token, &mut last, print).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(err) if err.exit == Exit::Unavailable => {
                tracing::debug!(message = %err.message, "watch interrupted; reconnecting");
            }
            Err(err) => return Err(err),
        }
        sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Follows one stream; returns true once INSYNC was seen, false if the
/// stream ended early.
async fn watch_once(endpoint: &str, token: &str, last: &mut i32, print: bool) -> Result<bool> {
    let mut client = connect(endpoint).await?;
    let request = WatchTokenRequest {
        change_token: token.to_owned(),
    };
    let mut stream = client.watch_token(request).await?.into_inner();
    while let Some(message) = stream.message().await? {
        if message.change_token_status <= *last {
            continue;
        }
        *last = message.change_token_status;
        if print {
            println!("{}", watch_line(&message));
        }
        if message.change_token_status == ChangeTokenStatus::Insync as i32 {
            return Ok(true);
        }
    }
    Ok(false)
}

fn status_name(status: i32) -> &'static str {
    match ChangeTokenStatus::try_from(status) {
        Ok(ChangeTokenStatus::Provisioned) => "PROVISIONED",
        Ok(ChangeTokenStatus::Pending) => "PENDING",
        Ok(ChangeTokenStatus::Insync) => "INSYNC",
        _ => "UNSPECIFIED",
    }
}

/// `STATUS REVISION TIME`, the time in RFC 3339 with milliseconds, UTC.
fn watch_line(message: &WatchTokenResponse) -> String {
    let at = message
        .changed_at
        .map(|t| {
            std::time::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
        })
        .unwrap_or(std::time::UNIX_EPOCH);
    format!(
        "{} {} {}",
        status_name(message.change_token_status),
        message.revision,
        humantime::format_rfc3339_millis(at)
    )
}

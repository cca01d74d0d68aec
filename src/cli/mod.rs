//! The command line of the `changetoken` binary: `serve` (the default) and the
//! client commands for scripts and people.

mod client;
mod node;
mod nodes;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    logging::{self, LogFormat},
    server::{self, Config, Server},
};

pub use client::Exit;

const EXIT_CODES: &str = "\
Exit codes:
  0  success (for wait: the token is INSYNC)
  1  unexpected failure (an INTERNAL error, an unreadable payload file, ...)
  2  bad usage or invalid argument (INVALID_ARGUMENT)
  3  the token does not exist (NOT_FOUND)
  4  the token is stale: it was already used for another change (ABORTED)
  5  wait or watch timed out before the token was INSYNC
  6  the service is unreachable or unavailable";

/// Tells a deploy system when its change is live on every server.
#[derive(Debug, Parser)]
#[command(name = "changetoken", version, after_help = EXIT_CODES)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Flags of `serve`, which runs when no command is given.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default command).
    Serve(ServeArgs),
    /// Print the scope's outstanding change token, minting one if needed.
    Token {
        /// The scope; empty is the default scope.
        #[arg(long, default_value = "")]
        scope: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a token's status: PROVISIONED, PENDING or INSYNC.
    Status {
        /// The change token.
        token: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Submit a change with a PROVISIONED token and print its revision.
    Submit {
        /// The change token.
        token: String,
        /// Read the payload from this file instead of standard input.
        #[arg(long, value_name = "FILE")]
        payload_file: Option<PathBuf>,
        /// A human-readable summary of the change.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print one line per state of the token until it is INSYNC:
    /// STATUS REVISION TIME (RFC 3339). Reconnects when the service restarts.
    Watch {
        /// The change token.
        token: String,
        /// Give up after this long (e.g. 30s, 20m); by default wait forever.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Exit 0 once the token is INSYNC, 5 if the timeout runs out first.
    /// Reconnects when the service restarts.
    Wait {
        /// The change token.
        token: String,
        /// How long to wait (e.g. 30s, 20m).
        #[arg(long, value_parser = parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the members of the fleet: NODE ACKED LAG STATE, one per line.
    Nodes {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run a fleet node: follow the change log, run CMD once per change with
    /// the payload on stdin, and acknowledge the change when CMD exits 0.
    Node {
        /// The node's stable identity: 1 to 128 characters of [A-Za-z0-9._-].
        #[arg(long)]
        id: String,
        /// The command applying one change, run with `sh -c`. It gets the
        /// payload on stdin and CHANGETOKEN_TOKEN, CHANGETOKEN_REVISION,
        /// CHANGETOKEN_DESCRIPTION and CHANGETOKEN_NODE_ID in its environment.
        #[arg(long, value_name = "CMD")]
        exec: String,
        /// Where the node keeps its last applied revision
        /// [default: changetoken-node-ID.state in the working directory].
        #[arg(long, value_name = "FILE")]
        state_file: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CHANGETOKEN_LISTEN", default_value = server::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Directory of the database; created if missing.
    #[arg(long, env = "CHANGETOKEN_DATA_DIR", default_value = server::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// How long a change stays PENDING before it is INSYNC.
    #[arg(long, env = "CHANGETOKEN_PROPAGATION_DELAY", default_value = "0s",
        value_parser = parse_duration)]
    propagation_delay: Duration,
    /// How long a disconnected fleet member keeps blocking INSYNC before it
    /// is dropped from the fleet.
    #[arg(long, env = "CHANGETOKEN_MEMBER_TIMEOUT", default_value = "30s",
        value_parser = parse_duration)]
    member_timeout: Duration,
    /// No change is INSYNC while fewer than this many members acknowledged it.
    #[arg(long, env = "CHANGETOKEN_MIN_FLEET_SIZE", default_value_t = 0)]
    min_fleet_size: usize,
    /// How long INSYNC tokens and their changes are kept before deletion.
    #[arg(long, env = "CHANGETOKEN_RETENTION", default_value = "7d", value_parser = parse_duration)]
    retention: Duration,
    /// The largest payload accepted, in bytes.
    #[arg(long, env = "CHANGETOKEN_MAX_PAYLOAD", default_value_t = server::DEFAULT_MAX_PAYLOAD)]
    max_payload: usize,
    /// How long shutdown waits for in-flight calls before dropping them.
    #[arg(long, env = "CHANGETOKEN_SHUTDOWN_GRACE", default_value = "10s",
        value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// Log format on stderr. The filter is read from CHANGETOKEN_LOG (default: info).
    #[arg(
        long,
        env = "CHANGETOKEN_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

/// Flags shared by the client commands.
#[derive(Debug, Args)]
struct ClientArgs {
    /// The service to talk to.
    #[arg(
        long,
        env = "CHANGETOKEN_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|err| format!("{err} (examples: 500ms, 30s, 7d)"))
}

/// The runtime every command runs on.
///
/// Built with `--cfg tokio_unstable` (set in `.cargo/config.toml`), it has
/// no LIFO slot: a task woken by another then waits its turn in the queue
/// instead of running next. For a server that matters most when one
/// transition is delivered to thousands of streams: each stream task queues
/// a frame and wakes its connection's task, which with the LIFO slot would
/// run at once and write that single frame; without it, the connection task
/// runs after the other streams and writes all their frames in one system
/// call.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.build()
}

impl Cli {
    /// Runs the chosen command to completion.
    pub fn run(self) -> ExitCode {
        let runtime = match runtime() {
            Ok(runtime) => runtime,
            Err(err) => return fail(Exit::Failure, format!("cannot start the runtime: {err}")),
        };
        let command = self.command.unwrap_or(Command::Serve(self.serve));
        let result = match command {
            Command::Serve(args) => return runtime.block_on(serve(args)),
            Command::Token { scope, client } => {
                runtime.block_on(client::token(&client.endpoint, scope))
            }
            Command::Status { token, client } => {
                runtime.block_on(client::status(&client.endpoint, token))
            }
            Command::Submit {
                token,
                payload_file,
                description,
                client,
            } => runtime.block_on(client::submit(
                &client.endpoint,
                token,
                payload_file,
                description,
            )),
            Command::Watch {
                token,
                timeout,
                client,
            } => runtime.block_on(client::follow(&client.endpoint, token, timeout, true)),
            Command::Wait {
                token,
                timeout,
                client,
            } => runtime.block_on(client::follow(
                &client.endpoint,
                token,
                Some(timeout),
                false,
            )),
            Command::Nodes { client } => runtime.block_on(nodes::list(&client.endpoint)),
            Command::Node {
                id,
                exec,
                state_file,
                client,
            } => runtime.block_on(node::run(&client.endpoint, id, exec, state_file)),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => fail(err.exit, err.message),
        }
    }
}

fn fail(exit: Exit, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("changetoken: {message}");
    ExitCode::from(exit as u8)
}

async fn serve(args: ServeArgs) -> ExitCode {
    logging::init(args.log_format, "info");
    let config = Config {
        data_dir: args.data_dir,
        propagation_delay: args.propagation_delay,
        member_timeout: args.member_timeout,
        min_fleet_size: args.min_fleet_size,
        retention: args.retention,
        max_payload: args.max_payload,
        shutdown_grace: args.shutdown_grace,
    };
    let server = match Server::open(config) {
        Ok(server) => server,
        Err(err) => return fail(Exit::Failure, err),
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            return fail(
                Exit::Failure,
                format!("cannot listen on {}: {err}", args.listen),
            );
        }
    };
    match server.serve(listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(Exit::Failure, err),
    }
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "signal received"),
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
    }
}

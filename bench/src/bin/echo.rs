//! The ceiling of tonic on this machine: a ChangeTokenService whose
//! GetChangeTokenStatus answers a constant PROVISIONED without touching any
//! storage, and whose other methods are unimplemented.
//!
//! `echo LISTEN_ADDR` (e.g. `127.0.0.1:0`). Logs one JSON line
//! `{"message":"listening","addr":"IP:PORT"}` on stderr once it accepts
//! connections and, after SIGTERM or SIGINT, `{"message":"requests
//! served","status_ok":N}` before it exits. The transport matches the
//! service's: the same runtime defaults and TCP_NODELAY on accepted sockets.

use std::{
    net::SocketAddr,
    pin::Pin,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use changetoken::proto::{
    GetChangeTokenRequest, GetChangeTokenResponse, GetChangeTokenStatusRequest,
    GetChangeTokenStatusResponse, SubmitChangeRequest, SubmitChangeResponse, WatchTokenRequest,
    WatchTokenResponse,
    change_token_service_server::{ChangeTokenService, ChangeTokenServiceServer},
};
use futures_util::Stream;
use tokio::signal::unix::{SignalKind, signal};
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

/// The echo service: counts the status reads it answered.
#[derive(Clone, Default)]
struct Echo {
    status_ok: Arc<AtomicU64>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchTokenResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ChangeTokenService for Echo {
    async fn get_change_token(
        &self,
        _request: Request<GetChangeTokenRequest>,
    ) -> Result<Response<GetChangeTokenResponse>, Status> {
        Err(Status::unimplemented(
            "echo serves GetChangeTokenStatus only",
        ))
    }

    async fn get_change_token_status(
        &self,
        _request: Request<GetChangeTokenStatusRequest>,
    ) -> Result<Response<GetChangeTokenStatusResponse>, Status> {
        self.status_ok.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(GetChangeTokenStatusResponse {
            change_token_status: 1,
        }))
    }

    async fn submit_change(
        &self,
        _request: Request<SubmitChangeRequest>,
    ) -> Result<Response<SubmitChangeResponse>, Status> {
        Err(Status::unimplemented(
            "echo serves GetChangeTokenStatus only",
        ))
    }

    type WatchTokenStream = WatchStream;

    async fn watch_token(
        &self,
        _request: Request<WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        Err(Status::unimplemented(
            "echo serves GetChangeTokenStatus only",
        ))
    }
}

fn main() -> ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: echo LISTEN_ADDR (e.g. 127.0.0.1:0)");
        return ExitCode::from(2);
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("echo: bad listen address {addr:?}: {err}");
            return ExitCode::from(2);
        }
    };
    // The same runtime as `changetoken serve` (src/cli/mod.rs).
    let runtime = changetoken::cli::runtime().expect("tokio runtime");
    match runtime.block_on(serve(addr)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("echo: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut term = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let echo = Echo::default();
    let served = echo.status_ok.clone();
    eprintln!(r#"{{"message":"listening","addr":"{local}"}}"#);
    tonic::transport::Server::builder()
        .add_service(ChangeTokenServiceServer::new(echo))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    let status_ok = served.load(Ordering::Relaxed);
    eprintln!(r#"{{"message":"requests served","status_ok":{status_ok}}}"#);
    Ok(())
}

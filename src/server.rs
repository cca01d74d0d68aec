//! The gRPC server: the change-token service, health, reflection, and the
//! background tasks, all stopped by one cancellation signal.
//!
//! Shutdown order: health turns NOT_SERVING, then every open watch ends with
//! UNAVAILABLE and the transport stops accepting and drains in-flight calls;
//! draining is bounded by the grace period, after which the remaining
//! connections are dropped. Acknowledged writes are already on disk, so a cut
//! drain loses nothing that was acknowledged.

use std::{future::Future, path::PathBuf, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    hub::Hub,
    propagation::{Propagation, Settings},
    proto::{
        self, change_token_service_server::ChangeTokenServiceServer,
        propagation_service_server::PropagationServiceServer,
    },
    retention,
    service::{ChangeTokens, MAX_DESCRIPTION},
    stats::Stats,
    store::{OpenError, Settle, Store},
    sync::FleetService,
};

/// The default address of `serve`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// The default data directory of `serve`.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// The default payload limit: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// How often an idle connection is pinged, so dead peers are noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped server waits for the last request tasks to let go of
/// the database (they end moments after their connections close).
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// How the server behaves; see `changetoken serve --help` for each field.
#[derive(Clone, Debug)]
pub struct Config {
    /// Directory holding the database.
    pub data_dir: PathBuf,
    /// How long a change stays PENDING before it is INSYNC while the fleet
    /// has no members and `min_fleet_size` is 0.
    pub propagation_delay: Duration,
    /// How long a disconnected member keeps blocking INSYNC before it is dropped.
    pub member_timeout: Duration,
    /// No change is INSYNC while fewer members than this acknowledged it.
    pub min_fleet_size: usize,
    /// How long an INSYNC token is kept before it is deleted.
    pub retention: Duration,
    /// The largest payload accepted, in bytes.
    pub max_payload: usize,
    /// How long shutdown waits for in-flight calls.
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            propagation_delay: Duration::ZERO,
            member_timeout: Duration::from_secs(30),
            min_fleet_size: 0,
            retention: Duration::from_secs(7 * 24 * 3600),
            max_payload: DEFAULT_MAX_PAYLOAD,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The embedded descriptor sets are unusable.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The listener or a connection failed fatally.
    #[error("transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A server whose database is open and that is ready to serve.
pub struct Server {
    config: Config,
    store: Store,
}

impl Server {
    /// Opens the data directory. Fails if it cannot be opened or another
    /// process holds it.
    pub fn open(config: Config) -> Result<Server, OpenError> {
        // Standing alone with no delay and no minimum fleet, a change is
        // INSYNC once durable: the commit settles it, saving a second commit.
        let settle = if config.propagation_delay.is_zero() && config.min_fleet_size == 0 {
            Settle::WhenAlone
        } else {
            Settle::Worker
        };
        let store = Store::open(&config.data_dir, settle)?;
        Ok(Server { config, store })
    }

    /// Serves on `listener` until `shutdown` completes, then shuts down as
    /// described in the module documentation. The database is released when
    /// this returns, unless a request task outlived its connection by more
    /// than a few seconds (logged as a warning); it is then released when
    /// that task ends.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let Server { config, store } = self;
        let released = store.released();
        let cancel = CancellationToken::new();
        let hub = Hub::default();
        let settings = Settings {
            delay: config.propagation_delay,
            member_timeout: config.member_timeout,
            min_fleet_size: config.min_fleet_size,
        };
        let (propagation, worker) =
            Propagation::spawn(store.clone(), hub.clone(), settings, cancel.clone());
        let sweeper = retention::spawn(store.clone(), config.retention, cancel.clone());
        let fleet = FleetService::new(store.clone(), propagation.clone(), cancel.clone());
        let stats = Stats::default();
        let service = ChangeTokens::new(
            store,
            hub.clone(),
            propagation,
            config.max_payload,
            stats.clone(),
        );

        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // google.rpc error details, so that reflection clients such as
                // grpcurl can decode the ErrorInfo of a failed call.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        // Room for the largest accepted submission, so that an oversized
        // payload up to twice the limit is refused with a clear
        // PAYLOAD_TOO_LARGE instead of a transport error.
        let max_message = config.max_payload.saturating_mul(2) + MAX_DESCRIPTION + 1024;
        let change_tokens =
            ChangeTokenServiceServer::new(service).max_decoding_message_size(max_message);

        let addr = listener.local_addr().ok();
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(KEEPALIVE_INTERVAL));
        let transport = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(change_tokens)
            .add_service(PropagationServiceServer::new(fleet))
            .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
        let mut transport = tokio::spawn(transport);
        if let Some(addr) = addr {
            tracing::info!(%addr, data_dir = %config.data_dir.display(), "listening");
        }

        let early = tokio::select! {
            _ = shutdown => None,
            result = &mut transport => Some(result),
        };
        tracing::info!("shutting down");
        set_health(&health, ServingStatus::NotServing).await;
        cancel.cancel();
        hub.close();

        let result = match early {
            Some(result) => result,
            None => match tokio::time::timeout(config.shutdown_grace, &mut transport).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        grace = ?config.shutdown_grace,
                        "grace period ran out; dropping remaining connections"
                    );
                    transport.abort();
                    let _ = (&mut transport).await;
                    Ok(Ok(()))
                }
            },
        };
        let _ = worker.await;
        let _ = sweeper.await;
        stats.log();
        if tokio::time::timeout(RELEASE_WAIT, released).await.is_err() {
            tracing::warn!(
                "a request still holds the database; it is released when that request ends"
            );
        }
        tracing::info!("stopped");
        match result {
            Ok(outcome) => outcome.map_err(ServeError::from),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(_) => Ok(()),
        }
    }
}

/// Sets the overall status and that of every served service.
async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for service in [
        "",
        <ChangeTokenServiceServer<ChangeTokens> as NamedService>::NAME,
        <PropagationServiceServer<FleetService> as NamedService>::NAME,
    ] {
        health.set_service_status(service, status).await;
    }
}

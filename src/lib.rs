//! changetoken: a gRPC service that tells a deploy system when its change is
//! live on every server.
//!
//! A writer gets a token ([`store::Store::provision`]), submits a change with
//! it ([`store::Store::submit`]: the token is PENDING), and the
//! [`propagation`] worker later marks it INSYNC (or, for a service standing
//! alone with no delay, the submission's own commit does, see
//! [`store::Settle`]). Every committed transition is
//! published to the [`hub`], from which each `WatchToken` stream ([`watch`])
//! reads. [`service`] is the gRPC face of this, [`server`] runs it with health,
//! reflection and graceful shutdown, and [`cli`] is the `changetoken` binary.
//!
//! Layout:
//! - [`token`]: tokens, scopes, statuses, records: validated domain types.
//! - [`store`]: the redb database and its write-ahead log; the only module
//!   that knows redb.
//! - [`hub`], [`watch`]: transition fan-out and the per-watcher stream.
//! - [`fleet`], [`sync`]: fleet membership, the INSYNC rule, and the Sync
//!   streams through which nodes follow the change log.
//! - [`propagation`], [`retention`]: background tasks.
//! - [`error`]: API errors and their single mapping to gRPC statuses.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod codec;
pub mod error;
pub mod fleet;
pub mod hub;
pub mod logging;
pub mod propagation;
pub mod proto;
pub mod retention;
pub mod server;
pub mod service;
pub mod stats;
pub mod store;
pub mod sync;
pub mod token;
pub mod watch;

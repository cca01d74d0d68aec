//! The errors an RPC can end with, and their one mapping to gRPC statuses.
//!
//! Every failure carries a `google.rpc.ErrorInfo` detail in [`DOMAIN`] whose
//! reason is one of the constants in [`reason`]; clients branch on those.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    store::{StoreError, SubmitError},
    token::{InvalidScope, InvalidToken, Status as TokenStatus, TokenId},
};

/// The `domain` of every `ErrorInfo` the service sends.
pub const DOMAIN: &str = "changetoken";

/// The `reason` values of `ErrorInfo`. They never change meaning.
pub mod reason {
    /// The token was already used for a different change.
    pub const CHANGE_TOKEN_STALE: &str = "CHANGE_TOKEN_STALE";
    /// The token was never issued, or retention deleted it.
    pub const CHANGE_TOKEN_NOT_FOUND: &str = "CHANGE_TOKEN_NOT_FOUND";
    /// The token is not a lowercase hyphenated version-4 UUID.
    pub const INVALID_CHANGE_TOKEN: &str = "INVALID_CHANGE_TOKEN";
    /// The scope is not empty nor 1 to 128 characters of `[A-Za-z0-9._/-]`.
    pub const INVALID_SCOPE: &str = "INVALID_SCOPE";
    /// The payload is over the configured limit.
    pub const PAYLOAD_TOO_LARGE: &str = "PAYLOAD_TOO_LARGE";
    /// The description is over its limit.
    pub const DESCRIPTION_TOO_LONG: &str = "DESCRIPTION_TOO_LONG";
    /// The storage failed in a way that a retry may overcome.
    pub const STORAGE_UNAVAILABLE: &str = "STORAGE_UNAVAILABLE";
    /// The storage holds data this build cannot read.
    pub const STORAGE_FAILURE: &str = "STORAGE_FAILURE";
    /// The server is shutting down; reconnect, possibly to another instance.
    pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";
    /// A node id is not 1 to 128 characters of `[A-Za-z0-9._-]`.
    pub const INVALID_NODE_ID: &str = "INVALID_NODE_ID";
    /// A Sync stream broke the protocol (no hello first, a second hello, an
    /// acknowledgement of a revision that was not sent).
    pub const SYNC_PROTOCOL: &str = "SYNC_PROTOCOL";
    /// A node claims a revision beyond the head of the log.
    pub const NODE_AHEAD_OF_LOG: &str = "NODE_AHEAD_OF_LOG";
    /// A node needs changes that retention already deleted.
    pub const NODE_BEHIND_LOG: &str = "NODE_BEHIND_LOG";
    /// A newer Sync stream with the same node id took over.
    pub const NODE_REPLACED: &str = "NODE_REPLACED";
}

/// Why an RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request's token is malformed.
    #[error(transparent)]
    InvalidToken(#[from] InvalidToken),
    /// The request's scope is malformed.
    #[error(transparent)]
    InvalidScope(#[from] InvalidScope),
    /// The payload is over the configured limit.
    #[error("payload is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The payload's size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The description is over [`crate::service::MAX_DESCRIPTION`].
    #[error("description is {size} bytes, over the limit of {limit} bytes")]
    DescriptionTooLong {
        /// The description's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The token was never issued, or retention deleted it.
    #[error("change token {0} does not exist")]
    NotFound(TokenId),
    /// The token was already used for a different change.
    #[error(
        "change token {token} is no longer current: it is {status}; \
         get a new token with GetChangeToken and submit again"
    )]
    Stale {
        /// The stale token.
        token: TokenId,
        /// Its current status.
        status: TokenStatus,
    },
    /// The store failed; nothing was acknowledged.
    #[error("{0}; retry the request")]
    Store(StoreError),
    /// The server is shutting down.
    #[error("the server is shutting down; reconnect and retry")]
    ShuttingDown,
    /// A malformed node id.
    #[error(transparent)]
    InvalidNodeId(#[from] crate::fleet::InvalidNodeId),
    /// A Sync stream broke the protocol.
    #[error("sync protocol violation: {0}")]
    SyncProtocol(String),
    /// A node claims a revision beyond the head of the log.
    #[error(
        "node {node} claims revision {applied} but the change log ends at revision {head}: \
         its state belongs to another service or this service lost data; \
         reset the node's state and rejoin as a new node"
    )]
    NodeAheadOfLog {
        /// The node.
        node: String,
        /// The revision it claims.
        applied: u64,
        /// The head of the log.
        head: u64,
    },
    /// A node needs changes that retention already deleted.
    #[error(
        "node {node} applied revision {applied} but the change log no longer holds revision {}: \
         bring the node up to date by other means, then reset its state and rejoin as a new node",
        applied + 1
    )]
    NodeBehindLog {
        /// The node.
        node: String,
        /// The revision it claims.
        applied: u64,
    },
    /// A newer Sync stream with the same node id took over.
    #[error("node {0} connected again on another stream; this one is closed")]
    NodeReplaced(String),
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Closed => ApiError::ShuttingDown,
            other => ApiError::Store(other),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(err: SubmitError) -> Self {
        match err {
            SubmitError::NotFound(token) => ApiError::NotFound(token),
            SubmitError::Stale { token, status } => ApiError::Stale { token, status },
            SubmitError::Store(err) => err.into(),
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        let mut metadata = HashMap::new();
        let (code, reason) = match &err {
            ApiError::InvalidToken(_) => (Code::InvalidArgument, reason::INVALID_CHANGE_TOKEN),
            ApiError::InvalidScope(_) => (Code::InvalidArgument, reason::INVALID_SCOPE),
            ApiError::PayloadTooLarge { limit, .. } => {
                metadata.insert("limit_bytes".to_owned(), limit.to_string());
                (Code::InvalidArgument, reason::PAYLOAD_TOO_LARGE)
            }
            ApiError::DescriptionTooLong { limit, .. } => {
                metadata.insert("limit_bytes".to_owned(), limit.to_string());
                (Code::InvalidArgument, reason::DESCRIPTION_TOO_LONG)
            }
            ApiError::NotFound(token) => {
                metadata.insert("change_token".to_owned(), token.to_string());
                (Code::NotFound, reason::CHANGE_TOKEN_NOT_FOUND)
            }
            ApiError::Stale { token, status } => {
                metadata.insert("change_token".to_owned(), token.to_string());
                metadata.insert("status".to_owned(), status.to_string());
                (Code::Aborted, reason::CHANGE_TOKEN_STALE)
            }
            ApiError::Store(StoreError::Corrupt(_)) => (Code::Internal, reason::STORAGE_FAILURE),
            ApiError::Store(_) => (Code::Unavailable, reason::STORAGE_UNAVAILABLE),
            ApiError::ShuttingDown => (Code::Unavailable, reason::SHUTTING_DOWN),
            ApiError::InvalidNodeId(_) => (Code::InvalidArgument, reason::INVALID_NODE_ID),
            ApiError::SyncProtocol(_) => (Code::InvalidArgument, reason::SYNC_PROTOCOL),
            ApiError::NodeAheadOfLog { node, head, .. } => {
                metadata.insert("node_id".to_owned(), node.clone());
                metadata.insert("head_revision".to_owned(), head.to_string());
                (Code::FailedPrecondition, reason::NODE_AHEAD_OF_LOG)
            }
            ApiError::NodeBehindLog { node, .. } => {
                metadata.insert("node_id".to_owned(), node.clone());
                (Code::FailedPrecondition, reason::NODE_BEHIND_LOG)
            }
            ApiError::NodeReplaced(node) => {
                metadata.insert("node_id".to_owned(), node.clone());
                (Code::Aborted, reason::NODE_REPLACED)
            }
        };
        Status::with_error_details(
            code,
            err.to_string(),
            ErrorDetails::with_error_info(reason, DOMAIN, metadata),
        )
    }
}

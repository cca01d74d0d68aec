//! `ChangeTokenService`: validates requests, calls the store, and publishes
//! the transitions the store committed.

use tonic::{Request, Response, Status};

use crate::{
    error::ApiError,
    hub::Hub,
    propagation::Propagation,
    proto::{
        GetChangeTokenRequest, GetChangeTokenResponse, GetChangeTokenStatusRequest,
        GetChangeTokenStatusResponse, SubmitChangeRequest, SubmitChangeResponse, WatchTokenRequest,
        change_token_service_server::ChangeTokenService,
    },
    stats::{Method, Stats},
    store::Store,
    token::{Scope, TokenId},
    watch::{self, WatchStream, proto_status},
};

/// The longest description accepted, in bytes.
pub const MAX_DESCRIPTION: usize = 4096;

/// The service's shared state. Cheap to clone.
#[derive(Clone)]
pub struct ChangeTokens {
    store: Store,
    hub: Hub,
    propagation: Propagation,
    max_payload: usize,
    stats: Stats,
}

impl ChangeTokens {
    /// Builds the service over its collaborators. Submissions over
    /// `max_payload` bytes are refused.
    pub fn new(
        store: Store,
        hub: Hub,
        propagation: Propagation,
        max_payload: usize,
        stats: Stats,
    ) -> Self {
        ChangeTokens {
            store,
            hub,
            propagation,
            max_payload,
            stats,
        }
    }
}

impl ChangeTokens {
    async fn get_change_token_inner(
        &self,
        request: Request<GetChangeTokenRequest>,
    ) -> Result<Response<GetChangeTokenResponse>, Status> {
        let scope = Scope::parse(&request.get_ref().scope).map_err(ApiError::from)?;
        let token = self.store.provision(&scope).await.map_err(ApiError::from)?;
        tracing::debug!(scope = scope.as_str(), %token, "get change token");
        Ok(Response::new(GetChangeTokenResponse {
            change_token: token.to_string(),
        }))
    }

    async fn get_change_token_status_inner(
        &self,
        request: Request<GetChangeTokenStatusRequest>,
    ) -> Result<Response<GetChangeTokenStatusResponse>, Status> {
        let token: TokenId = request
            .get_ref()
            .change_token
            .parse()
            .map_err(ApiError::from)?;
        let record = self.store.get(token).await.map_err(ApiError::from)?;
        let record = record.ok_or(ApiError::NotFound(token))?;
        Ok(Response::new(GetChangeTokenStatusResponse {
            change_token_status: proto_status(record.status) as i32,
        }))
    }

    async fn submit_change_inner(
        &self,
        request: Request<SubmitChangeRequest>,
    ) -> Result<Response<SubmitChangeResponse>, Status> {
        let SubmitChangeRequest {
            change_token,
            payload,
            description,
        } = request.into_inner();
        let token: TokenId = change_token.parse().map_err(ApiError::from)?;
        if payload.len() > self.max_payload {
            return Err(ApiError::PayloadTooLarge {
                size: payload.len(),
                limit: self.max_payload,
            }
            .into());
        }
        if description.len() > MAX_DESCRIPTION {
            return Err(ApiError::DescriptionTooLong {
                size: description.len(),
                limit: MAX_DESCRIPTION,
            }
            .into());
        }
        // The commit and its publication run in their own task: a client that
        // gives up mid-call must not cut off the publication of a transition
        // that was committed for it.
        let (store, hub, propagation) = (
            self.store.clone(),
            self.hub.clone(),
            self.propagation.clone(),
        );
        let accepted = tokio::spawn(async move {
            let submitted = store.submit(token, payload, description).await?;
            if !submitted.replay {
                hub.publish(&submitted.record);
                propagation.submitted(submitted.record.clone());
            }
            Ok::<_, ApiError>(submitted)
        });
        let submitted = accepted.await.map_err(|_| ApiError::ShuttingDown)??;
        let record = submitted.record;
        tracing::debug!(%token, revision = record.revision, replay = submitted.replay, "submit");
        Ok(Response::new(SubmitChangeResponse {
            change_token: token.to_string(),
            revision: record.revision,
        }))
    }

    async fn watch_token_inner(
        &self,
        request: Request<WatchTokenRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let token: TokenId = request
            .get_ref()
            .change_token
            .parse()
            .map_err(ApiError::from)?;
        let stream = watch::open(&self.hub, &self.store, token).await?;
        tracing::debug!(%token, "watch opened");
        Ok(Response::new(stream))
    }
}

#[tonic::async_trait]
impl ChangeTokenService for ChangeTokens {
    async fn get_change_token(
        &self,
        request: Request<GetChangeTokenRequest>,
    ) -> Result<Response<GetChangeTokenResponse>, Status> {
        let result = self.get_change_token_inner(request).await;
        self.stats.count(Method::GetChangeToken, result)
    }

    async fn get_change_token_status(
        &self,
        request: Request<GetChangeTokenStatusRequest>,
    ) -> Result<Response<GetChangeTokenStatusResponse>, Status> {
        let result = self.get_change_token_status_inner(request).await;
        self.stats.count(Method::GetChangeTokenStatus, result)
    }

    async fn submit_change(
        &self,
        request: Request<SubmitChangeRequest>,
    ) -> Result<Response<SubmitChangeResponse>, Status> {
        let result = self.submit_change_inner(request).await;
        self.stats.count(Method::SubmitChange, result)
    }

    type WatchTokenStream = WatchStream;

    async fn watch_token(
        &self,
        request: Request<WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        let result = self.watch_token_inner(request).await;
        self.stats.count(Method::WatchToken, result)
    }
}

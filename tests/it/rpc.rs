//! Every rule and error of the ChangeTokenService contract, against the real
//! server and a real database.

use std::{collections::HashSet, sync::Arc, time::Duration};

use changetoken::proto::{
    ChangeTokenStatus, GetChangeTokenRequest, GetChangeTokenStatusRequest, SubmitChangeRequest,
    WatchTokenRequest,
};
use tokio::task::JoinSet;
use tonic::Code;

use crate::common::{Client, TestServer, config, data_dir, eventually, reason};

async fn token(client: &mut Client, scope: &str) -> String {
    let request = GetChangeTokenRequest {
        scope: scope.to_owned(),
    };
    client
        .get_change_token(request)
        .await
        .expect("GetChangeToken")
        .into_inner()
        .change_token
}

async fn status(client: &mut Client, token: &str) -> Result<ChangeTokenStatus, tonic::Status> {
    let request = GetChangeTokenStatusRequest {
        change_token: token.to_owned(),
    };
    let response = client.get_change_token_status(request).await?.into_inner();
    Ok(response.change_token_status())
}

async fn submit(
    client: &mut Client,
    token: &str,
    payload: &[u8],
    description: &str,
) -> Result<u64, tonic::Status> {
    let request = SubmitChangeRequest {
        change_token: token.to_owned(),
        payload: payload.to_vec(),
        description: description.to_owned(),
    };
    let response = client.submit_change(request).await?.into_inner();
    assert_eq!(response.change_token, token);
    Ok(response.revision)
}

async fn wait_insync(client: &mut Client, token: &str) {
    eventually(Duration::from_secs(10), "INSYNC", || {
        let mut client = client.clone();
        async move {
            let now = status(&mut client, token).await.ok()?;
            (now == ChangeTokenStatus::Insync).then_some(())
        }
    })
    .await;
}

const UNISSUED: &str = "abcd12f2-46da-4fdb-b8d5-fbd4c466928f";

#[tokio::test]
async fn get_change_token_returns_the_outstanding_token_until_it_is_used() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let first = token(&mut client, "").await;
    assert_eq!(first.len(), 36);
    assert_eq!(first, first.to_lowercase());
    assert_eq!(&first[14..15], "4", "not a version-4 UUID: {first}");
    assert_eq!(token(&mut client, "").await, first);
    assert_eq!(
        status(&mut client, &first).await.unwrap(),
        ChangeTokenStatus::Provisioned
    );

    submit(&mut client, &first, b"x", "").await.unwrap();
    let second = token(&mut client, "").await;
    assert_ne!(second, first, "a used token was handed out again");
    assert_eq!(
        status(&mut client, &second).await.unwrap(),
        ChangeTokenStatus::Provisioned
    );
}

#[tokio::test]
async fn each_scope_has_its_own_outstanding_token() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let default = token(&mut client, "").await;
    let a = token(&mut client, "waf/acl-a").await;
    let b = token(&mut client, "waf/acl-b").await;
    assert_eq!(HashSet::from([&default, &a, &b]).len(), 3);

    submit(&mut client, &a, b"a", "").await.unwrap();
    assert_eq!(
        token(&mut client, "waf/acl-b").await,
        b,
        "using a's token disturbed b"
    );
    assert_eq!(token(&mut client, "").await, default);
    assert_ne!(token(&mut client, "waf/acl-a").await, a);
}

#[tokio::test]
async fn submit_moves_the_token_to_pending_then_insync_with_increasing_revisions() {
    let server = TestServer::start(|c| c.propagation_delay = Duration::from_millis(200)).await;
    let mut client = server.client().await;
    let mut last = 0;
    for scope in ["", "x", "y", ""] {
        let t = token(&mut client, scope).await;
        let revision = submit(&mut client, &t, scope.as_bytes(), "change")
            .await
            .unwrap();
        assert!(revision > last, "revision {revision} after {last}");
        last = revision;
        assert_eq!(
            status(&mut client, &t).await.unwrap(),
            ChangeTokenStatus::Pending
        );
        wait_insync(&mut client, &t).await;
    }
}

#[tokio::test]
async fn an_identical_retry_answers_the_original_revision_and_anything_else_is_stale() {
    let server = TestServer::start(|c| c.propagation_delay = Duration::from_millis(100)).await;
    let mut client = server.client().await;
    let t = token(&mut client, "retry").await;
    let revision = submit(&mut client, &t, b"payload", "desc").await.unwrap();
    assert_eq!(
        submit(&mut client, &t, b"payload", "desc").await.unwrap(),
        revision
    );

    for (payload, description) in [
        (&b"other"[..], "desc"),
        (&b"payload"[..], "other"),
        (&b""[..], ""),
    ] {
        let err = submit(&mut client, &t, payload, description)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Aborted);
        assert_eq!(reason(&err), "CHANGE_TOKEN_STALE");
    }

    wait_insync(&mut client, &t).await;
    assert_eq!(
        submit(&mut client, &t, b"payload", "desc").await.unwrap(),
        revision,
        "a retry after INSYNC must still answer the original revision"
    );
    let next = token(&mut client, "retry").await;
    assert_eq!(
        submit(&mut client, &next, b"n", "").await.unwrap(),
        revision + 1,
        "retries and stale submissions must not consume revisions"
    );
}

#[tokio::test]
async fn unknown_tokens_are_not_found() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let err = status(&mut client, UNISSUED).await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::NotFound, "CHANGE_TOKEN_NOT_FOUND")
    );
    let err = submit(&mut client, UNISSUED, b"p", "").await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::NotFound, "CHANGE_TOKEN_NOT_FOUND")
    );
    let request = WatchTokenRequest {
        change_token: UNISSUED.to_owned(),
    };
    let err = client.watch_token(request).await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::NotFound, "CHANGE_TOKEN_NOT_FOUND")
    );
}

#[tokio::test]
async fn malformed_tokens_and_scopes_are_invalid_arguments_that_say_what_is_expected() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let bad_tokens = [
        "",
        "nope",
        "ABCD12F2-46DA-4FDB-B8D5-FBD4C466928F",
        "abcd12f246da4fdbb8d5fbd4c466928f",
        "abcd12f2-46da-1fdb-b8d5-fbd4c466928f",
    ];
    for bad in bad_tokens {
        let err = status(&mut client, bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
        assert_eq!(reason(&err), "INVALID_CHANGE_TOKEN");
        assert!(
            err.message()
                .contains("lowercase hyphenated version-4 UUID"),
            "{}",
            err.message()
        );
        let err = submit(&mut client, bad, b"", "").await.unwrap_err();
        assert_eq!(reason(&err), "INVALID_CHANGE_TOKEN");
        let request = WatchTokenRequest {
            change_token: bad.to_owned(),
        };
        let err = client.watch_token(request).await.unwrap_err();
        assert_eq!(reason(&err), "INVALID_CHANGE_TOKEN");
    }
    for bad in ["has space", "ünï", "a:b", &"a".repeat(129)] {
        let request = GetChangeTokenRequest {
            scope: bad.to_owned(),
        };
        let err = client.get_change_token(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
        assert_eq!(reason(&err), "INVALID_SCOPE");
    }
    token(&mut client, &"a".repeat(128)).await;
    token(&mut client, "A-z_0.9/x").await;
}

#[tokio::test]
async fn oversized_submissions_are_refused_and_change_nothing() {
    let server = TestServer::start(|c| c.max_payload = 1024).await;
    let mut client = server.client().await;
    let t = token(&mut client, "big").await;
    for size in [1025, 2048, 4096] {
        let err = submit(&mut client, &t, &vec![7; size], "")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "payload of {size} bytes");
        assert_eq!(reason(&err), "PAYLOAD_TOO_LARGE");
    }
    let err = submit(&mut client, &t, b"", &"d".repeat(4097))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "DESCRIPTION_TOO_LONG")
    );

    assert_eq!(
        status(&mut client, &t).await.unwrap(),
        ChangeTokenStatus::Provisioned
    );
    assert_eq!(token(&mut client, "big").await, t);
    assert_eq!(
        submit(&mut client, &t, &[7; 1024], &"d".repeat(4096))
            .await
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_on_one_scope_get_exactly_one_winner_per_token() {
    let server = TestServer::start(|_| {}).await;
    let endpoint = server.endpoint();
    let writers = 24;
    for round in 0..5 {
        let barrier = Arc::new(tokio::sync::Barrier::new(writers));
        let mut tasks = JoinSet::new();
        for writer in 0..writers {
            let (endpoint, barrier) = (endpoint.clone(), barrier.clone());
            tasks.spawn(async move {
                let mut client = crate::common::connect(&endpoint).await;
                barrier.wait().await;
                let t = token(&mut client, "contended").await;
                let payload = format!("round {round} writer {writer}");
                let result = submit(&mut client, &t, payload.as_bytes(), "").await;
                (t, result)
            });
        }
        let results = tasks.join_all().await;
        let mut winners = std::collections::HashMap::new();
        for (t, result) in results {
            match result {
                Ok(revision) => assert!(winners.insert(t, revision).is_none(), "two winners"),
                Err(err) => assert_eq!(reason(&err), "CHANGE_TOKEN_STALE"),
            }
        }
        assert!(!winners.is_empty(), "round {round}: nobody won");
        let revisions: HashSet<_> = winners.values().collect();
        assert_eq!(
            revisions.len(),
            winners.len(),
            "a revision was handed out twice"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_of_different_scopes_never_collide() {
    let server = TestServer::start(|_| {}).await;
    let mut tasks = JoinSet::new();
    for scope in 0..16 {
        let endpoint = server.endpoint();
        tasks.spawn(async move {
            let mut client = crate::common::connect(&endpoint).await;
            let mut revisions = Vec::new();
            for n in 0..20 {
                let t = token(&mut client, &format!("scope-{scope}")).await;
                let payload = format!("{scope}/{n}");
                revisions.push(
                    submit(&mut client, &t, payload.as_bytes(), "")
                        .await
                        .expect("stale"),
                );
            }
            revisions
        });
    }
    let all: Vec<u64> = tasks.join_all().await.into_iter().flatten().collect();
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 320);
    assert_eq!(unique.len(), 320, "revisions collided across scopes");
    assert_eq!(all.iter().max(), Some(&320), "revisions have gaps");
}

#[tokio::test]
async fn every_state_survives_a_restart_on_the_same_data_directory() {
    let (_keep, dir) = data_dir();
    let start = |delay: u64| {
        let mut config = config(&dir);
        config.propagation_delay = Duration::from_millis(delay);
        TestServer::start_with(config)
    };
    let server = start(3_600_000).await;
    let mut client = server.client().await;
    let provisioned = token(&mut client, "kept").await;
    let pending = token(&mut client, "pending").await;
    let revision = submit(&mut client, &pending, b"p", "d").await.unwrap();
    drop(client);
    server.stop().await;

    let server = start(0).await;
    let mut client = server.client().await;
    assert_eq!(token(&mut client, "kept").await, provisioned);
    assert_eq!(
        status(&mut client, &provisioned).await.unwrap(),
        ChangeTokenStatus::Provisioned
    );
    wait_insync(&mut client, &pending).await;
    assert_eq!(
        submit(&mut client, &pending, b"p", "d").await.unwrap(),
        revision
    );
    let next = token(&mut client, "other").await;
    assert_eq!(
        submit(&mut client, &next, b"n", "").await.unwrap(),
        revision + 1
    );
}

#[tokio::test]
async fn retention_deletes_insync_tokens_and_nothing_else() {
    let server = TestServer::start(|c| c.retention = Duration::from_millis(200)).await;
    let mut client = server.client().await;
    let kept = token(&mut client, "unused").await;
    let t = token(&mut client, "used").await;
    submit(&mut client, &t, b"p", "").await.unwrap();
    let check = client.clone();
    eventually(
        Duration::from_secs(10),
        "retention to delete the token",
        || {
            let mut client = check.clone();
            let t = t.clone();
            async move {
                let err = status(&mut client, &t).await.err()?;
                assert_eq!(reason(&err), "CHANGE_TOKEN_NOT_FOUND");
                Some(())
            }
        },
    )
    .await;
    assert_eq!(
        status(&mut client, &kept).await.unwrap(),
        ChangeTokenStatus::Provisioned
    );
    assert_eq!(token(&mut client, "unused").await, kept);
    // The log is empty now; revisions still never repeat.
    let next = token(&mut client, "used").await;
    assert_eq!(
        status(&mut client, &next).await.unwrap(),
        ChangeTokenStatus::Provisioned
    );
    assert_eq!(submit(&mut client, &next, b"q", "").await.unwrap(), 2);
}

#[tokio::test]
async fn health_is_serving_while_up_and_not_serving_once_shutdown_begins() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    // A health Watch stream stays open through shutdown; the grace period ends it.
    let server = TestServer::start(|c| c.shutdown_grace = Duration::from_secs(1)).await;
    let channel = tonic::transport::Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "changetoken.v1.ChangeTokenService"] {
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        let response = health.check(request).await.unwrap().into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let mut updates = health.watch(request).await.unwrap().into_inner();
    let first = updates.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopping = tokio::spawn(server.stop());
    let next = tokio::time::timeout(Duration::from_secs(10), updates.message())
        .await
        .unwrap();
    assert_eq!(next.unwrap().unwrap().status(), ServingStatus::NotServing);
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_whose_caller_gave_up_still_reaches_insync() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let mut abandoned = Vec::new();
    for n in 0..20 {
        let t = token(&mut client, &format!("impatient-{n}")).await;
        let mut request = tonic::Request::new(SubmitChangeRequest {
            change_token: t.clone(),
            payload: b"p".to_vec(),
            description: String::new(),
        });
        request.set_timeout(Duration::from_micros(200));
        if client.submit_change(request).await.is_err() {
            abandoned.push(t);
        }
    }
    let mut committed = 0;
    for t in &abandoned {
        if status(&mut client, t).await.unwrap() != ChangeTokenStatus::Provisioned {
            committed += 1;
            wait_insync(&mut client, t).await;
        }
    }
    assert!(
        committed > 0,
        "no abandoned submission was committed; the test proved nothing"
    );
}

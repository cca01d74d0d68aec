//! The client commands of the binary, as a deploy script runs them: their
//! output and their exit codes.

use std::{process::Output, time::Duration};

use tokio::{io::AsyncWriteExt, process::Command};

use crate::common::{BIN, TestServer};

async fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn changetoken");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).await.expect("write stdin");
    drop(input);
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("command did not finish")
        .expect("command output")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone())
        .expect("utf-8 output")
        .trim_end()
        .to_owned()
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exit code")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_script_gets_a_token_submits_and_waits_for_insync() {
    let server = TestServer::start(|c| c.propagation_delay = Duration::from_millis(200)).await;
    let endpoint = server.endpoint();
    let e = ["--endpoint", endpoint.as_str()];

    let out = run(&[&["token", "--scope", "deploy/web"][..], &e].concat(), b"").await;
    assert_eq!(code(&out), 0, "{out:?}");
    let token = stdout(&out);
    assert!(
        token.parse::<changetoken::token::TokenId>().is_ok(),
        "{token:?}"
    );

    let out = run(&[&["status", &token][..], &e].concat(), b"").await;
    assert_eq!(stdout(&out), "PROVISIONED");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload");
    std::fs::write(&file, b"from a file").unwrap();
    let file = file.to_str().unwrap();
    let args = [
        &[
            "submit",
            &token,
            "--payload-file",
            file,
            "--description",
            "d",
        ][..],
        &e,
    ]
    .concat();
    let out = run(&args, b"").await;
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "1"), "{out:?}");
    // The same change again is an idempotent retry; from stdin, a different one is stale.
    assert_eq!(stdout(&run(&args, b"").await), "1");
    let out = run(&[&["submit", &token][..], &e].concat(), b"other").await;
    assert_eq!(code(&out), 4, "a stale token exits 4: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("CHANGE_TOKEN_STALE"));

    let out = run(&[&["watch", &token][..], &e].concat(), b"").await;
    assert_eq!(code(&out), 0, "{out:?}");
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    let last = lines.last().expect("watch printed nothing");
    let fields: Vec<&str> = last.split(' ').collect();
    assert_eq!(fields[..2], ["INSYNC", "1"], "{lines:?}");
    assert!(humantime::parse_rfc3339(fields[2]).is_ok(), "{last}");

    let out = run(
        &[&["wait", &token, "--timeout", "5s"][..], &e].concat(),
        b"",
    )
    .await;
    assert_eq!(code(&out), 0, "{out:?}");
    assert_eq!(
        stdout(&run(&[&["status", &token][..], &e].concat(), b"").await),
        "INSYNC"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_with_the_documented_codes() {
    let server = TestServer::start(|c| c.propagation_delay = Duration::from_secs(3600)).await;
    let endpoint = server.endpoint();
    let e = ["--endpoint", endpoint.as_str()];
    let unissued = "abcd12f2-46da-4fdb-b8d5-fbd4c466928f";

    assert_eq!(
        code(&run(&[&["status", unissued][..], &e].concat(), b"").await),
        3
    );
    assert_eq!(
        code(&run(&[&["status", "nope"][..], &e].concat(), b"").await),
        2
    );
    assert_eq!(
        code(&run(&[&["token", "--scope", "bad scope"][..], &e].concat(), b"").await),
        2
    );
    assert_eq!(
        code(&run(&["status"], b"").await),
        2,
        "missing argument is a usage error"
    );

    let token = stdout(&run(&[&["token"][..], &e].concat(), b"").await);
    assert_eq!(
        code(&run(&[&["submit", &token][..], &e].concat(), b"p").await),
        0
    );
    let out = run(
        &[&["wait", &token, "--timeout", "300ms"][..], &e].concat(),
        b"",
    )
    .await;
    assert_eq!(code(&out), 5, "a PENDING token times out: {out:?}");

    let dead = ["--endpoint", "http://127.0.0.1:1"];
    assert_eq!(
        code(&run(&[&["status", &token][..], &dead].concat(), b"").await),
        6
    );

    let help = run(&["--help"], b"").await;
    let help = stdout(&help);
    for line in [
        "3  the token does not exist",
        "5  wait or watch timed out",
        "6  the service",
    ] {
        assert!(help.contains(line), "--help does not document {line:?}");
    }
}

//! Durable write throughput at several client counts: GetChangeToken +
//! SubmitChange pairs per second against a running server, each client in
//! its own scope so no submission is stale.
//!
//! `cargo run --release --example write_load -- [ENDPOINT] [SECONDS] [CLIENTS...]`
//! (defaults: http://127.0.0.1:50051, 3 s, clients 1 16 64).

use std::time::{Duration, Instant};

use changetoken::proto::{
    GetChangeTokenRequest, SubmitChangeRequest,
    change_token_service_client::ChangeTokenServiceClient,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let endpoint = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let seconds: u64 = args.next().map_or(Ok(3), |s| s.parse())?;
    let mut counts: Vec<usize> = args.map(|s| s.parse()).collect::<Result<_, _>>()?;
    if counts.is_empty() {
        counts = vec![1, 16, 64];
    }
    let channel = tonic::transport::Channel::from_shared(endpoint)?
        .connect()
        .await?;
    let mut baseline = None;
    println!("{:>8} {:>12} {:>10}", "clients", "pairs/s", "vs 1st");
    for clients in counts {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..clients)
            .map(|n| {
                let mut client = ChangeTokenServiceClient::new(channel.clone());
                tokio::spawn(async move {
                    let mut done = 0u64;
                    while Instant::now() < deadline {
                        let scope = format!("load/{clients}/{n}");
                        let token = client
                            .get_change_token(GetChangeTokenRequest { scope })
                            .await
                            .expect("GetChangeToken")
                            .into_inner()
                            .change_token;
                        let request = SubmitChangeRequest {
                            change_token: token,
                            payload: done.to_le_bytes().to_vec(),
                            description: String::new(),
                        };
                        client.submit_change(request).await.expect("SubmitChange");
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        let mut total = 0;
        for task in tasks {
            total += task.await?;
        }
        let rate = total as f64 / seconds as f64;
        let first = *baseline.get_or_insert(rate);
        println!("{clients:>8} {rate:>12.0} {:>9.1}x", rate / first);
    }
    Ok(())
}

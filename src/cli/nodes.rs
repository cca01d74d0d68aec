//! `changetoken nodes`: one line per fleet member, `NODE_ID ACKED LAG STATE`,
//! space-separated and without a header so scripts can split it. STATE is
//! `connected` or `disconnected-since=TIME` (RFC 3339, milliseconds, UTC).

use std::time::{Duration, UNIX_EPOCH};

use crate::proto::{ListNodesRequest, Node, propagation_service_client::PropagationServiceClient};

use super::client::{Result, channel};

/// `nodes`: prints the members of the fleet in the service's order (by node id).
pub async fn list(endpoint: &str) -> Result {
    let mut client = PropagationServiceClient::new(channel(endpoint).await?);
    let response = client.list_nodes(ListNodesRequest {}).await?.into_inner();
    for node in &response.nodes {
        println!("{}", node_line(node));
    }
    Ok(())
}

/// `NODE_ID ACKED LAG STATE`.
fn node_line(node: &Node) -> String {
    let state = if node.connected {
        "connected".to_owned()
    } else {
        match node.disconnected_since {
            Some(t) => {
                let at = UNIX_EPOCH
                    + Duration::new(
                        t.seconds.max(0) as u64,
                        t.nanos.clamp(0, 999_999_999) as u32,
                    );
                format!(
                    "disconnected-since={}",
                    humantime::format_rfc3339_millis(at)
                )
            }
            None => "disconnected".to_owned(),
        }
    };
    format!(
        "{} {} {} {state}",
        node.node_id, node.acked_revision, node.lag
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(connected: bool, since: Option<prost_types::Timestamp>) -> Node {
        Node {
            node_id: "web-1".into(),
            acked_revision: 41,
            lag: 2,
            connected,
            disconnected_since: since,
        }
    }

    #[test]
    fn connected_member() {
        assert_eq!(node_line(&node(true, None)), "web-1 41 2 connected");
    }

    #[test]
    fn disconnected_member_shows_since_in_utc_millis() {
        let since = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 123_456_789,
        };
        assert_eq!(
            node_line(&node(false, Some(since))),
            "web-1 41 2 disconnected-since=2023-11-14T22:13:20.123Z"
        );
    }

    #[test]
    fn disconnected_member_without_time() {
        assert_eq!(node_line(&node(false, None)), "web-1 41 2 disconnected");
    }
}

//! Fleet membership and the INSYNC rule.
//!
//! A member is a node that joined through `Sync` and has not been dropped. A
//! change is INSYNC once every member acknowledged its revision and at least
//! the minimum fleet size did; with no members and a minimum of 0 the service
//! stands alone and the propagation delay decides. A disconnected member keeps
//! blocking until it has been gone for the member timeout, then it is dropped
//! and stops blocking; it rejoins by connecting again. This module is pure
//! state: the propagation worker owns it and persists what it reports.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::{
    store::MemberUpdate,
    token::{Micros, now_micros},
};

/// The longest node id, in bytes.
pub const MAX_NODE_ID_LEN: usize = 128;

/// Why a string is not a node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid node id {input:?}: a node id is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' \
     and '-'"
)]
pub struct InvalidNodeId {
    input: String,
}

/// Validates a node id.
pub fn parse_node_id(s: &str) -> Result<String, InvalidNodeId> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if s.is_empty() || s.len() > MAX_NODE_ID_LEN || !s.bytes().all(allowed) {
        return Err(InvalidNodeId {
            input: s.chars().take(MAX_NODE_ID_LEN + 1).collect(),
        });
    }
    Ok(s.to_owned())
}

/// Which PENDING changes may become INSYNC now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watermark {
    /// No fleet: changes are INSYNC after the propagation delay.
    Standalone,
    /// Every change up to and including this revision.
    UpTo(u64),
    /// None: fewer members than the minimum fleet size.
    Blocked,
}

/// One member as operators see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// The node's id.
    pub node: String,
    /// The highest revision it acknowledged.
    pub acked: u64,
    /// Whether it has a Sync stream open.
    pub connected: bool,
    /// When its last stream ended, while disconnected.
    pub disconnected_since: Option<Micros>,
}

struct Member {
    acked: u64,
    connection: Option<(u64, CancellationToken)>,
    /// Since when it is disconnected: the instant for the timeout, the wall
    /// clock for operators.
    disconnected: Option<(Instant, Micros)>,
    /// Whether `acked` changed since it was last persisted.
    dirty: bool,
}

/// The members of the fleet.
pub struct Fleet {
    members: BTreeMap<String, Member>,
    timeout: Duration,
    min_size: usize,
}

impl Fleet {
    /// The fleet as persisted: every member starts disconnected now, so each
    /// gets the full member timeout to reconnect after a restart.
    pub fn restore(stored: Vec<(String, u64)>, timeout: Duration, min_size: usize) -> Self {
        let since = (Instant::now(), now_micros());
        let members = stored
            .into_iter()
            .map(|(node, acked)| {
                let member = Member {
                    acked,
                    connection: None,
                    disconnected: Some(since),
                    dirty: false,
                };
                (node, member)
            })
            .collect();
        Fleet {
            members,
            timeout,
            min_size,
        }
    }

    /// Registers a connection of `node` that has applied everything up to
    /// `acked`. A previous connection of the same node is cancelled. Returns
    /// the update to persist before the node is welcomed.
    pub fn join(
        &mut self,
        node: &str,
        acked: u64,
        connection: u64,
        kick: CancellationToken,
    ) -> MemberUpdate {
        let member = self.members.entry(node.to_owned()).or_insert(Member {
            acked,
            connection: None,
            disconnected: None,
            dirty: false,
        });
        if let Some((_, old)) = member.connection.replace((connection, kick)) {
            old.cancel();
        }
        member.acked = acked;
        member.disconnected = None;
        member.dirty = false;
        MemberUpdate::Put {
            node: node.to_owned(),
            acked,
        }
    }

    /// Records an acknowledgement from the node's current connection.
    /// Returns whether the member's progress moved.
    pub fn ack(&mut self, node: &str, connection: u64, revision: u64) -> bool {
        match self.members.get_mut(node) {
            Some(member)
                if member
                    .connection
                    .as_ref()
                    .is_some_and(|(c, _)| *c == connection)
                    && revision > member.acked =>
            {
                member.acked = revision;
                member.dirty = true;
                true
            }
            _ => false,
        }
    }

    /// Records that a connection ended. A connection that was already
    /// replaced changes nothing.
    pub fn left(&mut self, node: &str, connection: u64) {
        if let Some(member) = self.members.get_mut(node)
            && member
                .connection
                .as_ref()
                .is_some_and(|(c, _)| *c == connection)
        {
            member.connection = None;
            member.disconnected = Some((Instant::now(), now_micros()));
        }
    }

    /// Drops the members disconnected for longer than the timeout and returns
    /// their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let timeout = self.timeout;
        let expired: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.disconnected.is_some_and(|(at, _)| now >= at + timeout))
            .map(|(node, _)| node.clone())
            .collect();
        for node in &expired {
            self.members.remove(node);
        }
        expired
    }

    /// When the next disconnected member will be dropped.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.members
            .values()
            .filter_map(|m| m.disconnected.map(|(at, _)| at + self.timeout))
            .min()
    }

    /// Which changes may be INSYNC now.
    pub fn watermark(&self) -> Watermark {
        if self.members.is_empty() && self.min_size == 0 {
            return Watermark::Standalone;
        }
        if self.members.len() < self.min_size {
            return Watermark::Blocked;
        }
        Watermark::UpTo(self.members.values().map(|m| m.acked).min().unwrap_or(0))
    }

    /// The acknowledgements not yet persisted; they count as persisted after.
    pub fn take_dirty(&mut self) -> Vec<MemberUpdate> {
        self.members
            .iter_mut()
            .filter(|(_, m)| m.dirty)
            .map(|(node, m)| {
                m.dirty = false;
                MemberUpdate::Put {
                    node: node.clone(),
                    acked: m.acked,
                }
            })
            .collect()
    }

    /// Whether any acknowledgement awaits persisting.
    pub fn has_dirty(&self) -> bool {
        self.members.values().any(|m| m.dirty)
    }

    /// Every member, ordered by id.
    pub fn view(&self) -> Vec<NodeView> {
        self.members
            .iter()
            .map(|(node, m)| NodeView {
                node: node.clone(),
                acked: m.acked,
                connected: m.connection.is_some(),
                disconnected_since: m.disconnected.map(|(_, wall)| wall),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(min_size: usize) -> Fleet {
        Fleet::restore(Vec::new(), Duration::from_secs(30), min_size)
    }

    #[test]
    fn node_ids_follow_the_documented_alphabet_and_length() {
        assert!(parse_node_id("web-1.eu_west").is_ok());
        assert!(parse_node_id(&"n".repeat(128)).is_ok());
        for bad in ["", "has space", "a/b", &"n".repeat(129)] {
            assert!(parse_node_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_empty_fleet_stands_alone_unless_a_minimum_is_set() {
        assert_eq!(fleet(0).watermark(), Watermark::Standalone);
        assert_eq!(fleet(1).watermark(), Watermark::Blocked);
    }

    #[test]
    fn the_slowest_member_sets_the_watermark() {
        let mut f = fleet(2);
        f.join("a", 5, 1, CancellationToken::new());
        assert_eq!(
            f.watermark(),
            Watermark::Blocked,
            "one member is under the minimum of two"
        );
        f.join("b", 3, 2, CancellationToken::new());
        assert_eq!(f.watermark(), Watermark::UpTo(3));
        assert!(f.ack("b", 2, 7));
        assert_eq!(f.watermark(), Watermark::UpTo(5));
        assert!(!f.ack("b", 2, 6), "acknowledgements never move back");
        assert!(!f.ack("a", 99, 9), "a stale connection cannot acknowledge");
        assert_eq!(
            f.take_dirty(),
            vec![MemberUpdate::Put {
                node: "b".into(),
                acked: 7
            }]
        );
        assert!(!f.has_dirty());
    }

    #[test]
    fn a_second_connection_replaces_the_first() {
        let mut f = fleet(0);
        let first = CancellationToken::new();
        f.join("a", 1, 1, first.clone());
        f.join("a", 1, 2, CancellationToken::new());
        assert!(first.is_cancelled());
        f.left("a", 1);
        assert!(
            f.view()[0].connected,
            "the replaced connection's end must not disconnect"
        );
        f.left("a", 2);
        assert!(!f.view()[0].connected);
    }

    #[test]
    fn disconnected_members_block_until_the_timeout_then_are_dropped() {
        let mut f = fleet(0);
        f.join("a", 4, 1, CancellationToken::new());
        f.left("a", 1);
        assert_eq!(f.watermark(), Watermark::UpTo(4));
        let deadline = f.next_expiry().expect("a disconnected member expires");
        assert!(f.expire(deadline - Duration::from_millis(1)).is_empty());
        assert_eq!(f.expire(deadline), vec!["a".to_owned()]);
        assert_eq!(f.watermark(), Watermark::Standalone);
    }

    #[test]
    fn restored_members_start_disconnected_with_a_full_timeout() {
        let f = Fleet::restore(vec![("a".into(), 9)], Duration::from_secs(30), 0);
        let view = f.view();
        assert!(!view[0].connected && view[0].disconnected_since.is_some());
        assert_eq!(f.watermark(), Watermark::UpTo(9));
        assert!(f.next_expiry().unwrap() > Instant::now() + Duration::from_secs(29));
    }
}

//! The domain vocabulary: change tokens, scopes, statuses and the record of a
//! token's progress. Everything here is validated on construction, so the rest
//! of the service never sees a malformed token or scope.

use std::{fmt, str::FromStr, time::SystemTime};

use uuid::Uuid;

/// The longest non-empty scope, in bytes.
pub const MAX_SCOPE_LEN: usize = 128;

/// A change token: a version-4 UUID, written lowercase and hyphenated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenId(u128);

impl TokenId {
    /// Mints a fresh random token.
    pub fn generate() -> Self {
        TokenId(Uuid::new_v4().as_u128())
    }

    /// The token as a 128-bit number (its storage key).
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Rebuilds a token from its storage key.
    pub fn from_u128(value: u128) -> Self {
        TokenId(value)
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Uuid::from_u128(self.0).hyphenated().fmt(f)
    }
}

/// Why a string is not a change token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid change token {input:?}: a change token is a lowercase hyphenated version-4 UUID \
     such as \"abcd12f2-46da-4fdb-b8d5-fbd4c466928f\""
)]
pub struct InvalidToken {
    input: String,
}

impl FromStr for TokenId {
    type Err = InvalidToken;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidToken {
            input: s.chars().take(MAX_SCOPE_LEN).collect(),
        };
        // The canonical form is exactly 36 characters; anything longer or
        // differently cased would parse but is not a token this service issues.
        if s.len() != 36 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid());
        }
        let uuid = Uuid::try_parse(s).map_err(|_| invalid())?;
        if uuid.get_version_num() != 4 || uuid.get_variant() != uuid::Variant::RFC4122 {
            return Err(invalid());
        }
        Ok(TokenId(uuid.as_u128()))
    }
}

/// A scope: `""` (the default scope) or 1 to 128 characters of `[A-Za-z0-9._/-]`.
/// Each scope has at most one outstanding PROVISIONED token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Scope(String);

/// Why a string is not a scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid scope {input:?}: a scope is empty (the default scope) or 1 to 128 characters \
     of A-Z, a-z, 0-9, '.', '_', '/' and '-'"
)]
pub struct InvalidScope {
    input: String,
}

impl Scope {
    /// Validates `s` as a scope.
    pub fn parse(s: &str) -> Result<Self, InvalidScope> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-');
        if s.len() > MAX_SCOPE_LEN || !s.bytes().all(allowed) {
            return Err(InvalidScope {
                input: s.chars().take(MAX_SCOPE_LEN + 1).collect(),
            });
        }
        Ok(Scope(s.to_owned()))
    }

    /// The scope as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where a token is in its lifecycle. The order of the variants is the only
/// order in which a token moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    /// Issued, not yet used.
    Provisioned,
    /// Its change is durable and propagating.
    Pending,
    /// Every server of the fleet applied its change.
    InSync,
}

impl Status {
    /// The name printed by the CLI and used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Provisioned => "PROVISIONED",
            Status::Pending => "PENDING",
            Status::InSync => "INSYNC",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Microseconds since the Unix epoch: how every timestamp is stored.
pub type Micros = u64;

/// The current wall-clock time in microseconds since the Unix epoch.
pub fn now_micros() -> Micros {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Everything known about one token. Timestamps of states the token has not
/// reached are zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// The token.
    pub token: TokenId,
    /// The scope it was issued in.
    pub scope: String,
    /// Its current status.
    pub status: Status,
    /// The revision of its change, or 0 while PROVISIONED.
    pub revision: u64,
    /// When it was issued.
    pub provisioned_at: Micros,
    /// When its change was accepted.
    pub pending_at: Micros,
    /// When its change became INSYNC.
    pub insync_at: Micros,
}

impl TokenRecord {
    /// When the token entered `status`, or `None` if it has not reached it.
    pub fn entered_at(&self, status: Status) -> Option<Micros> {
        if status > self.status {
            return None;
        }
        Some(match status {
            Status::Provisioned => self.provisioned_at,
            Status::Pending => self.pending_at,
            Status::InSync => self.insync_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_through_their_canonical_form() {
        let token = TokenId::generate();
        let text = token.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(text.parse::<TokenId>().unwrap(), token);
    }

    #[test]
    fn only_lowercase_hyphenated_v4_uuids_are_tokens() {
        assert!(
            "abcd12f2-46da-4fdb-b8d5-fbd4c466928f"
                .parse::<TokenId>()
                .is_ok()
        );
        for bad in [
            "",
            "not-a-token",
            "ABCD12F2-46DA-4FDB-B8D5-FBD4C466928F",
            "abcd12f246da4fdbb8d5fbd4c466928f",
            "{abcd12f2-46da-4fdb-b8d5-fbd4c466928f}",
            "abcd12f2-46da-1fdb-b8d5-fbd4c466928f",
            "abcd12f2-46da-4fdb-08d5-fbd4c466928f",
        ] {
            assert!(bad.parse::<TokenId>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn scopes_follow_the_documented_alphabet_and_length() {
        assert!(Scope::parse("").is_ok());
        assert!(Scope::parse("waf/web-acl_1.prod").is_ok());
        assert!(Scope::parse(&"a".repeat(128)).is_ok());
        assert!(Scope::parse(&"a".repeat(129)).is_err());
        assert!(Scope::parse("has space").is_err());
        assert!(Scope::parse("ünïcode").is_err());
    }
}

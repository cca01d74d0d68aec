//! The on-disk encoding of token and change records. Each value starts with a
//! format byte so that a later layout can be read beside this one.

use crate::token::{Status, TokenId, TokenRecord};

const FORMAT: u8 = 1;
const TOKEN_HEADER: usize = 2 + 8 * 4;
const CHANGE_HEADER: usize = 1 + 8 + 16 + 4;

/// A stored value that does not decode: the database was damaged or written
/// by an incompatible version.
#[derive(Debug, Clone, thiserror::Error)]
#[error("corrupt {what} record")]
pub struct Corrupt {
    what: &'static str,
}

fn status_byte(status: Status) -> u8 {
    match status {
        Status::Provisioned => 1,
        Status::Pending => 2,
        Status::InSync => 3,
    }
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("slice of eight bytes"))
}

/// Encodes everything but the token itself, which is the key.
pub fn encode_token(record: &TokenRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(TOKEN_HEADER + record.scope.len());
    out.push(FORMAT);
    out.push(status_byte(record.status));
    for n in [
        record.revision,
        record.provisioned_at,
        record.pending_at,
        record.insync_at,
    ] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(record.scope.as_bytes());
    out
}

/// Decodes a value written by [`encode_token`].
pub fn decode_token(token: TokenId, bytes: &[u8]) -> Result<TokenRecord, Corrupt> {
    let corrupt = Corrupt { what: "token" };
    if bytes.len() < TOKEN_HEADER || bytes[0] != FORMAT {
        return Err(corrupt);
    }
    let status = match bytes[1] {
        1 => Status::Provisioned,
        2 => Status::Pending,
        3 => Status::InSync,
        _ => return Err(corrupt),
    };
    let scope = std::str::from_utf8(&bytes[TOKEN_HEADER..]).map_err(|_| corrupt.clone())?;
    Ok(TokenRecord {
        token,
        scope: scope.to_owned(),
        status,
        revision: u64_at(bytes, 2),
        provisioned_at: u64_at(bytes, 10),
        pending_at: u64_at(bytes, 18),
        insync_at: u64_at(bytes, 26),
    })
}

/// One entry of the change log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The token it was submitted with.
    pub token: TokenId,
    /// When it was accepted, in microseconds since the Unix epoch.
    pub submitted_at: u64,
    /// The submitter's summary.
    pub description: String,
    /// The opaque change itself.
    pub payload: Vec<u8>,
}

/// Encodes a change; the revision is the key.
pub fn encode_change(
    token: TokenId,
    submitted_at: u64,
    description: &str,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHANGE_HEADER + description.len() + payload.len());
    out.push(FORMAT);
    out.extend_from_slice(&submitted_at.to_le_bytes());
    out.extend_from_slice(&token.as_u128().to_le_bytes());
    out.extend_from_slice(&(description.len() as u32).to_le_bytes());
    out.extend_from_slice(description.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// The parts of an encoded change, borrowed from the stored bytes.
pub struct ChangeRef<'a> {
    pub token: TokenId,
    pub submitted_at: u64,
    pub description: &'a str,
    pub payload: &'a [u8],
}

/// Decodes a value written by [`encode_change`] without copying it.
pub fn decode_change(bytes: &[u8]) -> Result<ChangeRef<'_>, Corrupt> {
    let corrupt = Corrupt { what: "change" };
    if bytes.len() < CHANGE_HEADER || bytes[0] != FORMAT {
        return Err(corrupt);
    }
    let token = u128::from_le_bytes(bytes[9..25].try_into().expect("slice of sixteen bytes"));
    let len = u32::from_le_bytes(bytes[25..29].try_into().expect("slice of four bytes")) as usize;
    let rest = &bytes[CHANGE_HEADER..];
    if rest.len() < len {
        return Err(corrupt);
    }
    let description = std::str::from_utf8(&rest[..len]).map_err(|_| corrupt.clone())?;
    Ok(ChangeRef {
        token: TokenId::from_u128(token),
        submitted_at: u64_at(bytes, 1),
        description,
        payload: &rest[len..],
    })
}

impl ChangeRef<'_> {
    /// Copies the change out of the stored bytes.
    pub fn to_owned(&self) -> Change {
        Change {
            token: self.token,
            submitted_at: self.submitted_at,
            description: self.description.to_owned(),
            payload: self.payload.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_records_round_trip() {
        let record = TokenRecord {
            token: TokenId::generate(),
            scope: "a/b".into(),
            status: Status::Pending,
            revision: 7,
            provisioned_at: 1,
            pending_at: 2,
            insync_at: 0,
        };
        let bytes = encode_token(&record);
        assert_eq!(decode_token(record.token, &bytes).unwrap(), record);
        assert!(decode_token(record.token, &bytes[..5]).is_err());
    }

    #[test]
    fn changes_round_trip() {
        let token = TokenId::generate();
        let bytes = encode_change(token, 42, "desc", b"\x00payload");
        let change = decode_change(&bytes).unwrap().to_owned();
        assert_eq!(
            change,
            Change {
                token,
                submitted_at: 42,
                description: "desc".into(),
                payload: b"\x00payload".to_vec()
            }
        );
        assert!(decode_change(&bytes[..20]).is_err());
    }
}

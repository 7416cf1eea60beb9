//! Decode errors, each mapping one to one onto a NOTIFICATION.

use super::consts::err;

/// A message that cannot be accepted; sending `code`/`subcode`/`data` in a
/// NOTIFICATION and closing the session is the required response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (NOTIFICATION {code}/{subcode})")]
pub struct DecodeError {
    /// NOTIFICATION error code.
    pub code: u8,
    /// NOTIFICATION error subcode.
    pub subcode: u8,
    /// NOTIFICATION data field.
    pub data: Vec<u8>,
    /// Human-readable cause, for logs.
    pub reason: String,
}

impl DecodeError {
    /// An error with empty data.
    pub fn new(code: u8, subcode: u8, reason: impl Into<String>) -> Self {
        Self {
            code,
            subcode,
            data: Vec::new(),
            reason: reason.into(),
        }
    }

    /// An error whose data field is `data`.
    pub fn with_data(code: u8, subcode: u8, data: Vec<u8>, reason: impl Into<String>) -> Self {
        Self {
            code,
            subcode,
            data,
            reason: reason.into(),
        }
    }

    /// "Bad message length", with the offending length as data.
    pub fn bad_length(len: usize) -> Self {
        Self::with_data(
            err::HEADER,
            err::HEADER_BAD_LENGTH,
            (len as u16).to_be_bytes().to_vec(),
            format!("bad message length {len}"),
        )
    }

    /// UPDATE "malformed attribute list".
    pub fn malformed_attrs(reason: impl Into<String>) -> Self {
        Self::new(err::UPDATE, err::UPDATE_MALFORMED_ATTR_LIST, reason)
    }
}

//! The appliance's error type and its one mapping to gRPC status codes. Messages
//! name fields and keys, never values; internal details go to the log only.

use tonic::{Code, Status};

use crate::hsm;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed.
    #[error("{field}: {msg}")]
    InvalidArgument { field: &'static str, msg: String },
    #[error("{0} not found")]
    KeyNotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    /// The key exists but its class or state does not allow this use.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A MAC, signature or authenticated decryption did not verify.
    #[error("{0}")]
    VerificationFailed(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("deadline exceeded")]
    DeadlineExceeded,
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Unavailable(String),
    /// Never shown to clients as is.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument { field, msg: msg.into() }
    }

    /// The gRPC code this error maps to (also written to the audit trail).
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } | Error::VerificationFailed(_) => Code::InvalidArgument,
            Error::KeyNotFound(_) => Code::NotFound,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::DeadlineExceeded => Code::DeadlineExceeded,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<hsm::Error> for Error {
    fn from(e: hsm::Error) -> Self {
        match e {
            hsm::Error::KeyNotFound(k) => Error::KeyNotFound(format!("key {k}")),
            hsm::Error::KeyUsage { key, reason } => Error::FailedPrecondition(format!("key {key}: {reason}")),
            hsm::Error::VerifyFailed => Error::VerificationFailed("does not verify".into()),
            hsm::Error::InvalidInput(m) => Error::InvalidArgument { field: "request", msg: m },
            hsm::Error::BadPinBlock => Error::InvalidArgument { field: "pin.block", msg: e.to_string() },
            hsm::Error::Exhausted(m) => Error::ResourceExhausted(m),
            hsm::Error::Unavailable(_)
            | hsm::Error::SessionLost { .. }
            | hsm::Error::ObjectVanished(_)
            | hsm::Error::LoginRefused(_) => {
                tracing::error!(error = %e, "token unavailable");
                Error::Unavailable("key store unavailable; retry later".into())
            }
            other @ (hsm::Error::Token { .. } | hsm::Error::Catalogue(_)) => Error::Internal(other.to_string()),
        }
    }
}

/// The one place where appliance errors become wire statuses.
impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = e.code();
        match e {
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::new(code, "internal error")
            }
            other => Status::new(code, other.to_string()),
        }
    }
}

/// Name of a gRPC code as the audit trail writes it ("INVALID_ARGUMENT").
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

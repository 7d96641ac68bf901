//! The PKCS#11 boundary: the only module that imports cryptoki. It owns the token
//! context, the logged-in anchor session, the session pool, the key catalogue and the
//! typed cryptographic operations. Nothing outside this module sees a handle or a
//! cryptoki type.

mod binding;
mod keys;
mod mac;
mod ops;
mod otp;
mod pin;
mod token;

pub use keys::{
    label, set_des_parity, validate_name, Algorithm, Catalogue, Compound, KeyClass, KeyEntry, KeyFlags, KeyMeta, KeyState,
    Usage, GCM_LIMIT, LEFT_SUFFIX, RIGHT_SUFFIX, VARIANT_SUFFIX,
};
pub use binding::{Resealable, INDEX_LEN};
pub use mac::{MacAlgorithm, MacKey};
pub use otp::{SeedCache, SeedHash};
pub use pin::{format_matches as pin_format_matches, DukptCache, PinInput, PinSourceKey, PvMethod};
pub use ops::low_s_normalise;
pub use token::{Hsm, HsmOptions, TokenIdentity, SOFTHSM_RECYCLE_AFTER};

use cryptoki::error::{Error as CkError, RvError};

/// What went wrong at the token boundary. Messages never carry key material or
/// caller data; they name keys by `name/vN` only.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The token (or its module) cannot be reached right now.
    #[error("token unavailable: {0}")]
    Unavailable(String),
    /// The session or login state was lost; the operation may be retried after recovery.
    #[error("token session lost during {op}: {rv}")]
    SessionLost { op: &'static str, rv: String },
    #[error("key {0} not found")]
    KeyNotFound(String),
    /// The key's class or state does not allow the requested use.
    #[error("key {key}: {reason}")]
    KeyUsage { key: String, reason: String },
    /// A MAC, signature or authenticated decryption did not verify.
    #[error("verification failed")]
    VerifyFailed,
    /// Caller input the token rejected (length, format).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A PIN block that does not decode (one uniform answer, no detail).
    #[error("PIN block does not contain valid values")]
    BadPinBlock,
    /// A usage limit (such as the AES-GCM invocation limit) is reached.
    #[error("limit reached: {0}")]
    Exhausted(String),
    /// Anything else the token answered; details for the log only.
    #[error("token error during {op}: {rv}")]
    Token { op: &'static str, rv: String },
    /// Bad configuration or catalogue content.
    #[error("{0}")]
    Catalogue(String),
    /// The token refused the user PIN (incorrect, locked, expired). Never retried
    /// automatically: HSMs lock or zeroise after repeated wrong PINs.
    #[error("token login refused: {0}")]
    LoginRefused(String),
    /// An object went away between finding and using it (another process replaced
    /// it); the catalogue load that saw it is retried.
    #[error("token object vanished during {0}")]
    ObjectVanished(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The kind of operation a PKCS#11 call belonged to: the same return value means
/// different things in different operations (SoftHSM answers a GCM tag mismatch
/// with CKR_GENERAL_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// Decryption or verification: data errors mean "does not authenticate".
    Verify,
    /// Everything else.
    Other,
}

impl Error {
    /// Map a cryptoki error once, knowing what the call was for.
    pub(crate) fn from_ck(op: &'static str, kind: OpKind, e: CkError) -> Self {
        match e {
            CkError::Pkcs11(rv, _) => {
                let name = format!("{rv:?}");
                match rv {
                    RvError::ObjectHandleInvalid if matches!(op, "get_attributes" | "destroy_object") => {
                        Error::ObjectVanished(op)
                    }
                    RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::UserNotLoggedIn
                    | RvError::KeyHandleInvalid
                    | RvError::WrappingKeyHandleInvalid
                    | RvError::UnwrappingKeyHandleInvalid
                    | RvError::ObjectHandleInvalid => Error::SessionLost { op, rv: name },
                    RvError::TokenNotPresent
                    | RvError::TokenNotRecognized
                    | RvError::DeviceRemoved
                    | RvError::DeviceError
                    | RvError::DeviceMemory
                    | RvError::SlotIdInvalid
                    | RvError::CryptokiNotInitialized => Error::Unavailable(format!("{op}: {name}")),
                    RvError::SignatureInvalid
                    | RvError::SignatureLenRange
                    | RvError::EncryptedDataInvalid
                    | RvError::EncryptedDataLenRange
                        if kind == OpKind::Verify =>
                    {
                        Error::VerifyFailed
                    }
                    RvError::GeneralError if kind == OpKind::Verify => Error::VerifyFailed,
                    RvError::DataLenRange | RvError::DataInvalid => {
                        Error::InvalidInput(format!("{op}: data length or content not accepted"))
                    }
                    _ => Error::Token { op, rv: name },
                }
            }
            CkError::LibraryLoading(e) => Error::Unavailable(format!("cannot load PKCS#11 module: {e}")),
            other => Error::Token { op, rv: other.to_string() },
        }
    }

    /// True when a fresh login and key reload may make the operation succeed.
    pub(crate) fn is_recoverable(&self) -> bool {
        matches!(self, Error::SessionLost { .. })
    }
}

/// Shorthand used inside this module: `ck(op)` maps a cryptoki result for an ordinary call.
pub(crate) fn ck(op: &'static str) -> impl FnOnce(CkError) -> Error {
    move |e| Error::from_ck(op, OpKind::Other, e)
}

/// As [`ck`], for decrypt/verify calls.
pub(crate) fn ck_verify(op: &'static str) -> impl FnOnce(CkError) -> Error {
    move |e| Error::from_ck(op, OpKind::Verify, e)
}

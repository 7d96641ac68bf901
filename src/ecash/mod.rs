//! E-cash formats and offline verification (device certificates, vouchers, payments,
//! trust bundles; the terminal and wallet sides).
//!
//! Pure and HSM-free: public-key work runs in openssl, signing keys of the appliance
//! (`device.ca`, `voucher.issuer`, `ecash.root`) stay in the token and only their
//! signatures arrive here. The byte layouts are documented in `docs/ecash-format.md`.
//!
//! - [`format`]: the signed objects, their to-be-signed and wire encodings
//!   ([`Signed`]), and the [`Presented`] container a wallet hands a terminal.
//! - [`sig`]: P-256 and Ed25519 public keys, strict low-S ECDSA and Ed25519
//!   verification, a software P-256 signer.
//! - [`bundle`]: trust-bundle verification ([`VerifiedBundle`]).
//! - [`verify`]: the [`Verdict`]s and [`check_payment`], the one place the payment
//!   rules live (shared by terminals and the ledger).
//! - [`offline`]: the merchant [`Terminal`] and the simulated secure-element [`Wallet`].

pub mod bundle;
pub mod format;
pub mod offline;
pub mod sig;
pub mod verify;

#[cfg(test)]
pub(crate) mod testkit;

pub use bundle::VerifiedBundle;
pub use format::{
    CertificationRequest, DeviceCertificate, KeyRole, OfflineLimits, Payment, Presented, Signable, Signed, TrustBundle,
    TrustedKey, Voucher,
};
pub use offline::{Challenge, Terminal, Wallet, WalletError};
pub use sig::{low_s, verify_p256, KeyAlgorithm, PublicKey, SigningKey};
pub use verify::{check_payment, check_payment_memo, KeySource, NoMemo, SignatureMemo, Verdict};

/// What went wrong decoding, building or verifying an e-cash object. Messages name
/// the object kind, the field and the rule, never a field's value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EcashError {
    /// A field (or the framing) breaks the encoding or a validation rule.
    #[error("{kind}: {field}: {msg}")]
    Malformed {
        kind: &'static str,
        field: &'static str,
        msg: &'static str,
    },
    /// Not a public key of the expected algorithm and encoding (P-256: not a point on the curve).
    #[error("invalid public key: {0}")]
    InvalidKey(&'static str),
    /// The signature does not verify (or is not a canonical low-S P-256 signature).
    #[error("bad signature")]
    BadSignature,
    /// A trust bundle names a root key version the verifier does not hold.
    #[error("unknown root key version {0}")]
    UnknownRoot(u32),
    /// A trust bundle older than the one required (or held).
    #[error("older bundle: version {got}, at least {min} required")]
    OlderBundle { got: u64, min: u64 },
    /// A trust bundle with the version already held but other keys.
    #[error("bundle version {0} is already held with different content")]
    BundleConflict(u64),
    /// The crypto library failed (out of memory, no randomness); names the operation.
    #[error("{0} failed in the crypto library")]
    Crypto(&'static str),
}

//! Trust-bundle verification: a bundle signed by an `ecash.root` version the verifier
//! holds becomes a [`VerifiedBundle`], the [`KeySource`] terminals check payments with.

use std::fmt;

use super::format::{KeyRole, Signed, TrustBundle};
use super::sig::PublicKey;
use super::verify::KeySource;
use super::EcashError;

/// One parsed key of a verified bundle.
#[derive(Clone)]
struct Entry {
    role: KeyRole,
    version: u32,
    not_before: u64,
    not_after: u64,
    key: PublicKey,
}

/// A trust bundle whose root signature verified; its keys parsed once, sorted by
/// (role, version) for lookup.
#[derive(Clone)]
pub struct VerifiedBundle {
    signed: Signed<TrustBundle>,
    encoded: Vec<u8>,
    entries: Vec<Entry>,
}

impl TrustBundle {
    /// Decodes `encoded` strictly and verifies it under the root of its
    /// `root_key_version` among `roots`. Errors: malformed, [`EcashError::UnknownRoot`],
    /// [`EcashError::BadSignature`], [`EcashError::OlderBundle`] when `bundle_version <
    /// min_version`.
    pub fn verify(encoded: &[u8], roots: &[(u32, PublicKey)], min_version: u64) -> Result<VerifiedBundle, EcashError> {
        let signed = Signed::<TrustBundle>::decode(encoded)?;
        let b = &signed.body;
        let root = roots
            .iter()
            .find(|(v, _)| *v == b.root_key_version)
            .map(|(_, k)| k)
            .ok_or(EcashError::UnknownRoot(b.root_key_version))?;
        signed.verify(root)?;
        if b.bundle_version < min_version {
            return Err(EcashError::OlderBundle {
                got: b.bundle_version,
                min: min_version,
            });
        }
        let entries = b
            .keys
            .iter()
            .map(|k| {
                Ok(Entry {
                    role: k.role,
                    version: k.version,
                    not_before: k.not_before,
                    not_after: k.not_after,
                    key: PublicKey::from_raw(k.algorithm, &k.public_key)?,
                })
            })
            .collect::<Result<Vec<_>, EcashError>>()?;
        Ok(VerifiedBundle {
            encoded: encoded.to_vec(),
            signed,
            entries,
        })
    }
}

impl VerifiedBundle {
    /// The bundle's version.
    pub fn version(&self) -> u64 {
        self.signed.body.bundle_version
    }

    /// The verified bundle.
    pub fn bundle(&self) -> &TrustBundle {
        &self.signed.body
    }

    /// The exact bytes it was verified from.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }
}

impl KeySource for VerifiedBundle {
    fn key(&self, role: KeyRole, version: u32, at: u64) -> Option<&PublicKey> {
        let i = self
            .entries
            .binary_search_by(|e| (e.role, e.version).cmp(&(role, version)))
            .ok()?;
        let e = self.entries.get(i)?;
        (e.not_before <= at && at <= e.not_after).then_some(&e.key)
    }
}

impl fmt::Debug for VerifiedBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedBundle")
            .field("version", &self.version())
            .field("root_key_version", &self.signed.body.root_key_version)
            .field("keys", &self.entries.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ecash::format::TrustedKey;
    use crate::ecash::sig::{KeyAlgorithm, SigningKey};
    use crate::ecash::testkit::*;

    #[test]
    fn verify_and_lookup() {
        let k = Kit::new();
        let roots = vec![(1, k.root.public_key())];
        let vb = TrustBundle::verify(&k.bundle_signed.encode(), &roots, 0).unwrap();
        assert_eq!(vb.version(), BUNDLE_V);
        assert_eq!(vb.encoded(), &k.bundle_signed.encode()[..]);
        assert_eq!(vb.key(KeyRole::DeviceCa, 1, T0), Some(&k.ca.public_key()));
        assert_eq!(vb.key(KeyRole::VoucherIssuer, 1, T0), Some(&k.issuer.public_key()));
        assert_eq!(vb.key(KeyRole::DeviceCa, 2, T0), None);
        assert_eq!(
            vb.key(KeyRole::VoucherIssuer, 1, u64::MAX),
            Some(&k.issuer.public_key())
        );
        // The CA key of the kit is valid from KEY_NOT_BEFORE.
        assert_eq!(vb.key(KeyRole::DeviceCa, 1, KEY_NOT_BEFORE - 1), None);
        assert!(vb.key(KeyRole::DeviceCa, 1, KEY_NOT_BEFORE).is_some());
        let s = format!("{vb:?}");
        assert!(s.contains("keys: 2"), "{s}");
    }

    #[test]
    fn validity_window_is_inclusive() {
        let root = SigningKey::generate().unwrap();
        let a = SigningKey::generate().unwrap();
        let body = TrustBundle {
            bundle_version: 1,
            issued_at: 10,
            root_key_version: 3,
            keys: vec![TrustedKey {
                role: KeyRole::VoucherIssuer,
                algorithm: KeyAlgorithm::P256,
                version: 7,
                public_key: a.sec1().to_vec(),
                not_before: 100,
                not_after: 200,
            }],
        };
        let e = Signed::sign(body, &root).unwrap().encode();
        let vb = TrustBundle::verify(&e, &[(3, root.public_key())], 1).unwrap();
        for (at, ok) in [(99, false), (100, true), (200, true), (201, false)] {
            assert_eq!(vb.key(KeyRole::VoucherIssuer, 7, at).is_some(), ok, "{at}");
        }
        assert_eq!(vb.key(KeyRole::DeviceCa, 7, 150), None);
    }

    #[test]
    fn refusals() {
        let k = Kit::new();
        let e = k.bundle_signed.encode();
        let root = k.root.public_key();
        assert_eq!(
            TrustBundle::verify(&e, &[(2, root.clone())], 0).unwrap_err(),
            EcashError::UnknownRoot(1)
        );
        let other = SigningKey::generate().unwrap().public_key();
        assert_eq!(
            TrustBundle::verify(&e, &[(1, other), (2, root.clone())], 0).unwrap_err(),
            EcashError::BadSignature
        );
        assert_eq!(
            TrustBundle::verify(&e, &[(1, root.clone())], BUNDLE_V + 1).unwrap_err(),
            EcashError::OlderBundle {
                got: BUNDLE_V,
                min: BUNDLE_V + 1
            }
        );
        let err = TrustBundle::verify(&e, &[(1, root.clone())], BUNDLE_V + 1).unwrap_err();
        assert!(err.to_string().contains("older bundle"), "{err}");
        TrustBundle::verify(&e, &[(1, root.clone())], BUNDLE_V).unwrap();
        let mut x = e.clone();
        let last = x.len() - 1;
        x[last] ^= 1;
        assert!(TrustBundle::verify(&x, &[(1, root.clone())], 0).is_err());
        assert!(TrustBundle::verify(&k.voucher.encode(), &[(1, root)], 0).is_err());
    }
}

//! Pure, HSM-free formats shared by the services and their clients.

pub mod binding;
pub mod dukpt;
pub mod encoding;
pub mod mac;
pub mod otp;
pub mod pin;

/// SHA-256 of `data`. OpenSSL 3's one-shot `SHA256()` fetches the digest implementation
/// anew (a lock and a table lookup) on every call; the streaming hasher does not, which
/// matters on the request path.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h = openssl::sha::Sha256::new();
    h.update(data);
    h.finish()
}

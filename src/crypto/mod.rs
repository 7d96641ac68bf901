//! Pure, HSM-free formats shared by the services and their clients.

pub mod binding;
pub mod dukpt;
pub mod encoding;
pub mod mac;
pub mod otp;
pub mod pin;

//! Pure, HSM-free formats shared by the services and their clients.

pub mod encoding;

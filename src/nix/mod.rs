//! Pure Nix formats: no I/O here. nixbase32, hashes, narinfo files and signatures, and the
//! request paths a binary cache answers.

pub mod base32;
pub mod hash;
pub mod narinfo;
pub mod request;
pub mod signing;

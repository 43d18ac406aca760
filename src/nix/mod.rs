//! Pure Nix formats: no I/O here. nixbase32, hashes, narinfo files and signatures, the
//! request paths a binary cache answers, NAR compressions and the check of a NAR against its
//! narinfo.

pub mod base32;
pub mod decode;
pub mod hash;
pub mod nar_check;
pub mod narinfo;
pub mod request;
pub mod signing;

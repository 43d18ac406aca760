//! Test doubles and fixtures shared by the integration tests. Everything listens on
//! 127.0.0.1 only, on ephemeral ports.
#![allow(dead_code)]

pub mod cloud;
pub mod http;
pub mod issuer;
pub mod nix;
pub mod sidecar;
pub mod upstream;

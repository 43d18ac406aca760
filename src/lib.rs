//! nix-sidecar: a loopback Nix binary cache in front of access-controlled upstream caches,
//! authenticating with this machine's workload identity.
//!
//! `app` builds everything from the configuration and runs it. Data flows one way: `server`
//! (HTTP to Nix) -> `proxy` (what to answer) -> `store` (the local cache) and `upstream` (HTTP
//! to caches) -> `identity` (tokens). `nix` holds the pure formats; `status` is the snapshot
//! health and metrics are made from; `tasks` owns the background work; `sys` holds the only
//! `unsafe` code.

#![deny(unsafe_code)]

pub mod app;
pub mod clock;
pub mod config;
pub mod exchange;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod nix;
pub mod proxy;
pub mod push;
pub mod secret;
pub mod server;
pub mod site;
pub mod status;
pub mod store;
pub mod sys;
pub mod systemd;
pub mod tasks;
pub mod upstream;

//! devfence's application layer: what a command *does*, shared by every front
//! end — the CLI today, the daemon and the fleet agent next (issue 11 item 2).
//!
//! A use case here takes typed input (a ledger, a subnet manager, a request) and
//! returns a typed result; it neither parses arguments nor prints. The binary
//! parses, calls and renders. Layering (docs/architecture.md): this crate sits
//! on the engine, the fabric seam and the model; it never reads the host itself
//! (that is `devfence-host`, reached through the engine).
//!
//! Moved here so far: the subnet manager of a host with none configured
//! ([`fabric::NoSm`]), the ledger → fabric view and `check --fabric`'s
//! findings ([`fabric::ledger_view`], [`fabric::fabric_findings`]); the
//! lifecycle operations, plan, recover and status ([`lifecycle`]); the libvirt
//! hook's decisions ([`hook`]); the GUID pool ([`guid_pool`]); the tenants
//! ([`tenant`]).

// EngineError carries its evidence and hint (as in the engine); it is not hot.
#![allow(clippy::result_large_err)]

pub use env::{Actor, Env, Kernel};
pub use error::{AppError, Result};

pub mod act;
pub mod audit;
pub mod check;
pub mod config;
pub mod env;
pub mod error;
pub mod fabric;
pub mod fleet;
pub mod guid_pool;
pub mod hook;
pub mod keys;
pub mod keystore;
pub mod lifecycle;
pub mod migrate;
pub mod state;
pub mod tenant;
pub mod verify;

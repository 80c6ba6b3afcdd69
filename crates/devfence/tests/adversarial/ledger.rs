//! Adversarial tests: ledger.

#[allow(unused_imports)]
use super::support::*;

//! Adversarial tests: hook.

#[allow(unused_imports)]
use super::support::*;

//! Adversarial tests: containment.

#[allow(unused_imports)]
use super::support::*;

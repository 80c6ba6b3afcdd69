//! Adversarial tests: fabric.

#[allow(unused_imports)]
use super::support::*;

//! The adversarial suite: the isolation guarantee against misconfiguration, lost state
//! and out-of-band change, tried as an attacker and a careless operator would. One
//! module per area; each test names the rule it holds (docs/threat-model.md maps every
//! line of the threat model to the test that proves it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod containment;
mod fabric;
mod hook;
mod ledger;
mod opensm;
mod reverify;

//! The one seam between devfence and the kernel.
//!
//! Every path devfence touches derives from one host root ([`HostRoot`]): `/` on a
//! real host, a generated fixture tree in tests and demos. The inventory readers
//! ([`read_inventory`]) turn what the kernel exposes under `/sys`, `/dev/vfio` and
//! `/proc` into the plain types of `devfence-model`, following the bus links into
//! `/sys/devices/...` the way the kernel lays them out. A value that is missing,
//! malformed or not UTF-8 never stops the scan: it becomes a
//! [`devfence_model::ReadProblem`] naming the path and the value, and the rest of
//! the inventory is still read.
//!
//! [`uevent`] listens for the kernel's device events (the host agent's wake-up
//! call) and parses them as untrusted input.
//!
//! [`sim`] writes realistic host trees (real symlink layout) for the profiles that
//! tests, benchmarks and the demo run on.

pub mod actuator;
#[doc(hidden)]
pub mod fuzzing;
pub mod inventory;
pub mod migration;
pub mod parse;
pub mod readback;
pub mod root;
pub mod sim;
pub mod simkernel;
pub mod uevent;

pub use inventory::{ReadStats, read_inventory, read_inventory_with_stats};
pub use root::{HostError, HostRoot};

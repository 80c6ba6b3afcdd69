//! `--config FILE`, recorded once for the process; the configuration itself is
//! `devfence_app::config`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use devfence_app::config::*;

static EXPLICIT: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Records `--config` for every later load of this process.
pub fn set_explicit(p: Option<PathBuf>) {
    let _ = EXPLICIT.set(p);
}

/// The `--config` given, if any.
pub fn explicit() -> Option<&'static Path> {
    EXPLICIT.get().and_then(|p| p.as_deref())
}

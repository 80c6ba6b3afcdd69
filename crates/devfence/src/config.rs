//! `--config FILE`, recorded once for the process and passed to every use case;
//! the configuration itself is `devfence_app::config`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static EXPLICIT: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Records `--config` for every later load of this process.
pub fn set_explicit(p: Option<PathBuf>) {
    let _ = EXPLICIT.set(p);
}

/// The `--config` given, if any.
pub fn explicit() -> Option<&'static Path> {
    EXPLICIT.get().and_then(|p| p.as_deref())
}

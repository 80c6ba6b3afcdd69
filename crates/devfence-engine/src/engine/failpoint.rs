//! Failpoints: named places in every operation where a test (or an operator
//! rehearsing recovery) can make devfence crash.
//!
//! Every journalled step has two points: `<op>:<step>:planned` (the journal says
//! the step is planned, nothing was done yet) and `<op>:<step>:acted` (the host or
//! fabric was changed, the journal does not say so yet). Those are exactly the
//! moments a crash leaves the journal and the world disagreeing, which is what
//! `devfence recover` must handle.
//!
//! In tests a failpoint panics with a [`Crash`] payload (the test catches it and
//! drops every handle, as a dead process would); from the CLI,
//! `DEVFENCE_FAILPOINT=<name>` aborts the process.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// What happens when an armed failpoint is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// `panic_any(Crash)`: unwinds (tests catch it).
    Panic,
    /// `std::process::abort()`: a real crash.
    Abort,
}

/// The panic payload of a failpoint in [`CrashMode::Panic`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crash(pub String);

/// The failpoints of one engine: which one is armed, and the names passed so far.
#[derive(Clone, Debug, Default)]
pub struct Failpoints {
    armed: Option<(String, CrashMode)>,
    /// Crash at the armed name's `nth` passing (0: the first).
    nth: usize,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Failpoints {
    /// No failpoint armed.
    #[must_use]
    pub fn none() -> Self {
        Self::default()
    }

    /// Crash at `name`.
    #[must_use]
    pub fn crash_at(name: impl Into<String>, mode: CrashMode) -> Self {
        Self::crash_at_nth(name, 0, mode)
    }

    /// Crash at the `nth` passing of `name` (0: the first): in a batch, every
    /// member passes the same step names.
    #[must_use]
    pub fn crash_at_nth(name: impl Into<String>, nth: usize, mode: CrashMode) -> Self {
        Self {
            armed: Some((name.into(), mode)),
            nth,
            seen: Arc::default(),
        }
    }

    /// From `DEVFENCE_FAILPOINT` (aborting), or none.
    #[must_use]
    pub fn from_env() -> Self {
        match std::env::var("DEVFENCE_FAILPOINT") {
            Ok(v) if !v.trim().is_empty() => Self::crash_at(v.trim(), CrashMode::Abort),
            _ => Self::none(),
        }
    }

    /// Passes the failpoint `name`: records it and crashes if it is armed.
    pub fn hit(&self, name: &str) {
        let mut before = 0;
        if let Ok(mut s) = self.seen.lock() {
            if self.nth > 0 {
                before = s.iter().filter(|n| *n == name).count();
            }
            s.push(name.to_owned());
        }
        if let Some((armed, mode)) = &self.armed
            && armed == name
            && before == self.nth
        {
            match mode {
                CrashMode::Panic => std::panic::panic_any(Crash(name.to_owned())),
                CrashMode::Abort => {
                    eprintln!("devfence: failpoint {name} reached: crashing as asked");
                    std::process::abort()
                }
            }
        }
    }

    /// Every failpoint passed so far, in order.
    #[must_use]
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The distinct failpoints passed so far.
    #[must_use]
    pub fn distinct(&self) -> BTreeSet<String> {
        self.seen().into_iter().collect()
    }
}

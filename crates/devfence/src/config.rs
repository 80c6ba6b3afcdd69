//! `/etc/devfence/devfence.toml`: which fabric backend devfence drives.
//!
//! Read from `--config FILE`, else `<root>/etc/devfence/devfence.toml` when it
//! exists; without either the default holds: the simulated SM on a simulated host,
//! none on the real host (IB VF handovers are then refused with a hint to
//! configure one).
//!
//! ```toml
//! [fabric]
//! backend = "opensm"          # "sim", "opensm", "ufm" or "none"
//!
//! [fabric.opensm]
//! partitions_file = "/etc/opensm/partitions.conf"
//! log_file = "/var/log/opensm.log"
//! pid_file = "/run/opensm.pid"  # optional: else the one process named opensm
//! [fabric.opensm.sa]
//! sm_key = "0x1"               # OpenSM's sm_key: the SA answers P_Key tables only to it
//! timeout_ms = 200
//!
//! [fabric.ufm]
//! url = "https://ufm.example:443"
//! ca_file = "/etc/devfence/ufm-ca.pem"
//! credentials = { file = "/etc/devfence/ufm.credentials" }
//! managed_pkeys = ["0x0001", "0x0002"]
//! ```
//!
//! Unknown keys are refused (a misspelt key silently ignored would mean a
//! backend other than the one the operator thinks).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use devfence_fabric::opensm::SaConfig;
use devfence_fabric::{OpenSmConfig, UfmConfig};
use devfence_host::HostRoot;
use devfence_model::bounded::{self, ReadFileError};

/// Where the configuration lives under a host root.
pub const CONFIG_PATH: &str = "/etc/devfence/devfence.toml";

/// The most devfence reads of a configuration file.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The fabric backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The default: the simulated SM on a simulated host, none on the real one.
    #[default]
    Auto,
    /// The simulated SM (simulated hosts only).
    Sim,
    /// OpenSM on this host: partitions file + SIGHUP, verified at the SA.
    Opensm,
    /// NVIDIA UFM over its REST API.
    Ufm,
    /// No SM: IB VF handovers are refused.
    None,
}

/// `[fabric]`.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FabricConfig {
    /// Which backend.
    #[serde(default)]
    pub backend: Backend,
    /// `[fabric.opensm]`.
    #[serde(default)]
    pub opensm: Option<OpenSmConfig>,
    /// `[fabric.ufm]`.
    #[serde(default)]
    pub ufm: Option<UfmConfig>,
    /// `[fabric.sa]`: how to reach the SA (both backends verify there).
    #[serde(default)]
    pub sa: Option<SaConfig>,
}

static EXPLICIT: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Records `--config` for every later [`Config::load`] of this process.
pub fn set_explicit(p: Option<PathBuf>) {
    let _ = EXPLICIT.set(p);
}

/// The `--config` given, if any.
pub fn explicit() -> Option<&'static Path> {
    EXPLICIT.get().and_then(|p| p.as_deref())
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[fabric]`.
    #[serde(default)]
    pub fabric: FabricConfig,
    /// Where it was read from (`None`: the defaults).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Config {
    /// Parses `text` (read from `path`).
    ///
    /// # Errors
    /// A TOML error or an inconsistent backend choice, naming the file.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut c: Config = toml::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}. Hint: see `man devfence` (CONFIGURATION) for the keys",
                path.display(),
                e.to_string().trim_end()
            )
        })?;
        c.source = Some(path.to_path_buf());
        match c.fabric.backend {
            Backend::Ufm if c.fabric.ufm.is_none() => bail!(
                "{}: [fabric] backend = \"ufm\" but there is no [fabric.ufm] section. Hint: give at least its url",
                path.display()
            ),
            _ => {}
        }
        Ok(c)
    }

    /// Loads `explicit`, else `<root>/etc/devfence/devfence.toml` if present, else
    /// the defaults.
    ///
    /// # Errors
    /// An explicit file that cannot be read; any file that does not parse.
    pub fn load(root: &HostRoot, explicit: Option<&Path>) -> Result<Self> {
        let (path, must) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => (root.path(CONFIG_PATH), false),
        };
        // Bounded, non-blocking, a regular file only; the default file is found
        // inside the root.
        let read = match explicit {
            Some(p) => bounded::read_file(p, MAX_CONFIG_BYTES),
            None => root.read_file(CONFIG_PATH, MAX_CONFIG_BYTES),
        };
        let text = read.and_then(|b| {
            String::from_utf8(b).map_err(|e| ReadFileError::Read {
                path: path.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
                ),
            })
        });
        match text {
            Ok(t) => Self::parse(&t, &path),
            Err(e) if !must && e.is_not_found() => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "Cannot read the configuration {}. Hint: check --config",
                    path.display()
                )
            }),
        }
    }

    /// How to reach the SA: `[fabric.sa]`, else `[fabric.opensm.sa]`, else the
    /// defaults (the UFM backend reads acknowledged port tables there too).
    #[must_use]
    pub fn sa(&self) -> SaConfig {
        self.fabric
            .sa
            .clone()
            .or_else(|| self.fabric.opensm.as_ref().map(|o| o.sa.clone()))
            .unwrap_or_default()
    }

    /// The OpenSM section, or its defaults.
    #[must_use]
    pub fn opensm(&self) -> OpenSmConfig {
        self.fabric.opensm.clone().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_backend_and_refuses_unknown_keys() {
        let p = Path::new("devfence.toml");
        let c = Config::parse(
            "[fabric]\nbackend = \"opensm\"\n[fabric.opensm]\npartitions_file = \"/x/p.conf\"\nlog_file = \"/x/o.log\"\n[fabric.opensm.sa]\nsm_key = \"0x1\"\n",
            p,
        )
        .expect("parses");
        assert_eq!(c.fabric.backend, Backend::Opensm);
        assert_eq!(c.opensm().partitions_file, PathBuf::from("/x/p.conf"));
        assert_eq!(c.opensm().sa.sm_key, 1);
        assert_eq!(
            Config::parse("", p).expect("empty").fabric.backend,
            Backend::Auto
        );
        let e = Config::parse("[fabric]\nbackend = \"opnsm\"\n", p).expect_err("typo");
        assert!(e.to_string().contains("devfence.toml"), "{e}");
        let e = Config::parse("[fabric]\nbackend = \"opensm\"\npartitons = 1\n", p)
            .expect_err("unknown key");
        assert!(e.to_string().contains("partitons"), "{e}");
        let e = Config::parse("[fabric]\nbackend = \"ufm\"\n", p).expect_err("no section");
        assert!(e.to_string().contains("[fabric.ufm]"), "{e}");
        let e = Config::parse("[fabric.opensm.sa]\nsm_key = \"zz\"\n", p).expect_err("bad key");
        assert!(e.to_string().contains("sm_key"), "{e}");
    }
}

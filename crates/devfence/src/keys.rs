//! `devfence keys`: this host's signing key for device-state envelopes and the
//! keyring of source hosts whose envelopes it admits (docs/state-envelopes.md).
//! Parses, calls `devfence_app::keys` and renders; the private key is never
//! printed.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use devfence_host::HostRoot;
use devfence_seal::{Fingerprint, HostKey, PublicKey, PublicLine, utc};

use crate::Exit;
use crate::table::Table;
use devfence_app::keystore::{load_host_key, load_keyring, now_ms};

/// `devfence keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make this host's signing key (ed25519) for device-state envelopes.
    ///
    /// Writes the private key to `<root>/etc/devfence/keys/host.key` (0600, in a
    /// 0700 directory) and the public key line to `host.pub`, and trusts the new
    /// key in this host's own keyring, so envelopes sealed here are admitted here
    /// too. Refused if a host key exists (see `keys rotate`). The private key is
    /// never printed.
    Init(KeysInitArgs),
    /// Print this host's public key line (and, with --json, its details).
    ///
    /// The first line is what other hosts trust with `devfence keys trust add
    /// --from FILE`: `devfence-ed25519 <64 hex digits> <host id>`.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace this host's signing key with a new one.
    ///
    /// The old key is retired in this host's keyring: envelopes it sealed before
    /// now stay admissible while they are unexpired (at most 7 days), and it never
    /// signs again. Give the new public key line to every destination host
    /// (`keys trust add` there retires the old key the same way). For a
    /// compromised key, rotate here and `keys trust remove` it everywhere.
    Rotate {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The keyring: the source hosts whose envelopes this host admits.
    #[command(subcommand)]
    Trust(TrustCommand),
}

/// `devfence keys init`.
#[derive(Debug, Args)]
pub struct KeysInitArgs {
    /// The id this host signs as (its short host name). Default: the first line
    /// of `<root>/etc/hostname`, up to its first dot.
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `devfence keys trust …`.
#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Trust a source host's public key.
    ///
    /// If the keyring has an active key for the same host, that key is retired
    /// (a rotation): it still vouches for envelopes created before now, until
    /// they expire, and for nothing newer.
    Add(TrustAddArgs),
    /// Remove a key from the keyring: its envelopes are refused from now on,
    /// whenever they were sealed (use this for a compromised key).
    Remove {
        /// The key's fingerprint (32 hex digits, from `keys trust list`).
        fingerprint: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the trusted keys: host, fingerprint, status (active, retired, or
    /// spent once no envelope it vouches for can still be unexpired).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `devfence keys trust add`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["from", "key"])))]
pub struct TrustAddArgs {
    /// A file holding the source host's public key line (what `devfence keys
    /// show` prints there); `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// The public key as 64 hex digits (with --host).
    #[arg(long, value_name = "HEX", requires = "host")]
    pub key: Option<String>,
    /// The host id the key speaks for (with --key).
    #[arg(long, value_name = "ID", requires = "key")]
    pub host: Option<String>,
    /// Trust the key even though it was removed from the keyring before (removal
    /// is how a compromised key is revoked). Warned about and audited.
    #[arg(long)]
    pub force: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `devfence keys …`.
pub fn run(
    root: &HostRoot,
    ledger: Option<&Path>,
    c: &KeysCommand,
    out: &mut dyn Write,
) -> Result<Exit> {
    match c {
        KeysCommand::Init(a) => init(root, ledger, a, out),
        KeysCommand::Show { json } => show(root, *json, out),
        KeysCommand::Rotate { json } => rotate(root, ledger, *json, out),
        KeysCommand::Trust(TrustCommand::Add(a)) => trust_add(root, ledger, a, out),
        KeysCommand::Trust(TrustCommand::Remove { fingerprint, json }) => {
            trust_remove(root, ledger, fingerprint, *json, out)
        }
        KeysCommand::Trust(TrustCommand::List { json }) => trust_list(root, *json, out),
    }
}

fn key_json(key: &HostKey) -> serde_json::Value {
    serde_json::json!({
        "host": key.host_id(),
        "public_key": key.public(),
        "fingerprint": key.public().fingerprint(),
        "created_ms": key.created_ms(),
        "public_line": key.public_line(),
    })
}

fn init(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &KeysInitArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let made = devfence_app::keys::init(root, ledger, a.host_id.as_deref())?;
    let key = &made.key;
    if a.json {
        crate::jsonout::emit(out, &key_json(key))?;
    } else {
        writeln!(
            out,
            "host key made for host {}: fingerprint {}\n  private key: {} (0600; never printed)\n  \
             public key:  {}\n\ngive this line to every destination host (`devfence keys trust add --from FILE` there):\n{}",
            key.host_id(),
            key.public().fingerprint(),
            made.path.display(),
            made.public_path.display(),
            key.public_line()
        )?;
    }
    Ok(Exit::Ok)
}

fn show(root: &HostRoot, json: bool, out: &mut dyn Write) -> Result<Exit> {
    let key = load_host_key(root)?;
    if json {
        crate::jsonout::emit(out, &key_json(&key))?;
    } else {
        writeln!(out, "{}", key.public_line())?;
        writeln!(
            out,
            "# fingerprint {}, host key made {}",
            key.public().fingerprint(),
            utc(key.created_ms())
        )?;
    }
    Ok(Exit::Ok)
}

fn rotate(root: &HostRoot, ledger: Option<&Path>, json: bool, out: &mut dyn Write) -> Result<Exit> {
    let devfence_app::keys::Rotated { old, new, at_ms } = devfence_app::keys::rotate(root, ledger)?;
    if json {
        let mut v = key_json(&new);
        v["retired"] = serde_json::json!(old.public().fingerprint());
        crate::jsonout::emit(out, &v)?;
    } else {
        writeln!(
            out,
            "host key of {} rotated: new fingerprint {}, old {} retired at {}\n\
             envelopes sealed before now stay admissible while unexpired (at most 7 days);\n\
             give the new line to every destination host (`devfence keys trust add --from FILE`):\n{}",
            old.host_id(),
            new.public().fingerprint(),
            old.public().fingerprint(),
            utc(at_ms),
            new.public_line()
        )?;
    }
    Ok(Exit::Ok)
}

fn trust_add(
    root: &HostRoot,
    ledger: Option<&Path>,
    a: &TrustAddArgs,
    out: &mut dyn Write,
) -> Result<Exit> {
    let line: PublicLine = match (&a.from, &a.key, &a.host) {
        (Some(file), _, _) => {
            let bytes = if file.as_os_str() == "-" {
                devfence_model::bounded::read_stream(std::io::stdin(), "standard input", 64 * 1024)
                    .context("Cannot read the public key line from standard input")?
            } else {
                devfence_model::bounded::read_file(file, 64 * 1024)?
            };
            let text = String::from_utf8(bytes)
                .map_err(|_| anyhow!("{} is not UTF-8 text", file.display()))?;
            let l = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'))
                .ok_or_else(|| {
                    anyhow!(
                        "{} holds no public key line. Hint: save what `devfence keys show` prints on the source host",
                        file.display()
                    )
                })?;
            l.parse()?
        }
        (None, Some(k), Some(h)) => {
            let key: PublicKey = k.parse().map_err(|e: String| anyhow!("--key: {e}"))?;
            devfence_seal::format::check_host_id(h).map_err(|e| anyhow!("--host: {e}"))?;
            PublicLine {
                key,
                host: h.clone(),
            }
        }
        _ => bail!("Give --from FILE, or --key HEX with --host ID"),
    };
    let devfence_app::keys::Trusted {
        change,
        was_removed,
    } = devfence_app::keys::trust_add(root, ledger, &line, a.force)?;
    if let Some(r) = &was_removed {
        eprintln!(
            "WARNING: key {} of host {} was REMOVED from this keyring at {} (removal is how a \
             compromised key is revoked). It is trusted again because of --force: envelopes it \
             signs are admitted from now on.",
            r.fingerprint,
            r.host,
            utc(r.removed_ms)
        );
    }
    if a.json {
        crate::jsonout::emit(
            out,
            &serde_json::json!({ "host": line.host, "added": change.added, "retired": change.retired }),
        )?;
    } else {
        writeln!(out, "trusted key {} for host {}", change.added, line.host)?;
        if let Some(r) = change.retired {
            writeln!(
                out,
                "retired {}'s previous key {r}: it vouches only for envelopes created before now, until they expire",
                line.host
            )?;
        }
    }
    Ok(Exit::Ok)
}

fn trust_remove(
    root: &HostRoot,
    ledger: Option<&Path>,
    fingerprint: &str,
    json: bool,
    out: &mut dyn Write,
) -> Result<Exit> {
    let fp: Fingerprint = fingerprint.parse().map_err(|e: String| anyhow!("{e}"))?;
    let removed = devfence_app::keys::trust_remove(root, ledger, &fp)?;
    if json {
        crate::jsonout::emit(out, &removed)?;
    } else {
        writeln!(
            out,
            "removed key {fp} of host {}: its envelopes are refused from now on",
            removed.host
        )?;
    }
    Ok(Exit::Ok)
}

fn trust_list(root: &HostRoot, json: bool, out: &mut dyn Write) -> Result<Exit> {
    let ring = load_keyring(root)?;
    let now = now_ms();
    if json {
        let v: Vec<_> = ring
            .keys
            .iter()
            .map(|k| {
                let mut v = serde_json::to_value(k).unwrap_or_default();
                v["status"] = serde_json::json!(k.status(now));
                v
            })
            .collect();
        crate::jsonout::emit(out, &v)?;
        return Ok(Exit::Ok);
    }
    if ring.keys.is_empty() {
        writeln!(
            out,
            "no trusted keys: this host admits no envelope (`devfence keys trust add`)"
        )?;
        return Ok(Exit::Ok);
    }
    let mut t = Table::new(&["HOST", "FINGERPRINT", "STATUS", "TRUSTED", "RETIRED"]);
    for k in &ring.keys {
        t.row(vec![
            k.host.clone(),
            k.fingerprint.to_string(),
            k.status(now).to_owned(),
            utc(k.added_ms),
            k.retired_ms.map(utc).unwrap_or_default(),
        ]);
    }
    t.write(out)?;
    Ok(Exit::Ok)
}

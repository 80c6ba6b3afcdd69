//! Benchmark: inventory + full check of the `scale` profile (4096 VFs, 1024 mdevs,
//! 65,536 AP queues). Run with `cargo bench -p devfence --bench scale`.
//!
//! The parent generates the host tree once, then runs the measurement in a child
//! process (this same binary with `--measure DIR`) so that the peak memory reported
//! (VmHWM) is that of reading and checking alone. Figures go to docs/benchmarks.md.
//!
//! The reference: `lspci -A linux-sysfs -O sysfs.path=<tree>/sys/bus/pci -nnk`
//! (pciutils, installed here when missing) lists the same tree's PCI functions
//! in the same run, one lspci round after each devfence round, so that both
//! see the same load; the bench reports both medians and their ratio.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use devfence_host::{HostRoot, read_inventory_with_stats, sim};

const ITERATIONS: usize = 15;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--measure") {
        let Some(dir) = args.get(i + 1) else {
            eprintln!("--measure needs a directory");
            std::process::exit(2);
        };
        measure(Path::new(dir));
        return;
    }
    // sysfs is an in-memory filesystem: keep the fixture in memory too (tmpfs at
    // /dev/shm) unless TMPDIR says otherwise, so the figures measure devfence and
    // not the disk's filesystem.
    let base = match std::env::var_os("TMPDIR") {
        Some(t) => std::path::PathBuf::from(t),
        None if Path::new("/dev/shm").is_dir() => std::path::PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    };
    println!("fixture directory: {}", base.display());
    let tmp = match tempfile::Builder::new()
        .prefix("devfence-bench-")
        .tempdir_in(&base)
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot create a temporary directory: {e}");
            std::process::exit(2);
        }
    };
    let host = tmp.path().join("scale");
    let t = Instant::now();
    let summary = match sim::generate(&sim::GenerateOptions {
        profile: sim::Profile::Scale,
        out: host.clone(),
        vfs: None,
        host_id: 0,
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("generate: {e}");
            std::process::exit(2);
        }
    };
    println!("generated scale profile in {:.2?}: {summary}", t.elapsed());
    if let Err(e) = ensure_lspci() {
        eprintln!("{e}");
        std::process::exit(2);
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("current_exe: {e}");
            std::process::exit(2);
        }
    };
    let status = Command::new(exe).arg("--measure").arg(&host).status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("measurement failed: {status:?}");
        std::process::exit(1);
    }
}

/// Installs pciutils (as root, with apt-get) when `lspci` is missing.
fn ensure_lspci() -> Result<(), String> {
    let found = || {
        Command::new("lspci")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if found() {
        return Ok(());
    }
    println!("lspci is missing: installing pciutils");
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends", "pciutils"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    if found() {
        Ok(())
    } else {
        Err(
            "lspci is not installed and could not be installed. Hint: apt-get install pciutils"
                .into(),
        )
    }
}

/// One run of the reference, `lspci -nnk` on the tree's PCI bus; returns how
/// many functions it listed.
fn lspci_round(dir: &Path) -> usize {
    let out = Command::new("lspci")
        .arg("-A")
        .arg("linux-sysfs")
        .arg("-O")
        .arg(format!("sysfs.path={}", dir.join("sys/bus/pci").display()))
        .arg("-nnk")
        .stderr(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => o
            .stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty() && !l.starts_with(b"\t"))
            .count(),
        other => {
            eprintln!("lspci failed: {other:?}");
            std::process::exit(2);
        }
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn measure(dir: &Path) {
    let root = HostRoot::new(dir);
    let tenancy = match devfence_policy::load_tenancy(&dir.join("etc/devfence/tenancy.toml")) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tenancy: {e}");
            std::process::exit(2);
        }
    };
    let mut inv_times = Vec::new();
    let mut check_times = Vec::new();
    let mut total_times = Vec::new();
    let mut lspci_times = Vec::new();
    let mut lspci_listed = 0;
    // DEVFENCE_BENCH_REFERENCE=0 leaves lspci out (for profiling devfence alone).
    let reference = std::env::var_os("DEVFENCE_BENCH_REFERENCE").is_none_or(|v| v != "0");
    let mut last = None;
    // One warm-up round so that every round reads from the page cache.
    for i in 0..=ITERATIONS {
        let t0 = Instant::now();
        let (inv, stats) = match read_inventory_with_stats(&root) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("inventory: {e}");
                std::process::exit(2);
            }
        };
        let t1 = Instant::now();
        let findings = devfence_policy::check(&inv, &tenancy);
        let t2 = Instant::now();
        let t3 = Instant::now();
        if reference {
            lspci_listed = lspci_round(dir);
        }
        let t4 = Instant::now();
        if i > 0 {
            inv_times.push(t1 - t0);
            check_times.push(t2 - t1);
            total_times.push(t2 - t0);
            lspci_times.push(t4 - t3);
        }
        last = Some((inv, stats, findings));
    }
    let Some((inv, stats, findings)) = last else {
        return;
    };
    let reads = stats.files_read + stats.links_read + stats.dirs_listed;
    println!(
        "host: {} PCI functions, {} IOMMU groups, {} mdevs, {} AP queues, {} matrix mdevs, {} VFIO nodes, {} problems, {} findings",
        inv.pci.len(),
        inv.iommu_groups.len(),
        inv.mdevs.len(),
        inv.ap.as_ref().map_or(0, |a| a.queues.len()),
        inv.ap.as_ref().map_or(0, |a| a.matrix_mdevs.len()),
        inv.vfio_nodes.len(),
        inv.problems.len(),
        findings.len()
    );
    println!(
        "reads: {} files, {} links, {} directory listings = {} reads for {} attributes ({:.3} reads per attribute)",
        stats.files_read,
        stats.links_read,
        stats.dirs_listed,
        reads,
        stats.attributes,
        reads as f64 / stats.attributes.max(1) as f64
    );
    let min = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    println!(
        "inventory: median {:.1?} (min {:.1?}); check: median {:.1?} (min {:.1?}); total: median {:.1?} (min {:.1?}) over {ITERATIONS} rounds",
        median(&mut inv_times.clone()),
        min(&inv_times),
        median(&mut check_times.clone()),
        min(&check_times),
        median(&mut total_times.clone()),
        min(&total_times),
    );
    if let Some(kib) = vm_hwm_kib() {
        println!("peak memory (VmHWM): {:.1} MiB", kib as f64 / 1024.0);
    }
    if !reference {
        return;
    }
    let ours = median(&mut total_times.clone());
    let theirs = median(&mut lspci_times.clone());
    println!(
        "reference: lspci -A linux-sysfs -O sysfs.path=<tree>/sys/bus/pci -nnk listed {lspci_listed} functions: median {:.1?} (min {:.1?}) over {ITERATIONS} rounds",
        theirs,
        min(&lspci_times),
    );
    println!(
        "ratio: devfence inventory + check / lspci = {:.2} (medians), {:.2} (minima)",
        ours.as_secs_f64() / theirs.as_secs_f64().max(1e-9),
        min(&total_times).as_secs_f64() / min(&lspci_times).as_secs_f64().max(1e-9),
    );
    if lspci_listed != inv.pci.len() {
        eprintln!(
            "lspci listed {lspci_listed} functions, devfence {}: they must agree",
            inv.pci.len()
        );
        std::process::exit(1);
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at the end: {}", l.trim());
    }
}

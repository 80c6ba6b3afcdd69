//! VFIO migration v2 of the simulated kernel: the core's state machine
//! (`vfio_mig_get_next_state`, drivers/vfio/vfio_main.c) and the one driver that
//! implements it here, the `mtty` sample (samples/vfio-mdev/mtty.c, with
//! migration from Linux 6.7; the testbed's 6.1 build has none, its 6.12 build
//! has it).
//!
//! What the real kernel does, as the testbed observed it (docs/testbed.md,
//! "Migration"), is what this answers:
//! * GET `MIGRATION`: `ENOTTY` for a device whose driver has no `mig_ops` (every
//!   device but an mtty mdev on a kernel ≥ 6.7); mtty: `STOP_COPY | P2P |
//!   PRE_COPY`.
//! * SET `MIG_DEVICE_STATE` to a number above 7, to ERROR, or from ERROR:
//!   `EINVAL`. STOP_COPY → PRE_COPY(_P2P), which the table blocks, spun in the
//!   real 6.12 kernel (a soft lockup); devfence's seam refuses it before the
//!   ioctl with `EINVAL` (`migration::kernel_blocks`), and so does the
//!   simulator, so that the scenario sees the same answer on both. Otherwise
//!   the core steps along its table and the driver performs each arc; a failing
//!   arc stops the walk where it was.
//! * mtty's stream: a 24-byte header (magic `0x7e9d09898c3e2c4e`, version 1.0,
//!   the port count, flags 0; little-endian) and 36 bytes per port (its
//!   `struct serial_port`, registers and loop-back FIFO). RESUMING takes at most
//!   that many bytes (`ENOMEM` beyond); a write that completes a header that does
//!   not match answers `EFAULT` (the bytes are kept nevertheless, as mtty does);
//!   RESUMING → STOP with fewer bytes than the full size is `EINVAL` and the
//!   device stays in RESUMING.
//! * A reset (`VFIO_DEVICE_RESET`) returns the state to RUNNING and ends the data
//!   sessions; it does not clear the ports. Closing the device ends the data
//!   sessions and leaves the state and the ports as they are.
//!
//! The device's memory (its state number and ports) lives where the real driver
//! keeps it, outside sysfs: the simulator persists it under
//! `/var/lib/devfence-simkernel/mdev/<uuid>` of the root, so separate devfence
//! invocations see one device. It also counts the migration calls made on each
//! device, so tests can prove that none was made.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, PoisonError};

use devfence_model::MdevUuid;

use super::{Held, K, Shared, SimOpen};
use crate::actuator::Errno;
use crate::migration::{MigData, MigFlags, MigState, MigrationDevice};

/// mtty's stream magic.
pub const MTTY_MAGIC: u64 = 0x7e9d_0989_8c3e_2c4e;
/// Header bytes before the ports.
pub const MTTY_HEADER: usize = 24;
/// `sizeof(struct serial_port)` on x86-64.
pub const MTTY_PORT: usize = 36;
/// `MAX_FIFO_SIZE`.
const MAX_FIFO: u8 = 16;
/// mtty's flags.
const MTTY_FLAGS: u64 = MigFlags::STOP_COPY | MigFlags::P2P | MigFlags::PRE_COPY;
/// Where the simulated devices' memory is kept.
const MEMORY: &str = "/var/lib/devfence-simkernel/mdev";
/// `EFAULT`.
const EFAULT: Errno = Errno(14);
/// `ENOMEM`.
const ENOMEM: Errno = Errno(12);

// Offsets in `struct serial_port`.
const P_FIFO: usize = 8;
const P_HEAD: usize = 24;
const P_TAIL: usize = 25;
const P_COUNT: usize = 26;
const P_DLAB: usize = 27;
const P_OVERRUN: usize = 28;
const P_DIVISOR: usize = 30;
const P_FCR: usize = 32;
const P_MAX_FIFO: usize = 33;
const P_TRIGGER: usize = 34;

/// The core's table (all optional features, as mtty has them): the next state
/// on the way from `cur` to `new`; `Error` for the blocked ones.
fn next_step(cur: MigState, new: MigState) -> MigState {
    use MigState::{Error, PreCopy, PreCopyP2p, Resuming, Running, RunningP2p, Stop, StopCopy};
    match (cur, new) {
        (Error, _) | (_, Error) => Error,
        (Stop, Running | PreCopy | PreCopyP2p | RunningP2p) => RunningP2p,
        (Stop, Stop) => Stop,
        (Stop, StopCopy) => StopCopy,
        (Stop, Resuming) => Resuming,
        (Running, PreCopy) => PreCopy,
        (Running, _) => RunningP2p,
        (PreCopy, PreCopyP2p | StopCopy) => PreCopyP2p,
        (PreCopy, _) => Running,
        (PreCopyP2p, PreCopy) => PreCopy,
        (PreCopyP2p, StopCopy) => StopCopy,
        (PreCopyP2p, _) => RunningP2p,
        (StopCopy, PreCopy | PreCopyP2p) => Error,
        (StopCopy, _) | (Resuming, _) => Stop,
        (RunningP2p, Running | PreCopy) => Running,
        (RunningP2p, PreCopyP2p) => PreCopyP2p,
        (RunningP2p, _) => Stop,
    }
}

/// One data session (`struct mtty_migration_file`), shared by the device and
/// the file handed out.
#[derive(Default)]
struct MigFile {
    data: Vec<u8>,
    filled: usize,
    pos: usize,
    disabled: bool,
    resuming: bool,
}

type FileRef = Arc<Mutex<MigFile>>;

fn lock(f: &FileRef) -> std::sync::MutexGuard<'_, MigFile> {
    f.lock().unwrap_or_else(PoisonError::into_inner)
}

fn disable(f: &FileRef) {
    let mut m = lock(f);
    m.disabled = true;
    m.filled = 0;
    m.pos = 0;
}

/// An mtty device's memory and its open data sessions.
pub(super) struct MttyDev {
    state: MigState,
    ports: Vec<u8>,
    nr_ports: usize,
    calls: u64,
    saving: Option<FileRef>,
    resuming: Option<FileRef>,
}

impl MttyDev {
    fn fresh(nr_ports: usize) -> Self {
        let mut ports = vec![0u8; nr_ports * MTTY_PORT];
        for p in 0..nr_ports {
            ports[p * MTTY_PORT + P_MAX_FIFO] = MAX_FIFO;
        }
        Self {
            state: MigState::Running,
            ports,
            nr_ports,
            calls: 0,
            saving: None,
            resuming: None,
        }
    }

    fn data_size(&self) -> usize {
        MTTY_HEADER + self.nr_ports * MTTY_PORT
    }

    fn disable_files(&mut self) {
        if let Some(f) = self.saving.take() {
            disable(&f);
        }
        if let Some(f) = self.resuming.take() {
            disable(&f);
        }
    }

    fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(MTTY_HEADER);
        h.extend_from_slice(&MTTY_MAGIC.to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&u32::try_from(self.nr_ports).unwrap_or(0).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h
    }

    /// `mtty_step_state`: one arc; the new data session's file, if any.
    fn step(&mut self, new: MigState) -> Result<Option<FileRef>, Errno> {
        use MigState::{PreCopy, PreCopyP2p, Resuming, Running, RunningP2p, Stop, StopCopy};
        let cur = self.state;
        match (cur, new) {
            (Running, RunningP2p)
            | (RunningP2p, Running | Stop)
            | (PreCopy, PreCopyP2p)
            | (PreCopyP2p, PreCopy)
            | (Stop, RunningP2p) => Ok(None),
            (Resuming, Stop) => {
                let f = self.resuming.clone().ok_or(Errno::EINVAL)?;
                {
                    let m = lock(&f);
                    if m.filled < self.data_size() {
                        return Err(Errno::EINVAL);
                    }
                    let src = m
                        .data
                        .get(MTTY_HEADER..self.data_size())
                        .ok_or(Errno::EINVAL)?;
                    self.ports.copy_from_slice(src);
                }
                self.disable_files();
                Ok(None)
            }
            (PreCopy, Running) | (PreCopyP2p, RunningP2p) | (StopCopy, Stop) => {
                self.disable_files();
                Ok(None)
            }
            (Running, PreCopy)
            | (RunningP2p, PreCopyP2p)
            | (Stop, StopCopy)
            | (PreCopyP2p, StopCopy) => {
                if let Some(f) = &self.saving {
                    if new == StopCopy {
                        let mut m = lock(f);
                        m.data.extend_from_slice(&self.ports);
                        m.filled += self.ports.len();
                    }
                    return Ok(None);
                }
                let mut data = self.header();
                if new == StopCopy {
                    data.extend_from_slice(&self.ports);
                }
                let f = Arc::new(Mutex::new(MigFile {
                    filled: data.len(),
                    data,
                    ..MigFile::default()
                }));
                self.saving = Some(Arc::clone(&f));
                Ok(Some(f))
            }
            (Stop, Resuming) => {
                let f = Arc::new(Mutex::new(MigFile {
                    data: vec![0; self.data_size()],
                    resuming: true,
                    ..MigFile::default()
                }));
                self.resuming = Some(Arc::clone(&f));
                Ok(Some(f))
            }
            _ => Err(Errno::EINVAL),
        }
    }

    /// `mtty_set_state` with the core's walk.
    fn set_state(&mut self, new: MigState) -> Result<Option<FileRef>, Errno> {
        let mut ret = None;
        while self.state != new {
            let next = next_step(self.state, new);
            if next == MigState::Error {
                return Err(Errno::EINVAL);
            }
            ret = self.step(next)?;
            self.state = next;
            if ret.is_some() && next != new {
                return Err(Errno::EINVAL);
            }
        }
        Ok(ret)
    }

    /// `handle_bar_write` for one byte at `offset` of port `index`'s BAR.
    fn bar_write(&mut self, index: usize, offset: u64, data: u8) {
        let Some(p) = self
            .ports
            .get_mut(index * MTTY_PORT..(index + 1) * MTTY_PORT)
        else {
            return;
        };
        let dlab = p[P_DLAB] != 0;
        match offset {
            0 => {
                if dlab {
                    let d = u16::from_le_bytes([p[P_DIVISOR], p[P_DIVISOR + 1]]) | u16::from(data);
                    p[P_DIVISOR..P_DIVISOR + 2].copy_from_slice(&d.to_le_bytes());
                } else if p[P_COUNT] < p[P_MAX_FIFO] {
                    let head = usize::from(p[P_HEAD] & (MAX_FIFO - 1));
                    p[P_FIFO + head] = data;
                    p[P_COUNT] = p[P_COUNT].wrapping_add(1);
                    p[P_HEAD] = (p[P_HEAD].wrapping_add(1)) & (MAX_FIFO - 1);
                    p[P_OVERRUN] = 0;
                } else {
                    p[P_OVERRUN] = 1;
                }
            }
            1 => {
                if dlab {
                    let d = u16::from_le_bytes([p[P_DIVISOR], p[P_DIVISOR + 1]])
                        | (u16::from(data) << 8);
                    p[P_DIVISOR..P_DIVISOR + 2].copy_from_slice(&d.to_le_bytes());
                } else {
                    p[1] = data;
                }
            }
            2 => {
                p[P_FCR] = data;
                // UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT
                if data & 0x06 != 0 {
                    p[P_COUNT] = 0;
                    p[P_HEAD] = 0;
                    p[P_TAIL] = 0;
                }
                p[P_TRIGGER] = 1;
                // UART_FCR_ENABLE_FIFO
                p[P_MAX_FIFO] = if data & 0x01 != 0 { MAX_FIFO } else { 1 };
            }
            3 => {
                // UART_LCR_DLAB
                if data & 0x80 != 0 {
                    p[P_DLAB] = 1;
                    p[P_DIVISOR] = 0;
                    p[P_DIVISOR + 1] = 0;
                } else {
                    p[P_DLAB] = 0;
                }
                p[3] = data;
            }
            4 | 7 => p[usize::try_from(offset).unwrap_or(7)] = data,
            _ => {}
        }
    }

    /// `handle_bar_read` for the registers that read back stored state (RX is
    /// not modelled: reading it consumes the FIFO).
    fn bar_read(&self, index: usize, offset: u64) -> u8 {
        let Some(p) = self.ports.get(index * MTTY_PORT..(index + 1) * MTTY_PORT) else {
            return 0;
        };
        let dlab = p[P_DLAB] != 0;
        let empty = p[P_HEAD] == p[P_TAIL];
        match offset {
            0 if dlab => p[P_DIVISOR],
            1 if dlab => p[P_DIVISOR + 1],
            1 => p[1] & 0x0f,
            3 | 4 | 7 => p[usize::try_from(offset).unwrap_or(7)],
            5 => {
                let mut lsr = 0u8;
                if !empty {
                    lsr |= 0x01;
                }
                if p[P_OVERRUN] != 0 {
                    lsr |= 0x02;
                }
                if empty {
                    lsr |= 0x60;
                }
                lsr
            }
            _ => 0,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut s = format!(
            "state {}\nports {}\ncalls {}\n",
            self.state.raw(),
            hex(&self.ports),
            self.calls
        );
        s.push('\n');
        s.into_bytes()
    }

    fn decode(text: &str, nr_ports: usize) -> Option<Self> {
        let mut d = Self::fresh(nr_ports);
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("state", v)) => d.state = MigState::from_raw(v.parse().ok()?)?,
                Some(("ports", v)) => {
                    let b = unhex(v)?;
                    if b.len() != d.ports.len() {
                        return None;
                    }
                    d.ports = b;
                }
                Some(("calls", v)) => d.calls = v.parse().ok()?,
                _ => {}
            }
        }
        Some(d)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        use std::fmt::Write as _;
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The (major, minor) of a kernel release such as `6.12.95+deb12-amd64`.
fn release(s: &str) -> Option<(u32, u32)> {
    let mut it = s.trim().split(['.', '-', '+']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

impl K<'_> {
    /// Whether this kernel's mtty implements migration (Linux 6.7 and later).
    fn mtty_migrates(&self) -> bool {
        self.t
            .text("/proc/sys/kernel/osrelease")
            .and_then(|r| release(&r))
            .is_some_and(|v| v >= (6, 7))
    }

    /// The number of ports of an mtty mdev; `None` for any other device.
    fn mtty_ports(&self, uuid: MdevUuid) -> Option<usize> {
        let d = self.t.link(&format!("/sys/bus/mdev/devices/{uuid}"))?;
        if self.driver_of(&d).as_deref() != Some("mtty") {
            return None;
        }
        let ty = self.t.link_name(&format!("{d}/mdev_type"))?;
        Some(if ty.ends_with("-2") { 2 } else { 1 })
    }

    /// The device's memory: in this process, or as persisted, or fresh.
    fn mtty(&mut self, uuid: MdevUuid) -> Option<&mut MttyDev> {
        let ports = self.mtty_ports(uuid)?;
        if !self.s.mtty.contains_key(&uuid) {
            let d = self
                .t
                .text(&format!("{MEMORY}/{uuid}"))
                .and_then(|t| MttyDev::decode(&t, ports))
                .unwrap_or_else(|| MttyDev::fresh(ports));
            self.s.mtty.insert(uuid, d);
        }
        self.s.mtty.get_mut(&uuid)
    }

    fn persist(&self, uuid: MdevUuid) {
        if let Some(d) = self.s.mtty.get(&uuid) {
            let _ = self.t.put(&format!("{MEMORY}/{uuid}"), &d.encode(), 0o600);
        }
    }

    /// The migration calls made on an mdev (0 for one never reached).
    pub(super) fn mtty_calls(&mut self, uuid: MdevUuid) -> u64 {
        self.mtty(uuid).map_or(0, |d| d.calls)
    }

    /// Forgets an mdev's memory (it was created anew or removed).
    pub(super) fn mtty_forget(&mut self, uuid: MdevUuid) {
        if let Some(mut d) = self.s.mtty.remove(&uuid) {
            d.disable_files();
        }
        let _ = self.t.unlink(&format!("{MEMORY}/{uuid}"));
    }
}

/// An mdev opened for its migration interface ([`super::SimKernel::open_migration_device`]).
pub struct SimMigDevice {
    shared: Arc<Shared>,
    uuid: Option<MdevUuid>,
    open: SimOpen,
}

impl SimMigDevice {
    pub(super) fn new(shared: Arc<Shared>, open: SimOpen) -> Self {
        let uuid = match open.held {
            Held::Mdev(u) => Some(u),
            Held::Pci(_) => None,
        };
        Self { shared, uuid, open }
    }

    /// Runs `f` on the mtty device's memory (`EFAULT` for a device whose
    /// regions are not emulated); with `migration`, only when the driver
    /// implements migration (`ENOTTY` otherwise), counting the call.
    fn with<R>(
        &self,
        migration: bool,
        f: impl FnOnce(&mut MttyDev) -> Result<R, Errno>,
    ) -> Result<R, Errno> {
        let fail = if migration { Errno::ENOTTY } else { EFAULT };
        let uuid = self.uuid.ok_or(fail)?;
        let mut st = self.shared.lock();
        let mut k = K {
            t: &self.shared.tree,
            s: &mut st,
        };
        if migration && !k.mtty_migrates() {
            return Err(Errno::ENOTTY);
        }
        let d = k.mtty(uuid).ok_or(fail)?;
        if migration {
            d.calls += 1;
        }
        let r = f(d);
        k.persist(uuid);
        r
    }

    /// A write to the device's regions (`pwrite` on the device fd): mtty's BARs
    /// are region 0 (and 1 with two ports) at `index << 40`.
    ///
    /// # Errors
    /// `EFAULT` outside the port BARs, `ENOTTY` for a device this simulator does
    /// not emulate.
    pub fn region_write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.with(false, |d| {
            let index = usize::try_from(offset >> 40).map_err(|_| EFAULT)?;
            if index >= d.nr_ports {
                return Err(EFAULT);
            }
            for (i, b) in data.iter().enumerate() {
                d.bar_write(index, (offset & 0xff_ffff_ffff) + i as u64, *b);
            }
            Ok(())
        })
    }

    /// A read of the device's regions, one byte per register.
    ///
    /// # Errors
    /// As [`SimMigDevice::region_write`].
    pub fn region_read(&self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        self.with(false, |d| {
            let index = usize::try_from(offset >> 40).map_err(|_| EFAULT)?;
            if index >= d.nr_ports {
                return Err(EFAULT);
            }
            Ok((0..len)
                .map(|i| d.bar_read(index, (offset & 0xff_ffff_ffff) + i as u64))
                .collect())
        })
    }

    /// The device's name.
    #[must_use]
    pub fn device(&self) -> String {
        self.open.device()
    }
}

impl std::fmt::Debug for SimMigDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimMigDevice")
            .field("device", &self.open.device())
            .finish_non_exhaustive()
    }
}

impl MigrationDevice for SimMigDevice {
    fn flags(&self) -> Result<MigFlags, Errno> {
        self.with(true, |_| Ok(MigFlags(MTTY_FLAGS)))
    }

    fn state(&self) -> Result<MigState, Errno> {
        self.with(true, |d| Ok(d.state))
    }

    fn set_state(&mut self, s: MigState) -> Result<Option<Box<dyn MigData>>, Errno> {
        self.with(true, |d| {
            let f = d.set_state(s)?;
            Ok(f.map(|f| {
                let max = d.data_size();
                Box::new(SimMigFile {
                    file: f,
                    max,
                    nr_ports: d.nr_ports,
                }) as Box<dyn MigData>
            }))
        })
    }

    fn reset(&mut self) -> Result<(), Errno> {
        // mtty_reset: back to RUNNING, the data sessions end; the ports stay.
        // Not a migration call: it is VFIO_DEVICE_RESET.
        self.with(false, |d| {
            d.state = MigState::Running;
            d.disable_files();
            Ok(())
        })
    }

    fn region_write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        SimMigDevice::region_write(self, offset, data)
    }

    fn region_read(&self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        SimMigDevice::region_read(self, offset, len)
    }
}

/// A data session's file of the simulated mtty.
struct SimMigFile {
    file: FileRef,
    max: usize,
    nr_ports: usize,
}

fn os(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.0)
}

impl Read for SimMigFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut m = lock(&self.file);
        if m.resuming {
            return Err(os(Errno(9)));
        }
        if m.disabled {
            return Err(os(Errno::ENODEV));
        }
        if m.pos > m.filled {
            return Err(os(Errno::EINVAL));
        }
        let n = buf.len().min(m.filled - m.pos);
        let from = m.pos;
        buf[..n].copy_from_slice(&m.data[from..from + n]);
        m.pos += n;
        Ok(n)
    }
}

impl Write for SimMigFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut m = lock(&self.file);
        if !m.resuming {
            return Err(os(Errno(9)));
        }
        let end = m
            .pos
            .checked_add(buf.len())
            .ok_or_else(|| os(Errno::EINVAL))?;
        if end > self.max {
            return Err(os(ENOMEM));
        }
        if m.disabled {
            return Err(os(Errno::ENODEV));
        }
        let from = m.pos;
        m.data[from..end].copy_from_slice(buf);
        m.pos = end;
        let mut ret = Ok(buf.len());
        if m.filled < MTTY_HEADER && m.filled + buf.len() >= MTTY_HEADER {
            let h = &m.data[..MTTY_HEADER];
            let magic = u64::from_le_bytes(h[0..8].try_into().unwrap_or_default());
            let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap_or_default());
            if magic != MTTY_MAGIC
                || word(20) != 0
                || word(8) != 1
                || word(12) != 0
                || usize::try_from(word(16)).ok() != Some(self.nr_ports)
            {
                ret = Err(os(EFAULT));
            }
        }
        m.filled += buf.len();
        ret
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_walks_like_the_kernel() {
        use MigState::*;
        let walk = |from: MigState, to: MigState| {
            let mut v = vec![from];
            let mut c = from;
            while c != to {
                c = next_step(c, to);
                v.push(c);
                if c == Error {
                    break;
                }
            }
            v
        };
        assert_eq!(
            walk(Running, StopCopy),
            [Running, RunningP2p, Stop, StopCopy]
        );
        assert_eq!(
            walk(StopCopy, Running),
            [StopCopy, Stop, RunningP2p, Running]
        );
        assert_eq!(
            walk(Running, Resuming),
            [Running, RunningP2p, Stop, Resuming]
        );
        assert_eq!(walk(Resuming, StopCopy), [Resuming, Stop, StopCopy]);
        assert_eq!(walk(StopCopy, PreCopy), [StopCopy, Error]);
        assert_eq!(walk(Running, Error), [Running, Error]);
    }

    #[test]
    fn save_load_round_trip_and_validation() {
        let mut a = MttyDev::fresh(1);
        a.bar_write(0, 7, 0x5a);
        a.bar_write(0, 3, 0x1b);
        assert!(a.set_state(MigState::Stop).unwrap().is_none());
        let f = a.set_state(MigState::StopCopy).unwrap().unwrap();
        let stream = lock(&f).data.clone();
        assert_eq!(stream.len(), 60);
        let mut b = MttyDev::fresh(1);
        b.set_state(MigState::Stop).unwrap();
        let f = b.set_state(MigState::Resuming).unwrap().unwrap();
        let mut w = SimMigFile {
            file: f,
            max: 60,
            nr_ports: 1,
        };
        w.write_all(&stream).unwrap();
        b.set_state(MigState::Stop).unwrap();
        assert_eq!(b.bar_read(0, 7), 0x5a);
        assert_eq!(b.bar_read(0, 3), 0x1b);

        // Short stream: EINVAL, still RESUMING.
        let mut c = MttyDev::fresh(1);
        c.set_state(MigState::Stop).unwrap();
        let f = c.set_state(MigState::Resuming).unwrap().unwrap();
        let mut w = SimMigFile {
            file: f,
            max: 60,
            nr_ports: 1,
        };
        w.write_all(&stream[..30]).unwrap();
        assert_eq!(c.set_state(MigState::Stop).err(), Some(Errno::EINVAL));
        assert_eq!(c.state, MigState::Resuming);
        // Too long: ENOMEM; bad magic: EFAULT.
        assert_eq!(
            w.write(&[0; 31]).err().and_then(|e| e.raw_os_error()),
            Some(12)
        );
    }
}

//! A thin binding to `libibumad.so.3`, loaded at run time.
//!
//! devfence sends its SA queries as MADs through libibumad (the user-MAD library
//! of rdma-core) — no `saquery` process per query. The library is opened with
//! `dlopen` when the OpenSM backend first queries, not linked: a host without
//! rdma-core still builds and runs devfence, and gets a clear error naming the
//! package only when it asks an SA. Under `LD_PRELOAD=libumad2sim.so` (the
//! simulated fabric) libibumad's `open`/`ioctl`/`read`/`write` reach ibsim instead
//! of `/dev/infiniband`, unchanged.
//!
//! This module is the only `unsafe` code of the crate; each call states why it is
//! sound.
#![allow(unsafe_code)]

use std::ffi::{CString, c_char, c_int, c_long, c_uint, c_void};

use libloading::Library;

/// `struct umad_port` of `<infiniband/umad.h>` (rdma-core 44).
#[repr(C)]
struct UmadPort {
    ca_name: [c_char; 20],
    portnum: c_int,
    base_lid: c_uint,
    lmc: c_uint,
    sm_lid: c_uint,
    sm_sl: c_uint,
    state: c_uint,
    phys_state: c_uint,
    rate: c_uint,
    capmask: u32,
    gid_prefix: u64,
    port_guid: u64,
    pkeys_size: c_uint,
    pkeys: *mut u16,
    link_layer: [c_char; 20],
}

type FnInit = unsafe extern "C" fn() -> c_int;
type FnGetPort = unsafe extern "C" fn(*const c_char, c_int, *mut UmadPort) -> c_int;
type FnReleasePort = unsafe extern "C" fn(*mut UmadPort) -> c_int;
type FnOpenPort = unsafe extern "C" fn(*const c_char, c_int) -> c_int;
type FnClosePort = unsafe extern "C" fn(c_int) -> c_int;
type FnRegister = unsafe extern "C" fn(c_int, c_int, c_int, u8, *mut c_long) -> c_int;
type FnUnregister = unsafe extern "C" fn(c_int, c_int) -> c_int;
type FnGetMad = unsafe extern "C" fn(*mut c_void) -> *mut c_void;
type FnSize = unsafe extern "C" fn() -> usize;
type FnSetAddr = unsafe extern "C" fn(*mut c_void, c_int, c_int, c_int, c_int) -> c_int;
type FnSend = unsafe extern "C" fn(c_int, c_int, *mut c_void, c_int, c_int, c_int) -> c_int;
type FnRecv = unsafe extern "C" fn(c_int, *mut c_void, *mut c_int, c_int) -> c_int;
type FnStatus = unsafe extern "C" fn(*mut c_void) -> c_int;

/// The library and the functions devfence uses.
pub(crate) struct Umad {
    init: FnInit,
    get_port: FnGetPort,
    release_port: FnReleasePort,
    open_port: FnOpenPort,
    close_port: FnClosePort,
    register: FnRegister,
    unregister: FnUnregister,
    get_mad: FnGetMad,
    size: FnSize,
    set_addr: FnSetAddr,
    send: FnSend,
    recv: FnRecv,
    status: FnStatus,
    // Keeps the function pointers above valid; dropped last.
    _lib: Library,
}

/// What the local port says about itself and its SM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PortInfo {
    pub ca_name: String,
    pub portnum: i32,
    pub base_lid: u32,
    pub sm_lid: u32,
    pub sm_sl: u32,
    pub state: u32,
    pub port_guid: u64,
}

/// The library name devfence opens.
pub(crate) const LIBRARY: &str = "libibumad.so.3";

impl Umad {
    /// Opens libibumad and resolves its functions.
    pub(crate) fn load() -> Result<Self, String> {
        // SAFETY: loading libibumad runs its ELF constructors, which only set up
        // library-internal state; the library is the system's rdma-core one.
        let lib =
            unsafe { Library::new(LIBRARY) }.map_err(|e| format!("cannot load {LIBRARY}: {e}"))?;
        macro_rules! sym {
            ($name:literal, $t:ty) => {{
                // SAFETY: the symbol has this C signature in <infiniband/umad.h>
                // (rdma-core 44); the pointer is only used while `_lib` lives.
                let s: libloading::Symbol<'_, $t> = unsafe { lib.get($name) }.map_err(|e| {
                    format!(
                        "{LIBRARY} lacks {}: {e}",
                        String::from_utf8_lossy(&$name[..$name.len() - 1])
                    )
                })?;
                *s
            }};
        }
        let u = Self {
            init: sym!(b"umad_init\0", FnInit),
            get_port: sym!(b"umad_get_port\0", FnGetPort),
            release_port: sym!(b"umad_release_port\0", FnReleasePort),
            open_port: sym!(b"umad_open_port\0", FnOpenPort),
            close_port: sym!(b"umad_close_port\0", FnClosePort),
            register: sym!(b"umad_register\0", FnRegister),
            unregister: sym!(b"umad_unregister\0", FnUnregister),
            get_mad: sym!(b"umad_get_mad\0", FnGetMad),
            size: sym!(b"umad_size\0", FnSize),
            set_addr: sym!(b"umad_set_addr\0", FnSetAddr),
            send: sym!(b"umad_send\0", FnSend),
            recv: sym!(b"umad_recv\0", FnRecv),
            status: sym!(b"umad_status\0", FnStatus),
            _lib: lib,
        };
        // SAFETY: umad_init takes no arguments and may be called more than once.
        let rc = unsafe { (u.init)() };
        if rc < 0 {
            return Err(format!("umad_init failed ({rc})"));
        }
        Ok(u)
    }

    fn c_name(ca: Option<&str>) -> Result<Option<CString>, String> {
        ca.map(|c| CString::new(c).map_err(|_| format!("CA name {c:?} holds a NUL byte")))
            .transpose()
    }

    /// Reads the local port (`ca` None: the first CA; `port` 0: its first active port).
    pub(crate) fn port(&self, ca: Option<&str>, port: i32) -> Result<PortInfo, String> {
        let name = Self::c_name(ca)?;
        let ptr = name.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: UmadPort is plain data; all-zero is a valid value (null pkeys).
        let mut p: UmadPort = unsafe { std::mem::zeroed() };
        // SAFETY: `ptr` is null or a NUL-terminated string alive for the call;
        // `p` is a valid, writable umad_port.
        let rc = unsafe { (self.get_port)(ptr, port, &raw mut p) };
        if rc < 0 {
            return Err(format!(
                "umad_get_port({}, {port}) failed ({rc})",
                ca.unwrap_or("first CA")
            ));
        }
        let ca_name: String = p
            .ca_name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| char::from(u8::try_from(*c).unwrap_or(b'?')))
            .collect();
        let info = PortInfo {
            ca_name,
            portnum: p.portnum,
            base_lid: p.base_lid,
            sm_lid: p.sm_lid,
            sm_sl: p.sm_sl,
            state: p.state,
            port_guid: u64::from_be(p.port_guid),
        };
        // SAFETY: `p` was filled by umad_get_port; release frees its pkeys array.
        unsafe { (self.release_port)(&raw mut p) };
        Ok(info)
    }

    /// Opens the port and registers an agent for `class`/`version`; returns (fd, agent).
    pub(crate) fn open(
        &self,
        ca: Option<&str>,
        port: i32,
        class: u8,
        version: u8,
    ) -> Result<(i32, i32), String> {
        let name = Self::c_name(ca)?;
        let ptr = name.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: `ptr` is null or a NUL-terminated string alive for the call.
        let fd = unsafe { (self.open_port)(ptr, port) };
        if fd < 0 {
            return Err(format!("umad_open_port failed ({fd})"));
        }
        // SAFETY: `fd` is the port just opened; a null method mask means "none"
        // (this agent only sends requests and receives their replies); RMPP
        // version 1 lets the kernel reassemble multi-MAD SA replies.
        let agent = unsafe {
            (self.register)(
                fd,
                c_int::from(class),
                c_int::from(version),
                1,
                std::ptr::null_mut(),
            )
        };
        if agent < 0 {
            // SAFETY: closing the fd we opened.
            unsafe { (self.close_port)(fd) };
            return Err(format!("umad_register failed ({agent})"));
        }
        Ok((fd, agent))
    }

    /// Unregisters and closes.
    pub(crate) fn close(&self, fd: i32, agent: i32) {
        // SAFETY: `fd`/`agent` came from `open` and are closed once (the caller
        // forgets them).
        unsafe {
            (self.unregister)(fd, agent);
            (self.close_port)(fd);
        }
    }

    /// Bytes of the umad header before the MAD.
    pub(crate) fn header_len(&self) -> usize {
        // SAFETY: no arguments.
        unsafe { (self.size)() }
    }

    /// Sends `mad` to `dlid` QP1 (the SA) with `timeout_ms` and `retries`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send(
        &self,
        fd: i32,
        agent: i32,
        mad: &[u8],
        dlid: u32,
        sl: u32,
        timeout_ms: i32,
        retries: i32,
    ) -> Result<(), String> {
        let h = self.header_len();
        let mut buf = vec![0u8; h + mad.len()];
        let base = buf.as_mut_ptr().cast::<c_void>();
        // SAFETY: `buf` holds a umad header plus the MAD; umad_get_mad returns a
        // pointer into it (at offset `h`), and set_addr writes only the header.
        unsafe {
            let dst = (self.get_mad)(base).cast::<u8>();
            let off = usize::try_from(dst.offset_from(base.cast::<u8>()))
                .map_err(|_| "umad_get_mad pointed before the buffer".to_owned())?;
            if off + mad.len() > buf.len() {
                return Err("umad_get_mad pointed past the buffer".into());
            }
            std::ptr::copy_nonoverlapping(mad.as_ptr(), dst, mad.len());
            (self.set_addr)(
                base,
                c_int::try_from(dlid).unwrap_or(0),
                1,
                c_int::try_from(sl).unwrap_or(0),
                0x8001_0000u32 as c_int,
            );
        }
        let len = c_int::try_from(mad.len()).map_err(|_| "MAD too long".to_owned())?;
        // SAFETY: `buf` is a complete umad of `len` MAD bytes, alive for the call.
        let rc = unsafe { (self.send)(fd, agent, base, len, timeout_ms, retries) };
        if rc < 0 {
            return Err(format!("umad_send failed ({rc})"));
        }
        Ok(())
    }

    /// Receives one MAD (up to `max` bytes) within `timeout_ms`: Ok(Some((umad
    /// status, bytes))), Ok(None) on timeout.
    pub(crate) fn recv(
        &self,
        fd: i32,
        max: usize,
        timeout_ms: i32,
    ) -> Result<Option<(i32, Vec<u8>)>, String> {
        let h = self.header_len();
        let mut buf = vec![0u8; h + max];
        let mut len = c_int::try_from(max).unwrap_or(c_int::MAX);
        let base = buf.as_mut_ptr().cast::<c_void>();
        // SAFETY: `buf` has room for the header plus `len` bytes, as told.
        let rc = unsafe { (self.recv)(fd, base, &raw mut len, timeout_ms) };
        if rc < 0 {
            let e = -rc;
            if e == 110 || e == 11 {
                return Ok(None); // ETIMEDOUT / EAGAIN
            }
            return Err(format!("umad_recv failed ({rc})"));
        }
        // SAFETY: `buf` holds a umad header written by umad_recv.
        let status = unsafe { (self.status)(base) };
        let n = usize::try_from(len).unwrap_or(0).min(max);
        Ok(Some((status, buf[h..h + n].to_vec())))
    }
}

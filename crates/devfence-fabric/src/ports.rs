//! Reading a port's programmed P_Key table by its GUID, independently of which SM
//! configured it. OpenSM's SA client implements it (PKeyTableRecord of the GUID's
//! LID); the UFM backend uses one to turn UFM's *configured* view into an
//! *acknowledged* one (UFM reports what it was asked, not what the ports took).

use devfence_model::Guid;

use crate::{FabricError, Programmed, SmState};

/// Reads what a port acknowledged: its LID and P_Key table as a set.
pub trait PortReader: Send + Sync {
    /// What the fabric says is programmed on the port with this GUID;
    /// [`Programmed::Absent`] when no port has it.
    ///
    /// # Errors
    /// Unreachable SA, malformed replies, timeouts.
    fn read_port(&self, guid: Guid) -> Result<Programmed, FabricError>;

    /// [`read_port`](Self::read_port) for each GUID, in order; a reader that
    /// can (the SA client) reads them together.
    ///
    /// # Errors
    /// As [`read_port`](Self::read_port), for any of them.
    fn read_ports(&self, guids: &[Guid]) -> Result<Vec<Programmed>, FabricError> {
        guids.iter().map(|g| self.read_port(*g)).collect()
    }

    /// The role of the SM on this host, as the SM itself reports it (OpenSM:
    /// the SMInfoRecord of the local port's GUID); `Ok(None)` when this reader
    /// cannot tell.
    ///
    /// # Errors
    /// Unreachable SA, malformed replies, timeouts.
    fn local_sm_state(&self) -> Result<Option<SmState>, FabricError> {
        Ok(None)
    }
}

impl<T: PortReader + ?Sized> PortReader for std::sync::Arc<T> {
    fn read_port(&self, guid: Guid) -> Result<Programmed, FabricError> {
        (**self).read_port(guid)
    }
    fn read_ports(&self, guids: &[Guid]) -> Result<Vec<Programmed>, FabricError> {
        (**self).read_ports(guids)
    }
    fn local_sm_state(&self) -> Result<Option<SmState>, FabricError> {
        (**self).local_sm_state()
    }
}

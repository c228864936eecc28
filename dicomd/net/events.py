"""Events the sans-IO upper layer hands to its user (the asyncio transport).

The upper layer (``dicomd.net.fsm.UpperLayer``) never touches a socket or a clock. Feeding
it bytes or local primitives yields these small immutable events; the transport acts on
them: it forwards indications to the association, writes ``data_to_send()`` to the socket,
arms or stops the ARTIM timer, and closes the connection.

Names follow PS3.8 9.2 (service primitives) and 9.3.1 (the ARTIM timer and transport
connection actions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicomd.net.acse_codec import AssociateRJ
    from dicomd.net.negotiation import AssociateAC, AssociationRequest


# A-ABORT source values (PS3.8 9.3.8, table 9-26).
ABORT_SOURCE_USER = 0  # DICOM UL service-user
ABORT_SOURCE_PROVIDER = 2  # DICOM UL service-provider

# A-ABORT provider reasons (PS3.8 table 9-26), used with ABORT_SOURCE_PROVIDER.
ABORT_REASON_NOT_SPECIFIED = 0
ABORT_REASON_UNRECOGNIZED_PDU = 1
ABORT_REASON_UNEXPECTED_PDU = 2
ABORT_REASON_UNRECOGNIZED_PDU_PARAMETER = 4
ABORT_REASON_UNEXPECTED_PDU_PARAMETER = 5
ABORT_REASON_INVALID_PDU_PARAMETER = 6


@dataclass(frozen=True, slots=True)
class Pdv:
    """One presentation data value item of a P-DATA-TF PDU (PS3.8 9.3.5.1, E.2)."""

    context_id: int
    is_command: bool
    is_last: bool
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class AssociateIndication:
    """A-ASSOCIATE indication (acceptor): the peer sent an A-ASSOCIATE-RQ (Evt6, AE-6)."""

    request: AssociationRequest


@dataclass(frozen=True, slots=True)
class AssociateAccepted:
    """A-ASSOCIATE confirmation, accepted (requestor, Evt3, AE-3)."""

    accept: AssociateAC


@dataclass(frozen=True, slots=True)
class AssociateRejected:
    """A-ASSOCIATE confirmation, rejected (requestor, Evt4, AE-4).

    ``local`` is True on the acceptor when the UL provider itself rejected the request
    (AE-6: protocol version not supported) and sent ``reject`` to the peer; the user never
    saw an A-ASSOCIATE indication, this is for the log.
    """

    reject: AssociateRJ
    local: bool = False


@dataclass(frozen=True, slots=True)
class DataIndication:
    """P-DATA indication: the PDVs of one received P-DATA-TF PDU (Evt10, DT-2)."""

    pdvs: tuple[Pdv, ...]


@dataclass(frozen=True, slots=True)
class ReleaseIndication:
    """A-RELEASE indication: the peer asked to release (Evt12, AR-2 / AR-8 on collision)."""

    collision: bool = False


@dataclass(frozen=True, slots=True)
class ReleaseConfirmed:
    """A-RELEASE confirmation: our release request was answered (Evt13, AR-3)."""


@dataclass(frozen=True, slots=True)
class AbortIndication:
    """A-ABORT (peer sent A-ABORT, Evt16, AA-3) or A-P-ABORT (the provider gave up: a bad
    or unexpected PDU, the ARTIM timer, or the transport closed unexpectedly, AA-4/AA-8).

    ``local`` is True when this side detected the problem (and, where PS3.8 says so,
    sent an A-ABORT PDU to the peer); ``source`` and ``reason`` are the PS3.8 values
    that were received or sent. ``detail`` says in words why, for the log.
    """

    source: int
    reason: int
    local: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StartArtim:
    """Arm (or re-arm) the ARTIM timer."""


@dataclass(frozen=True, slots=True)
class StopArtim:
    """Disarm the ARTIM timer."""


@dataclass(frozen=True, slots=True)
class CloseTransport:
    """Close the transport connection once pending output has been written."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The association is over and the transport is closed (Sta1). Always the last event."""


Event = (
    AssociateIndication
    | AssociateAccepted
    | AssociateRejected
    | DataIndication
    | ReleaseIndication
    | ReleaseConfirmed
    | AbortIndication
    | StartArtim
    | StopArtim
    | CloseTransport
    | ConnectionClosed
)

"""A-ASSOCIATE PDUs for the upper-layer tests, built with pynetdicom's own classes so the
code under test is checked against an independent encoder."""

from __future__ import annotations

from collections.abc import Sequence

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"


def associate_primitive(
    calling: str = "SCU",
    *,
    transfer_syntaxes: Sequence[str] = (IMPLICIT,),
    max_pdu: int = 16384,
    implementation_uid: str | None = "1.2.826.0.1.3680043.9.9999",
) -> A_ASSOCIATE:
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = "DICOMD"
    cx = build_context(VERIFICATION, list(transfer_syntaxes))
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    items: list[object] = [ml]
    if implementation_uid is not None:
        ic = ImplementationClassUIDNotification()
        ic.implementation_class_uid = implementation_uid
        items.append(ic)
    prim.user_information = items  # type: ignore[assignment]
    return prim


def make_rq(calling: str = "SCU", **kw: object) -> A_ASSOCIATE_RQ:
    return A_ASSOCIATE_RQ(associate_primitive(calling, **kw))  # type: ignore[arg-type]


def make_ac(calling: str = "SCU", **kw: object) -> A_ASSOCIATE_AC:
    prim = associate_primitive(calling, **kw)  # type: ignore[arg-type]
    prim.result = 0
    cx = build_context(VERIFICATION, [IMPLICIT])
    cx.context_id = 1
    cx.result = 0
    prim.presentation_context_definition_results_list = [cx]
    return A_ASSOCIATE_AC(prim)

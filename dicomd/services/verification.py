"""Verification service (C-ECHO SCP, PS3.4 Annex A)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from dicomd.services.base import Offer, Service

if TYPE_CHECKING:
    from dicomd.association import Association, Request

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
# Uncompressed transfer syntaxes, our preference first.
UNCOMPRESSED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
)


class VerificationService(Service):
    name: ClassVar[str] = "verification"
    permissions: ClassVar[tuple[str, ...]] = ("echo",)

    def offers(self) -> list[Offer]:
        return [Offer(VERIFICATION_SOP_CLASS, UNCOMPRESSED_TRANSFER_SYNTAXES)]

    def answer_inline(self, association: Association, request: Request) -> bool:
        association.respond_now(request, status=0x0000)
        return True

    async def handle(self, association: Association, request: Request) -> None:
        await association.respond(request, status=0x0000)

"""dcmqrscp.cfg importer: DCMTK's shipped file and a realistic site configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import yaml
from conftest import missing

from dicomd.access import AssociationFacts, decide, move_destination
from dicomd.config import parse_config
from dicomd.importers.dcmqrscp import import_dcmqrscp
from dicomd.services.base import Offer, Service
from dicomd.services.registry import Registry
from dicomd.services.verification import VerificationService

SHIPPED = Path("/etc/dcmtk/dcmqrscp.cfg")


class FakeStorage(Service):
    name: ClassVar[str] = "storage"
    permissions: ClassVar[tuple[str, ...]] = ("store",)

    def offers(self) -> list[Offer]:
        return []

    async def handle(self, association: object, request: object) -> None:  # type: ignore[override]
        return None


class FakeQueryRetrieve(FakeStorage):
    name: ClassVar[str] = "qr"
    permissions: ClassVar[tuple[str, ...]] = ("find", "move", "get")


REGISTRY = Registry(
    {"verification": VerificationService, "storage": FakeStorage, "qr": FakeQueryRetrieve}
)

REALISTIC = """\
#-----------------------------------------------------------------------
# Radiology department archive (dcmqrscp), converted to dicomd in 2026
#-----------------------------------------------------------------------
NetworkType     = "tcp"
NetworkTCPPort  = 11112
MaxPDUSize      = 65536
MaxAssociations = 32
UserName        = dcmtk
GroupName       = dcmtk
SpecificCharacterSet = "ISO_IR 192", override, discard

HostTable BEGIN
ct1          = (CT_SCANNER1, 10.20.1.11, 104)
ct2          = (CT_SCANNER2, 10.20.1.12, 104)
mr1          = (MR_MAIN, mr-main.radiology.example, 104)
viewers      = (VIEWER_WS1, 10.20.5.40, 11112), (VIEWER_WS2, 10.20.5.41, 11112)
modalities   = ct1, ct2, mr1
HostTable END

VendorTable BEGIN
"Acme CT Company" = ct1
VendorTable END

AETable BEGIN
ARCHIVE   /var/lib/dcmtk/db/ARCHIVE   RW (500, 1024mb)  modalities
QUERY     /var/lib/dcmtk/db/ARCHIVE   R  (500, 1024mb)  viewers, (PACS2, 10.30.0.5, 104)
INBOX     /var/lib/dcmtk/db/INBOX     W  (100, 512mb)   ANY
AETable END
"""


def config_from(fragment: dict, **extra: object):  # type: ignore[no-untyped-def]
    return parse_config({**fragment, **extra}, registry=REGISTRY)


def test_realistic_file() -> None:
    result = import_dcmqrscp(REALISTIC, source="dcmqrscp.cfg", registry=REGISTRY)
    fragment = result.fragment
    assert fragment["listeners"] == [{"name": "dicom", "address": "0.0.0.0", "port": 11112}]
    assert fragment["limits"] == {"max_pdu_length": 65536, "max_associations": 32}
    assert fragment["run_as"] == {"user": "dcmtk", "group": "dcmtk"}
    assert [(p["name"], p["ae_title"], p["host"], p["port"]) for p in fragment["peers"]] == [
        ("ct1", "CT_SCANNER1", "10.20.1.11", 104),
        ("ct2", "CT_SCANNER2", "10.20.1.12", 104),
        ("mr1", "MR_MAIN", "mr-main.radiology.example", 104),
        ("viewers-1", "VIEWER_WS1", "10.20.5.40", 11112),
        ("viewers-2", "VIEWER_WS2", "10.20.5.41", 11112),
        ("pacs2", "PACS2", "10.30.0.5", 104),
    ]
    assert all(p["move_destination"] for p in fragment["peers"])
    assert {ae["ae_title"]: sorted(ae["services"]) for ae in fragment["local_aes"]} == {
        "ARCHIVE": ["qr", "storage", "verification"],
        "QUERY": ["qr", "verification"],
        "INBOX": ["storage", "verification"],
    }
    notes = [str(n) for n in result.notes if not n.converted]
    assert any(n.startswith("dcmqrscp.cfg:10: SpecificCharacterSet") for n in notes)
    assert any(n.startswith("dcmqrscp.cfg:21: VendorTable entry 'Acme CT Company'") for n in notes)
    assert (
        "dcmqrscp.cfg:25: ARCHIVE: quota (500, 1024mb) not converted "
        "(dicomd has no per-AE quota)" in notes
    )
    assert any("storage area '/var/lib/dcmtk/db/INBOX'" in n for n in notes)
    caveats = [str(n) for n in result.notes if n.converted]
    assert any("MR_MAIN on host 'mr-main.radiology.example'" in n for n in caveats)

    config = config_from(fragment)
    cases = [
        # (address, calling, called, allowed, services)
        ("10.20.1.11", "CT_SCANNER1", "ARCHIVE", True, {"echo", "store", "find", "move", "get"}),
        ("10.20.1.99", "CT_SCANNER1", "ARCHIVE", False, set()),  # right AE, wrong address
        ("10.20.1.12", "CT_SCANNER1", "ARCHIVE", False, set()),  # another scanner's address
        ("192.0.2.7", "MR_MAIN", "ARCHIVE", True, {"echo", "store", "find", "move", "get"}),
        ("10.20.5.40", "VIEWER_WS1", "QUERY", True, {"echo", "find", "move", "get"}),
        ("10.20.5.40", "VIEWER_WS1", "ARCHIVE", False, set()),
        ("10.30.0.5", "PACS2", "QUERY", True, {"echo", "find", "move", "get"}),
        ("198.51.100.1", "ANYBODY", "INBOX", True, {"echo", "store"}),
        ("198.51.100.1", "ANYBODY", "QUERY", False, set()),
    ]
    for address, calling, called, allowed, services in cases:
        decision = decide(config, AssociationFacts(address, calling, called, "dicom"))
        assert decision.allowed is allowed, (address, calling, called, decision)
        assert set(decision.services) == services, (address, calling, called, decision)
        if not allowed:
            assert decision.rule == "access.default (deny)"
            assert decision.reject_reason == 3  # calling AE title not recognized, as dcmqrscp
    viewer = decide(config, AssociationFacts("10.20.5.40", "VIEWER_WS1", "QUERY", "dicom"))
    destination = move_destination(config, viewer, "CT_SCANNER2")
    assert destination is not None and destination.host == "10.20.1.12"
    assert move_destination(config, viewer, "NOT_KNOWN") is None


def test_services_not_installed_are_reported() -> None:
    small = Registry({"verification": VerificationService})
    result = import_dcmqrscp(REALISTIC, registry=small)
    notes = [str(n) for n in result.notes if not n.converted]
    assert any("ARCHIVE: store, find, move, get (access RW) not served" in n for n in notes)
    rules = {r["name"]: r for r in result.fragment["access"]["rules"]}
    assert rules["INBOX: ANY"]["services"] == ["echo"]
    parse_config(result.fragment, registry=small)


def test_shipped_file(tmp_path: Path) -> None:
    if not SHIPPED.exists():
        missing(f"{SHIPPED} (Debian package dcmtk)")
    result = import_dcmqrscp(SHIPPED.read_text(), source=str(SHIPPED), registry=REGISTRY)
    fragment = result.fragment
    assert fragment["listeners"][0]["port"] == 104
    assert fragment["limits"] == {"max_pdu_length": 16384, "max_associations": 16}
    assert fragment["run_as"] == {"user": "dcmtk", "group": "dcmtk"}
    assert fragment["access"] == {"default": "deny", "rules": []}
    assert any("the AETable is empty" in str(n) for n in result.notes)
    # With a local AE added, it is a valid configuration.
    config_from(fragment, local_aes=[{"ae_title": "DICOMD", "services": {"verification": None}}])
    # And through the command line.
    cli = subprocess.run(
        [sys.executable, "-m", "dicomd", "import-dcmqrscp", str(SHIPPED)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    printed = yaml.safe_load(cli.stdout)
    assert printed["listeners"][0]["port"] == 104
    assert "# Not converted:" in cli.stdout
    assert "item(s) not converted" in cli.stderr

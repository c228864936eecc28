"""A plain pynetdicom Verification SCP, the pynetdicom column of bench_echo.py.

Run as a subprocess: ``python bench/pynetdicom_scp.py PORT``. Stock pynetdicom settings,
except ``maximum_associations`` (2,000, so it can hold the idle-association test) and
``network_timeout`` (600 s instead of 60 s, so idle associations are not released by the
server while they are measured; dicomd's idle timeout is 300 s).
"""

from __future__ import annotations

import logging
import sys

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def main() -> None:
    port = int(sys.argv[1])
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_supported_context(Verification)
    ae.maximum_associations = 2000
    ae.network_timeout = 600
    ae.start_server(("127.0.0.1", port), block=True)


if __name__ == "__main__":
    main()

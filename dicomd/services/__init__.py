"""DIMSE services as plug-ins: one module per service, registered as entry points
in the ``dicomd.services`` group (built-ins included)."""

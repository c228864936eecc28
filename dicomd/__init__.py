"""dicomd: a DICOM daemon suite for Debian and systemd."""

__version__ = "0.1.0"

# Our own identity on every association (PS3.7 D.3.3.2). A 2.25 (UUID-derived) UID needs no
# registered root (PS3.5 B.2);
# the version name is at most 16 characters.
IMPLEMENTATION_CLASS_UID = "2.25.238323272850970659405613357582759040268"
IMPLEMENTATION_VERSION_NAME = "DICOMD_010"

"""Modality worklist sources: DCMTK-compatible folders and an SQL table; dump import."""

"""The DICOM upper layer (PS3.8) as a sans-IO core: no sockets, no asyncio, no clocks."""

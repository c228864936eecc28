"""The archive: blob store (layout, atomic durable writes, digests) and its SQL index."""

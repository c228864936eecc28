"""Query/Retrieve: index reads, retrieve sub-operations, the find/move/get CLI."""

"""The artifact store: objects, the run manifest, Parquet tables, provenance, streamed aggregation, verification."""

"""dtlab analysis: run records into pandas DataFrames and comparison reports (no torch, no Ray)."""

"""Library-specific knowledge the generic engine cannot trace (kept out of the engine itself)."""

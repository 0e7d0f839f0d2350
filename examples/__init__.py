"""Examples of using OrMo-PS from your own code (run from the repository root: `python -m examples.NAME`)."""

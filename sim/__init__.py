"""The deterministic simulator: ServerCore driven by virtual workers."""

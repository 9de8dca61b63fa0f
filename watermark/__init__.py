"""Framework-free watermarking core: pure functions on tensors and arrays (no Lightning)."""

"""StealthMark core: key, triggers, QR grid, soft targets, LIME explanation, evidence."""

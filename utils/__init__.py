"""Run plumbing shared by train.py and verify.py (logging set-up, instantiation, summaries)."""

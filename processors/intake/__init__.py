"""Intake: the one door from upstream systems into the run log (validate, deduplicate, re-key, sign)."""

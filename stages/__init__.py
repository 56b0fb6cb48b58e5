"""Orchestration of the three stages: one run() each, no math."""

"""Differential privacy: accounting (issue #13; record/client mechanisms not wired yet)."""

"""Differential privacy (issue #13): accounting, record-level DP-SGD (:mod:`.record`), reports."""

"""Privacy audit: attacks on what each mode's parties see (``fedshield audit``).

One module per attack family; importing this package imports nothing heavy.

- :mod:`fedshield_flwr.audit.membership`: membership inference from per-row losses (released
  model, a silo's update).
"""

"""fedshield_flwr/relay."""

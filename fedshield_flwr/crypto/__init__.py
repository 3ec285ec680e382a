"""fedshield_flwr/crypto."""

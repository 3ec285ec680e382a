"""FedShield-Flwr: federated LoRA fine-tuning of LLMs with Flower, with privacy modes."""

__version__ = "0.1.0"

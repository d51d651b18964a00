"""A small Python client for Gorgon's RL routes, and the glue for TRL's GRPOTrainer."""

from client.http import GorgonClient

__all__ = ["GorgonClient"]

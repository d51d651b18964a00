"""Speculative decoding: cheap proposers guess the next tokens, the target verifies them in one pass.

`proposer.py` is the interface every proposer implements (the draft model here, prompt lookup, Medusa
heads); `rejection.py` is the one verifier; the engine wires them into its step.
"""

from decoding.speculative.proposer import Proposal, Proposer, SpecCounters

__all__ = ["Proposal", "Proposer", "SpecCounters"]

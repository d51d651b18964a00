"""Whether speculation pays in this step: decided by the measured speed of steps with and without it.

Speculation trades a wider forward (each sequence scores 1 + k tokens) for more tokens per forward. At
batch 1 on a memory-bound model the wider forward is nearly free; at batch 8 the step is compute-bound
and the extra rows cost about what they return; for sampled RL groups at temperature 1 acceptance drops.
Where the balance lies depends on the model, the CPU, the proposer and the traffic, so it is measured,
not configured: for each batch size (1-8 apart, then by powers of two), pure decode steps are timed with
speculation on and off, and each step takes the mode whose recent tokens per second is higher. The mode
that lost is re-measured every EXPLORE_EVERY steps of its batch size, so a change in acceptance (another
kind of prompt, a temperature) is noticed; that costs at most one step in EXPLORE_EVERY.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_SAMPLES = 3          # steps of a mode before its speed is trusted
EXPLORE_EVERY = 48       # decisions of a batch size between re-measurements of the mode not taken
DECAY = 0.9              # weight of the older steps in a mode's speed, per new step


def batch_bucket(num_decoding: int) -> int:
    """Batch sizes measured apart: 1..8 each, then 9-16, 17-32, ..."""
    return num_decoding if num_decoding <= 8 else 8 + (num_decoding - 1).bit_length() - 3


@dataclass
class ModeSpeed:
    tokens: float = 0.0           # decayed sums over the mode's recent pure decode steps
    seconds: float = 0.0
    samples: int = 0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens = DECAY * self.tokens + tokens
        self.seconds = DECAY * self.seconds + seconds
        self.samples += 1

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BucketState:
    on: ModeSpeed = field(default_factory=ModeSpeed)
    off: ModeSpeed = field(default_factory=ModeSpeed)
    decisions: int = 0


class SpeculationGovernor:
    def __init__(self):
        self._buckets: dict[int, BucketState] = {}

    def speculate(self, num_decoding: int) -> bool:
        """The mode for a step where `num_decoding` sequences decode."""
        state = self._buckets.setdefault(batch_bucket(num_decoding), BucketState())
        state.decisions += 1
        if state.on.samples < MIN_SAMPLES:
            return True
        if state.off.samples < MIN_SAMPLES:
            return False
        better = state.on.tokens_per_second >= state.off.tokens_per_second
        return (not better) if state.decisions % EXPLORE_EVERY == 0 else better

    def record(self, num_decoding: int, speculated: bool, tokens: int, seconds: float) -> None:
        """A pure decode step's outcome: `tokens` emitted by its decoding sequences in `seconds`."""
        state = self._buckets.setdefault(batch_bucket(num_decoding), BucketState())
        (state.on if speculated else state.off).add(tokens, seconds)

    def summary(self) -> dict[int, dict[str, float]]:
        """Per batch bucket, each mode's measured tokens per second (for metrics and benchmarks)."""
        return {bucket: {"on_tok_s": round(s.on.tokens_per_second, 1), "off_tok_s": round(s.off.tokens_per_second, 1),
                         "on_steps": s.on.samples, "off_steps": s.off.samples}
                for bucket, s in sorted(self._buckets.items())}

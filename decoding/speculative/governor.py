"""Whether speculation pays in this step: decided by the measured speed of steps with and without it.

Speculation trades a wider forward (each sequence scores 1 + k tokens) for more tokens per forward. At
batch 1 on a memory-bound model the wider forward is nearly free; at batch 8 the step is compute-bound
and the extra rows cost about what they return; for sampled RL groups at temperature 1 acceptance drops.
Where the balance lies depends on the model, the CPU, the proposer and the traffic, so it is measured,
not configured: for each batch size (1-8 apart, then by powers of two), pure decode steps are timed with
speculation on and off, and each step takes the mode whose recent tokens per second is higher (the mode
in use keeping its place until the other leads by a margin, `_leader`). The mode
that lost is re-measured after EXPLORE_EVERY steps of its batch size, so a change in acceptance (another
kind of prompt, a temperature) is noticed; each time it loses again the wait doubles (up to
MAX_EXPLORE_EVERY), and it returns to EXPLORE_EVERY when the other mode wins.

A re-measurement starts that mode's figures afresh (the old ones are stale by then) and takes as many
timed steps as the mode needs to be trusted: a plain step emits one token per sequence and only its time
varies, so PLAIN_SAMPLES are enough; a speculating step emits anywhere from 1 token to the whole tree
(at T = 0.7 on SmolLM2: 1 to 6, mean 1.9), so SPECULATING_SAMPLES, and the figures decay slowly enough to
average over a couple of dozen steps: with 6 samples and a 10-step memory a governed EAGLE at T = 0.7
spent a third of its steps plain while speculating was measured 27% faster. The first step after
each switch of mode is not timed: it pays for the switch, not for the mode (switching speculation on, a
draft model or an EAGLE head first catches up on every token it missed), which would otherwise make
speculation look slower after every re-measurement than it runs. Nor is the first step of a batch size,
which pays for the engine's first use of its buffers (a fresh EAGLE engine's first speculating steps made
plain decoding win its warm-up generation: 51 plain steps to 37).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Timed steps of a mode before its speed is trusted, at first and per re-measurement (speculation's at
# batch 1; fewer for larger batches, `speculating_samples`).
SPECULATING_SAMPLES = 12
PLAIN_SAMPLES = 3
EXPLORE_EVERY = 48       # decisions of a batch size before the mode not taken is re-measured
MAX_EXPLORE_EVERY = 768
DECAY = 0.95             # weight of the older steps in a mode's speed, per new step
SWITCH_MARGIN = 0.1      # how much faster the other mode must measure to be switched to between re-measurements


def batch_bucket(num_decoding: int) -> int:
    """Batch sizes measured apart: 1..8 each, then 9-16, 17-32, ..."""
    return num_decoding if num_decoding <= 8 else 8 + (num_decoding - 1).bit_length() - 3


def speculating_samples(num_decoding: int) -> int:
    """A speculating step's tokens are summed over its sequences, so their spread relative to the mean
    shrinks with the batch, and so does the count of steps that measure it (a speculating step at batch 8
    is the expensive one to measure: it usually loses)."""
    return max(PLAIN_SAMPLES, -(-SPECULATING_SAMPLES // num_decoding))


@dataclass
class ModeSpeed:
    tokens: float = 0.0           # decayed sums over the mode's recent pure decode steps
    seconds: float = 0.0
    samples: int = 0

    def add(self, tokens: int, seconds: float, steps: int = 1) -> None:
        """`steps` decode steps (or speculating rounds) run in one call count as that many samples; the
        figures still decay per call: decayed per step, a figure over calls of eight rounds remembered about
        three calls, and one noisy call on this shared machine decided the mode."""
        self.tokens = DECAY * self.tokens + tokens
        self.seconds = DECAY * self.seconds + seconds
        self.samples += steps

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BucketState:
    on: ModeSpeed = field(default_factory=ModeSpeed)
    off: ModeSpeed = field(default_factory=ModeSpeed)
    since_explored: int = 0           # decisions since the mode not taken was last re-measured
    explore_every: int = EXPLORE_EVERY
    leader: bool | None = None        # the mode that was ahead at the last re-measurement
    last_mode: bool | None = None     # the mode of this batch size's last timed-or-skipped step
    current: bool | None = None       # the mode chosen since the last re-measurement (None: choose afresh)


class SpeculationGovernor:
    def __init__(self):
        self._buckets: dict[int, BucketState] = {}

    def speculate(self, num_decoding: int) -> bool:
        """The mode for a step where `num_decoding` sequences decode."""
        state = self._buckets.setdefault(batch_bucket(num_decoding), BucketState())
        if state.on.samples < speculating_samples(num_decoding):
            return True
        if state.off.samples < PLAIN_SAMPLES:
            return False
        better = self._leader(state)
        state.since_explored += 1
        if state.since_explored < state.explore_every:
            return better
        # Re-measure the other mode from scratch (the early returns above then keep it for its samples'
        # timed steps); wait longer next time if the same mode is still ahead.
        same = state.leader is None or state.leader == better
        state.explore_every = min(2 * state.explore_every, MAX_EXPLORE_EVERY) if same else EXPLORE_EVERY
        state.leader, state.since_explored, state.current = better, 0, None
        if better:
            state.off = ModeSpeed()
        else:
            state.on = ModeSpeed()
        return not better

    @staticmethod
    def _leader(state: BucketState) -> bool:
        """The mode to run: after a re-measurement the faster one; between re-measurements the mode in use
        keeps running until the other is faster by SWITCH_MARGIN. The figure of the mode in use moves
        every step while the other's stands still, so comparing them every step without a margin switches
        on noise. Simulated (a sampled step emitting 1 to 6 tokens, mean 1.96, 1,000 steps, 5 seeds):
        speculation 12% faster on average ran in 24-50% of the steps without the margin, 50-85% with it;
        at batch 8 a mode 5% slower than the other costs 1-2% of the best mode's speed either way (a
        margin of 0.2 cost up to 4%)."""
        on, off = state.on.tokens_per_second, state.off.tokens_per_second
        if state.current is None:
            state.current = on >= off
        elif state.current and off > on * (1 + SWITCH_MARGIN) or not state.current and on > off * (1 + SWITCH_MARGIN):
            state.current = not state.current
        return state.current

    def record(self, num_decoding: int, speculated: bool, tokens: int, seconds: float, steps: int = 1) -> None:
        """A pure decode step's outcome: `tokens` emitted by its decoding sequences in `seconds`; `steps` steps
        or speculating rounds when one native call ran several (decoding/multi_step.py,
        decoding/speculative/chain.py): a call of eight rounds counts as eight of the samples a mode
        needs before it is trusted, so a losing mode's re-measurement costs a call or two, not a dozen."""
        state = self._buckets.setdefault(batch_bucket(num_decoding), BucketState())
        switched = state.last_mode != speculated       # (the first step of a batch size counts as one)
        state.last_mode = speculated
        if not switched:
            (state.on if speculated else state.off).add(tokens, seconds, steps)

    def summary(self) -> dict[int, dict[str, float]]:
        """Per batch bucket, each mode's measured tokens per second (for metrics and benchmarks)."""
        return {bucket: {"on_tok_s": round(s.on.tokens_per_second, 1), "off_tok_s": round(s.off.tokens_per_second, 1),
                         "on_steps": s.on.samples, "off_steps": s.off.samples}
                for bucket, s in sorted(self._buckets.items())}

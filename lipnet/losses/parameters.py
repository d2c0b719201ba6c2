"""The scalar hyper-parameters a loss declares sweepable, each with the range its values must lie in.

A loss class lists them in its ``sweepable`` class attribute (``TauCrossEntropy.sweepable == (TAU,
OFFSET)``); ``lipnet sweep`` and the run configuration ask the loss for them instead of keeping a table
of their own (:func:`lipnet.losses.sweepable`, :func:`lipnet.losses.parameter_rule`). A name means the
same thing in every loss that declares it (``tau`` multiplies the logits everywhere, ``margin`` is in
logit units everywhere), so each name has one :class:`LossParameter` here, shared by those losses.

The loss constructor stays the final judge of a value (it may say more, e.g. HKR's note on deel-lip's
``alpha'``); a declaration admits exactly the values its constructor accepts (``tests/test_losses.py``
checks this for every registered loss), so that a command can refuse a bad value before it loads data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

__all__ = ["ALPHA", "EPSILON", "GAMMA", "MARGIN", "OFFSET", "POS_WEIGHT", "TAU", "LossParameter"]


@dataclass(frozen=True)
class LossParameter:
    """A real hyper-parameter ``name`` whose values lie in ``[low, high]`` (``(low, high]`` with
    ``low_open``); ``meaning`` is said in the error message (e.g. ``it multiplies the logits``)."""

    name: str
    low: float
    high: float = math.inf
    low_open: bool = False
    meaning: str = ""

    @property
    def rule(self) -> str:
        """The range in words: ``be > 0``, ``be >= -1``, ``lie in [0, 1]``."""
        if math.isfinite(self.high):
            return f"lie in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        return f"be {'>' if self.low_open else '>='} {self.low:g}"

    def admits(self, value: float) -> bool:
        """Whether the finite number ``value`` lies in the range."""
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def check(self, value: object, key: str) -> float:
        """``value`` as a float; ``ValueError`` naming ``key`` (``loss.tau``) unless it is a finite
        number in the range: ``loss.tau must be > 0 (it multiplies the logits), got 0``."""
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ValueError(f"{key} must be a number, got {value!r}")
        out = float(value)
        if not math.isfinite(out):
            raise ValueError(f"{key} must be finite, got {value!r}")
        if not self.admits(out):
            note = f" ({self.meaning})" if self.meaning else ""
            raise ValueError(f"{key} must {self.rule}{note}, got {value!r}")
        return out


#: Logit scale of the CE-type losses: ``tau`` multiplies the logits (``CE(tau f, y) / tau``).
TAU = LossParameter("tau", 0.0, low_open=True, meaning="it multiplies the logits")
#: Lipschitz-margin offset of the CE-type losses, in logit units.
OFFSET = LossParameter("offset", 0.0)
#: Logit margin of the hinge and HKR losses.
MARGIN = LossParameter("margin", 0.0)
#: HKR's weight of the hinge against the KR term.
ALPHA = LossParameter("alpha", 0.0, 1.0)
#: Focusing exponent of the focal and Poly losses.
GAMMA = LossParameter("gamma", 0.0)
#: Poly-1's leading coefficient; ``>= -1`` keeps it non-negative.
EPSILON = LossParameter("epsilon", -1.0)
#: Weight of the positive terms of tau-BCE.
POS_WEIGHT = LossParameter("pos_weight", 0.0, low_open=True)

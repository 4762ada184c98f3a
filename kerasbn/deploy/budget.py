"""The check's batch: as many random samples as the model's activations allow within a memory budget.

A check evaluates the original model in its own float type and in float64
(`kerasbn.deploy.twins`), and the candidate, on the same random inputs. What
that costs grows with the batch times the model's largest activation: a
4096×4096×3 image model checked at the default batch 8 went past 6 GB. So
the batch of random check inputs is chosen here, once, from the activation
sizes the model declares: every tensor of its functional graph (nested
models flattened, `kerasbn.folding.graph`), per sample, in float64, times
`LIVE` (the largest layer's input, its output and a temporary of its size
at once). The batch is the requested one, or less, down to 1, so that this
estimate stays within ``budget`` bytes. Inputs the user gives are used as
given. A subclassed model declares no activations but its inputs, so only
those count there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEFAULT_BUDGET = 2 * 2**30  # bytes for one evaluation's activations
LIVE = 3  # tensors of the largest activation's size alive at once
FLOAT64 = 8  # bytes
UNKNOWN = 8  # an unknown dimension besides the batch, as `Signature.random` draws it


@dataclass(frozen=True)
class CheckBatch:
    """The batch a check runs at, and why.

    Attributes:
        batch: The batch of random check inputs.
        requested: The batch asked for.
        per_sample: Estimated bytes one sample's activations take in a float64 evaluation.
        budget: The budget in bytes.
    """

    batch: int
    requested: int
    per_sample: int
    budget: int

    @property
    def reduced(self) -> bool:
        """The batch is smaller than the one asked for."""
        return self.batch < self.requested

    def __str__(self) -> str:
        if not self.reduced:
            return f"batch {self.batch}"
        return (
            f"batch {self.batch} instead of {self.requested}: the model's activations take about "
            f"{_size(self.per_sample)} a sample in float64, the check's budget is {_size(self.budget)}"
        )


def per_sample_bytes(model: Any) -> int:
    """Estimated peak bytes of one sample's activations in a float64 evaluation of ``model`` (see the module)."""
    from kerasbn.errors import UnsupportedModelError
    from kerasbn.folding.graph import build_graph
    from kerasbn.model_signature import signature

    try:
        shapes = list(build_graph(model).shapes.values())
    except UnsupportedModelError:  # no graph to read: the inputs are what is known
        shapes = []
    shapes = shapes or [spec.shape for spec in signature(model).inputs]
    largest = max((_elements(shape) for shape in shapes), default=1)
    return LIVE * FLOAT64 * largest


def check_batch(model: Any, requested: int, budget: int | None = None) -> CheckBatch:
    """The batch of random check inputs for ``model``: ``requested``, or less (at least 1) to stay within
    ``budget`` bytes (`DEFAULT_BUDGET` when None)."""
    budget = DEFAULT_BUDGET if budget is None else budget
    per_sample = per_sample_bytes(model)
    batch = max(1, min(requested, budget // per_sample))
    return CheckBatch(batch, requested, per_sample, budget)


def _elements(shape: tuple) -> int:
    """Elements per sample of a tensor of ``shape`` (batch axis first)."""
    return math.prod(UNKNOWN if d is None else int(d) for d in tuple(shape)[1:])


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"

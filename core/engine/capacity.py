"""How many adapter slots and class rows the device tier gets: by count or by memory.

``DIFFFIT_ADAPTER_SLOTS=auto`` sizes the tier from a byte budget:

- CUDA: ``DIFFFIT_ADAPTER_MEMORY_FRACTION`` of the device memory still free
  after the base is loaded, less ``DIFFFIT_ACTIVATION_RESERVE_MB`` kept for
  activations (and the VAE decode);
- CPU (or any other device): ``DIFFFIT_ADAPTER_CPU_BUDGET_MB``.

A slot costs its fp32 vector row (biases and placeable gammas, V columns)
plus its class rows; the budget is split as if every adapter had
``DIFFFIT_ADAPTER_BUDGET_CLASSES`` classes, and the rows are one shared store,
so small tenants leave room that large ones use. A number instead of
``auto`` keeps that many slots (slot 0 = the base).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.adapter.placement import gamma_placeable

MB = 1024**2


def vector_width(transformer: nn.Module) -> int:
    """Columns V of a slot's fp32 vector row for `transformer` (before wrapping).

    Every biased linear contributes its bias, and its gamma where a placement
    may put one; the biased patch-embedding conv its bias.
    """
    width = 0
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            width += module.out_features * (2 if gamma_placeable(name) else 1)
        elif isinstance(module, nn.Conv2d) and module.bias is not None:
            width += module.out_channels
    return width


@dataclass(frozen=True)
class Capacity:
    """Device tier size: `slots` (incl. the base's), `table_rows` class rows in all."""

    slots: int
    table_rows: int
    budget_bytes: int | None  # None: slots given as a number

    def bytes(self, width: int, dim: int) -> int:
        """Bytes the tier allocates: [slots, width] + [table_rows, dim] fp32."""
        return 4 * (self.slots * width + self.table_rows * dim)


def device_budget(device: torch.device, fraction: float, reserve_mb: int, cpu_budget_mb: int) -> int:
    """Bytes the adapter tier may take on `device` (see the module docstring)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(0, int((free - reserve_mb * MB) * fraction))
    return cpu_budget_mb * MB


def plan_capacity(
    slots: int | str,
    *,
    width: int,
    dim: int,
    base_rows: int,
    max_classes: int,
    budget_classes: int,
    budget_bytes: int | None = None,
) -> Capacity:
    """Slots and class rows for a bank row of `width` floats and tables `dim` wide.

    slots="auto": S = budget / (4 * (width + (budget_classes + 1) * dim)),
    at least 2; the rows left after the S vector rows all go to the row store
    (so the budget is spent whole). A number: that many slots and
    ``budget_classes + 1`` rows per adapter slot. Either way the store holds
    at least one adapter of `max_classes` classes next to the base.
    """
    per_adapter_rows = min(budget_classes, max_classes) + 1
    least_rows = base_rows + max_classes + 1
    if slots == "auto":
        if budget_bytes is None:
            raise ValueError("slots='auto' needs a budget_bytes")
        per_slot = 4 * (width + per_adapter_rows * dim)
        count = max(2, budget_bytes // per_slot)
        rows = base_rows + max(0, budget_bytes - 4 * count * width) // (4 * dim)
        return Capacity(int(count), int(max(rows, least_rows)), budget_bytes)
    count = int(slots)
    if count < 2:
        raise ValueError(f"adapter slots must be 'auto' or at least 2; got {slots!r}")
    return Capacity(count, max(base_rows + (count - 1) * per_adapter_rows, least_rows), None)

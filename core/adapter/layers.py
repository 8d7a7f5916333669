"""Adapted layers: a frozen weight followed by a per-adapter transform of its output.

Every place DiffFit touches computes ``y = gamma * (W x) + b`` with ``W``
frozen (``../shared/DESIGN.md`` section 1). Each adapted layer keeps a *bank*
of S rows of ``gamma`` and ``b`` (slot 0 is the base model) and a shared
:class:`Route` tells it, per forward, which rows to use:

- ``Route.slot``: every sample uses one slot (the cheap path: one fused
  ``F.linear`` with that slot's bias when its gamma is 1);
- ``Route.slots``: one slot index per sample (mixed-adapter batches): gather
  rows ``[B, out]`` and broadcast over tokens;
- ``Route.params``: live trainable tensors of a fine-tuning job, so autograd
  reaches them while the bank and the base stay frozen.

The arithmetic of each path belongs to the adapter method
(:mod:`core.adapter.method`, :mod:`core.adapter.difffit`); a layer picks the
path and supplies ``project`` (``W x``), ``rows`` and ``channels``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from difffit.adapter_format import CLASS_TABLE

if TYPE_CHECKING:
    from core.adapter.method import AdapterMethod


@dataclass
class Route:
    """Which adapter rows the next forward uses. Set by the engine thread only."""

    slot: int | None = 0
    slots: torch.Tensor | None = None  # [B] long, one slot per sample
    unique_slots: tuple[int, ...] = ()
    params: dict[str, torch.Tensor] | None = None  # name -> live tensor (training)

    @classmethod
    def single(cls, slot: int) -> Route:
        return cls(slot=slot)

    @classmethod
    def mixed(cls, slots: list[int], device: torch.device | str = "cpu") -> Route:
        """Per-sample slots; collapses to the cheap path when all are equal."""
        uniq = tuple(sorted(set(slots)))
        if len(uniq) == 1:
            return cls(slot=uniq[0])
        index = torch.tensor(slots, dtype=torch.long, device=device)
        return cls(slot=None, slots=index, unique_slots=uniq)

    @classmethod
    def training(cls, params: dict[str, torch.Tensor]) -> Route:
        return cls(slot=None, params=params)


@dataclass
class RouteHolder:
    """One mutable holder shared by reference by every adapted layer of a model."""

    current: Route = field(default_factory=Route)


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose bias (and optional gamma) come from a bank.

    Shapes: x [B, ..., in] -> y [B, ..., out]; bias_bank, gamma_bank [S, out].
    """

    def __init__(
        self,
        base: nn.Linear,
        name: str,
        holder: RouteHolder,
        slots: int,
        gamma: bool,
        method: AdapterMethod,
    ):
        super().__init__()
        self.name = name
        self.holder = holder
        self.method = method
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        out = base.out_features
        bias = base.bias.detach() if base.bias is not None else torch.zeros(out)
        self.register_buffer("bias_bank", bias.expand(slots, out).clone(), persistent=False)
        self.gamma_placeable = gamma
        if gamma:
            ones = torch.ones(slots, out, dtype=bias.dtype, device=bias.device)
            self.register_buffer("gamma_bank", ones, persistent=False)
        else:
            self.gamma_bank = None
        self.has_gamma = [False] * slots  # per slot: is gamma != 1 anywhere

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """W x (+ bias, fused): x [B, ..., in] -> [B, ..., out]."""
        return F.linear(x, self.weight, bias)

    @staticmethod
    def rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-sample rows [B, out] -> [B, 1, ..., out] matching ``like``'s rank (channels last)."""
        return rows.view(rows.shape[0], *([1] * (like.dim() - 2)), rows.shape[1])

    @staticmethod
    def channels(vector: torch.Tensor) -> torch.Tensor:
        """A per-channel vector [out], broadcastable against the output (channels last)."""
        return vector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.holder.current
        if route.params is not None:
            return self.method.forward_live(self, x, route.params)
        if route.slot is not None:
            return self.method.forward_slot(self, x, route.slot)
        return self.method.forward_mixed(self, x, route)


class AdaptedConv2d(nn.Module):
    """A frozen patch-embedding ``nn.Conv2d`` with a banked bias (no gamma).

    Shapes: x [B, C, H, W] -> y [B, D, H/p, W/p]; bias_bank [S, D].
    """

    def __init__(self, base: nn.Conv2d, name: str, holder: RouteHolder, slots: int, method: AdapterMethod):
        super().__init__()
        self.name = name
        self.holder = holder
        self.method = method
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.stride, self.padding = base.stride, base.padding
        out = base.out_channels
        bias = base.bias.detach() if base.bias is not None else torch.zeros(out)
        self.register_buffer("bias_bank", bias.expand(slots, out).clone(), persistent=False)
        self.gamma_placeable = False
        self.gamma_bank = None
        self.has_gamma = [False] * slots

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """W * x (+ bias, fused): x [B, C, H, W] -> [B, D, H/p, W/p]."""
        return F.conv2d(x, self.weight, bias, self.stride, self.padding)

    @staticmethod
    def rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-sample rows [B, D] -> [B, D, 1, 1] (channels first)."""
        return rows[:, :, None, None]

    @staticmethod
    def channels(vector: torch.Tensor) -> torch.Tensor:
        """A per-channel vector [D] -> [D, 1, 1] (channels first)."""
        return vector[:, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.holder.current
        if route.params is not None:
            return self.method.forward_live(self, x, route.params)
        if route.slot is not None:
            return self.method.forward_slot(self, x, route.slot)
        return self.method.forward_mixed(self, x, route)


AdaptedLayer = AdaptedLinear | AdaptedConv2d


class ClassTableBank(nn.Module):
    """Replaces diffusers' ``LabelEmbedding``: one class table per slot.

    Labels are in the adapter's own space: 0..C-1 for classes and C (the
    adapter's ``num_classes``) for its null row. Bank: [S, R, D] with
    R = max rows; rows past an adapter's C + 1 are zero and never read.
    No label dropout here: trainers drop labels themselves, once per sample
    (diffusers would drop independently in each of its per-block copies).
    """

    name = CLASS_TABLE

    def __init__(self, base_table: torch.Tensor, holder: RouteHolder, slots: int, max_rows: int):
        super().__init__()
        self.holder = holder
        rows, dim = base_table.shape
        max_rows = max(max_rows, rows)
        bank = torch.zeros(slots, max_rows, dim, dtype=base_table.dtype, device=base_table.device)
        bank[:, :rows] = base_table.detach()
        self.register_buffer("bank", bank, persistent=False)
        self.num_classes = [rows - 1] * slots  # per slot; the null row index

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        route = self.holder.current
        if route.params is not None:
            return F.embedding(labels, route.params[self.name])
        if route.slot is not None:
            return F.embedding(labels, self.bank[route.slot])
        rows = self.bank.shape[1]
        flat = self.bank.view(-1, self.bank.shape[-1])
        return F.embedding(route.slots * rows + labels, flat)


class CachedConditioning(nn.Module):
    """Wraps the one shared timestep+class embedder; computes it once per forward.

    diffusers calls ``norm1.emb`` in every block and once more for the final
    layer with the same tensors. The cache is keyed on tensor identity and
    version counter, so a new or modified input always recomputes.
    """

    def __init__(self, emb: nn.Module):
        super().__init__()
        self.inner = emb
        self._t = self._y = self._key = self._out = None

    def forward(self, timestep, class_labels, hidden_dtype=None):
        key = (timestep._version, class_labels._version, hidden_dtype)
        if self._t is timestep and self._y is class_labels and self._key == key:
            return self._out
        out = self.inner(timestep, class_labels, hidden_dtype=hidden_dtype)
        self._t, self._y, self._key, self._out = timestep, class_labels, key, out
        return out

    def clear(self) -> None:
        """Drop the cached tensors (and the autograd graph they hold)."""
        self._t = self._y = self._key = self._out = None

"""Adapted layers: a frozen weight followed by a per-adapter transform of its output.

Every place DiffFit touches computes ``y = gamma * (W x) + b`` with ``W``
frozen (``../shared/DESIGN.md`` section 1). The rows of ``gamma`` and ``b``
of all S slots live in one fp32 bank ``[S, V]`` (slot 0 is the base; each
adapted layer owns fixed columns of it, :mod:`core.adapter.store`), and a
shared :class:`Route` tells the layers, per forward, which rows to use:

- ``Route.slot``: every sample uses one slot (the cheap path: one fused
  ``F.linear`` with that slot's bias when its gamma is 1 and the base is fp32);
- ``Route.slots``: one slot index per sample (mixed-adapter batches): the
  model gathers every layer's rows once per forward (``Route.rows`` [B, V]);
- ``Route.params``: live trainable tensors of a fine-tuning job, so autograd
  reaches them while the bank and the base stay frozen.

The arithmetic of each path belongs to the adapter method
(:mod:`core.adapter.method`, :mod:`core.adapter.difffit`); a layer picks the
path and supplies ``project`` (``W x``), ``project32`` (``W x`` with an fp32
result, for a bf16/fp16 base), ``rows`` and ``channels``.
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
    from core.adapter.store import RowStore


@dataclass
class Route:
    """Which adapter rows the next forward uses. Set by the engine thread only."""

    slot: int | None = 0
    slots: torch.Tensor | None = None  # [B] long, one slot per sample
    unique_slots: tuple[int, ...] = ()
    params: dict[str, torch.Tensor] | None = None  # name -> live tensor (training)
    # Filled by the model at the start of a mixed forward:
    rows: torch.Tensor | None = None  # [B, V] fp32: every layer's bank row per sample
    gamma_on: frozenset[int] = frozenset()  # layers where some sample's slot has a gamma

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
    """One mutable holder shared by reference by every adapted layer of a model.

    ``vectors`` is the model's [S, V] fp32 bank; ``gammas[s]`` the indices of
    the layers whose gamma in slot s is not implicitly 1. Both set by the model.
    """

    current: Route = field(default_factory=Route)
    vectors: torch.Tensor | None = None
    gammas: list[frozenset[int]] = field(default_factory=list)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x W^T`` with an fp32 result: x [..., in] -> [..., out] fp32.

    For a bf16/fp16 base: rounded to bf16 first, ``W x`` would sit on the bf16
    grid and a sub-ulp change (gamma 1.002) would round away the same way for
    every token of a channel, instead of averaging out. CUDA: a half-precision
    matmul that writes fp32 (``out_dtype``); elsewhere the operands are upcast.
    """
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.linear(x, weight)
    if x.is_cuda and x.dtype == weight.dtype:
        try:
            flat = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32)
            return flat.view(*x.shape[:-1], weight.shape[0])
        except (RuntimeError, TypeError):  # no such kernel for this GPU or build
            pass
    return F.linear(x.float(), weight.float())


class _Banked:
    """What both adapted layers share (a mixin): their columns of the model's fp32 bank."""

    holder: RouteHolder
    index: int
    bias_cols: tuple[int, int]
    gamma_cols: tuple[int, int] | None

    @property
    def bias_bank(self) -> torch.Tensor:
        """[S, out] fp32, a view of the bank."""
        a, b = self.bias_cols
        return self.holder.vectors[:, a:b]

    @property
    def gamma_bank(self) -> torch.Tensor | None:
        """[S, out] fp32, a view of the bank; None where no gamma can be placed."""
        if self.gamma_cols is None:
            return None
        a, b = self.gamma_cols
        return self.holder.vectors[:, a:b]

    @property
    def gamma_placeable(self) -> bool:
        return self.gamma_cols is not None

    def gamma_in(self, slot: int) -> bool:
        """Whether the adapter in `slot` has a gamma here (else it is 1)."""
        return self.index in self.holder.gammas[slot]

    def _attach(self, base: nn.Module, name: str, holder: RouteHolder, index: int, cols, method) -> None:
        """Take the frozen weight of `base` and the bank columns (bias_cols, gamma_cols)."""
        self.name, self.holder, self.method, self.index = name, holder, method, index
        self.bias_cols, self.gamma_cols = cols
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.holder.current
        if route.params is not None:
            return self.method.forward_live(self, x, route.params)
        if route.slot is not None:
            return self.method.forward_slot(self, x, route.slot)
        return self.method.forward_mixed(self, x, route)


class AdaptedLinear(_Banked, nn.Module):
    """A frozen ``nn.Linear`` whose bias (and optional gamma) come from the bank.

    Shapes: x [B, ..., in] -> y [B, ..., out] in x's dtype; bias_bank,
    gamma_bank [S, out] fp32 (columns ``bias_cols``/``gamma_cols`` of the bank).
    """

    def __init__(
        self,
        base: nn.Linear,
        name: str,
        holder: RouteHolder,
        index: int,
        bias_cols: tuple[int, int],
        gamma_cols: tuple[int, int] | None,
        method: AdapterMethod,
    ):
        super().__init__()
        self._attach(base, name, holder, index, (bias_cols, gamma_cols), method)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """W x (+ bias, fused): x [B, ..., in] -> [B, ..., out] in x's dtype."""
        return F.linear(x, self.weight, bias)

    def project32(self, x: torch.Tensor) -> torch.Tensor:
        """W x with an fp32 result: x [B, ..., in] -> [B, ..., out] fp32."""
        return linear_fp32(x, self.weight)

    def project_rows(self, x: torch.Tensor, bias_rows: torch.Tensor) -> torch.Tensor:
        """W x + per-sample bias rows, fp32: x [B, ..., in], rows [B, out] -> [B, ..., out].

        As ``F.linear`` does with a bias: the rows are written to the output and
        the matmul adds onto them (beta=1), with no extra pass over y.
        """
        if x.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return self.project32(x).add_(self.rows(bias_rows, x))
        out = self.out_features
        y = self.rows(bias_rows, x).expand(*x.shape[:-1], out).contiguous()
        y.view(-1, out).addmm_(x.reshape(-1, x.shape[-1]), self.weight.t())
        return y

    @staticmethod
    def rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-sample rows [B, out] -> [B, 1, ..., out] matching ``like``'s rank (channels last)."""
        return rows.view(rows.shape[0], *([1] * (like.dim() - 2)), rows.shape[1])

    @staticmethod
    def channels(vector: torch.Tensor) -> torch.Tensor:
        """A per-channel vector [out], broadcastable against the output (channels last)."""
        return vector


class AdaptedConv2d(_Banked, nn.Module):
    """A frozen patch-embedding ``nn.Conv2d`` with a banked bias (no gamma).

    Shapes: x [B, C, H, W] -> y [B, D, H/p, W/p] in x's dtype; bias_bank [S, D] fp32.
    """

    def __init__(
        self,
        base: nn.Conv2d,
        name: str,
        holder: RouteHolder,
        index: int,
        bias_cols: tuple[int, int],
        method: AdapterMethod,
    ):
        super().__init__()
        self._attach(base, name, holder, index, (bias_cols, None), method)
        self.stride, self.padding = base.stride, base.padding

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """W * x (+ bias, fused): x [B, C, H, W] -> [B, D, H/p, W/p] in x's dtype."""
        return F.conv2d(x, self.weight, bias, self.stride, self.padding)

    def project32(self, x: torch.Tensor) -> torch.Tensor:
        """W * x with an fp32 result (upcast operands: the patch conv is small)."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return self.project(x)
        return F.conv2d(x.float(), self.weight.float(), None, self.stride, self.padding)

    def project_rows(self, x: torch.Tensor, bias_rows: torch.Tensor) -> torch.Tensor:
        """W * x + per-sample bias rows [B, D], fp32."""
        return self.project32(x).add_(self.rows(bias_rows, x))

    @staticmethod
    def rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-sample rows [B, D] -> [B, D, 1, 1] (channels first)."""
        return rows[:, :, None, None]

    @staticmethod
    def channels(vector: torch.Tensor) -> torch.Tensor:
        """A per-channel vector [D] -> [D, 1, 1] (channels first)."""
        return vector[:, None, None]


AdaptedLayer = AdaptedLinear | AdaptedConv2d


class ClassTableBank(nn.Module):
    """Replaces diffusers' ``LabelEmbedding``: every slot's class table in one row store.

    Labels are in the adapter's own space: 0..C-1 for classes and C (the
    adapter's ``num_classes``) for its null row; the row read is
    ``offset[slot] + label`` of the fp32 :class:`~core.adapter.store.RowStore`
    (tables are ragged: a slot holds C + 1 rows). Output [B, D] in the base's
    dtype. No label dropout here: trainers drop labels themselves, once per
    sample (diffusers would drop independently in each of its per-block copies).
    """

    name = CLASS_TABLE

    def __init__(self, base_table: torch.Tensor, holder: RouteHolder, store: RowStore):
        super().__init__()
        self.holder = holder
        self.store = store
        self.out_dtype = base_table.dtype
        self.num_classes = [base_table.shape[0] - 1] * len(store.count)  # per slot; the null row index
        store.place(0, base_table.detach().float())

    @property
    def dim(self) -> int:
        return self.store.rows.shape[1]

    def table(self, slot: int) -> torch.Tensor:
        """The class table of `slot`: a view [C + 1, D] fp32."""
        start = self.store.offset[slot]
        return self.store.rows[start : start + self.store.count[slot]]

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        route = self.holder.current
        if route.params is not None:
            return F.embedding(labels, route.params[self.name])
        if route.slot is not None:
            rows = F.embedding(labels + self.store.offset[route.slot], self.store.rows)
        else:
            rows = F.embedding(self.store.offsets_t.index_select(0, route.slots) + labels, self.store.rows)
        return rows.to(self.out_dtype)


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

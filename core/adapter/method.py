"""The seam for adapter methods: what a way of adapting the frozen DiT provides.

One method exists, DiffFit/BitFit (:mod:`core.adapter.difffit`, the output
affine of ``../shared/DESIGN.md`` section 1). A second method (LoRA, say)
implements this class; the model (:class:`core.adapter.model.DiffFitDiT`)
and its adapted layers call it and never spell out a method's arithmetic.
No plugin machinery: a model is built with one method instance.

Adapter tensors are a flat dict ``name -> tensor``; names follow
:mod:`difffit.adapter_format`. The routed forward has one function per
routing path of :class:`core.adapter.layers.Route` (a single slot, mixed
slots, the live tensors of a training run), so each path's arithmetic is
written in exactly one place. An adapted layer calls one of them per forward
and nothing else: they are on the hot path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from difffit.contract import Placement

if TYPE_CHECKING:
    from core.adapter.layers import AdaptedLayer, Route
    from core.adapter.model import DiffFitDiT
    from core.adapter.store import PackedAdapter


class AdapterMethod(ABC):
    """One adapter method: tensors, their initialisation, slots, forward, merge, counts."""

    name: str

    # -- tensors ---------------------------------------------------------------
    @abstractmethod
    def tensor_spec(self, model: DiffFitDiT, placement: Placement, num_classes: int) -> dict[str, tuple]:
        """Name -> shape of every tensor of an adapter for `model` with this placement."""

    @abstractmethod
    def init(
        self,
        model: DiffFitDiT,
        placement: Placement,
        num_classes: int,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Fresh trainable tensors (fp32) of a new adapter, shaped as :meth:`tensor_spec` says."""

    @abstractmethod
    def check(self, model: DiffFitDiT, tensors: dict[str, torch.Tensor]) -> None:
        """Raise ``IncompatibleAdapter`` naming the first tensor that does not fit `model`."""

    @abstractmethod
    def pack(self, model: DiffFitDiT, tensors: dict[str, torch.Tensor]) -> PackedAdapter:
        """Checked adapter tensors laid out for `model`'s bank (host memory, fp32); any thread."""

    @abstractmethod
    def load_slot(
        self, model: DiffFitDiT, slot: int, tensors: dict[str, torch.Tensor] | PackedAdapter
    ) -> None:
        """Copy a checked (or packed) adapter into bank row `slot` and its class rows (no grad)."""

    # -- the routed forward of one adapted layer ---------------------------------
    @abstractmethod
    def forward_slot(self, layer: AdaptedLayer, x: torch.Tensor, slot: int) -> torch.Tensor:
        """Every sample uses bank row `slot`. x [B, ..., in] -> y [B, ..., out]."""

    @abstractmethod
    def forward_mixed(self, layer: AdaptedLayer, x: torch.Tensor, route: Route) -> torch.Tensor:
        """Sample i uses bank row ``route.slots[i]``. x [B, ..., in] -> y [B, ..., out]."""

    @abstractmethod
    def forward_live(
        self, layer: AdaptedLayer, x: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """A training run's live tensors (autograd reaches them). x [B, ..., in] -> y [B, ..., out]."""

    # -- export and counts -------------------------------------------------------
    @abstractmethod
    def merge(self, transformer: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """Fold the adapter into a plain diffusers DiT's weights (in place); return it."""

    @abstractmethod
    def count_params(self, tensors: dict[str, torch.Tensor | tuple]) -> dict[str, int]:
        """Trainable parameters by group plus ``"total"``, from tensors or their shapes."""

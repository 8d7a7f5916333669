"""DiffFitDiT: diffusers' DiT with its per-block copies tied and adapters banked.

Built once per worker around the resident base:

1. the per-block copies of the timestep embedder and class table that
   diffusers' converter made are checked equal and tied to one module
   (DiT-XL/2: 749.8M -> ~675M parameters, one class table per adapter);
2. every biased linear (and the patch-embedding conv) becomes an adapted
   layer with an S-slot bank of bias and, where placeable, gamma rows;
3. the class table becomes an S-slot :class:`ClassTableBank`.

What an adapter is (its tensors, their init, slot loading, the routed
forward) belongs to the model's :class:`core.adapter.method.AdapterMethod`,
DiffFit by default (:mod:`core.adapter.difffit`: ``"<layer>.bias"`` [out],
``"<layer>.gamma"`` [out] where placed, ``"class_table"`` [C + 1, D]).
"""

from __future__ import annotations

import torch
from torch import nn

from core.adapter.difffit import CLASS_TABLE, DIFFFIT
from core.adapter.layers import (
    AdaptedConv2d,
    AdaptedLinear,
    CachedConditioning,
    ClassTableBank,
    Route,
    RouteHolder,
)
from core.adapter.method import AdapterMethod
from core.adapter.placement import SHARED_EMB, gamma_placeable
from difffit.adapter_format import tensor_name
from difffit.contract import Placement

__all__ = ["CLASS_TABLE", "SHARED_EMB", "DiffFitDiT", "count_params", "tie_shared_embeddings"]


def tie_shared_embeddings(transformer: nn.Module, check: bool = True) -> nn.Module:
    """Point every block's ``norm1.emb`` at block 0's; return the shared module.

    Raises ValueError when the copies differ (then they are not copies and
    tying would change the model).
    """
    blocks = transformer.transformer_blocks
    shared = blocks[0].norm1.emb
    if check and not shared.timestep_embedder.linear_1.weight.is_meta:
        ref = shared.state_dict()
        for i, block in enumerate(blocks[1:], start=1):
            for key, value in block.norm1.emb.state_dict().items():
                if not torch.equal(value, ref[key]):
                    raise ValueError(
                        f"transformer_blocks.{i}.norm1.emb.{key} differs from block 0's copy; "
                        "the per-block embedders are not copies and cannot be tied"
                    )
    for block in blocks:
        block.norm1.emb = shared
    return shared


class DiffFitDiT(nn.Module):
    """A frozen DiT serving S adapter slots (slot 0 = the base itself).

    forward: x [B, C, H, W], t [B] long, labels [B] long (adapter label space,
    null = that adapter's num_classes) -> [B, C_out, H, W].
    """

    def __init__(
        self,
        transformer: nn.Module,
        slots: int = 2,
        max_classes: int = 0,
        check_ties: bool = True,
        method: AdapterMethod = DIFFFIT,
    ):
        super().__init__()
        self.method = method
        transformer.requires_grad_(False)
        transformer.eval()
        self.transformer = transformer
        self.slots = slots
        self.holder = RouteHolder()
        shared = tie_shared_embeddings(transformer, check=check_ties)

        # 1. Biased linears (and the patch conv) -> adapted layers with banks.
        self.layers: dict[str, AdaptedLinear | AdaptedConv2d] = {}
        for name, module in list(transformer.named_modules()):
            if isinstance(module, nn.Linear) and module.bias is not None:
                new = AdaptedLinear(module, name, self.holder, slots, gamma_placeable(name), method)
            elif isinstance(module, nn.Conv2d) and module.bias is not None:
                new = AdaptedConv2d(module, name, self.holder, slots, method)
            else:
                continue
            parent, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent), child, new)
            self.layers[name] = new

        # 2. The class table -> a bank of per-slot tables.
        base_table = shared.class_embedder.embedding_table.weight
        self.class_table = ClassTableBank(base_table, self.holder, slots, max_classes + 1)
        shared.class_embedder = self.class_table

        # 3. Compute the shared conditioning once per forward, not once per block.
        self.conditioning = CachedConditioning(shared)
        for block in transformer.transformer_blocks:
            block.norm1.emb = self.conditioning

    # -- shapes ------------------------------------------------------------
    @property
    def config(self):
        return self.transformer.config

    @property
    def num_layers(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def hidden_size(self) -> int:
        return self.class_table.bank.shape[-1]

    @property
    def base_num_classes(self) -> int:
        return self.class_table.num_classes[0]

    def adapter_shapes(self, placement: Placement, num_classes: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor of an adapter with this placement."""
        return self.method.tensor_spec(self, placement, num_classes)

    # -- forward -------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, route: Route) -> torch.Tensor:
        self.holder.current = route
        try:
            return self.transformer(x, timestep=t, class_labels=labels).sample
        finally:
            self.conditioning.clear()
            self.holder.current = Route()

    # -- adapters --------------------------------------------------------------
    def base_adapter(self) -> dict[str, torch.Tensor]:
        """The identity adapter: the base's biases and class table, no gamma."""
        out = {tensor_name(n, "bias"): m.bias_bank[0].clone() for n, m in self.layers.items()}
        out[CLASS_TABLE] = self.class_table.bank[0, : self.base_num_classes + 1].clone()
        return out

    def init_adapter(
        self, placement: Placement, num_classes: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Fresh trainable tensors of a new adapter (see the method's ``init``)."""
        return self.method.init(self, placement, num_classes, generator)

    def check_compatible(self, tensors: dict[str, torch.Tensor]) -> None:
        """Raise IncompatibleAdapter unless every tensor fits a layer of this base."""
        self.method.check(self, tensors)

    def load_slot(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy an adapter's tensors into `slot` (1..S-1). Shapes are checked first."""
        if not 0 < slot < self.slots:
            raise ValueError(f"slot must be in 1..{self.slots - 1}; got {slot}")
        self.method.check(self, tensors)
        self.method.load_slot(self, slot, tensors)

    def num_classes_of(self, slot: int) -> int:
        """Classes of the adapter in `slot`; its null label is this number."""
        return self.class_table.num_classes[slot]


def count_params(tensors: dict[str, torch.Tensor | tuple[int, ...]]) -> dict[str, int]:
    """Trainable-parameter breakdown of a DiffFit adapter: biases, gammas, class table, total."""
    return DIFFFIT.count_params(tensors)

"""DiffFitDiT: diffusers' DiT with its per-block copies tied and adapters banked.

Built once per worker around the resident base:

1. the per-block copies of the timestep embedder and class table that
   diffusers' converter made are checked equal and tied to one module
   (DiT-XL/2: 749.8M -> ~675M parameters, one class table per adapter);
2. every biased linear (and the patch-embedding conv) becomes an adapted
   layer with an S-slot bank of bias and, where placeable, gamma rows;
3. the class table becomes an S-slot :class:`ClassTableBank`.

Adapter tensors are a flat dict: ``"<layer>.bias"`` [out], ``"<layer>.gamma"``
[out] (only where the placement puts one) and ``"class_table"`` [C + 1, D].
"""

from __future__ import annotations

import torch
from torch import nn

from core.adapter.layers import (
    AdaptedConv2d,
    AdaptedLinear,
    CachedConditioning,
    ClassTableBank,
    Route,
    RouteHolder,
)
from core.adapter.placement import gamma_layers, gamma_placeable
from difffit.contract import Placement
from difffit.errors import IncompatibleAdapter

CLASS_TABLE = ClassTableBank.name
SHARED_EMB = "transformer_blocks.0.norm1.emb"


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

    def __init__(self, transformer: nn.Module, slots: int = 2, max_classes: int = 0, check_ties: bool = True):
        super().__init__()
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
                new = AdaptedLinear(module, name, self.holder, slots, gamma=gamma_placeable(name))
            elif isinstance(module, nn.Conv2d) and module.bias is not None:
                new = AdaptedConv2d(module, name, self.holder, slots)
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
        shapes = {f"{n}.bias": (m.bias_bank.shape[1],) for n, m in self.layers.items()}
        for n in gamma_layers(placement, self.num_layers):
            shapes[f"{n}.gamma"] = (self.layers[n].bias_bank.shape[1],)
        shapes[CLASS_TABLE] = (num_classes + 1, self.hidden_size)
        return shapes

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
        out = {f"{n}.bias": m.bias_bank[0].clone() for n, m in self.layers.items()}
        out[CLASS_TABLE] = self.class_table.bank[0, : self.base_num_classes + 1].clone()
        return out

    def init_adapter(
        self, placement: Placement, num_classes: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Fresh trainable tensors: base biases, gamma = 1, a new class table.

        New class rows start at the base's null row plus N(0, 0.02^2) noise
        (DiT's init scale), so an untrained adapter samples like the base's
        unconditional model and the classes can drift apart from there.
        """
        out = {f"{n}.bias": m.bias_bank[0].clone().float() for n, m in self.layers.items()}
        for n in gamma_layers(placement, self.num_layers):
            out[f"{n}.gamma"] = torch.ones_like(out[f"{n}.bias"])
        null = self.class_table.bank[0, self.base_num_classes].float().cpu()
        noise = torch.randn(num_classes, null.shape[0], generator=generator) * 0.02
        table = torch.cat([null + noise, null[None]], dim=0)
        out[CLASS_TABLE] = table.to(out[next(iter(out))].device)
        return out

    def check_compatible(self, tensors: dict[str, torch.Tensor]) -> None:
        """Raise IncompatibleAdapter unless every tensor fits a layer of this base."""
        table = tensors.get(CLASS_TABLE)
        if table is None or table.dim() != 2 or table.shape[1] != self.hidden_size:
            got = None if table is None else tuple(table.shape)
            raise IncompatibleAdapter(
                f"class_table must have shape (num_classes + 1, {self.hidden_size}); got {got}"
            )
        if table.shape[0] > self.class_table.bank.shape[1]:
            raise IncompatibleAdapter(
                f"adapter has {table.shape[0] - 1} classes; this worker allows at most "
                f"{self.class_table.bank.shape[1] - 1} (DIFFFIT_MAX_CLASSES)"
            )
        missing = [f"{n}.bias" for n in self.layers if f"{n}.bias" not in tensors]
        if missing:
            raise IncompatibleAdapter(f"adapter lacks {len(missing)} bias tensors, e.g. {missing[0]}")
        for key, value in tensors.items():
            if key == CLASS_TABLE:
                continue
            layer_name, _, kind = key.rpartition(".")
            layer = self.layers.get(layer_name)
            if layer is None or kind not in ("bias", "gamma"):
                raise IncompatibleAdapter(f"adapter tensor {key!r} matches no layer of the base model")
            if kind == "gamma" and not layer.gamma_placeable:
                raise IncompatibleAdapter(f"gamma is not allowed on {layer_name}")
            if tuple(value.shape) != (layer.bias_bank.shape[1],):
                raise IncompatibleAdapter(
                    f"{key} has shape {tuple(value.shape)}; the base expects ({layer.bias_bank.shape[1]},)"
                )

    @torch.no_grad()
    def load_slot(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy an adapter's vectors into `slot` (1..S-1). Shapes are checked first."""
        if not 0 < slot < self.slots:
            raise ValueError(f"slot must be in 1..{self.slots - 1}; got {slot}")
        self.check_compatible(tensors)
        for name, layer in self.layers.items():
            layer.bias_bank[slot].copy_(tensors[f"{name}.bias"])
            gamma = tensors.get(f"{name}.gamma")
            if layer.gamma_bank is not None:
                if gamma is None:
                    layer.gamma_bank[slot].fill_(1.0)
                else:
                    layer.gamma_bank[slot].copy_(gamma)
            layer.has_gamma[slot] = gamma is not None
        table = tensors[CLASS_TABLE]
        self.class_table.bank[slot].zero_()
        self.class_table.bank[slot, : table.shape[0]].copy_(table)
        self.class_table.num_classes[slot] = table.shape[0] - 1

    def num_classes_of(self, slot: int) -> int:
        """Classes of the adapter in `slot`; its null label is this number."""
        return self.class_table.num_classes[slot]


def count_params(tensors: dict[str, torch.Tensor | tuple[int, ...]]) -> dict[str, int]:
    """Trainable-parameter breakdown of an adapter: biases, gammas, class table, total."""

    def numel(v) -> int:
        if isinstance(v, torch.Tensor):
            return v.numel()
        n = 1
        for d in v:
            n *= d
        return n

    groups = {"biases": 0, "gammas": 0, "class_table": 0}
    for key, value in tensors.items():
        group = "class_table" if key == CLASS_TABLE else ("gammas" if key.endswith(".gamma") else "biases")
        groups[group] += numel(value)
    groups["total"] = sum(groups.values())
    return groups

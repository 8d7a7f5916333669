"""DiffFitDiT: diffusers' DiT with its per-block copies tied and adapters banked.

Built once per worker around the resident base:

1. the per-block copies of the timestep embedder and class table that
   diffusers' converter made are checked equal and tied to one module
   (DiT-XL/2: 749.8M -> ~675M parameters, one class table per adapter);
2. every biased linear (and the patch-embedding conv) becomes an adapted
   layer with an S-slot bank of bias and, where placeable, gamma rows;
3. the class table becomes a :class:`ClassTableBank` over a ragged row store.

The adapters of all S slots sit in fp32 whatever the base's dtype: one [S, V]
bank (each adapted layer owns fixed columns: its bias, and its gamma where a
placement may put one) and one [R, D] class-row store with per-slot offsets
(:mod:`core.adapter.store`). A mixed batch gathers its rows once per forward.
Both are buffers of this module and referenced by the layers: never ``.to()``
the model after wrapping (build it on the device instead).

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
from core.adapter.store import PackedAdapter, RowStore
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
        table_rows: int | None = None,
    ):
        """`slots` bank rows (slot 0 = the base); an adapter has at most `max_classes`
        classes; the row store holds `table_rows` class rows in all (default: the
        base's table plus ``max_classes + 1`` rows per adapter slot)."""
        super().__init__()
        self.method = method
        transformer.requires_grad_(False)
        transformer.eval()
        self.transformer = transformer
        self.slots = slots
        self.max_classes = max_classes
        self.holder = RouteHolder()
        shared = tie_shared_embeddings(transformer, check=check_ties)
        device = next(transformer.parameters()).device

        # 1. Biased linears (and the patch conv) -> adapted layers owning bank columns.
        self.layers: dict[str, AdaptedLinear | AdaptedConv2d] = {}
        base_row: list[torch.Tensor] = []  # the base's bank row, in column order
        width = 0
        for name, module in list(transformer.named_modules()):
            if isinstance(module, nn.Linear) and module.bias is not None:
                out = module.out_features
                gamma = (width + out, width + 2 * out) if gamma_placeable(name) else None
                new = AdaptedLinear(
                    module, name, self.holder, len(self.layers), (width, width + out), gamma, method
                )
            elif isinstance(module, nn.Conv2d) and module.bias is not None:
                out, gamma = module.out_channels, None
                new = AdaptedConv2d(module, name, self.holder, len(self.layers), (width, width + out), method)
            else:
                continue
            base_row.append(module.bias.detach().float())
            if gamma is not None:
                base_row.append(torch.ones(out, device=device))
            width += 2 * out if gamma else out
            parent, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent), child, new)
            self.layers[name] = new
        self.width = width
        # zeros, not empty: rows of free slots are gathered (never used) and compared in tests.
        self.register_buffer("vectors", torch.zeros(slots, width, device=device), persistent=False)
        self.vectors[0] = torch.cat(base_row)
        self.holder.vectors = self.vectors
        self.holder.gammas = [frozenset()] * slots

        # 2. The class table -> one ragged row store for every slot's table.
        base_table = shared.class_embedder.embedding_table.weight
        if table_rows is None:
            table_rows = base_table.shape[0] + (slots - 1) * (max_classes + 1)
        self.row_store = RowStore(max(table_rows, base_table.shape[0]), base_table.shape[1], slots, device)
        self.register_buffer("class_rows", self.row_store.rows, persistent=False)
        self.class_table = ClassTableBank(base_table, self.holder, self.row_store)
        shared.class_embedder = self.class_table

        # 3. Compute the shared conditioning once per forward, not once per block.
        self.conditioning = CachedConditioning(shared)
        for block in transformer.transformer_blocks:
            block.norm1.emb = self.conditioning

    def materialize_banks(self, device: torch.device | str = "cpu") -> None:
        """Real bank tensors for a base built on the meta device.

        Memory and copy-time work at DiT-XL/2 size without its weights: only the
        adapter tiers exist (zeros), the frozen weights stay meta (no forward).
        """
        self.vectors = torch.zeros(self.slots, self.width, device=device)
        self.holder.vectors = self.vectors
        old = self.row_store
        self.row_store = RowStore(old.capacity, old.rows.shape[1], self.slots, device)
        self.row_store.place(0, torch.zeros(old.count[0], old.rows.shape[1]))
        self.class_rows = self.row_store.rows
        self.class_table.store = self.row_store

    @property
    def slot_vector_bytes(self) -> int:
        """Bytes of one slot's fp32 bank row (biases and placeable gammas)."""
        return self.width * 4

    @property
    def most_classes(self) -> int:
        """Most classes an adapter may have here: DIFFFIT_MAX_CLASSES and the row store."""
        return min(self.max_classes, self.row_store.capacity - self.row_store.count[0] - 1)

    # -- shapes ------------------------------------------------------------
    @property
    def config(self):
        return self.transformer.config

    @property
    def num_layers(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def hidden_size(self) -> int:
        return self.class_table.dim

    @property
    def base_num_classes(self) -> int:
        return self.class_table.num_classes[0]

    def adapter_shapes(self, placement: Placement, num_classes: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor of an adapter with this placement."""
        return self.method.tensor_spec(self, placement, num_classes)

    # -- forward -------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, route: Route) -> torch.Tensor:
        if route.slots is not None and route.params is None:
            # Mixed batch: every layer's rows, gathered once for the whole forward (again for
            # every forward: a route reused after a slot was reloaded must not serve old rows).
            route.rows = self.vectors.index_select(0, route.slots)
            route.gamma_on = frozenset().union(*(self.holder.gammas[s] for s in route.unique_slots))
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
        out[CLASS_TABLE] = self.class_table.table(0).clone()
        return out

    def init_adapter(
        self, placement: Placement, num_classes: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Fresh trainable tensors of a new adapter (see the method's ``init``)."""
        return self.method.init(self, placement, num_classes, generator)

    def check_compatible(self, tensors: dict[str, torch.Tensor]) -> None:
        """Raise IncompatibleAdapter unless every tensor fits a layer of this base."""
        self.method.check(self, tensors)

    def pack(self, tensors: dict[str, torch.Tensor]) -> PackedAdapter:
        """Check an adapter and lay it out for the bank (host, fp32); any thread."""
        self.method.check(self, tensors)
        return self.method.pack(self, tensors)

    def load_slot(self, slot: int, adapter: dict[str, torch.Tensor] | PackedAdapter) -> None:
        """Copy an adapter into `slot` (1..S-1); a dict is checked and packed first.

        Raises IncompatibleAdapter when its class rows do not fit the free rows
        (the bank evicts before it calls this).
        """
        if not 0 < slot < self.slots:
            raise ValueError(f"slot must be in 1..{self.slots - 1}; got {slot}")
        packed = adapter if isinstance(adapter, PackedAdapter) else self.pack(adapter)
        self.method.load_slot(self, slot, packed)

    def unload_slot(self, slot: int) -> None:
        """Free `slot`'s class rows; its bank row is overwritten by the next load."""
        if slot:
            self.row_store.release(slot)
            self.holder.gammas[slot] = frozenset()

    def num_classes_of(self, slot: int) -> int:
        """Classes of the adapter in `slot`; its null label is this number."""
        return self.class_table.num_classes[slot]


def count_params(tensors: dict[str, torch.Tensor | tuple[int, ...]]) -> dict[str, int]:
    """Trainable-parameter breakdown of a DiffFit adapter: biases, gammas, class table, total."""
    return DIFFFIT.count_params(tensors)

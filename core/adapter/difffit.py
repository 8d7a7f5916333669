"""DiffFit and BitFit: the output affine ``y = gamma * (W x) + b`` on frozen layers.

``../shared/DESIGN.md`` section 1. Every adapted layer (each biased linear
and the patch-embedding conv) trains its bias ``b``; a gamma scales the
outputs of the layers the placement selects (:mod:`core.adapter.placement`);
BitFit is the placement with no gamma. The class table is replaced whole.

Tensors (named and checked by :mod:`difffit.adapter_format`): ``"<layer>.bias"``
[out], ``"<layer>.gamma"`` [out] where placed and ``"class_table"`` [C + 1, D]
(row C is the null class for guidance).

The affine is written once per routing path, in :meth:`DiffFit.forward_slot`,
:meth:`DiffFit.forward_mixed` and :meth:`DiffFit.forward_live`; the adapted
layers supply only ``project`` (``W x``, optionally with a fused bias),
``project32`` / ``project_rows`` (fp32 results) and the broadcasting of
per-channel vectors (``rows``, ``channels``).

Serving precision: the bank and class rows are fp32 whatever the base's dtype;
with a bf16/fp16 base the affine runs in fp32 on an fp32 ``W x`` and the result
is cast once to the activation dtype, so gammas like 1.002 keep their effect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from core.adapter.method import AdapterMethod
from core.adapter.placement import diffusers_paths, gamma_layers
from core.adapter.store import PackedAdapter, copy_into
from difffit.adapter_format import CLASS_TABLE, check_shapes, tensor_name
from difffit.contract import Placement
from difffit.errors import IncompatibleAdapter

if TYPE_CHECKING:
    from core.adapter.layers import AdaptedLayer, Route
    from core.adapter.model import DiffFitDiT


class DiffFit(AdapterMethod):
    """The affine method; BitFit is DiffFit under ``Placement.bitfit()`` (gamma nowhere)."""

    name = "difffit"

    # -- tensors ---------------------------------------------------------------
    def tensor_spec(self, model: DiffFitDiT, placement: Placement, num_classes: int) -> dict[str, tuple]:
        shapes = {tensor_name(n, "bias"): (m.bias_bank.shape[1],) for n, m in model.layers.items()}
        for n in gamma_layers(placement, model.num_layers):
            shapes[tensor_name(n, "gamma")] = (model.layers[n].bias_bank.shape[1],)
        shapes[CLASS_TABLE] = (num_classes + 1, model.hidden_size)
        return shapes

    def init(
        self,
        model: DiffFitDiT,
        placement: Placement,
        num_classes: int,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Base biases, gamma = 1, a new class table.

        New class rows start at the base's null row plus N(0, 0.02^2) noise
        (DiT's init scale), so an untrained adapter samples like the base's
        unconditional model and the classes can drift apart from there.
        """
        out = {tensor_name(n, "bias"): m.bias_bank[0].clone().float() for n, m in model.layers.items()}
        for n in gamma_layers(placement, model.num_layers):
            out[tensor_name(n, "gamma")] = torch.ones_like(out[tensor_name(n, "bias")])
        null = model.class_table.table(0)[model.base_num_classes].float().cpu()
        noise = torch.randn(num_classes, null.shape[0], generator=generator) * 0.02
        table = torch.cat([null + noise, null[None]], dim=0)
        out[CLASS_TABLE] = table.to(out[next(iter(out))].device)
        return out

    def check(self, model: DiffFitDiT, tensors: dict[str, torch.Tensor]) -> None:
        spec, required = self._spec(model)
        check_shapes({k: tuple(v.shape) for k, v in tensors.items()}, spec, required)
        rows = tensors[CLASS_TABLE].shape[0]
        if rows - 1 > model.most_classes:
            raise IncompatibleAdapter(
                f"adapter has {rows - 1} classes; this worker allows at most "
                f"{model.most_classes} (DIFFFIT_MAX_CLASSES and the class-row store)"
            )

    @staticmethod
    def _spec(model: DiffFitDiT) -> tuple[dict[str, tuple], frozenset[str]]:
        # Every name the base allows (bias on each layer, gamma where placeable, a class
        # table of any row count); the biases and the table are required. Fixed per
        # model, so built once: cold loads check every adapter against it.
        cached = getattr(model, "_difffit_spec", None)
        if cached is None:
            spec: dict[str, tuple] = {CLASS_TABLE: (None, model.hidden_size)}
            for n, layer in model.layers.items():
                out = (layer.bias_bank.shape[1],)
                spec[tensor_name(n, "bias")] = out
                if layer.gamma_placeable:
                    spec[tensor_name(n, "gamma")] = out
            required = frozenset({tensor_name(n, "bias") for n in model.layers} | {CLASS_TABLE})
            cached = model._difffit_spec = (spec, required)
        return cached

    @staticmethod
    def _layout(model: DiffFitDiT) -> list[tuple[str, str | None, torch.Tensor | None, int]]:
        # The bank row's order: (bias name, gamma name or None, gamma's ones, layer index) per layer.
        cached = getattr(model, "_difffit_layout", None)
        if cached is None:
            cached = []
            for layer in model.layers.values():
                gamma_name, ones = None, None
                if layer.gamma_cols is not None:
                    gamma_name = tensor_name(layer.name, "gamma")
                    ones = torch.ones(layer.gamma_cols[1] - layer.gamma_cols[0])
                cached.append((tensor_name(layer.name, "bias"), gamma_name, ones, layer.index))
            model._difffit_layout = cached
        return cached

    def pack(self, model: DiffFitDiT, tensors: dict[str, torch.Tensor]) -> PackedAdapter:
        """Checked tensors laid out as one bank row (fp32, host) plus the class table.

        Reads only the model's fixed layout, so task threads pack while the
        engine thread serves; loading a packed adapter is then two copies.
        """
        pieces, gammas = [], set()
        for bias_name, gamma_name, ones, index in self._layout(model):
            pieces.append(_flat32(tensors[bias_name]))
            if gamma_name is not None:
                gamma = tensors.get(gamma_name)
                if gamma is None:
                    pieces.append(ones)  # torch.cat copies it: one shared tensor is enough
                else:
                    pieces.append(_flat32(gamma))
                    gammas.add(index)
        table = tensors[CLASS_TABLE]
        table = _flat32(table).view(table.shape)
        return PackedAdapter(torch.cat(pieces), table, frozenset(gammas))

    @torch.no_grad()
    def load_slot(
        self, model: DiffFitDiT, slot: int, tensors: dict[str, torch.Tensor] | PackedAdapter
    ) -> None:
        packed = tensors if isinstance(tensors, PackedAdapter) else self.pack(model, tensors)
        model.row_store.place(slot, packed.table)  # raises when the rows do not fit
        copy_into(model.vectors[slot], packed.vector)
        model.holder.gammas[slot] = packed.gammas
        model.class_table.num_classes[slot] = packed.num_classes

    # -- the affine, once per routing path ------------------------------------------
    def forward_slot(self, layer: AdaptedLayer, x: torch.Tensor, slot: int) -> torch.Tensor:
        # fp32 base, gamma 1: the bias fuses into the matmul. Otherwise one addcmul in fp32.
        row = layer.holder.vectors[slot]
        bias = row[layer.bias_cols[0] : layer.bias_cols[1]]
        gamma = layer.gamma_in(slot)
        exact = x.dtype == torch.float32
        if exact and not gamma:
            return layer.project(x, bias)
        y = layer.project32(x)
        if gamma:
            g = row[layer.gamma_cols[0] : layer.gamma_cols[1]]
            y = torch.addcmul(layer.channels(bias), y, layer.channels(g))
        else:
            y = y.add_(layer.channels(bias))
        return y if exact else y.to(x.dtype)

    def forward_mixed(self, layer: AdaptedLayer, x: torch.Tensor, route: Route) -> torch.Tensor:
        # Each sample's rows were gathered once for all layers (route.rows [B, V], fp32):
        # one addcmul where some sample has a gamma here, else the rows ride the matmul.
        rows = route.rows
        bias = rows[:, layer.bias_cols[0] : layer.bias_cols[1]]
        if layer.index in route.gamma_on:
            y = layer.project32(x)
            g = rows[:, layer.gamma_cols[0] : layer.gamma_cols[1]]
            y = torch.addcmul(layer.rows(bias, y), y, layer.rows(g, y))
        else:
            y = layer.project_rows(x, bias)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def forward_live(
        self, layer: AdaptedLayer, x: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Training: fp32 master tensors, the affine in fp32, cast once to the base's dtype.

        Unfused on purpose: autograd reaches gamma and b, the bank and W stay frozen.
        On a bf16 base a gamma of 1.002 would round to exactly 1.0 (spacing 2^-7 near
        1); applied in fp32 to ``W x`` and rounded once, its effect reaches the
        activations. The input is cast to W's dtype: the fp32 class table makes the
        conditioning fp32.
        """
        y = layer.project(x.to(layer.weight.dtype))
        gamma = params.get(tensor_name(layer.name, "gamma"))
        bias = layer.channels(params[tensor_name(layer.name, "bias")])
        if y.dtype == bias.dtype:
            return y + bias if gamma is None else torch.addcmul(bias, y, layer.channels(gamma))
        yf = y.float()
        out = yf + bias if gamma is None else torch.addcmul(bias, yf, layer.channels(gamma))
        return out.to(y.dtype)

    # -- export and counts ---------------------------------------------------------
    @torch.no_grad()
    def merge(self, transformer: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """``gamma * (W x) + b`` is the layer with weight ``gamma[:, None] * W`` and bias ``b``.

        Exact up to float rounding. Needs a transformer whose class count matches the adapter's.
        """
        num_layers = len(transformer.transformer_blocks)
        layers = {k.rpartition(".")[0] for k in tensors if k != CLASS_TABLE}
        for layer in sorted(layers):
            bias, gamma = tensors[tensor_name(layer, "bias")], tensors.get(tensor_name(layer, "gamma"))
            for path in diffusers_paths(layer, num_layers):
                module = transformer.get_submodule(path)
                if gamma is not None:
                    module.weight.mul_(gamma.to(module.weight).view(-1, *([1] * (module.weight.dim() - 1))))
                module.bias.copy_(bias)
        table = tensors[CLASS_TABLE]
        for block in transformer.transformer_blocks:
            block.norm1.emb.class_embedder.embedding_table.weight.copy_(table)
        return transformer

    def count_params(self, tensors: dict[str, torch.Tensor | tuple]) -> dict[str, int]:
        """Biases, gammas, class table and total."""

        def numel(v) -> int:
            if isinstance(v, torch.Tensor):
                return v.numel()
            n = 1
            for d in v:
                n *= d
            return n

        groups = {"biases": 0, "gammas": 0, "class_table": 0}
        for key, value in tensors.items():
            kind = "gammas" if key.endswith(".gamma") else "biases"
            groups["class_table" if key == CLASS_TABLE else kind] += numel(value)
        groups["total"] = sum(groups.values())
        return groups


DIFFFIT = DiffFit()


def _flat32(t: torch.Tensor) -> torch.Tensor:
    """`t` as a flat fp32 host tensor; no conversion calls when it is one already (a parsed file)."""
    if t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad:
        return t if t.dim() == 1 else t.reshape(-1)
    return t.detach().float().cpu().reshape(-1)

"""Extract an adapter from a fine-tuned plain diffusers DiT (the inverse of the merge).

A model fine-tuned with DiffFit or BitFit outside this service (or a merged
export) differs from the base only in biases, row scales of some weights
and the class table. Extraction reads the biases and table directly and
recovers each gamma as the least-squares row scale of ``W'`` against ``W``:
``gamma_i = <W'_i, W_i> / <W_i, W_i>``. Any other change to a weight cannot be
expressed as an adapter and is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from core.adapter.model import CLASS_TABLE, SHARED_EMB, DiffFitDiT
from core.adapter.placement import gamma_layers
from difffit.adapter_format import tensor_name
from difffit.contract import Placement
from difffit.errors import IncompatibleAdapter


@torch.no_grad()
def extract_adapter(
    model: DiffFitDiT, tuned: nn.Module, placement: Placement, atol: float = 1e-5
) -> dict[str, torch.Tensor]:
    """Adapter tensors that turn `model`'s base into `tuned` (a plain diffusers DiT)."""
    gammas = set(gamma_layers(placement, model.num_layers))
    out: dict[str, torch.Tensor] = {}
    for name, layer in model.layers.items():
        source = name.replace(SHARED_EMB, "transformer_blocks.0.norm1.emb", 1)
        module = tuned.get_submodule(source)
        base_w, tuned_w = layer.weight.float(), module.weight.float()
        rows = base_w.reshape(base_w.shape[0], -1)
        tuned_rows = tuned_w.reshape(tuned_w.shape[0], -1)
        if name in gammas:
            gamma = (tuned_rows * rows).sum(1) / (rows * rows).sum(1).clamp_min(1e-30)
            out[tensor_name(name, "gamma")] = gamma
            rows = rows * gamma[:, None]
        if not torch.allclose(rows, tuned_rows, atol=atol, rtol=1e-4):
            diff = (rows - tuned_rows).abs().max().item()
            raise IncompatibleAdapter(
                f"{source}.weight differs from the base by more than a row scale allowed by the "
                f"placement (max abs diff {diff:.3g}); this model is not an adapter of the base"
            )
        out[tensor_name(name, "bias")] = module.bias.detach().float().clone()
    table = tuned.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    out[CLASS_TABLE] = table.detach().float().clone()
    return out

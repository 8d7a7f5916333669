"""Parameter counts of DiffFit/BitFit on a DiT built on the meta device (no weights)."""

from __future__ import annotations

import torch

from core.adapter.model import DiffFitDiT, count_params
from core.shapes import SHAPES
from difffit.contract import Placement


def dit_config(shape: str, num_classes: int = 1000, sample_size: int = 32) -> dict:
    """A diffusers DiT config for a named shape; ValueError lists the allowed names."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}; got {shape!r}")
    return dict(
        in_channels=4,
        out_channels=8,
        sample_size=sample_size,
        num_embeds_ada_norm=num_classes,
        **SHAPES[shape],
    )


def count_for_shape(
    shape: str, num_classes: int, method: str = "difffit", placement: Placement | None = None
) -> dict:
    """Total and trainable parameters of `method` on `shape` with `num_classes` classes.

    Returns a dict with: diffusers_params (the model as diffusers stores it,
    per-block embedder copies included), base_params (tied), trainable
    breakdown (biases, gammas, class_table, total), model_params (base with
    the new class table and gammas), and trainable_percent.
    """
    from diffusers import DiTTransformer2DModel

    if method not in ("difffit", "bitfit"):
        raise ValueError(f"method must be 'difffit' or 'bitfit'; got {method!r}")
    placement = Placement.bitfit() if method == "bitfit" else (placement or Placement())
    with torch.device("meta"):
        transformer = DiTTransformer2DModel(**dit_config(shape))
        diffusers_params = sum(p.numel() for p in transformer.parameters())
        model = DiffFitDiT(transformer, slots=1, max_classes=0, check_ties=False)
    base_params = sum(p.numel() for p in model.parameters())  # frozen weights
    base_params += sum(m.bias_bank.shape[1] for m in model.layers.values())
    base_table = (model.base_num_classes + 1) * model.hidden_size
    base_params += base_table
    shapes = model.adapter_shapes(placement, num_classes)
    trainable = count_params(shapes)
    # The reference code (thuml/Diffusion-Tuning) keeps a gamma on the attention output
    # projection AND one on the attention residual branch; both scale the same output,
    # so here they are one vector on attn1.to_out.0. Counted its way, each adds H.
    doubled = sum(shapes[k][0] for k in shapes if k.endswith("attn1.to_out.0.gamma"))
    reference = {**trainable, "gammas": trainable["gammas"] + doubled, "total": trainable["total"] + doubled}
    model_params = base_params - base_table + trainable["class_table"] + trainable["gammas"]
    return {
        "shape": shape,
        "num_classes": num_classes,
        "method": method,
        "placement": placement.model_dump(),
        "diffusers_params": diffusers_params,
        "base_params": base_params,
        "model_params": model_params,
        "trainable": trainable,
        "trainable_reference_count": reference,
        "trainable_percent": 100.0 * trainable["total"] / model_params,
    }


def format_counts(c: dict) -> str:
    """Human-readable table of :func:`count_for_shape`'s result."""
    t, r = c["trainable"], c["trainable_reference_count"]
    lines = [
        f"{c['shape']}, {c['num_classes']} classes, method {c['method']} (placement {c['placement']})",
        f"  diffusers checkpoint params : {c['diffusers_params']:>13,}  (per-block embedder copies)",
        f"  base params (tied)         : {c['base_params']:>13,}",
        f"  fine-tuned model params    : {c['model_params']:>13,}",
        f"  trainable, paper's count   : {r['total']:>13,}"
        f"  ({r['total'] / 1e6:.3f}M, {100.0 * r['total'] / c['model_params']:.3f}%)",
        f"    biases                   : {r['biases']:>13,}",
        f"    gammas                   : {r['gammas']:>13,}  (each gamma its own vector)",
        f"    class table              : {r['class_table']:>13,}",
        f"  stored in the adapter file : {t['total']:>13,}"
        f"  ({t['total'] / 1e6:.3f}M, {t['gammas']:,} gammas:",
        "    the attention output's gamma and its branch's gamma scale the same output, so one vector)",
    ]
    return "\n".join(lines)

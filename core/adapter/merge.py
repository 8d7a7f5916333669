"""Merged export: an adapter folded into a plain diffusers DiT folder.

``y = gamma * (W x) + b`` is the linear layer with weight ``gamma[:, None] * W``
and bias ``b``, so the export is exact up to float rounding. The shared
embedder's adapted tensors are written into every block's copy, because
plain diffusers keeps one copy per block.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from core.adapter.difffit import CLASS_TABLE, DIFFFIT
from core.adapter.method import AdapterMethod


def merge_into(
    transformer: torch.nn.Module, tensors: dict[str, torch.Tensor], method: AdapterMethod = DIFFFIT
) -> torch.nn.Module:
    """Fold adapter tensors into a plain diffusers DiT with a matching class count (in place)."""
    return method.merge(transformer, tensors)


def export_merged(
    base_source: str, tensors: dict[str, torch.Tensor], metadata: dict, out_dir: str | Path
) -> Path:
    """Write a diffusers model folder = base + adapter, loadable with plain diffusers.

    The class table is replaced, so ``num_embeds_ada_norm`` becomes the
    adapter's class count and ``model_index.json`` gets its class names as
    ``id2label`` (as DiTPipeline expects).
    """
    from diffusers import DiTTransformer2DModel

    out = Path(out_dir)
    base = DiTTransformer2DModel.from_pretrained(base_source, subfolder="transformer")
    num_classes = tensors[CLASS_TABLE].shape[0] - 1
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    config["num_embeds_ada_norm"] = num_classes
    merged = DiTTransformer2DModel.from_config(config)
    state = {k: v for k, v in base.state_dict().items() if "class_embedder" not in k}
    missing, unexpected = merged.load_state_dict(state, strict=False)
    assert not unexpected and all("class_embedder" in k for k in missing), (missing, unexpected)
    merge_into(merged, tensors)
    merged.save_pretrained(out / "transformer")

    src = Path(base_source)
    for sub in ("scheduler", "vae"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, out / sub, dirs_exist_ok=True)
    index = {}
    if (src / "model_index.json").is_file():
        index = json.loads((src / "model_index.json").read_text())
    index["id2label"] = {str(i): n for i, n in enumerate(metadata["class_names"])}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / "labels.json").write_text(json.dumps(metadata["class_names"]))
    (out / "difffit_adapter.json").write_text(json.dumps(metadata, indent=2))
    return out

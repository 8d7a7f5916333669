"""The five fine-tuning methods of the study, with identical data, steps, batch and seed.

- ``bitfit``, ``difffit``, ``diff_tuning`` run the project's own trainer
  (``core.engine.training.TrainingRun``) on a shared ``DiffFitDiT``; the
  trained adapter goes into slot 1 for sampling.
- ``full`` and ``lora`` are written here against a plain diffusers DiT (as
  ``bench/bench_training.py``'s full variant is), with the tied embedders and
  the same recipe as ``TrainingRun``: hybrid loss (``GaussianDiffusion``,
  vb weight 1.0 = lambda 0.001), 10% label dropout to the null row, random
  horizontal flips, AdamW with weight decay 0. They even draw their random
  numbers in TrainingRun's order from the same seed, so every method sees the
  same batches, timesteps, flips and noise, and starts from the same new class
  table (``DiffFitDiT.init_adapter``'s: the base's null row plus N(0, 0.02^2)).

Learning rates follow the paper: 1e-4 for full fine-tuning, 10x (1e-3) for the
parameter-efficient methods, LoRA included (Sec. 4.1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from core.adapter.model import CLASS_TABLE, DiffFitDiT, tie_shared_embeddings
from core.base_model import load_base
from core.diffusion import GaussianDiffusion
from core.engine.training import VLB_WEIGHT, TrainingData, TrainingRun, draw_batch
from difffit.contract import FinetuneRequest, Placement

from .sampling import PlainDiT

METHODS = ("full", "bitfit", "difffit", "lora", "diff_tuning")
LEARNING_RATES = {"full": 1e-4, "bitfit": 1e-3, "difffit": 1e-3, "lora": 1e-3, "diff_tuning": 1e-3}
LORA_RANK = 8
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
ADAPTER_SLOT = 1


@dataclass
class Finetuned:
    """A trained model ready to sample, and what its training cost."""

    method: str
    sampler: nn.Module  # called as (x, t, labels, route)
    slot: int  # the DiffFitDiT slot holding the adapter (0 for plain models)
    null_label: int
    trainable_params: int
    adapter_bytes: int  # safetensors size of the trainable tensors (fp32)
    train_seconds: float  # wall time of the optimizer-step loop only
    final_loss: float


class StudyBase:
    """The base model loaded once: a DiffFitDiT for adapters, plain copies on demand."""

    def __init__(self, source: str):
        self.source = source
        base = load_base(source)
        self.content_hash = base.content_hash  # the base is retrained now and then: record which
        self.scheduler_config = base.scheduler_config
        self.diffusion = GaussianDiffusion.from_scheduler_config(base.scheduler_config)
        self.model = DiffFitDiT(
            base.transformer, slots=2, max_classes=base.transformer.config.num_embeds_ada_norm
        )
        self.base_num_classes = self.model.base_num_classes
        # Parameters of the model being fine-tuned, counting the tied embedders once
        # (the denominator of "trainable %").
        self.total_params = sum(p.numel() for p in self.plain_transformer().parameters())

    def plain_transformer(self) -> nn.Module:
        """A fresh diffusers DiT from disk, embedders tied, eval mode (no built-in label dropout)."""
        from diffusers import DiTTransformer2DModel

        transformer = DiTTransformer2DModel.from_pretrained(self.source, subfolder="transformer")
        tie_shared_embeddings(transformer)
        return transformer.eval()


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return len(safetensors_bytes({k: v.detach().float().contiguous() for k, v in tensors.items()}))


def _loop(step, steps: int) -> tuple[float, float]:
    """Run `step` (returns the loss) `steps` times; wall seconds and the mean loss of the last 10%."""
    losses = []
    t0 = time.perf_counter()
    with torch.enable_grad():
        for _ in range(steps):
            losses.append(step())
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, steps // 10) :]
    return seconds, sum(tail) / len(tail)


def finetune_adapter(
    base: StudyBase,
    data: TrainingData,
    method: str,
    steps: int,
    batch_size: int,
    seed: int,
    placement: Placement | None = None,
) -> Finetuned:
    """BitFit, DiffFit or DiffFit + Diff-Tuning through TrainingRun; loads slot 1."""
    request = FinetuneRequest(
        dataset_url="bench:paper", adapter="paper", steps=steps, batch_size=batch_size, seed=seed,
        method="bitfit" if method == "bitfit" else "difffit",
        objective="diff_tuning" if method == "diff_tuning" else "standard",
        placement=placement, learning_rate=LEARNING_RATES[method],
    )  # fmt: skip
    if method == "diff_tuning" and data.retention is None:
        raise ValueError("diff_tuning needs data.retention (samples of the base)")
    run = TrainingRun(base.model, base.diffusion, data, request)

    def step() -> float:
        run.step()
        return run.progress.loss

    seconds, loss = _loop(step, steps)
    tensors = run.result()
    base.model.load_slot(ADAPTER_SLOT, tensors)
    params = sum(v.numel() for v in tensors.values())
    return Finetuned(
        method, base.model, ADAPTER_SLOT, data.num_classes, params, _bytes(tensors), seconds, loss
    )


def _new_class_table(base: StudyBase, num_classes: int, generator: torch.Generator) -> nn.Embedding:
    """The same fresh table (and generator draws) TrainingRun starts from."""
    table = base.model.init_adapter(Placement.bitfit(), num_classes, generator=generator)[CLASS_TABLE]
    return nn.Embedding.from_pretrained(table.clone(), freeze=False)


def _attach_lora(transformer: nn.Module, seed: int) -> None:
    """peft LoRA (rank 8, alpha 8, no dropout, biases frozen) on LORA_TARGETS, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)  # LoRA A is initialised from the global RNG
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, bias="none",
                        target_modules=LORA_TARGETS)  # fmt: skip
    inject_adapter_in_model(config, transformer)


def finetune_plain(
    base: StudyBase, data: TrainingData, method: str, steps: int, batch_size: int, seed: int
) -> Finetuned:
    """Full fine-tuning or LoRA on a plain diffusers DiT, TrainingRun's recipe step for step."""
    if method not in ("full", "lora"):
        raise ValueError(f"finetune_plain runs 'full' or 'lora', not {method!r}")
    transformer = base.plain_transformer()
    g = torch.Generator("cpu").manual_seed(seed)
    emb = transformer.transformer_blocks[0].norm1.emb  # shared by every block after tying
    emb.class_embedder.embedding_table = _new_class_table(base, data.num_classes, g)
    if method == "lora":
        _attach_lora(transformer, seed)
        for name, p in transformer.named_parameters():
            p.requires_grad_("lora_" in name or "class_embedder" in name)
    else:
        transformer.requires_grad_(True)
    trainable = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(trainable.values(), lr=LEARNING_RATES[method], weight_decay=0.0)
    diffusion, c = base.diffusion, data.num_classes

    def step() -> float:
        # The recipe's own batch drawing: same batches as TrainingRun for every method.
        x0, y, t, noise, x_t, _ = draw_batch(data, diffusion, batch_size, g)
        out = transformer(x_t, timestep=t, class_labels=y).sample
        loss = diffusion.training_losses(out, x0, x_t, t, noise, VLB_WEIGHT)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    seconds, loss = _loop(step, steps)
    transformer.requires_grad_(False)
    params = sum(p.numel() for p in trainable.values())
    return Finetuned(method, PlainDiT(transformer), 0, c, params, _bytes(trainable), seconds, loss)


def finetune(
    base: StudyBase, data: TrainingData, method: str, steps: int, batch_size: int, seed: int
) -> Finetuned:
    """Dispatch one of METHODS (DiffFit with the paper's default placement)."""
    if method in ("full", "lora"):
        return finetune_plain(base, data, method, steps, batch_size, seed)
    return finetune_adapter(base, data, method, steps, batch_size, seed)

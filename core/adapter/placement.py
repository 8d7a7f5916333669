"""Where gamma goes: placement rules on diffusers' DiT parameter names.

Biases are adapted everywhere (BitFit's rule); gamma only on the layers a
:class:`difffit.contract.Placement` selects. Names are diffusers' own, e.g.
``transformer_blocks.3.attn1.to_q``, so they map one to one onto a plain
diffusers checkpoint for the merged export.
"""

from __future__ import annotations

from difffit.contract import BlockSpan, Placement

QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
# gamma on a residual branch (x + gate * gamma * f(x)) equals gamma on the
# branch's last linear, because the adaLN gate is per channel and the bias
# is trained too (../shared/DESIGN.md section 1).
BRANCH_OUTPUTS = ("attn1.to_out.0", "ff.net.2")
FINAL = "proj_out_2"
# The one shared timestep+class embedder after tying (core.adapter.model); plain
# diffusers keeps a copy of it in every block.
SHARED_EMB = "transformer_blocks.0.norm1.emb"


def blocks_in(span: BlockSpan, num_layers: int) -> range:
    """Block indices a span covers: 'first_half' is blocks 0..L/2-1 (paper: 1..14 of 28)."""
    if span == "all":
        return range(num_layers)
    if span == "first_half":
        return range(num_layers // 2)
    if span == "none":
        return range(0)
    raise ValueError(f"span must be one of 'none', 'first_half', 'all'; got {span!r}")


def gamma_placeable(name: str) -> bool:
    """Whether some placement may put a gamma on the layer `name`."""
    return name == FINAL or name.endswith(QKV) or name.endswith(BRANCH_OUTPUTS)


def gamma_layers(placement: Placement, num_layers: int) -> list[str]:
    """Names of the linear layers that carry a gamma under `placement`."""
    names = [f"transformer_blocks.{i}.{s}" for i in blocks_in(placement.qkv, num_layers) for s in QKV]
    names += [
        f"transformer_blocks.{i}.{s}"
        for i in blocks_in(placement.branches, num_layers)
        for s in BRANCH_OUTPUTS
    ]
    if placement.final_layer:
        names.append(FINAL)
    return names


def diffusers_paths(name: str, num_layers: int) -> list[str]:
    """Module paths in a plain diffusers DiT that the adapted layer `name` stands for."""
    if name.startswith(SHARED_EMB + "."):
        rest = name[len(SHARED_EMB) + 1 :]
        return [f"transformer_blocks.{i}.norm1.emb.{rest}" for i in range(num_layers)]
    return [name]

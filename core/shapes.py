"""DiT shapes by name (torch-free, so the CLI can list them without importing torch)."""

# diffusers DiTTransformer2DModel arguments of the DiT paper's models.
SHAPES: dict[str, dict] = {
    "DiT-XL/2": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2),
    "DiT-L/2": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, patch_size=2),
    "DiT-B/2": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, patch_size=2),
    "DiT-S/2": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=2),
}

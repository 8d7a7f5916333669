"""Issue 5: the DiffFit paper's Table 1 at small scale, with real FID.

``python -m bench.paper.study`` fine-tunes the Fashion-MNIST DiT base
(``base_models/fmnist-dit``) on three small real data sets with five methods
(full fine-tuning, BitFit, DiffFit, LoRA, DiffFit + Diff-Tuning), measures FID
with the standard Inception-v3 features against held-out images, checks class
conditioning with a small classifier, runs the gamma-placement ablation and
writes ``bench/results/paper.{json,md}`` plus one sample grid per method.

Modules: :mod:`.data` (data sets), :mod:`.fid` (Inception features, FID),
:mod:`.classifier` (conditioning check), :mod:`.methods` (fine-tuning),
:mod:`.sampling` (DDIM sampling, grids), :mod:`.report` (markdown),
:mod:`.study` (the command).
"""

"""layercap: curvature-weighted layer capacity allocation and pruning for LLMs.

Pipeline (one sub-package per stage):
  scores/    zeta_k^2 = g_k^T (C_k + lambda I)^-1 g_k per layer block (torch)
  programs/  the convex allocation / pruning programs and transfer regret (numpy only)
  apply/     pruning at per-layer ratios; LoRA-MoE and PEFT LoRA with per-layer capacity
  evaluate/  perplexity and zero-shot multiple-choice accuracy
  report/    plots and the HTML / Markdown report
  pipeline/  the main job (`layercap run`)
"""

from layercap.errors import LayercapError
from layercap.scorefile import LayerScore, LayerScores

__version__ = "0.1.0"
__all__ = ["LayercapError", "LayerScore", "LayerScores", "__version__"]

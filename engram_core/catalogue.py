"""Which first-party plugin provides which component, for messages when it is not loaded.

A recipe that names `type = "engram_hash"` on a machine with only engram-core installed
(or with `ENGRAM_PLUGINS` leaving llm-hash out) is told which plugin to install or
enable, not only that the name is unknown. Installed plugins are asked directly (see
`Registry.resolve`); this table covers the ones that are not installed.
`tests/test_validate.py` checks it against the installed plugins so it cannot go stale.
"""

from __future__ import annotations

# plugin entry-point name -> (distribution, path in this repository, {kind: component names})
FIRST_PARTY: dict[str, tuple[str, str, dict[str, tuple[str, ...]]]] = {
    "audio-mimi": ("engram-audio-mimi", "plugins/audio-mimi", {
        "datasets": ("zdyn",),
        "heads": ("gaussian_mlp", "vmf_magnitude", "linear", "linear_mlp"),
        "memories": ("kmeans", "residual_topk", "gated_residual", "hybrid", "basis"),
        "objectives": ("one_step_nll", "rollout_nll", "mixed"),
        "metrics": ("dnll", "direction_cos", "rollout", "gate_mean", "kappa_stats", "archetypes"),
    }),
    "deq-hrr": ("engram-deq-hrr", "plugins/deq-hrr", {
        "datasets": ("needle", "listops_lite", "listops_recall"),
        "heads": ("deq_classifier",),
        "memories": ("hrr",),
        "objectives": ("deq_hrr_task",),
        "metrics": ("deq_hrr_accuracy",),
    }),
    "llm-hash": ("engram-llm-hash", "plugins/llm-hash", {
        "datasets": ("exact_match", "long_recall"),
        "heads": ("tiny_causal_lm", "hf_causal_lm"),
        "memories": ("engram_hash", "hybrid_hash_content"),
        "objectives": ("completion_ce",),
        "metrics": ("exact_match",),
    }),
    "qwen-compressor": ("engram-qwen-compressor", "plugins/qwen-compressor", {
        "datasets": ("digit_kv",),
        "heads": ("reader",),
        "memories": ("mem_encoder", "reader_encoder", "token_select"),
        "objectives": ("answer_ce", "compressor_loss", "oracle_cosine", "contrastive"),
        "metrics": ("digit_accuracy", "collapse", "grad_check"),
    }),
}


def providers(kind: str, name: str) -> list[str]:
    """First-party plugins that provide component `name` of `kind`."""
    short = name.split(":", 1)[-1]
    return [p for p, (_, _, kinds) in FIRST_PARTY.items() if short in kinds.get(kind, ())]

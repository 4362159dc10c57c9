"""Hook implementations of the llm-hash plugin."""

from engram_core.hookspecs import hookimpl

from .data import ExactMatchConfig, ExactMatchDataset, LongRecallConfig, LongRecallDataset
from .heads import HFCausalLMConfig, HFCausalLMHead, TinyCausalLMConfig, TinyCausalLMHead
from .memories import EngramHashConfig, EngramHashMemory, HybridHashContentConfig, HybridHashContentMemory
from .metrics import ExactMatchMetric, ExactMatchMetricConfig
from .objectives import CompletionCE, CompletionCEConfig


@hookimpl
def engram_datasets(register):
    register("exact_match", ExactMatchDataset, ExactMatchConfig, provides=("text_completion",))
    register("long_recall", LongRecallDataset, LongRecallConfig, provides=("text_completion",))


@hookimpl
def engram_heads(register):
    register("tiny_causal_lm", TinyCausalLMHead, TinyCausalLMConfig, provides=("causal_lm",), points=("layer",))
    register("hf_causal_lm", HFCausalLMHead, HFCausalLMConfig, provides=("causal_lm",), points=("layer",))


@hookimpl
def engram_memories(register):
    register("engram_hash", EngramHashMemory, EngramHashConfig, points=("layer",))
    register("hybrid_hash_content", HybridHashContentMemory, HybridHashContentConfig, points=("layer",))


@hookimpl
def engram_objectives(register):
    register("completion_ce", CompletionCE, CompletionCEConfig, requires=("causal_lm",))


@hookimpl
def engram_metrics(register):
    register("exact_match", ExactMatchMetric, ExactMatchMetricConfig, requires=("causal_lm",))

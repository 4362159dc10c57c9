"""Hook implementations of the `qwen-compressor` plugin."""

from engram_core.hookspecs import hookimpl

from .data import DigitKVConfig, DigitKVDataset
from .memories import (
    Gather,
    GatherConfig,
    MemEncoder,
    MemEncoderConfig,
    ReaderEncoder,
    ReaderEncoderConfig,
    TokenSelect,
    TokenSelectConfig,
)
from .metrics import (
    Collapse,
    CollapseConfig,
    DigitAccuracy,
    DigitAccuracyConfig,
    GradCheck,
    GradCheckConfig,
    ValueMatch,
    ValueMatchConfig,
)
from .objectives import (
    AnswerCE,
    AnswerCEConfig,
    CompressorLoss,
    CompressorLossConfig,
    Contrastive,
    ContrastiveConfig,
    OracleCosine,
    OracleCosineConfig,
    ValueCE,
    ValueCEConfig,
)
from .reader import CompressorReader, ReaderConfig
from .stdlib_assign import StdlibAssignConfig, StdlibAssignDataset


@hookimpl
def engram_datasets(register):
    register("digit_kv", DigitKVDataset, DigitKVConfig, provides=("digit_kv",))
    register("stdlib_assign", StdlibAssignDataset, StdlibAssignConfig, provides=("stdlib_assign",))


@hookimpl
def engram_heads(register):
    register("reader", CompressorReader, ReaderConfig, provides=("reader", "causal_lm"), points=("context",))


@hookimpl
def engram_memories(register):
    register("mem_encoder", MemEncoder, MemEncoderConfig, points=("context",), provides=("context",))
    register("reader_encoder", ReaderEncoder, ReaderEncoderConfig, points=("context",), provides=("context",), requires=("reader",))
    register("token_select", TokenSelect, TokenSelectConfig, points=("context",), provides=("context",), requires=("reader",))
    register("gather", Gather, GatherConfig, points=("context",), provides=("context",), requires=("reader",))


@hookimpl
def engram_objectives(register):
    register("answer_ce", AnswerCE, AnswerCEConfig, requires=("reader", "digit_kv"))
    register("compressor_loss", CompressorLoss, CompressorLossConfig, requires=("reader", "digit_kv"))
    register("oracle_cosine", OracleCosine, OracleCosineConfig, requires=("reader", "context", "digit_kv"))
    register("contrastive", Contrastive, ContrastiveConfig, requires=("reader", "context", "digit_kv"))
    register("value_ce", ValueCE, ValueCEConfig, requires=("reader", "stdlib_assign"))


@hookimpl
def engram_metrics(register):
    register("digit_accuracy", DigitAccuracy, DigitAccuracyConfig, requires=("reader", "digit_kv"))
    register("collapse", Collapse, CollapseConfig, requires=("reader", "context", "digit_kv"))
    register("grad_check", GradCheck, GradCheckConfig, requires=("reader", "digit_kv"))
    register("value_match", ValueMatch, ValueMatchConfig, requires=("reader", "stdlib_assign"))

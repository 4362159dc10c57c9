"""Hook implementations of the deq-hrr plugin."""

from engram_core.hookspecs import hookimpl

from .data import (
    ListOpsLiteConfig,
    ListOpsLiteDataset,
    ListOpsRecallConfig,
    ListOpsRecallDataset,
    NeedleConfig,
    NeedleDataset,
)
from .head import DEQClassifier, DEQClassifierConfig
from .memories import HRRMemory, HRRMemoryConfig
from .metrics import DEQHRRAccuracy, DEQHRRAccuracyConfig
from .objective import DEQHRRTaskConfig, DEQHRRTaskObjective


@hookimpl
def engram_datasets(register):
    register("needle", NeedleDataset, NeedleConfig)
    register("listops_lite", ListOpsLiteDataset, ListOpsLiteConfig)
    register("listops_recall", ListOpsRecallDataset, ListOpsRecallConfig)


@hookimpl
def engram_heads(register):
    register("deq_classifier", DEQClassifier, DEQClassifierConfig, provides=("classify", "deq"), points=("trace",))


@hookimpl
def engram_memories(register):
    register("hrr", HRRMemory, HRRMemoryConfig, points=("trace",))


@hookimpl
def engram_objectives(register):
    register("deq_hrr_task", DEQHRRTaskObjective, DEQHRRTaskConfig, requires=("classify",))


@hookimpl
def engram_metrics(register):
    register("deq_hrr_accuracy", DEQHRRAccuracy, DEQHRRAccuracyConfig, requires=("classify",))

"""TensorBoard logging for a run: stable tags, histograms, hparams, a custom scalars layout.

Tags: ``train/<term>``, ``eval/<metric>``, ``memory/<stat>``, ``rollout/<diagnostic>``,
``lr``, ``throughput/steps_per_s``, ``throughput/samples_per_s``.

`SummaryWriter.add_hparams` writes into a new timestamped sub-folder, which shows up
as an extra run (pytorch issue 32651); `hparams` here writes the same summaries into
the run's own event file instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary


class RunLogger:
    """A thin wrapper over SummaryWriter that remembers which tags it has written."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.tags: set[str] = set()

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.tags.add(tag)
        self.writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        values = values.detach().float().cpu().flatten()
        values = values[torch.isfinite(values)]
        if values.numel():
            self.writer.add_histogram(tag, values, step)

    def figure(self, tag: str, fig, step: int) -> None:
        """A matplotlib figure as an image (closed after writing)."""
        self.writer.add_figure(tag, fig, step, close=True)

    def audio(self, tag: str, wave: torch.Tensor, step: int, sample_rate: int) -> None:
        """A mono waveform; values outside [-1, 1] are clipped to that range."""
        w = torch.as_tensor(wave).detach().float().cpu().flatten()
        w = torch.nan_to_num(w).clamp(-1.0, 1.0)
        self.writer.add_audio(tag, w, step, sample_rate=int(sample_rate))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        exp, ssi, sei = hparams_summary(clean, {k: float(v) for k, v in metrics.items()})
        fw = self.writer.file_writer
        fw.add_summary(exp)
        fw.add_summary(ssi)
        fw.add_summary(sei)  # the metric values themselves are the run's own eval/* scalars

    def layout(self, tags: set[str]) -> None:
        """Custom scalars: teacher-forced (eval/X) beside rollout (rollout/X), training curves."""
        eval_names = {t.split("/", 1)[1] for t in tags if t.startswith("eval/")}
        roll_names = {t.split("/", 1)[1] for t in tags if t.startswith("rollout/")}
        side = {}
        for name in sorted(eval_names | roll_names):
            side[name] = ["Multiline", [f"eval/{name}", f"rollout/{name}"] if name in eval_names and name in roll_names else [f"eval/{name}" if name in eval_names else f"rollout/{name}"]]
        layout = {
            "teacher-forced vs rollout": side,
            "training": {
                "losses": ["Multiline", [r"train/.*"]],
                "lr": ["Multiline", ["lr"]],
                "throughput": ["Multiline", [r"throughput/.*"]],
            },
            "memory": {"memory": ["Multiline", [r"memory/.*"]]},
        }
        self.writer.add_custom_scalars(layout)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

"""TensorBoard logging for a run: stable tags, histograms, hparams, a custom scalars layout.

Tags: ``train/<term>``, ``eval/<metric>``, ``memory/<stat>``, ``rollout/<diagnostic>``,
``lr``, ``throughput/steps_per_s``, ``throughput/samples_per_s``, ``throughput/tokens_per_s`` (global over ranks).

`SummaryWriter.add_hparams` writes into a new timestamped sub-folder, which shows up
as an extra run (pytorch issue 32651); `hparams` here writes the same summaries into
the run's own event file instead.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from .rundir import atomic_write_bytes


def _wait_to_sort_after_existing_event_files(log_dir: Path) -> None:
    """TensorBoard (and EventAccumulator) read a folder's event files in name order, and a
    name starts with the writer's start time in whole seconds, then host and pid. A resumed
    run that opens its writer within the same second as the file it continues would sort by
    pid, possibly before it, and its events would read as older. Wait (under a second) until
    the new name's time is later than every existing one."""
    stamps = []
    for path in log_dir.glob("events.out.tfevents.*"):
        part = path.name.split(".")[3:4]
        if part and part[0].isdigit():
            stamps.append(int(part[0]))
    if stamps:
        wait = max(stamps) + 1 - time.time()
        if wait > 0:
            time.sleep(wait)


class RunLogger:
    """A thin wrapper over SummaryWriter that remembers which tags it has written.

    Scalars are held and handed to the writer every `write_secs` seconds (and at every
    `flush`, histogram, eval and close): each `add_scalar` wakes SummaryWriter's writer
    thread, which then competes with the training loop for the GIL, and that cost is
    most of the engine's per-step overhead when it is paid at every log step. The events
    keep their own step and wall time; the writer flushes to disk every 120 s anyway.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None, write_secs: float = 10.0):
        _wait_to_sort_after_existing_event_files(Path(log_dir))
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.tags: set[str] = set()
        self.write_secs = write_secs
        self.pending: list[tuple[str, float, int, float]] = []
        self.last_write = time.monotonic()

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.tags.add(tag)
        self.pending.append((tag, float(value), step, time.time()))
        if time.monotonic() - self.last_write > self.write_secs:
            self.write_pending()

    def write_pending(self) -> None:
        for tag, value, step, wall in self.pending:
            self.writer.add_scalar(tag, value, step, walltime=wall)
        self.pending.clear()
        self.last_write = time.monotonic()

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.write_pending()
        values = values.detach().float().cpu().flatten()
        values = values[torch.isfinite(values)]
        if values.numel():
            self.writer.add_histogram(tag, values, step)

    def figure(self, tag: str, fig, step: int) -> None:
        """A matplotlib figure as an image (the caller closes it)."""
        self.writer.add_figure(tag, fig, step, close=False)

    def audio(self, tag: str, wave: torch.Tensor, step: int, sample_rate: int) -> None:
        """A mono waveform; values outside [-1, 1] are clipped to that range."""
        w = torch.as_tensor(wave).detach().float().cpu().flatten()
        w = torch.nan_to_num(w).clamp(-1.0, 1.0)
        self.writer.add_audio(tag, w, step, sample_rate=int(sample_rate))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.write_pending()
        self.writer.add_text(tag, text, step)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        self.write_pending()
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
        self.write_pending()
        self.writer.flush()

    def close(self) -> None:
        self.write_pending()
        self.writer.close()


class NullLogger:
    """RunLogger's interface, writing nothing: what ranks other than 0 of a distributed run log to."""

    def __init__(self) -> None:
        self.tags: set[str] = set()

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.tags.add(tag)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.tags.update(values)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int = 0) -> None:
        pass

    def figure(self, tag: str, figure, step: int) -> None:
        pass

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        pass

    def summary(self, summary: dict, status: str) -> None:
        pass

    def layout(self, tags: set[str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def drop_events_after(log_dir: Path, wall_time: float | None) -> int:
    """Remove from the event files in `log_dir` every event written after `wall_time`.

    A run killed after its last checkpoint may have flushed scalars (an eval stage's, a
    stage end's) that the resumed run writes again at the same step; TensorBoard's
    `purge_step` drops only steps after the checkpoint's, so the ones at its step would
    be doubled. The checkpoint records when it was saved; whatever came later is what
    the resumed run repeats. Each file is rewritten atomically. Returns events dropped.
    """
    if wall_time is None:
        return 0
    import io

    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    dropped = 0
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        # raw records, written back byte for byte (the parsing loader would migrate their format)
        records = list(RawEventFileLoader(str(path)).Load())
        keep = [r for r in records if Event.FromString(r).wall_time <= wall_time]
        if len(keep) == len(records):
            continue
        dropped += len(records) - len(keep)
        buf = io.BytesIO()
        writer = RecordWriter(buf)
        for r in keep:
            writer.write(r)
        atomic_write_bytes(path, buf.getvalue())
    return dropped

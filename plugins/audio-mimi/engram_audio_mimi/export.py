"""`engram-audio-export`: wav files + speaker table → Mimi continuous latents → zdyn zarr store.

    engram-audio-export --model /path/to/mimi --wavs /path/to/wavs --speakers speakers.csv \\
        --out data/zdyn.zarr [--device cpu] [--max-seconds 30]

- `--model`: a local directory saved by transformers (`MimiModel.save_pretrained`, or a
  downloaded `kyutai/mimi` snapshot). Nothing is downloaded.
- `--speakers`: CSV with a header row and columns `file,speaker` (file relative to --wavs).
- Each wav is mixed to mono, converted to float in [-1, 1], resampled to the model's
  sampling rate, and encoded to the continuous latents (``encoder_latents``: the Mimi
  encoder's output, on every transformers layout of `MimiModel`): the continuous latents
  before quantisation, (latent_dim, frames) at Mimi's frame rate (12.5 Hz for the
  released model). The store holds one float32 (frames, latent_dim) array per file.
"""

from __future__ import annotations

import argparse
import csv
import sys
from math import gcd
from pathlib import Path

import numpy as np

from .store import write_store


class ExportError(Exception):
    """A problem with the inputs; printed as one line, exit status 2."""


def read_speaker_table(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        raise ExportError(f"--speakers: file does not exist: {path}")
    with path.open(newline="") as fh:
        sample = fh.read(4096)
        fh.seek(0)
        dialect = csv.Sniffer().sniff(sample, delimiters=",\t;") if sample.strip() else csv.excel
        rows = list(csv.DictReader(fh, dialect=dialect))
    if not rows or not {"file", "speaker"} <= set(rows[0].keys()):
        raise ExportError(f"--speakers: {path} needs a header row with columns 'file' and 'speaker'")
    out = []
    for i, row in enumerate(rows, start=2):
        f, s = (row.get("file") or "").strip(), (row.get("speaker") or "").strip()
        if not f or not s:
            raise ExportError(f"--speakers: {path} line {i}: empty file or speaker")
        out.append((f, s))
    return out


def load_wav(path: Path, target_rate: int) -> np.ndarray:
    """Mono float32 in [-1, 1] at `target_rate` Hz."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    if not path.exists():
        raise ExportError(f"wav file does not exist: {path}")
    try:
        rate, data = wavfile.read(str(path))
    except ValueError as exc:
        raise ExportError(f"cannot read {path} as wav: {exc}") from None
    if np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
    data = data.astype(np.float32)
    if data.ndim == 2:
        data = data.mean(1)
    if rate != target_rate:
        g = gcd(int(rate), int(target_rate))
        data = resample_poly(data, target_rate // g, rate // g).astype(np.float32)
    return data


def encode_latents(model, audio: np.ndarray, device: str = "cpu") -> np.ndarray:
    """(frames, latent_dim) continuous Mimi latents before quantisation."""
    import torch

    x = torch.from_numpy(audio).to(device)[None, None, :]
    with torch.no_grad():
        latents = encoder_latents(model, x)  # (1, latent_dim, frames)
    return latents[0].T.float().cpu().numpy()


def encoder_latents(model, x):
    """Mimi's continuous latents before quantisation, (B, latent_dim, frames) at the frame rate.

    transformers has two layouts of `MimiModel`, told apart by what `model.encoder(x)` returns:
    - an output with `.latents` (e.g. 5.24): `encoder` is the whole encoder (SEANet
      convolutions, encoder transformer, downsampling to the frame rate);
    - a plain tensor (e.g. 5.0 to 5.17): `encoder` is the SEANet convolutions alone, at twice
      the frame rate; the encoder transformer and the downsampling are the model's sibling
      modules `encoder_transformer` and `downsample`, applied here in the model's own order.
    Either way the result quantises to exactly `model.encode(x).audio_codes` (the tests check it).
    """
    import torch

    out = model.encoder(x)
    if not isinstance(out, torch.Tensor):
        return out.latents
    hidden = model.encoder_transformer(out.transpose(1, 2))[0].transpose(1, 2)
    if getattr(model, "downsample", None) is not None:
        hidden = model.downsample(hidden)
    return hidden


def export(
    model_dir: Path, wav_dir: Path, speakers: Path, out: Path, device: str = "cpu", max_seconds: float = 0.0
) -> Path:
    try:
        from transformers import MimiModel
    except ImportError as exc:
        raise ExportError(
            f"transformers with MimiModel is needed for export ({exc}); pip install 'engram-audio-mimi[export]'"
        ) from None
    if not model_dir.is_dir():
        raise ExportError(f"--model: not a directory: {model_dir}")
    table = read_speaker_table(speakers)
    model = MimiModel.from_pretrained(str(model_dir)).to(device).eval()
    rate = int(model.config.sampling_rate)
    frame_rate = float(model.config.frame_rate)

    def items():
        for index, (file, speaker) in enumerate(table, start=1):
            audio = load_wav(wav_dir / file, rate)
            if max_seconds > 0:
                audio = audio[: int(max_seconds * rate)]
            z = encode_latents(model, audio, device)
            utt = Path(file).with_suffix("").as_posix().replace("/", "__")
            print(
                f"  [{index}/{len(table)}] {file}: {len(audio) / rate:.2f} s -> {z.shape[0]} frames x {z.shape[1]}",
                file=sys.stderr,
                flush=True,
            )
            yield utt, speaker, z

    return write_store(out, items(), frame_rate=frame_rate, source=f"mimi:{model_dir}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="engram-audio-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="local directory of a saved transformers MimiModel")
    p.add_argument("--wavs", required=True, type=Path, help="folder of wav files")
    p.add_argument("--speakers", required=True, type=Path, help="CSV with columns file,speaker")
    p.add_argument("--out", required=True, type=Path, help="zarr store to write (zdyn format)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument(
        "--max-seconds", type=float, default=0.0, help="truncate each file to this many seconds (0 = whole file)"
    )
    args = p.parse_args(argv)
    try:
        path = export(args.model, args.wavs, args.speakers, args.out, args.device, args.max_seconds)
    except ExportError as exc:
        print(f"engram-audio-export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Mimi continuous latents (before quantisation) → audio, the inverse path of `export`.

`export.encoder_latents` takes the encoder's output before the quantiser; a quantised code
decodes (in transformers' `MimiModel`) through `quantizer.decode` to an embedding of the
same size, then `upsample` → `decoder_transformer` → `decoder`. Decoding the continuous
latents skips only the quantiser: they go straight into `upsample`. Used to listen to
generated latents (`generate` metric with `data.decoder` set).
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_decoder(model_dir: Path):
    try:
        from transformers import MimiModel
    except ImportError as exc:  # the `export` extra
        raise RuntimeError(f"data.decoder needs transformers with MimiModel ({exc}); pip install 'engram-audio-mimi[export]'") from None
    return MimiModel.from_pretrained(str(model_dir)).eval()


@torch.no_grad()
def decode_latents(model, latents: torch.Tensor) -> torch.Tensor:
    """(frames, latent_dim) un-normalised continuous latents → mono waveform (samples,)."""
    x = latents.to(next(model.parameters()).dtype).T[None]  # (1, latent_dim, frames)
    if getattr(model, "upsample", None) is not None:
        x = model.upsample(x)
    hidden = model.decoder_transformer(x.transpose(1, 2))[0].transpose(1, 2)
    wave = model.decoder(hidden)  # (1, 1, samples)
    return wave[0, 0].float().cpu()

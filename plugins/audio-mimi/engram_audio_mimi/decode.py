"""Mimi continuous latents (before quantisation) → audio, the inverse path of `export`.

`export.encoder_latents` takes the encoder's output before the quantiser; a quantised code
decodes (in transformers' `MimiModel`) through `quantizer.decode` to an embedding of the
same size, then upsampling → decoder transformer → SEANet decoder. Decoding the continuous
latents skips only the quantiser. Used to listen to
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
    """(frames, latent_dim) un-normalised continuous latents → mono waveform (samples,).

    Two layouts of `MimiModel` in transformers, as in `export.encoder_latents`:
    - `model.decoder` is the whole decoder (e.g. 5.24: upsample, decoder transformer and
      SEANet in a `MimiDecoderModel` taking the continuous latents, returning `audio_values`);
    - `model.decoder` is the SEANet stack alone (5.0 to 5.17), with `upsample` and
      `decoder_transformer` as the model's sibling modules, applied here in its own order.
    """
    x = latents.to(next(model.parameters()).dtype).T[None]  # (1, latent_dim, frames)
    if hasattr(model.decoder, "decoder_transformer"):
        wave = model.decoder(x).audio_values
    else:
        if getattr(model, "upsample", None) is not None:
            x = model.upsample(x)
        hidden = model.decoder_transformer(x.transpose(1, 2))[0].transpose(1, 2)
        wave = model.decoder(hidden)  # (1, 1, samples)
    return wave[0, 0].float().cpu()

"""engram-audio-export end to end on a tiny randomly initialised Mimi saved by the test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
wavfile = pytest.importorskip("scipy.io.wavfile")

from engram_audio_mimi.data import ZdynConfig, ZdynDataset  # noqa: E402
from engram_audio_mimi.export import main  # noqa: E402
from engram_audio_mimi.store import read_store  # noqa: E402


def tiny_mimi(path):
    import torch

    torch.manual_seed(0)
    cfg = transformers.MimiConfig(
        hidden_size=64,
        num_filters=8,
        upsampling_ratios=[8, 6, 5, 4],
        codebook_dim=32,
        codebook_size=64,
        num_quantizers=4,
        num_semantic_quantizers=1,
        vector_quantization_hidden_dimension=32,
        upsample_groups=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        intermediate_size=128,
        sliding_window=50,
    )
    transformers.MimiModel(cfg).eval().save_pretrained(path)
    return cfg


@pytest.fixture(scope="module")
def mimi_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mimi")
    return path, tiny_mimi(path)


def write_wavs(folder, rate=16000):
    """Three short utterances (2 speakers): chirps with noise, 16-bit, one of them stereo."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (spk, secs) in enumerate([("alice", 1.0), ("alice", 0.7), ("bob", 1.3)]):
        t = np.arange(int(secs * rate)) / rate
        x = 0.3 * np.sin(2 * np.pi * (150 + 200 * i) * t * (1 + t)) + 0.02 * rng.standard_normal(t.shape)
        data = (x * 32767).astype(np.int16)
        if i == 2:
            data = np.stack([data, data], 1)
        wavfile.write(folder / f"utt{i}.wav", rate, data)
        rows.append(f"utt{i}.wav,{spk}")
    (folder.parent / "speakers.csv").write_text("file,speaker\n" + "\n".join(rows) + "\n")


def test_export_writes_a_zdyn_store(tmp_path, mimi_dir):
    model_dir, cfg = mimi_dir
    write_wavs(tmp_path / "wavs")
    out = tmp_path / "z.zarr"
    rc = main(
        [
            "--model",
            str(model_dir),
            "--wavs",
            str(tmp_path / "wavs"),
            "--speakers",
            str(tmp_path / "speakers.csv"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    ids, speakers, arrays, attrs_ = read_store(out)
    assert ids == ["utt0", "utt1", "utt2"] and speakers == ["alice", "alice", "bob"]
    frame_rate = cfg.sampling_rate / np.prod(cfg.upsampling_ratios) / 2  # SEANet hop, then ×2 downsample
    assert attrs_["frame_rate"] == pytest.approx(cfg.frame_rate)
    for arr, secs in zip(arrays, [1.0, 0.7, 1.3]):
        assert arr.shape[1] == cfg.hidden_size
        assert abs(arr.shape[0] - secs * frame_rate) <= 1
        assert np.isfinite(arr).all()
    # the latents are the model's own pre-quantisation latents: quantised, they give exactly
    # the codes of the public `model.encode` (on every transformers layout of MimiModel)
    import torch

    model = transformers.MimiModel.from_pretrained(str(model_dir)).eval()
    from engram_audio_mimi.export import encoder_latents, load_wav

    audio = load_wav(tmp_path / "wavs" / "utt0.wav", cfg.sampling_rate)
    x = torch.from_numpy(audio)[None, None]
    with torch.no_grad():
        codes = model.encode(x).audio_codes  # (1, n_q, frames)
        mine = model.quantizer.encode(torch.from_numpy(arrays[0].T.copy())[None]).transpose(0, 1)
        ref = encoder_latents(model, x)[0].T.numpy()
    assert codes.shape[-1] == arrays[0].shape[0]
    assert torch.equal(mine, codes)
    np.testing.assert_allclose(arrays[0], ref, rtol=1e-5, atol=1e-5)
    # and the data set reads it (2 speakers: one per side)
    ds = ZdynDataset(ZdynConfig(path=str(out), eval_fraction=0.5))
    assert ds.spec.dim == cfg.hidden_size


def test_export_bad_inputs_exit_2(tmp_path, capsys):
    write_wavs(tmp_path / "wavs")
    (tmp_path / "bad.csv").write_text("path,who\nutt0.wav,alice\n")
    (tmp_path / "mimi").mkdir()
    rc = main(
        [
            "--model",
            str(tmp_path / "mimi"),
            "--wavs",
            str(tmp_path / "wavs"),
            "--speakers",
            str(tmp_path / "bad.csv"),
            "--out",
            str(tmp_path / "z.zarr"),
        ]
    )
    assert rc == 2
    assert "columns 'file' and 'speaker'" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)")
def test_export_real_speech_from_espeak(tmp_path, mimi_dir):
    model_dir, cfg = mimi_dir
    (tmp_path / "wavs").mkdir()
    rows = []
    for i, (voice, text) in enumerate([("en-us", "The quick brown fox."), ("en-gb+f3", "Jumps over the lazy dog.")]):
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(tmp_path / "wavs" / f"s{i}.wav"), text], check=True)
        rows.append(f"s{i}.wav,{voice}")
    (tmp_path / "speakers.csv").write_text("file,speaker\n" + "\n".join(rows) + "\n")
    rc = main(
        [
            "--model",
            str(model_dir),
            "--wavs",
            str(tmp_path / "wavs"),
            "--speakers",
            str(tmp_path / "speakers.csv"),
            "--out",
            str(tmp_path / "z.zarr"),
        ]
    )
    assert rc == 0
    _, speakers, arrays, _ = read_store(tmp_path / "z.zarr")
    assert len(arrays) == 2 and all(a.shape[1] == cfg.hidden_size and a.shape[0] > 5 for a in arrays)


def test_export_progress_and_decoded_generation_in_tensorboard(tmp_path, mimi_dir, capsys):
    """Long enough utterances for K = 16; the headline recipe (shrunk) on the exported store
    with the decoder configured writes generated and true audio and the trajectory picture."""
    import torch
    from engram_audio_mimi.decode import decode_latents, load_decoder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engram_core.testing.cli import run_cli

    model_dir, cfg = mimi_dir
    (tmp_path / "wavs").mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for i, spk in enumerate(["a", "a", "b", "b", "c", "c"]):
        t = np.arange(int(2.2 * 16000)) / 16000
        x = 0.3 * np.sin(2 * np.pi * (120 + 40 * i) * t * (1 + 0.5 * t)) + 0.02 * rng.standard_normal(t.shape)
        wavfile.write(tmp_path / "wavs" / f"u{i}.wav", 16000, (x * 32767).astype(np.int16))
        rows.append(f"u{i}.wav,{spk}")
    (tmp_path / "speakers.csv").write_text("file,speaker\n" + "\n".join(rows) + "\n")
    out = tmp_path / "z.zarr"
    argv = ["--model", str(model_dir), "--wavs", str(tmp_path / "wavs"), "--speakers", str(tmp_path / "speakers.csv")]
    assert main([*argv, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "[1/6] u0.wav" in err and "[6/6] u5.wav" in err
    _, _, arrays, _ = read_store(out)
    model = load_decoder(model_dir)
    wave = decode_latents(model, torch.from_numpy(arrays[0]))
    hop = cfg.sampling_rate / cfg.frame_rate
    assert abs(wave.shape[0] - arrays[0].shape[0] * hop) <= hop and bool(torch.isfinite(wave).all())
    r = run_cli(
        str(Path(__file__).resolve().parents[3] / "recipes" / "rollout_vmf.toml"), f"data.path={out}", f"data.decoder={model_dir}", "data.eval_fraction=0.34",
        "stages.0.steps=3", "stages.2.steps=2", "metrics.2.segments=8", "--quiet", "--out", str(tmp_path / "runs"),
        plugins="audio-mimi", env={"ENGRAM_CACHE": str(tmp_path / "cache")},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = next((tmp_path / "runs" / "rollout_vmf").iterdir())
    acc = EventAccumulator(str(run_dir), size_guidance={"audio": 0, "images": 0}).Reload()
    tags = acc.Tags()
    assert "generate/post/audio_gen_0" in tags["audio"] and "generate/post/audio_true_0" in tags["audio"]
    assert "generate/post/trajectories" in tags["images"]

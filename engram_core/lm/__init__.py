"""A general causal LM made here: pretrained on the Python standard library's source.

An optional part of engram-core (entry point `engram-lm`, extra `engram-core[lm]`: transformers
and tokenizers); the kernel never imports it. Research lines about what a *pretrained* LM does
with a memory (qwen-compressor's frozen reader, llm-hash's base) name the model as they would a
hub checkpoint, and it is built here from an empty cache instead of downloaded:

    engram lm pretrain stdlib-lm-cpu            # or stdlib-lm-gpu; prints where it is cached
    engram-run recipes/general_lm.toml          # held-out perplexity, with n-gram baselines
    head.model_dir = "engram:stdlib-lm-cpu"     # in an llm-hash / qwen-compressor recipe

`engram:NAME` resolves to the cached `save_pretrained` folder (weights, config, tokenizer),
pretraining it first if it is not there; anything else is a local directory.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

PREFIX = "engram:"


def is_engram_model(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def require_extra(key: str) -> None:
    """One line, not an ImportError, where transformers or tokenizers is missing."""
    import importlib.util

    from ..errors import ConfigError

    missing = [m for m in ("transformers", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(key, f"the general LM needs {' and '.join(missing)}: pip install 'engram-core[lm]'")


def preset(name: str, key: str = "model_dir"):
    """The `PretrainConfig` of `engram:NAME`, or one line naming the models there are."""
    from ..errors import ConfigError
    from .pretrain import SIZES

    size = name[len(PREFIX):] if is_engram_model(name) else name
    if size not in SIZES:
        raise ConfigError(key, f"no engram model {name!r}; the models made here are: {', '.join(PREFIX + s for s in SIZES)}")
    return SIZES[size]


def _cache(cache_dir):
    from ..components import default_cache_dir

    return cache_dir if cache_dir is not None else default_cache_dir()


def resolve_model(name: str, cache_dir=None, device=None, key: str = "model_dir", seed: int | None = None) -> Path:
    """`engram:NAME` -> its cached model folder (pretrained now if missing; `seed` None = the
    size's own, 0); a path -> itself."""
    if not is_engram_model(name):
        return Path(name).expanduser()
    import attrs

    from .pretrain import pretrained_folder

    require_extra(key)
    cfg = preset(name, key)
    return pretrained_folder(cfg if seed is None else attrs.evolve(cfg, seed=seed), _cache(cache_dir), device)


def cached_model(name: str, cache_dir=None) -> Path | None:
    """The model folder of `engram:NAME` if it is cached, else None (nothing is built)."""
    from .pretrain import cache_entry

    e = cache_entry(preset(name), _cache(cache_dir))
    return e.path if e.exists() else None


def tokenizer_folder(name: str, cache_dir=None, key: str = "tokenizer") -> Path:
    """The tokenizer of `engram:NAME` (the same files its model folder holds), from the
    tokenised corpus: only the BPE is trained if missing, not the model."""
    from .tokens import cache_entry, load_tokens

    require_extra(key)
    cfg = preset(name, key).tokens
    e = cache_entry(cfg, _cache(cache_dir))
    if not e.exists():
        load_tokens(cfg, _cache(cache_dir))
    return e.path / "tokenizer"


def skeleton_model(name: str, key: str = "model_dir"):
    """A randomly initialised model of `engram:NAME`'s shape: what `engram validate` and
    `--dry-run` build, so a check never pretrains."""
    from transformers import AutoModelForCausalLM

    from .pretrain import llama_config

    return AutoModelForCausalLM.from_config(llama_config(preset(name, key)))


@contextlib.contextmanager
def quiet_transformers():
    """No per-shard progress bars from transformers while loading or saving a small model."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()

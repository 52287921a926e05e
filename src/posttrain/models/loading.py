"""Loading causal LMs and tokenizers: the embedded default, a local directory, or a hub id.

Guarantees: `trust_remote_code` is off unless the caller turns it on; weights load from safetensors where the
checkpoint has them (transformers' default); the name "embedded" resolves to the cached embedded model, built on
first use (no download, ever); a tokenizer without a pad token gets pad = eos (masks are built from lengths, so this
is safe); errors name what was asked for.

Before transformers is called, `locate` checks the reference and raises `ModelSourceError` naming it and what was
expected: a path that does not exist, a directory without config.json and weights (model) or without tokenizer
files (tokenizer), or a hub id that is neither cached nor reachable (HF_HUB_OFFLINE set, or the hub does not
answer a bounded probe). transformers' own messages for these are misleading ("Repo id must be in the form ...",
"You need to have sentencepiece or tiktoken installed") or come after a minute of retries.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

EMBEDDED = "embedded"


def resolve_model_path(name_or_path: str) -> str:
    """'embedded' -> the cached embedded model directory; anything else unchanged."""
    if name_or_path == EMBEDDED:
        from .embedded import embedded_model_dir

        return str(embedded_model_dir())
    return name_or_path


class ModelSourceError(OSError):
    """A model or tokenizer reference that cannot be loaded as given; retrying cannot help (the agent runtime does
    not retry it). An OSError, as transformers' own loading errors are."""


# Files of which a tokenizer directory has at least one (fast tokenizers, sentencepiece, BPE and WordPiece vocabs).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TRUE = ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub endpoint ($HF_ENDPOINT, default huggingface.co) gives any HTTP answer within `timeout`."""
    # A bounded probe (a thread, so a hanging DNS lookup cannot stall us either): the hub clients alone may retry
    # for minutes before failing offline. urllib honours the proxy environment variables; any HTTP answer counts.
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    answer: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(endpoint, timeout=timeout).close()
            answer.append(True)
        except urllib.error.HTTPError:
            answer.append(True)
        except Exception:  # noqa: BLE001 - unreachable for any reason
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answer and answer[0])


def _looks_like_path(ref: str) -> bool:
    # A hub id is 'name' or 'org/name'; anything else that does not exist locally was meant as a path.
    return (os.path.isabs(ref) or ref.startswith((".", "~")) or ref.endswith("/") or ref.count("/") > 1
            or os.sep != "/" and os.sep in ref)


def _check_directory(path: Path, ref: str, what: str) -> None:
    names = {p.name for p in path.iterdir()}
    if what == "tokenizer":
        if not names & set(TOKENIZER_FILES):
            raise ModelSourceError(f"{ref}: directory has no tokenizer files (expected one of "
                                   f"{', '.join(TOKENIZER_FILES)}, as save_pretrained writes)")
        return
    if "config.json" not in names and "adapter_config.json" not in names:
        raise ModelSourceError(f"{ref}: directory has no config.json (expected a Hugging Face model directory: "
                               "config.json and *.safetensors or *.bin weights, as save_pretrained writes)")
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        raise ModelSourceError(f"{ref}: directory has config.json but no weights (expected *.safetensors or *.bin "
                               "files, as save_pretrained writes)")


def _check_hub_id(ref: str) -> None:
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(ref)
    except ValueError:
        raise ModelSourceError(f"{ref}: no such directory, and not a hub id either (expected a local model "
                               "directory, or a hub id 'name' or 'org/name')") from None
    cached = any(isinstance(try_to_load_from_cache(ref, name), str)
                 for name in ("config.json", "tokenizer_config.json", "tokenizer.json"))
    if cached:
        return  # transformers can load it from the hub cache
    offline = constants.HF_HUB_OFFLINE or any(os.environ.get(v, "").lower() in _TRUE
                                              for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if offline:
        raise ModelSourceError(f"not a local path and the hub is offline (HF_HUB_OFFLINE is set) with no cached "
                               f"copy: {ref}")
    if not hub_reachable():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise ModelSourceError(f"not a local path and the hub is unreachable ({endpoint} did not answer): {ref}")


def locate(name_or_path: str, what: str = "model") -> str:
    """What to hand to `from_pretrained` for `what` ("model" or "tokenizer"), checked as the module docstring says;
    "embedded" resolves to the cached embedded model (built on first use)."""
    if what not in ("model", "tokenizer"):
        raise ValueError(f"what must be 'model' or 'tokenizer', got {what!r}")
    ref = str(name_or_path)
    if ref == EMBEDDED:
        return resolve_model_path(ref)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"{ref}: not a directory (expected a Hugging Face model directory)")
        _check_directory(path, ref, what)
        return str(path)
    if _looks_like_path(ref):
        raise ModelSourceError(f"{ref}: no such directory (expected a local Hugging Face model directory, or a hub "
                               "id 'org/name')")
    _check_hub_id(ref)
    return ref


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a CUDA device is present, else 'cpu'; anything else is checked and returned."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA device")
    return device


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    path = locate(name_or_path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types; the user needs to know what was asked for
        raise OSError(f"could not load a tokenizer from {name_or_path!r} ({path}): {exc}") from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               device: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    path = locate(name_or_path, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise OSError(f"could not load a causal LM from {name_or_path!r} ({path}): {exc}") from exc
    if device is not None:
        model.to(device)
    model.eval()
    return model


def is_reward_model(name_or_path: str) -> bool:
    """True when the checkpoint's config names a sequence-classification architecture (a reward model)."""
    import json

    config = Path(resolve_model_path(name_or_path)) / "config.json"
    if not config.exists():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def weights_size_bytes(directory: str | Path) -> int:
    """Bytes of the weight files (*.safetensors, *.bin, *.gguf) in a model directory."""
    directory = Path(directory)
    return sum(p.stat().st_size for p in directory.iterdir()
               if p.is_file() and p.suffix in {".safetensors", ".bin", ".gguf"})


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

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

`load_model` never hands back weights transformers initialised at random: a checkpoint that lacks any weight of the
model class (transformers' `output_loading_info`; a weight tied to a loaded one, e.g. `lm_head.weight` with
`tie_word_embeddings`, is loaded, not missing) raises `UninitialisedWeightsError` naming the path and the first
missing weights. A posttrain int8 artifact (`compress.int8`: quantization.json, `*.qweight` / `*.scale` tensors,
which transformers alone would drop) loads through `compress.int8.load_int8`, so it computes with its int8 weights.
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


class UninitialisedWeightsError(ModelSourceError):
    """A checkpoint that lacks weights of the model class it is loaded as: transformers would initialise them at
    random (and, with its logging at errors, say nothing)."""


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


def newly_initialised(model: torch.nn.Module, info: dict[str, Any]) -> list[str]:
    """The weights of `model` that `from_pretrained(..., output_loading_info=True)` initialised instead of loading
    (`info` is that loading info: missing and size-mismatched keys), sorted, less any weight tied to a loaded one
    (same tensor, e.g. `lm_head.weight` with `tie_word_embeddings`)."""
    new = set(info.get("missing_keys") or ())
    new |= {k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys") or ()}
    if not new:
        return []
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for name, p in params.items() if name not in new}
    return sorted(k for k in new if not (k in params and id(params[k]) in loaded))


def refuse_new_weights(model: torch.nn.Module, info: dict[str, Any], name_or_path: str,
                       allowed: tuple[str, ...] = (), ignored: tuple[str, ...] = ()) -> None:
    """Raise `UninitialisedWeightsError` naming `name_or_path` and the first five weights `newly_initialised`
    finds, but `allowed` (weights the caller means to train from scratch); the checkpoint's unexpected keys but
    `ignored` (ones the caller knows it drops) are named too, as they usually say what it holds instead."""
    new = [k for k in newly_initialised(model, info) if k not in allowed]
    if not new:
        return
    shown = ", ".join(new[:5]) + (f", ... ({len(new)} in all)" if len(new) > 5 else "")
    unexpected = sorted(set(info.get("unexpected_keys") or ()) - set(ignored))
    instead = (f"; it has instead {', '.join(unexpected[:3])}" + (", ..." if len(unexpected) > 3 else "")
               if unexpected else "")
    raise UninitialisedWeightsError(
        f"{name_or_path}: the checkpoint lacks {len(new)} weight(s) of {type(model).__name__}, which loading would "
        f"initialise at random: {shown}{instead} (expected a complete checkpoint of this architecture, as "
        "save_pretrained writes)")


def int8_artifact(path: str) -> bool:
    """True when `path` (as `locate` returns it) is a posttrain int8 artifact (`compress.int8`)."""
    from ..compress.int8 import is_int8_artifact

    return Path(path).is_dir() and is_int8_artifact(path)


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               device: str | None = None) -> Any:
    """A causal LM in eval mode, its floating-point weights in `dtype`, on `device` when given.

    `name_or_path` goes through `locate`; a posttrain int8 artifact loads through `compress.int8.load_int8` (its
    linears keep their int8 weights and compute in the input's dtype; one of a reward model is refused: it is not a
    causal LM); anything else through `AutoModelForCausalLM.from_pretrained`, refused with
    `UninitialisedWeightsError` when a weight would be initialised at random (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    path = locate(name_or_path, "model")
    if int8_artifact(path):
        from ..compress.int8 import load_int8

        if is_reward_model(path):
            raise ModelSourceError(f"{name_or_path}: an int8-quantized reward model (a sequence-classification "
                                   "artifact), not a causal LM; load it with align.reward_model.load_reward_model")
        model = load_int8(path).to(dtype=dtype)  # int8 tensors stay int8: only floating-point ones are cast
    else:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                               output_loading_info=True)
        except Exception as exc:
            raise OSError(f"could not load a causal LM from {name_or_path!r} ({path}): {exc}") from exc
        refuse_new_weights(model, info, name_or_path)
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

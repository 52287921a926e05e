"""Run configuration: typed, with defaults; YAML in, dotted overrides from the command line.

Guarantees: unknown keys are refused with the key's dotted path and the closest known key; `--train.lr 1e-4` style
overrides are parsed as YAML scalars and validated like the file, and an error caused by a flag names the flag
(`command-line flag --train.stpes`), never the YAML file; a list-typed key takes a YAML list or comma-separated
values from a flag (`--evaluate.benchmarks mmlu,arc_easy`); an empty config file is refused (it would run the
embedded defaults); settings that can never work (an unknown benchmark, a compress method that is malformed or
out of range) are refused when the config is read; the resolved configuration is written to the run directory,
so a run can be reproduced from its own `config.yaml`.

Example (src/posttrain/configs/demo.yaml shows the full set):

    model: embedded            # or a local path / hub id
    data: null                 # null: the embedded arithmetic task; else a path or hub id
    method: auto               # auto | sft | rm | dpo | ipo | simpo | orpo | kto | grpo
    train: {steps: 30, lr: 1e-5}
"""

from __future__ import annotations

import copy
import difflib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .align.engine import TrainOptions
from .bus.health import HealthOptions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataOptions(_Strict):
    split: str | None = Field(None, description="split to read from a hub id or directory")
    limit: int | None = Field(None, ge=1, description="use at most this many rows (after validation)")
    eval_data: str | None = Field(None, description="held-out data; default: the embedded test split, or a "
                                                     "hold-out of `data`")
    eval_split: str | None = None
    eval_size: int = Field(64, ge=1, description="rows held out from `data` when no eval_data is given")
    drop_empty: bool = Field(False, description="drop (and count) rows with an empty response instead of failing; "
                                                "real sets such as UltraFeedback and HH-RLHF contain a few")
    kind: Literal["preference", "verifiable", "sft", "unpaired"] | None = Field(
        None, description="force a data kind instead of detecting it")


ReferenceModeName = Literal["copy", "precompute", "adapter_disabled", "adapter_copy", "auto"]
REFERENCE_HELP = ("copy: a frozen copy; precompute: log-probs of the initial policy computed once; adapter_disabled: "
                  "the LoRA base with adapters off; adapter_copy: a frozen copy of an existing adapter; auto: adapters "
                  "off for a fresh LoRA adapter, an adapter copy for a trained one, a frozen copy of a plain model")


class SFTOptions(_Strict):
    loss_on: Literal["completion", "assistant_turns"] = Field(
        "completion", description="supervise the final completion, or every assistant turn of the conversation")


class DPOOptions(_Strict):
    beta: float = Field(0.1, gt=0, description="KL strength β (Rafailov et al. 2023 use 0.1)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO label noise ε")
    reference: ReferenceModeName = Field("auto", description=REFERENCE_HELP)


class IPOOptions(_Strict):
    beta: float = Field(0.1, gt=0, description="τ; the target margin of the length-averaged log-ratios is 1/(2τ)")
    reference: ReferenceModeName = Field("auto", description=REFERENCE_HELP)


class SimPOOptions(_Strict):
    beta: float = Field(2.0, gt=0, description="reward scale β (Meng et al. 2024 default 2.0)")
    gamma: float = Field(0.5, ge=0, description="target margin γ (paper: γ/β = 0.25)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class ORPOOptions(_Strict):
    beta: float = Field(0.1, gt=0, description="λ, weight of the odds-ratio term (Hong et al. 2024 use 0.1)")


class KTOOptions(_Strict):
    beta: float = Field(0.1, gt=0, description="β (Ethayarajh et al. 2024 use 0.1)")
    desirable_weight: float = Field(1.0, gt=0, description="λ_D; keep λ_D·n_D / (λ_U·n_U) in [1, 4/3]")
    undesirable_weight: float = Field(1.0, gt=0, description="λ_U")
    reference: ReferenceModeName = Field("auto", description=REFERENCE_HELP)


class RewardModelOptions(_Strict):
    center_coefficient: float | None = Field(None, ge=0, description="Eisenstein et al. 2023 centering (0.01)")
    margin_field: str | None = Field(None, description="a row field holding a per-pair margin (Llama 2)")


class LoraSection(_Strict):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or module names")


class GRPOOptions(_Strict):
    num_generations: int = Field(8, ge=2, description="G samples per prompt (TRL default 8)")
    prompts_per_step: int = Field(8, ge=1, description="prompts per generation batch; the batch of prompts_per_step "
                                                       "× num_generations samples is split into train.grad_accum "
                                                       "micro-batches (train.batch_size is not used by GRPO)")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    top_p: float = Field(1.0, gt=0, le=1)
    epsilon_low: float = Field(0.2, ge=0, description="PPO clip range below 1")
    epsilon_high: float = Field(0.2, ge=0, description="clip range above 1 (DAPO clip-higher uses 0.28)")
    beta: float = Field(0.0, ge=0, description="k3 KL coefficient to a frozen reference (DeepSeekMath 0.04; "
                                               "TRL default 0: no reference is loaded)")
    num_iterations: int = Field(1, ge=1, description="optimizer passes over each generation batch (μ)")
    loss_type: Literal["grpo", "dapo"] = Field("dapo", description="grpo: per-sequence mean (DeepSeekMath); "
                                                                   "dapo: token mean over the batch (TRL default)")
    scale_rewards: Literal["group", "none"] = "group"
    reward: Literal["hash_answer"] = Field("hash_answer", description="verifiable reward: the `#### N` answer")


class CompressOptions(_Strict):
    enabled: bool = True
    method: str = Field("int8_rtn", description="int8_rtn | gptq | awq | gguf:<type> | prune:<algo>:<amount> | "
                                                "distill:<kind> (see posttrain.compress.api)")
    fallback: list[str] = Field(default_factory=list, description="milder methods tried in order when the gate "
                                                                  "below rejects an artifact, e.g. [gguf:q8_0]")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="gate: reject an artifact whose top-1 "
                                                                          "agreement with the aligned model is lower")
    max_perplexity_ratio: float | None = Field(None, ge=1, description="gate: reject an artifact whose held-out "
                                                                      "perplexity exceeds the aligned model's by more")
    heldout_max_new_tokens: int = Field(64, ge=1, description="held-out rows without a completion (verifiable, "
                                        "prompt-only) are measured on the aligned model's greedy completion of "
                                        "their prompt, up to this many new tokens")
    options: dict[str, Any] = Field(default_factory=dict, description="method options: group_size, student, "
                                    "student_config, head_fraction, train (distillation's loop: steps, lr, ...), "
                                    "distill (loss, temperature, final_temperature, ...); see "
                                    "posttrain.compress.api.MethodOptions")

    @field_validator("method", "fallback")
    @classmethod
    def _known_methods(cls, value: Any) -> Any:
        from .compress.api import parse_method

        for method in ([value] if isinstance(value, str) else value):
            parse_method(method)
        return value

    @field_validator("options")
    @classmethod
    def _known_options(cls, value: Any) -> Any:
        from .compress.api import parse_options

        parse_options(value)  # unknown or bad keys are refused when the config is read, not at the compress stage
        return value


class EvalOptions(_Strict):
    enabled: bool = True
    benchmarks: list[str] = Field(default_factory=list, description="standard benchmarks run on base, aligned and "
                                  "compressed models: mmlu, arc_easy, arc_challenge, gsm8k, truthfulqa_mc1, "
                                  "truthfulqa_mc2, humaneval, mt_bench")
    data_dir: str | None = Field(None, description="benchmark data laid out like ../shared/datasets (None: the hub)")
    benchmark_limit: int | None = Field(50, ge=1, description="seeded random subset per benchmark (None: all)")
    allow_code_execution: bool = Field(False, description="HumanEval runs model-written code in a sandbox: opt in")
    judge: str | None = Field(None, description="MT-Bench judge: self | local:PATH | openai:MODEL")
    judge_base_url: str | None = None
    mt_bench_pairwise: bool = Field(False, description="with mt_bench in benchmarks: also judge the aligned model's "
                                    "MT-Bench answers against the base model's (each pair twice, positions swapped); "
                                    "win/tie/loss with n go to the log and the report as mt_bench_vs_base")
    benchmark_max_new_tokens: int | None = Field(None, ge=1, description="cap generation for gsm8k, humaneval, "
                                                 "mt_bench and the MT-Bench judge, as `posttrain eval "
                                                 "--max-new-tokens` (None: each benchmark's standard; MT-Bench's "
                                                 "1024 needs a context longer than 1024)")
    gate: dict[str, float] = Field(default_factory=dict, description="maximum allowed drop per metric, e.g. "
                                   "{'task': 0.05, 'gsm8k/exact_match_strict': 0.02}: aligned vs base and compressed "
                                   "vs aligned; a larger drop fails the run with the numbers ('task' = the run's "
                                   "own held-out metric), except that a compressed model past it makes the "
                                   "coordinator compress again with the next compress.fallback not yet tried")
    limit: int | None = Field(200, ge=1, description="evaluate at most this many held-out rows")
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(64, ge=1)

    @field_validator("benchmarks")
    @classmethod
    def _known_benchmarks(cls, value: list[str]) -> list[str]:
        from .evaluate.benchmarks import REGISTRY  # names only: a runner module is imported when it runs

        for name in value:
            if name not in REGISTRY:
                close = difflib.get_close_matches(name, list(REGISTRY), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown benchmark {name!r}{hint}; known: {', '.join(REGISTRY)}")
        return value


class RunConfig(_Strict):
    model: str = Field("embedded", description="'embedded', a local path or a hub id")
    data: str | None = Field(None, description="training data: path or hub id; null = the embedded task")
    method: Literal["auto", "sft", "rm", "dpo", "ipo", "simpo", "orpo", "kto", "grpo"] = "auto"
    seed: int = 0
    runs_dir: str = "runs"
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                                 description="prefix of the run id (letters, digits, '.', '_', '-')")
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    trust_remote_code: bool = Field(False, description="execute model code from the hub (off: never by default)")
    run_timeout_s: float = Field(3600.0, gt=0, description="the run fails with a clear reason past this")
    task_timeout_s: float = Field(1800.0, gt=0, description="a stage task fails past this deadline")
    data_options: DataOptions = Field(default_factory=DataOptions)
    train: TrainOptions = Field(default_factory=lambda: TrainOptions(steps=30, batch_size=8, lr=1e-5))
    lora: LoraSection | None = Field(None, description="train LoRA adapters (PEFT) instead of all weights")
    sft: SFTOptions = Field(default_factory=SFTOptions)
    rm: RewardModelOptions = Field(default_factory=RewardModelOptions)
    dpo: DPOOptions = Field(default_factory=DPOOptions)
    ipo: IPOOptions = Field(default_factory=IPOOptions)
    simpo: SimPOOptions = Field(default_factory=SimPOOptions)
    orpo: ORPOOptions = Field(default_factory=ORPOOptions)
    kto: KTOOptions = Field(default_factory=KTOOptions)
    grpo: GRPOOptions = Field(default_factory=GRPOOptions)
    compress: CompressOptions = Field(default_factory=CompressOptions)
    evaluate: EvalOptions = Field(default_factory=EvalOptions)
    health: HealthOptions = Field(default_factory=HealthOptions)

    @model_validator(mode="before")
    @classmethod
    def _training_seed_follows_the_run_seed(cls, data: Any) -> Any:
        # One seed for a run: `seed` (or `--seed N`) also seeds training (sampling, shuffling, initialisation)
        # unless `train.seed` is given explicitly. Before, `--seed 1` changed the data split only.
        if isinstance(data, dict) and isinstance(data.get("seed"), int) and isinstance(data.get("train", {}), dict) \
                and "seed" not in data.get("train", {}):
            data = {**data, "train": {**data.get("train", {}), "seed": data["seed"]}}
        return data


class ConfigError(ValueError):
    pass


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--train.lr", "1e-4", "--method=dpo"]` -> {"train.lr": 1e-4, "method": "dpo"} (values parsed as YAML).

    A flag without a value (the last argument, or followed by another `--flag`) is a ConfigError: an unknown key
    is reported as unknown, with the closest known keys (`--bogus`, `--stpes --train.lr 1e-4`), as `load_config`
    reports an unknown key that has a value; a known key as having no value."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --key.sub value or --key.sub=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or _looks_like_flag(args[i + 1]):
                if is_unknown_key(key.replace("-", "_")):
                    raise ConfigError(f"command-line flag --{key}: unknown key"
                                      f"{did_you_mean(key.replace('-', '_'), flag=True)}")
                follows = f" (it is followed by the flag {args[i + 1]})" if i + 1 < len(args) else ""
                raise ConfigError(f"override --{key} has no value{follows}")
            i += 1
            value = args[i]
        out[key.replace("-", "_")] = _scalar(value)
        i += 1
    return out


def _looks_like_flag(arg: str) -> bool:
    """`--key...`: another override, never a value (no config value starts with two dashes and a letter)."""
    return len(arg) > 2 and arg.startswith("--") and arg[2].isalpha()


def _scalar(text: str) -> Any:
    """A YAML scalar, except that `1e-4` is a float (YAML 1.1 reads exponents without a dot as strings)."""
    if text == "":
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section (a pydantic model) a field holds, also through `X | None`; None for a plain value."""
    for option in (annotation, *get_args(annotation)):
        if isinstance(option, type) and issubclass(option, BaseModel):
            return option
    return None


def known_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the configuration, sections included (`train`, `train.steps`, ...)."""
    keys = []
    for name, info in model.model_fields.items():
        keys.append(prefix + name)
        section = _section_model(info.annotation)
        if section is not None:
            keys.extend(known_keys(section, f"{prefix}{name}."))
    return keys


def is_unknown_key(dotted: str) -> bool:
    """True when a part of `dotted` names no field of the configuration (`bogus`, `trian.steps`, `train.stpes`).
    A key inside a free-form value (`evaluate.gate.task`) is not unknown here: validation decides about it."""
    model: type[BaseModel] | None = RunConfig
    for part in dotted.split("."):
        if model is None:
            return False
        if part not in model.model_fields:
            return True
        model = _section_model(model.model_fields[part].annotation)
    return False


def _field(dotted: str) -> Any:
    """The FieldInfo of a dotted key, or None when it is unknown or lies inside a free-form dict."""
    model: type[BaseModel] | None = RunConfig
    info = None
    for part in dotted.split("."):
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = _section_model(info.annotation)
    return info


def _from_flag(key: str, value: Any) -> Any:
    """Comma-separated text given to a list-typed key becomes a list (`mmlu,arc_easy`, or one name alone); a key
    that also takes a string (`lora.target_modules`) is split only at commas."""
    info = _field(key)
    if info is None or not isinstance(value, str):
        return value
    annotation = info.annotation
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    if not any(o is list or get_origin(o) is list for o in options):
        return value
    if str in options and "," not in value:
        return value
    return [item.strip() for item in value.split(",") if item.strip()]


# Names users bring from transformers' TrainingArguments / TRL configs, which spelling similarity would not find.
TRAINER_ARGUMENT_NAMES = {
    "learning_rate": "lr", "max_steps": "steps", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "schedule", "warmup": "warmup_steps",
    "max_completion_length": "max_new_tokens", "max_seq_length": "max_length",
}


def did_you_mean(dotted: str, *, flag: bool = False) -> str:
    """' (did you mean train.steps?)' for the closest known keys of an unknown one, or ''."""
    keys = known_keys()
    section, _, last = dotted.rpartition(".")
    alias = TRAINER_ARGUMENT_NAMES.get(last)
    aliased = [k for k in keys if alias and k.rsplit(".", 1)[-1] == alias]
    close = ([k for k in aliased if k.startswith(section + ".")] or aliased)[:4]
    if not close:
        close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
        if "." not in dotted or not close:  # `--steps` for `--train.steps`: the (nearly) same last part in a section
            leaves = {k: k.rsplit(".", 1)[-1] for k in keys}
            near = difflib.get_close_matches(last, sorted(set(leaves.values())), n=1, cutoff=0.75)
            close = [k for k, leaf in leaves.items() if leaf in near][:4] or close
    dash = "--" if flag else ""
    return f" (did you mean {', '.join(dash + k for k in close)}?)" if close else ""


def _has_path(tree: Any, loc: tuple) -> bool:
    for part in loc:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _flag_behind(loc: tuple, overrides: dict[str, Any], file_raw: dict[str, Any]) -> str | None:
    """The flag an error at `loc` comes from: the flag's key or one inside it, or a key below a section the flag
    created (an unknown section such as `--trian.steps`)."""
    dotted = ".".join(str(p) for p in loc)
    for key in overrides:
        if dotted == key or dotted.startswith(key + "."):
            return key
    for key in overrides:
        if key.startswith(dotted + ".") and not _has_path(file_raw, loc):
            return key
    return None


def _problem(error: dict[str, Any], where: str, overrides: dict[str, Any], file_raw: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    dotted = ".".join(str(p) for p in loc)
    flag = _flag_behind(loc, overrides, file_raw)
    unknown = error["type"] == "extra_forbidden"
    if flag is not None:
        msg = f"unknown key{did_you_mean(flag, flag=True)}" if unknown else _message(error)
        inner = dotted[len(flag) + 1:] if dotted.startswith(flag + ".") else ""
        at = f" (at {inner})" if inner and not inner.isdigit() else ""
        return f"command-line flag --{flag}{at}: {msg}"
    msg = f"unknown key{did_you_mean(dotted)}" if unknown else _message(error)
    return f"{where}: {dotted}: {msg}"


def _message(error: dict[str, Any]) -> str:
    # pydantic prefixes our validators' ValueErrors with "Value error, "; the text after it is the message.
    return str(error["msg"]).removeprefix("Value error, ")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist" if not path.exists() else
                              f"{path} is not a file: give the path of a YAML config")
        try:
            loaded = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if loaded is None or loaded == {}:  # running the embedded defaults is `posttrain demo`, said out loud
            raise ConfigError(f"{path} is empty: a run config sets at least one key, e.g. model, data or method "
                              "(`posttrain demo` runs the embedded default)")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        raw = loaded
    file_raw = copy.deepcopy(raw)
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        try:
            _set_dotted(raw, key, _from_flag(key, value))
        except ConfigError as exc:
            raise ConfigError(f"command-line flag --{key}: {exc}") from None
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        where = f"{path}" if path else "configuration"
        problems = [_problem(e, where, overrides, file_raw) for e in exc.errors()]
        raise ConfigError("; ".join(dict.fromkeys(problems))) from None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

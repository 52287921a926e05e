"""Configuration: YAML in, dotted overrides, unknown keys refused with their path."""

import pytest

from posttrain.config import ConfigError, did_you_mean, load_config, parse_overrides


def test_overrides_are_parsed_as_yaml_scalars():
    assert parse_overrides(["--train.lr", "1e-4", "--method=dpo", "--grpo.num-generations", "4",
                            "--data", "null"]) == {"train.lr": 1e-4, "method": "dpo", "grpo.num_generations": 4,
                                                   "data": None}


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: dpo\ntrain:\n  steps: 3\n")
    cfg = load_config(path, {"train.lr": 0.5, "dpo.beta": 0.2})
    assert (cfg.method, cfg.train.steps, cfg.train.lr, cfg.dpo.beta) == ("dpo", 3, 0.5, 0.2)


def test_unknown_key_is_refused_with_its_dotted_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"train\.stpes"):
        load_config(path)


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"grpo\.num_generations"):
        load_config(None, {"grpo.num_generations": 1})


def test_override_without_value_is_an_error():
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.lr"])


@pytest.mark.parametrize("args, message", [
    # Regression: an unknown flag without a value was reported as "override --bogus has no value".
    (["--bogus"], "command-line flag --bogus: unknown key"),
    (["--train.lr", "1e-4", "--stpes"], "command-line flag --stpes: unknown key (did you mean --train.steps?)"),
    (["--train.stpes"], "command-line flag --train.stpes: unknown key (did you mean --train.steps?)"),
    (["--trian-steps", "--train.lr", "1e-4"], "command-line flag --trian-steps: unknown key (did you mean "
                                              "--train.steps?)"),
    # A known key without a value, also when another flag follows it (that flag is not its value).
    (["--train.steps", "--train.lr", "1e-4"], "override --train.steps has no value (it is followed by the flag "
                                              "--train.lr)"),
    (["--evaluate.gate.task"], "override --evaluate.gate.task has no value"),  # inside a free-form dict: known
])
def test_a_flag_without_a_value_reports_an_unknown_key_first(args, message):
    with pytest.raises(ConfigError) as info:
        parse_overrides(args)
    assert str(info.value) == message


def test_a_value_that_is_not_a_flag_is_still_taken():
    assert parse_overrides(["--train.lr", "-1e-4", "--seed", "-3"]) == {"train.lr": -1e-4, "seed": -3}


def test_packaged_demo_config_is_valid():
    from posttrain.cli import _demo_config_path

    cfg = load_config(_demo_config_path())
    assert cfg.model == "embedded" and cfg.data is None and cfg.method == "auto"


def test_device_resolution():
    import torch

    from posttrain.models.loading import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


# ------------------------------------------------------------------------ errors name their source, early

def _cli(argv, capsys):
    from posttrain.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "run"])
def test_a_flag_typo_is_blamed_on_the_flag_with_the_closest_key(command, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("method: grpo\n")
    argv = [command] + ([str(config)] if command == "run" else []) + ["--train.stpes", "2",
                                                                       "--runs_dir", str(tmp_path / "runs")]
    code, err = _cli(argv, capsys)
    assert code == 2
    assert err == "posttrain: command-line flag --train.stpes: unknown key (did you mean --train.steps?)\n"
    assert not (tmp_path / "runs").exists()


def test_an_unknown_section_or_bare_leaf_flag_suggests_the_full_key():
    with pytest.raises(ConfigError) as info:
        load_config(None, parse_overrides(["--trian.steps", "2"]))
    assert str(info.value) == "command-line flag --trian.steps: unknown key (did you mean --train.steps?)"
    with pytest.raises(ConfigError) as info:
        load_config(None, parse_overrides(["--steps", "2"]))
    assert str(info.value) == "command-line flag --steps: unknown key (did you mean --train.steps?)"


def test_a_bad_flag_value_names_the_flag_not_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: dpo\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, parse_overrides(["--train.steps", "abc"]))
    assert str(info.value) == ("command-line flag --train.steps: Input should be a valid integer, unable to parse "
                               "string as an integer")


def test_an_unknown_key_in_the_yaml_names_the_file_and_the_closest_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, parse_overrides(["--train.lr", "1e-4"]))
    assert str(info.value) == f"{path}: train.stpes: unknown key (did you mean train.steps?)"


@pytest.mark.parametrize("flag,value,expected", [
    ("evaluate.benchmarks", "mmlu,arc_easy", ["mmlu", "arc_easy"]),
    ("evaluate.benchmarks", "mmlu, arc_easy", ["mmlu", "arc_easy"]),
    ("evaluate.benchmarks", "[mmlu, arc_easy]", ["mmlu", "arc_easy"]),
    ("evaluate.benchmarks", "gsm8k", ["gsm8k"]),
    ("compress.fallback", "gguf:q8_0,int8_rtn", ["gguf:q8_0", "int8_rtn"]),
    ("lora.target_modules", "q_proj,v_proj", ["q_proj", "v_proj"]),
    ("lora.target_modules", "all-linear", "all-linear"),  # also a string: split only at commas
])
def test_list_keys_take_comma_separated_flags(flag, value, expected):
    config = load_config(None, parse_overrides([f"--{flag}", value]))
    section, key = flag.split(".")
    assert getattr(getattr(config, section), key) == expected


def test_list_keys_keep_the_yaml_list_syntax(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("evaluate:\n  benchmarks: [mmlu, arc_easy]\ncompress:\n  fallback:\n    - gguf:q8_0\n")
    config = load_config(path)
    assert (config.evaluate.benchmarks, config.compress.fallback) == (["mmlu", "arc_easy"], ["gguf:q8_0"])


KNOWN = "mmlu, arc_easy, arc_challenge, gsm8k, truthfulqa_mc1, truthfulqa_mc2, humaneval, mt_bench"


def test_an_unknown_benchmark_is_refused_when_the_config_is_read(tmp_path, capsys):
    code, err = _cli(["demo", "--evaluate.benchmarks", "[mmluu]", "--runs_dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert err == ("posttrain: command-line flag --evaluate.benchmarks: unknown benchmark 'mmluu' (did you mean "
                   f"'mmlu'?); known: {KNOWN}\n")
    assert not (tmp_path / "runs").exists()
    path = tmp_path / "c.yaml"
    path.write_text("evaluate:\n  benchmarks: [gsm8k, hellaswag]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: evaluate.benchmarks: unknown benchmark 'hellaswag'; known: {KNOWN}"


def test_an_out_of_range_compress_method_is_refused_before_anything_runs(tmp_path, capsys):
    code, err = _cli(["demo", "--compress.method", "prune:width:1.5", "--runs_dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert err == ("posttrain: command-line flag --compress.method: compression method 'prune:width:1.5': expected "
                   "the fraction of FFN neurons to remove, a number in [0, 1), e.g. prune:width:0.25, got '1.5'\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method,expected", [
    ("prune:width:1.5", "the fraction of FFN neurons to remove, a number in [0, 1)"),
    ("prune:width:1", "the fraction of FFN neurons to remove, a number in [0, 1)"),
    ("prune:width:-0.1", "the fraction of FFN neurons to remove, a number in [0, 1)"),
    ("prune:width:half", "the fraction of FFN neurons to remove, a number in [0, 1)"),
    ("prune:magnitude:0", "a sparsity in (0, 1) or an N:M pattern"),
    ("prune:wanda:1.0", "a sparsity in (0, 1) or an N:M pattern"),
    ("prune:magnitude:nan", "a sparsity in (0, 1) or an N:M pattern"),
    ("prune:sparsegpt:4:2", "an N:M pattern with 0 < N < M"),
    ("prune:magnitude:0:4", "an N:M pattern with 0 < N < M"),
    ("prune:wanda:2:x", "an N:M pattern with 0 < N < M"),
    ("prune:depth:0", "a positive whole number of decoder layers to remove"),
    ("prune:depth:1.5", "a positive whole number of decoder layers to remove"),
    ("prune:depth:-1", "a positive whole number of decoder layers to remove"),
])
def test_parse_method_refuses_amounts_no_model_can_take(method, expected):
    from posttrain.compress.api import parse_method

    with pytest.raises(ValueError) as info:
        parse_method(method)
    assert str(info.value).startswith(f"compression method {method!r}: expected {expected}")
    assert str(info.value).endswith(f", got {method.split(':', 2)[2]!r}")


@pytest.mark.parametrize("method,amount", [("prune:width:0", "0"), ("prune:width:0.25", "0.25"),
                                           ("prune:magnitude:0.5", "0.5"), ("prune:wanda:2:4", "2:4"),
                                           ("prune:depth:2", "2")])
def test_parse_method_keeps_valid_amounts(method, amount):
    from posttrain.compress.api import parse_method

    assert parse_method(method).amount == amount


@pytest.mark.parametrize("text", ["", "# nothing set yet\n", "{}\n"])
def test_an_empty_config_file_is_refused_naming_it(text, tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    code, err = _cli(["run", str(path), "--runs_dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert err == (f"posttrain: {path} is empty: a run config sets at least one key, e.g. model, data or method "
                   "(`posttrain demo` runs the embedded default)\n")
    assert not (tmp_path / "runs").exists()


def test_run_notes_name_the_run_config_key_for_the_data_dir(tmp_path, monkeypatch):
    """A benchmark without data says `give --data-dir DIR` (posttrain eval's flag); in a run the note names
    evaluate.data_dir."""
    from posttrain.agents.evaluator import EvaluatorAgent
    from posttrain.config import RunConfig
    from posttrain.evaluate import loglikelihood
    from posttrain.evaluate.harness import BenchmarkUnavailable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(loglikelihood, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(BenchmarkUnavailable) as info:
        loglikelihood.load_hub_split("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test")
    assert "give --data-dir DIR" in str(info.value)  # posttrain eval keeps its flag

    class Ctx:
        notes: list = []

        def publish(self, type, data, **kw):
            self.notes.append(data["text"])

    ctx = Ctx()
    out = {"results": {}, "skipped": {"arc_easy": str(info.value)}, "notes": {}}
    EvaluatorAgent(RunConfig(runs_dir=str(tmp_path)), tmp_path)._publish(ctx, "base", "embedded", out,
                                                                          tmp_path / "s.jsonl")
    assert ctx.notes == ["base: arc_easy not measured: arc_easy: cannot load allenai/ai2_arc (test) from the Hugging "
                         "Face hub: the hub is not reachable (set HF_HUB_OFFLINE=1 to use a cached copy); set "
                         "evaluate.data_dir in the run config (a folder laid out like ../shared/datasets)"]


def test_the_run_seed_seeds_training_unless_train_seed_is_given(tmp_path):
    # Regression: `--seed 1` changed the data split but training kept train.seed 0.
    assert load_config(overrides={"seed": 3}).train.seed == 3
    assert load_config(overrides={"seed": 3, "train.seed": 5}).train.seed == 5
    assert load_config().train.seed == 0
    path = tmp_path / "c.yaml"
    path.write_text("seed: 7\ntrain:\n  steps: 2\n")
    config = load_config(path)
    assert (config.seed, config.train.seed, config.train.steps) == (7, 7, 2)


@pytest.mark.parametrize("key, hint", [
    # transformers/TRL names that spelling similarity misses (train.learning_rate was "did you mean train.min_lr_ratio")
    ("train.learning_rate", " (did you mean train.lr?)"),
    ("dpo.learning_rate", " (did you mean train.lr?)"),  # not in that section: the key wherever it lives
    ("train.gradient_accumulation_steps", " (did you mean train.grad_accum?)"),
    ("grpo.max_completion_length", " (did you mean grpo.max_new_tokens?)"),
    ("train.stpes", " (did you mean train.steps?)"),  # spelling similarity still applies to the rest
])
def test_did_you_mean_knows_trainer_argument_names(key, hint):
    assert did_you_mean(key) == hint


def test_a_yaml_key_named_as_in_transformers_gets_our_name(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"learning_rate.*did you mean train\.lr\?"):
        load_config(path)

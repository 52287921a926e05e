"""Configuration: YAML in, dotted overrides, unknown keys refused with their path."""

import pytest

from posttrain.config import ConfigError, load_config, parse_overrides


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

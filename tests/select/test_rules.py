"""Method selection: by data kind, by memory, explicit choices win and warn when they do not fit."""

import pytest

from posttrain.select.rules import Machine, select_method, training_bytes

GIB = 2**30


def test_kinds_map_to_methods():
    m = Machine(ram_bytes=24 * GIB, cuda_devices=0, gpu_bytes=0)
    assert select_method("verifiable", 100, 10**6, m).method == "grpo"
    assert select_method("preference", 100, 10**6, m).method == "dpo"
    assert select_method("unpaired", 100, 10**6, m).method == "kto"
    assert select_method("sft", 100, 10**6, m).method == "sft"


def test_pairs_fall_back_to_reference_free_simpo_when_the_reference_does_not_fit():
    params = 10**9  # 4 GB per fp32 copy: 4 copies = 16 GB fit, 5 copies = 20 GB do not fit in 18 GB
    m = Machine(ram_bytes=18 * 10**9, cuda_devices=0, gpu_bytes=0)
    choice = select_method("preference", 1000, params, m)
    assert choice.method == "simpo" and choice.runner_up == "orpo"
    assert "does not fit" in choice.rationale and "reference-free" in choice.rationale
    assert f"{training_bytes(params, True) / 2**20:.1f} MiB" in choice.rationale


def test_lora_keeps_dpo_because_the_reference_is_the_base_with_adapters_off():
    m = Machine(ram_bytes=18 * 10**9, cuda_devices=0, gpu_bytes=0)
    choice = select_method("preference", 1000, 10**9, m, lora=True)
    assert choice.method == "dpo" and "adapters disabled" in choice.rationale


def test_explicit_method_wins_and_a_kind_mismatch_is_refused_early():
    m = Machine(ram_bytes=24 * GIB, cuda_devices=0, gpu_bytes=0)
    choice = select_method("preference", 10, 10**6, m, explicit="ipo")
    assert choice.method == "ipo" and choice.explicit and "explicitly" in choice.rationale
    assert select_method("preference", 10, 10**6, m, explicit="kto").method == "kto"  # pairs are unpaired for KTO
    with pytest.raises(ValueError, match="DPO trains on 'preference' data but this data is 'verifiable'"):
        select_method("verifiable", 10, 10**6, m, explicit="dpo")


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        select_method("preference", 10, 10, Machine(GIB, 0, 0), explicit="magic")


@pytest.mark.parametrize("kind", ["verifiable", "preference", "unpaired", "sft"])
@pytest.mark.parametrize("ram", [24 * GIB, 18 * 10**9])
def test_a_runner_up_is_always_a_method_that_runs_on_the_data(kind, ram):
    """The report names the runner-up: it must be a method `method:` accepts and that trains on this data kind
    (GRPO's runner-up was 'ppo', which posttrain does not have)."""
    from posttrain.config import RunConfig
    from posttrain.select.rules import METHOD_KINDS

    choice = select_method(kind, 1000, 10**9, Machine(ram_bytes=ram, cuda_devices=0, gpu_bytes=0))
    if choice.runner_up is not None:
        assert kind in METHOD_KINDS[choice.runner_up] and choice.runner_up != choice.method
        assert RunConfig(method=choice.runner_up).method == choice.runner_up
    expected = {"verifiable": None, "preference": "simpo" if ram == 24 * GIB else "orpo", "unpaired": None,
                "sft": None}
    assert choice.runner_up == expected[kind]
    if kind == "verifiable":
        assert "no runner-up" in choice.rationale

"""LUQConfig: the run's fields and one part per allocation, validated once; flat keywords reach the parts."""

import dataclasses

import pytest

import luq
from luq.config import PARTS, EntropyConfig, LUQConfig, MeasuredConfig
from luq.errors import LuqError


def test_flat_keywords_build_the_same_config_as_the_parts():
    flat = LUQConfig(formats=("gptq4-g128", "gptq3-g128"), sensitivity_samples=4, budget_gb=0.1)
    nested = LUQConfig(measured=MeasuredConfig(formats="gptq4-g128,gptq3-g128", sensitivity_samples=4),
                       budget_gb=0.1)
    assert flat == nested
    assert flat.measured.formats == ("gptq4-g128", "gptq3-g128") and flat.formats == flat.measured.formats
    assert flat.entropy == EntropyConfig()   # the other allocation's part keeps its defaults
    assert luq.LUQConfig is LUQConfig and luq.MeasuredConfig is MeasuredConfig and luq.EntropyConfig is EntropyConfig


def test_the_entropy_part_holds_the_papers_knobs_and_the_menu_follows_the_allocation():
    config = LUQConfig(allocate="entropy", n_low_layers=2, order=[3, 0, 1], high="gptq4-g64", low="billm-k5g64r")
    assert config.entropy == EntropyConfig(high="gptq4-g64", low="billm-k5g64r", order=(3, 0, 1), n_low_layers=2)
    assert config.menu() == ("gptq4-g64", "billm-k5g64r") and config.unit_menu() == ("gptq4-g64",)
    assert config.to_json()["entropy"]["order"] == [3, 0, 1]


def test_replace_takes_flat_and_part_fields():
    config = LUQConfig(formats=("gptq4-g128",))
    changed = dataclasses.replace(config, budget_gb=0.2, formats=("gptq4-g128", "gptq2-g128"))
    assert changed.budget_gb == 0.2 and changed.measured.formats == ("gptq4-g128", "gptq2-g128")
    assert config.measured.formats == ("gptq4-g128",)   # frozen: the original is unchanged


def test_no_part_field_shadows_a_run_field_or_another_parts():
    run = {f.name for f in dataclasses.fields(LUQConfig)}
    seen = set()
    for part in PARTS.values():
        names = {f.name for f in dataclasses.fields(part)}
        assert not names & run and not names & seen
        seen |= names


@pytest.mark.parametrize("given, says", [
    (dict(colour="red", budget_gb=1), "no field colour"),
    (dict(measured=EntropyConfig(), budget_gb=1), "takes a MeasuredConfig"),
    (dict(formats=("gptq9-g7",), budget_gb=1), "unknown format 'gptq9-g7'"),
    (dict(sensitivity_samples=0, budget_gb=1), "--sensitivity-samples must be positive"),
    (dict(allocate="entropy", order="sideways", n_low_layers=1), "--order must be one of"),
    (dict(allocate="entropy", order=(1, 1), n_low_layers=1), "at most once"),
    (dict(allocate="entropy", kmeans_clusters=1, n_low_layers=1), "--kmeans-clusters must be at least 2"),
    (dict(allocate="entropy", formats=("gptq4-g128",), n_low_layers=1), "--allocate entropy takes --high"),
    (dict(n_low_layers=3), "use it with --allocate entropy"),
    (dict(budget_gb=1, max_drop=0.1), "give exactly one of"),
    (dict(), "give exactly one of"),
])
def test_bad_fields_are_refused_in_one_line(given, says):
    with pytest.raises(LuqError, match=says.replace("(", r"\(")) as caught:
        LUQConfig(**given)
    assert "\n" not in str(caught.value)


def test_an_unknown_flat_read_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no field 'colour'"):
        LUQConfig(budget_gb=1).colour

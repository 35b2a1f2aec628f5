"""The typed YAML loader: every key and type checked, typos answered with a suggestion."""
from dataclasses import dataclass, field
from typing import Literal

import pytest

from cellavie_hpc.config import apply_overrides, from_mapping, load_yaml, to_mapping
from cellavie_hpc.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    batch_size: int = 8
    precision: Literal["fp32", "mixed_float16"] = "fp32"


@dataclass(frozen=True)
class Outer:
    name: str
    rate: float = 1e-3
    inner: Inner = field(default_factory=Inner)
    sizes: list[int] = field(default_factory=list)
    extra: int | None = None


def test_nested_mapping_builds_typed_dataclasses():
    cfg = from_mapping(Outer, {"name": "u", "rate": 1, "inner": {"batch_size": 4}, "sizes": [1, 2]})
    assert cfg == Outer(name="u", rate=1.0, inner=Inner(batch_size=4), sizes=[1, 2])
    assert isinstance(cfg.rate, float)
    assert to_mapping(cfg)["inner"] == {"batch_size": 4, "precision": "fp32"}


def test_typo_in_nested_key_names_path_and_suggests():
    with pytest.raises(ConfigError, match=r"train.yaml.inner: unknown key 'bach_size' \(did you mean 'batch_size'\?\)"):
        from_mapping(Outer, {"name": "u", "inner": {"bach_size": 4}}, "train.yaml")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "u", "inner": {"batch_size": "8"}}, r"cfg.inner.batch_size: expected an integer, got '8'"),
        ({"name": "u", "inner": {"batch_size": True}}, r"expected an integer, got True"),
        ({"name": "u", "inner": {"precision": "fp16"}}, r"'fp16' is not one of 'fp32', 'mixed_float16'"),
        ({"name": "u", "sizes": [1, "x"]}, r"cfg.sizes\[1\]: expected an integer"),
        ({"rate": 0.1}, r"missing required key 'name'"),
        ({"name": 3}, r"cfg.name: expected a string"),
    ],
)
def test_bad_values_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(Outer, data, "cfg")


def test_optional_accepts_none_and_value():
    assert from_mapping(Outer, {"name": "u", "extra": None}).extra is None
    assert from_mapping(Outer, {"name": "u", "extra": 3}).extra == 3


def test_overrides_parse_yaml_scalars_and_do_not_mutate_input():
    base = {"inner": {"batch_size": 8}}
    out = apply_overrides(base, ["inner.batch_size=16", "inner.precision=mixed_float16", "name=x"])
    assert out == {"inner": {"batch_size": 16, "precision": "mixed_float16"}, "name": "x"}
    assert base == {"inner": {"batch_size": 8}}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(base, ["inner.batch_size"])


def test_load_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_yaml(listing)
    with pytest.raises(ConfigError, match="cannot read .*missing.yaml"):
        load_yaml(tmp_path / "missing.yaml")

"""Config loading: overlays, --set overrides, strict validation with key paths."""

import dataclasses

import pytest
import yaml

from jaxlab.training import ConfigError, RunConfig, load_config
from jaxlab.training.config import apply_set, deep_merge, from_dict, load_yaml, to_dict


@pytest.fixture
def base(tmp_path):
    p = tmp_path / "base.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "train": {"steps": 10}, "task": {"name": "flow_matching"}}))
    return p


def test_overlay_and_set_order(tmp_path, base):
    ov1 = tmp_path / "ov1.yaml"
    ov1.write_text(yaml.safe_dump({"train": {"steps": 20, "log_every": 5}, "mesh": {"fsdp": 2}}))
    ov2 = tmp_path / "ov2.yaml"
    ov2.write_text(yaml.safe_dump({"train": {"steps": 30}}))
    cfg = load_config(base, overlays=[ov1, ov2], sets=["optim.learning_rate=3e-4", "task.options.sample_steps=7"])
    assert cfg.train.steps == 30  # later overlay wins
    assert cfg.train.log_every == 5  # earlier overlay's other keys survive (deep merge)
    assert cfg.mesh.fsdp == 2
    assert cfg.optim.learning_rate == pytest.approx(3e-4)
    assert cfg.task.options == {"sample_steps": 7}
    assert cfg.name == "x"


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["train.stepz=3"], "unknown key train.'stepz'"),
        (["train.steps=abc"], "train.steps: expected an int"),
        (["train.steps=1.5"], "train.steps: expected an int"),
        (["optim.name=lion"], "optim.name: unknown method 'lion'; registered: ['adam', 'adamw'"),
        (["optim.options.switch_epz=1"], "unknown key optim.options.'switch_epz': no registered method takes it"),
        (["train.progress=3"], "train.progress: expected a bool"),
        (["task.options.sample_stepz=3"], "task.options.'sample_stepz'"),
        (["task.options.sample_steps=0"], "sample_steps must be >= 1"),
        (["model.options.hidden=x"], "model.options.hidden: expected an int"),
        (["task.name=nope"], "task.name: unknown task 'nope'"),
        (["data=3"], "data: expected a mapping"),
    ],
)
def test_errors_name_the_key_path(base, sets, needle):
    with pytest.raises(ConfigError) as e:
        load_config(base, sets=sets)
    assert needle in str(e.value)


def test_bad_set_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_set({}, "train.steps")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_int_accepted_for_float_and_roundtrip():
    cfg = from_dict(RunConfig, {"optim": {"learning_rate": 1}, "mesh": {"ici": [1, 4, 1]}})
    assert isinstance(cfg.optim.learning_rate, float)
    again = from_dict(RunConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


def test_deep_merge_is_pure():
    a = {"x": {"y": 1, "z": 2}}
    b = deep_merge(a, {"x": {"y": 5}})
    assert a == {"x": {"y": 1, "z": 2}} and b == {"x": {"y": 5, "z": 2}}


def test_required_field_missing():
    @dataclasses.dataclass
    class Need:
        k: int

    with pytest.raises(ConfigError, match="opts.k: required key is missing"):
        from_dict(Need, {}, "opts")


def test_exponent_floats_without_a_dot_are_numbers():
    """``1e-3`` is a float in config files and ``--set`` (PyYAML alone, YAML 1.1, reads it as a string, which
    free-form experiment configs pass on unvalidated, e.g. into ``step_adamw(switch_eps="3e-8")``)."""
    assert isinstance(yaml.safe_load("1e-3"), str)  # the trap this guards against
    assert apply_set({"step": {"t_min": 1}}, "step.switch_eps=3e-8") == {"step": {"t_min": 1, "switch_eps": 3e-8}}
    got = load_yaml("a: 5e-9\nb: -2E+3\nc: 1.0e-8\nd: 7\ne: 1_000\nf: e5\ng: 1e\nh: '1e-3'\ni: .5\nj: 1.5")
    assert got == {"a": 5e-9, "b": -2000.0, "c": 1e-8, "d": 7, "e": 1000, "f": "e5", "g": "1e", "h": "1e-3",
                   "i": 0.5, "j": 1.5}
    assert [type(got[k]) for k in "abdefh"] == [float, float, int, int, str, str]

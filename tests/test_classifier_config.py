"""The classifier methods' configs are typed as the LLM methods' are (``methods.settings``):
every field refuses the values its type rules out with a one-line SettingError naming it, when
the method is made; unknown settings are refused; ``describe`` lists every setting."""

from __future__ import annotations

import dataclasses

import pytest

from unlearn_kernels.classifier import SmallCNN, registry
from unlearn_kernels.errors import UserError
from unlearn_kernels.methods.settings import SettingError, describe, field_description
from conftest import bad_values


def _bad(config_class, name: str) -> list:
    """The values ``test_config`` derives from the field's type; a string field refuses a number."""
    return bad_values(config_class, name) or [5]


CASES = [(method, f.name, value) for method, cls in registry.items() for f in dataclasses.fields(cls.config_class)
         for value in _bad(cls.config_class, f.name)]


def test_the_cases_cover_every_field():
    for method, cls in registry.items():
        assert {f.name for f in dataclasses.fields(cls.config_class)} == {n for m, n, _ in CASES if m == method}


@pytest.mark.parametrize("method, name, value", CASES, ids=[f"{m}.{n}={v!r}" for m, n, v in CASES])
def test_every_setting_refuses_bad_values_naming_itself(method, name, value):
    cls = registry[method]
    with pytest.raises(SettingError) as raised:
        cls(SmallCNN(width=4, feature_dim=8), **{name: value})
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and len(message.splitlines()) == 1, message
    assert message.startswith(f"setting {name} ") and raised.value.field == name, message
    with pytest.raises(SettingError, match=f"setting {name} "):   # an assignment is checked the same way
        setattr(cls.config_class(), name, value)


@pytest.mark.parametrize("method, settings, words", [
    ("RL", dict(epochs=0), "setting epochs must be >= 1, got 0"),
    ("RL", dict(lr=0.0), "setting lr must be > 0, got 0.0"),
    ("RL", dict(stop_at_forget_acc=2.0), "setting stop_at_forget_acc must be in [0, 1], got 2.0"),
    ("NegGrad+", dict(beta=float("inf")), "setting beta is not a finite number: inf"),
    ("SalUn", dict(fraction=0.0), "setting fraction must be in (0, 1], got 0.0"),
    ("MeGU", dict(oracle="llm"), "setting oracle must be auto, embedding, confusion or a callable"),
    ("MeGU", dict(noise_penalty=float("nan")), "setting noise_penalty is not a finite number: nan"),
    ("CMF-RL", dict(head_data="forget"), "setting head_data must be all or retain, got 'forget'"),
    ("CMF-RL", dict(center="median"), "setting center must be classes or samples, got 'median'"),
    ("CMF-NegGrad+", dict(convert_epochs=-1), "setting convert_epochs must be >= 0, got -1"),
    ("Retrain", dict(fraction=0.5), "Retrain has no setting fraction; its settings: epochs=30"),
    ("MeGU", dict(oracles="auto"), "MeGU has no setting oracles (did you mean oracle?)"),
])
def test_the_table_of_bad_settings(method, settings, words):
    with pytest.raises(SettingError) as raised:
        registry[method](SmallCNN(width=4, feature_dim=8), **settings)
    assert words in str(raised.value) and len(str(raised.value).splitlines()) == 1


def test_a_config_object_and_overrides():
    cls = registry["NegGrad+"]
    method = cls(SmallCNN(width=4, feature_dim=8), cls.config_class(beta=0.5), epochs="2", lr="1e-2")
    assert (method.config.beta, method.config.epochs, method.config.lr) == (0.5, 2, 1e-2)
    assert registry["Retrain"].config_class().epochs == 30 and registry["CMF-NegGrad+"].config_class().beta == 0.9


@pytest.mark.parametrize("name", list(registry))
def test_describe_lists_every_setting_with_its_description(name):
    text = describe(registry[name])
    config_class = registry[name].config_class
    for f in dataclasses.fields(config_class):
        meaning = field_description(config_class, f.name)
        assert meaning, (name, f.name)
        assert any(line.startswith(f"| {f.name} | ") and line.endswith(f" | {meaning} |")
                   for line in text.splitlines()), (name, f.name)

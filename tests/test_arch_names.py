"""Architecture names: every one is written literally in fairseq_smoe/models/, and each still sets the defaults it did.

tests/data/arch_namespaces.json was written by the registration code of commit cd217f3, before the names became a
literal table (the loops over variants x sizes): for every registered name, the Namespace its architecture function makes from
an empty Namespace and from one holding user overrides. The table must reproduce both exactly.
"""

import argparse
import json
import re
from pathlib import Path

import pytest

import fairseq_smoe  # noqa: F401  (registers the models and architectures)
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY
from fairseq_smoe.models import s2t_lmoe, s2t_smoe

MODELS_DIR = Path(fairseq_smoe.__file__).parent / "models"
FIXTURE = Path(__file__).parent / "data" / "arch_namespaces.json"
OURS = ("s2t_smoe", "s2t_lmoe")


def registered():
    return sorted(name for name, model in ARCH_MODEL_NAME_REGISTRY.items() if model in OURS)


def test_every_registered_name_is_written_literally_in_models():
    source = "\n".join(p.read_text() for p in sorted(MODELS_DIR.glob("*.py")))
    names = registered()
    assert len(names) == 26  # 5 S-MoE and 3 learned-gate variants x 3 sizes, plus the two generic model names
    missing = [n for n in names if not re.search(rf"[\"']{re.escape(n)}[\"']", source)]
    assert missing == [], f"architecture names registered but not written in fairseq_smoe/models/: {missing}"


@pytest.mark.parametrize("module", [s2t_smoe, s2t_lmoe], ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_each_table_name_ends_with_its_size(module):
    suffix = {"paper": "", "s": "_s", "xs": "_xs"}
    assert set(suffix) == set(s2t_smoe.SIZES)
    for name, (size, _) in module.ARCH_TABLE.items():
        stem = name[: len(name) - len(suffix[size])] if suffix[size] else name
        assert name == stem + suffix[size] and not stem.endswith(("_s", "_xs")), (name, size)
    assert sorted(module.ARCHITECTURES) == sorted(module.ARCH_TABLE)


def test_registered_names_are_those_of_the_fixture():
    expected = json.loads(FIXTURE.read_text())["architectures"]
    assert registered() == sorted(expected)
    assert {n: ARCH_MODEL_NAME_REGISTRY[n] for n in registered()} == {n: e["model"] for n, e in expected.items()}


@pytest.mark.parametrize("name", sorted(json.loads(FIXTURE.read_text())["architectures"]))
def test_architecture_sets_the_same_namespace_as_before(name):
    fixture = json.loads(FIXTURE.read_text())
    expected = fixture["architectures"][name]
    for key, preset in (("defaults", {}), ("with_overrides", fixture["overrides"])):
        args = argparse.Namespace(**preset)
        ARCH_CONFIG_REGISTRY[name](args)
        # through JSON as the fixture was, so tuples/lists compare alike
        assert json.loads(json.dumps(dict(sorted(vars(args).items())))) == expected[key], (name, key)

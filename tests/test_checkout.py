"""A tool of one checkout refuses to run another checkout's ocz_d2."""

from pathlib import Path

import pytest

import ocz_d2
from ocz_d2.utils.checkout import check_same_checkout

REPO = Path(__file__).resolve().parents[1]


def test_own_checkout_passes():
    check_same_checkout(REPO / "tools" / "train_net.py", ocz_d2.__file__)


def test_tool_of_another_checkout_names_both_paths(tmp_path):
    other = tmp_path / "other_clone"
    (other / "ocz_d2").mkdir(parents=True)
    (other / "ocz_d2" / "__init__.py").write_text("")
    (other / "tools").mkdir()
    script = other / "tools" / "train_net.py"
    with pytest.raises(RuntimeError) as err:
        check_same_checkout(script, ocz_d2.__file__)
    assert str(other) in str(err.value) and str(Path(ocz_d2.__file__).parent) in str(err.value)


def test_script_outside_a_checkout_passes(tmp_path):
    check_same_checkout(tmp_path / "scripts" / "mine.py", ocz_d2.__file__)

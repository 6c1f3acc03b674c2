"""Which checkout's code runs: a script of one source checkout must import that checkout's
ocz_d2, not another clone's (several checkouts share one environment, see INSTALL.md)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["check_same_checkout"]


def check_same_checkout(script: str | os.PathLike, package_file: str | os.PathLike) -> None:
    """Raise if ``script`` lies in a source checkout whose ``ocz_d2`` is not the one imported.

    Args:
        script: the running tool, e.g. ``__file__`` of ``tools/train_net.py``.
        package_file: ``ocz_d2.__file__`` of the imported package.

    Raises:
        RuntimeError: naming both folders, when the script's checkout holds an ``ocz_d2``
            package other than the imported one (the imported one may be another clone, or a
            non-editable install); nothing when the script is not in a checkout.
    """
    checkout = Path(script).resolve().parents[1]
    imported = Path(package_file).resolve().parent
    own = checkout / "ocz_d2"
    if not (own / "__init__.py").is_file() or own == imported:
        return
    raise RuntimeError(
        f"{Path(script).name} belongs to the checkout {checkout}, but this Python imported "
        f"ocz_d2 from {imported}: it would run other code than the checkout's. Run it with the "
        f"checkout's own interpreter, {checkout / '.venv' / 'bin' / 'python'} (`make setup` "
        f"creates it), or install this checkout: pip install --no-deps -e {checkout}"
    )

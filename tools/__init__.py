"""ocz_d2's command-line tools; run each as a script: ``python tools/<name>.py``.

A package only so that the tests import them (``from tools import train_net``) from the
repository root, which pytest puts first on ``sys.path`` (``pythonpath`` in pyproject.toml):
Detectron2 installs a top-level package of the same name, which would be found otherwise.
"""

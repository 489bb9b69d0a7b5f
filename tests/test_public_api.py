"""The one public door: __all__ matches the exports, and importing stays light."""

from __future__ import annotations

import subprocess
import sys

import asyncckpt


def test_all_lists_exactly_the_public_names():
    public = {name for name in vars(asyncckpt) if not name.startswith("_")}
    assert set(asyncckpt.__all__) == public
    assert len(asyncckpt.__all__) == len(set(asyncckpt.__all__))


def test_import_does_not_pull_in_torch_or_jax():
    code = ("import sys, asyncckpt; "
            "bad = [m for m in ('torch', 'jax', 'ml_dtypes') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

"""The PyTorch path never imports JAX: ``import fcnseg`` and ``fcnseg --help`` stay JAX-free."""
from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
{code}
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax"))
assert not leaked, leaked
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHECK.format(code=code)], capture_output=True, text=True, timeout=120)


def test_import_fcnseg_does_not_import_jax():
    result = _run("import fcnseg, fcnseg.inference.backends, fcnseg.inference.segmenter")
    assert result.returncode == 0, result.stderr


def test_cli_help_does_not_import_jax():
    code = ("from fcnseg.cli import main\n"
            "for argv in (['--help'], ['train', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass")
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "--backend" in result.stdout


def test_without_jax_both_commands_name_the_extra(monkeypatch, tmp_path, capsys):
    """With JAX missing, ``--backend jax`` is a usage error naming ``pip install 'fcnseg[jax]'``."""
    import torch

    from fcnseg.cli import main
    from fcnseg.data.synthetic import make_synthetic
    from fcnseg.errors import OptionError
    from fcnseg.inference.backends import EngineRequest, make_engine

    for name in [m for m in sys.modules if m.startswith("fcnseg.jax_backend")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` now fails as if it were not installed
    root = make_synthetic(tmp_path / "data", num_classes=3, n=5, size=(32, 32), seed=0, progress=False)
    status = main(["train", "--backend", "jax", "--root", str(root), "--out", str(tmp_path / "run"),
                   "--weights-backbone", "none", "--no-progress"])
    assert status == 2
    assert "--backend jax needs the package 'jax': pip install 'fcnseg[jax]'" in capsys.readouterr().err
    try:
        make_engine("jax", EngineRequest(torch.nn.Identity(), torch.device("cpu"), None))
    except OptionError as err:
        assert "pip install 'fcnseg[jax]'" in str(err)
    else:
        raise AssertionError("make_engine('jax') built an engine without JAX")

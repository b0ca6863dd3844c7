"""The error taxonomy (rtlib/errors.py): one base class carrying the CLI's exit code, the old
import locations still naming the same classes, and the exit codes `rtlib.cli.main` returns."""

import importlib
import inspect
from pathlib import Path

import pytest

from rtlib import errors
from rtlib.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "specs" / "tiny.yaml")

DEFINED = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
           if issubclass(cls, BaseException) and cls.__module__ == errors.__name__]

# Where each error could be imported from before rtlib.errors existed; code written against
# those locations must keep working.
OLD_LOCATIONS = [
    ("rtlib.data.store", "StoreError"),
    ("rtlib.spec.load", "SpecError"),
    ("rtlib.train.checkpoint", "CheckpointError"),
    ("rtlib.train.run_dir", "RunError"),
    ("rtlib.parallel", "MeshError"),
    ("rtlib.parallel", "DistributedError"),
    ("rtlib.data.sources", "SourceError"),
    ("rtlib.train.loop", "NonFiniteLoss"),
    ("rtlib", "SpecError"),
]


def test_every_error_derives_from_rtlib_error_and_has_an_exit_code():
    assert errors.RtlibError in DEFINED and len(DEFINED) > 1
    for cls in DEFINED:
        assert issubclass(cls, errors.RtlibError), cls
        assert type(cls.exit_code) is int and cls.exit_code > 0, cls
    codes = {cls.exit_code for cls in DEFINED}
    assert codes <= {errors.EXIT_ERROR, errors.EXIT_USAGE, errors.EXIT_NON_FINITE}


@pytest.mark.parametrize("module, name", OLD_LOCATIONS, ids=lambda x: x)
def test_old_import_locations_name_the_same_classes(module, name):
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_cli_exit_codes(tmp_path, capsys):
    # usage errors: 2
    assert main(["validate", str(tmp_path / "missing.yaml")]) == errors.EXIT_USAGE == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["validate", TINY, "model.n_layers=zero"]) == 2
    assert "model.n_layers" in capsys.readouterr().err
    # a data problem: 1, before anything is built or trained
    assert main(["train", TINY, f"data.path={tmp_path / 'nodata'}",
                 f"run.dir={tmp_path / 'run'}", "mesh.data=1", "--no-progress"]) == 1
    assert "no token store here" in capsys.readouterr().err


def test_another_package_named_kernels_is_refused_clearly(tmp_path):
    """`kernels` is a generic top-level name: if another package of that name comes first on
    the path, importing rtlib says so instead of failing deep inside an import."""
    import subprocess
    import sys

    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    proc = subprocess.run([sys.executable, "-c", "import rtlib"], capture_output=True, text=True,
                          env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
                          cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "is not rtlib's Pallas kernels" in proc.stderr
    assert str(tmp_path / "kernels") in proc.stderr

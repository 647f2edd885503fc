"""`geobp --help` and `geobp VERB --help` answer without importing torch or Lightning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from geobp.cli import COMMANDS, LIGHTNING_VERBS, VERBS
from geobp.cli import helpcache

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``python -c CODE`` from the repository with its own help cache and a fixed terminal width."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "COLUMNS": "100",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


NO_TORCH = (
    "import sys\n"
    "bad = [m for m in ('torch', 'lightning', 'lightning.pytorch') if m in sys.modules]\n"
    "assert not bad, bad\n"
)


def test_help_pages_of_the_argparse_verbs_do_not_import_torch(tmp_path):
    code = (
        "import contextlib, io, sys\n"
        "from geobp.cli import main, COMMANDS\n"
        + NO_TORCH +
        "pages = {}\n"
        "for argv in [['--help'], *[[verb, '--help'] for verb in COMMANDS], ['infer', '-h']]:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            code = main(argv)\n"
        "        except SystemExit as stop:\n"
        "            code = stop.code\n"
        "    assert code in (0, None), (argv, code)\n"
        "    pages[' '.join(argv)] = out.getvalue()\n"
        + NO_TORCH +
        "for name, page in pages.items():\n"
        "    print('=====', name)\n"
        "    print(page)\n"
    )
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "===== --help\nusage: geobp VERB" in proc.stdout
    for verb in COMMANDS:
        assert f"===== {verb} --help\nusage: geobp {verb}" in proc.stdout, verb
    # the choices come from geobp.choices, the same as inference's
    assert "--normalize_on {reader,device}" in proc.stdout and "{32-true,bf16-mixed,16-mixed,32,bf16,16}" in proc.stdout
    assert "`geobp fit --help`" in proc.stdout  # check's page points to the data options


@pytest.mark.slow
def test_fit_help_is_cached_and_the_second_call_imports_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from geobp.cli import main\n"
        "assert main(['fit', '--help']) == 0\n"
        "print('TORCH', 'torch' in sys.modules, 'lightning' in sys.modules)\n"
    )
    first = run_python(code, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "TORCH True True" in first.stdout  # built by LightningCLI
    assert "--data.label_map" in first.stdout and "--trainer.max_epochs" in first.stdout
    cached = list((tmp_path / "cache" / "geobp").glob("help-fit-*.txt"))
    assert len(cached) == 1
    second = run_python(code, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "TORCH False False" in second.stdout
    assert second.stdout.replace("TORCH False False", "") == first.stdout.replace("TORCH True True", "")


def test_the_help_cache_is_rebuilt_when_its_key_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built: list[str] = []

    def build(verb: str) -> str:
        built.append(verb)
        return f"help of {verb} #{len(built)}\n"

    assert helpcache.cached_help("fit", build, key="aaaa") == "help of fit #1\n"
    assert helpcache.cached_help("fit", build, key="aaaa") == "help of fit #1\n"  # from the cache
    assert built == ["fit"]
    assert helpcache.cached_help("fit", build, key="bbbb") == "help of fit #2\n"  # a stale key: built again
    assert built == ["fit", "fit"]
    assert [p.name for p in (tmp_path / "cache" / "geobp").iterdir()] == ["help-fit-bbbb.txt"]  # the stale page is gone
    assert helpcache.cached_help("test", build, key="bbbb") == "help of test #3\n"  # one page per verb


def test_the_help_key_follows_sources_versions_and_width(tmp_path, monkeypatch):
    src = tmp_path / "pkg"
    src.mkdir()
    module = src / "a.py"
    module.write_text("x = 1\n")
    key = helpcache.help_key("fit", src, columns=100)
    assert helpcache.help_key("fit", src, columns=100) == key
    assert helpcache.help_key("validate", src, columns=100) != key
    assert helpcache.help_key("fit", src, columns=120) != key
    module.write_text("x = 12\n")  # another size
    changed = helpcache.help_key("fit", src, columns=100)
    assert changed != key
    os.utime(module, ns=(1, 1))  # another modification time
    assert helpcache.help_key("fit", src, columns=100) != changed
    changed = helpcache.help_key("fit", src, columns=100)
    monkeypatch.setattr(helpcache, "_version", lambda package: "9.9" if package == "jsonargparse" else "1.0")
    assert helpcache.help_key("fit", src, columns=100) != changed
    changed = helpcache.help_key("fit", src, columns=100)
    monkeypatch.setattr(helpcache.geobp, "__version__", "99.0")
    assert helpcache.help_key("fit", src, columns=100) != changed


def test_the_help_cache_lives_under_xdg_cache_home_or_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert helpcache.cache_dir() == tmp_path / "xdg" / "geobp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert helpcache.cache_dir() == tmp_path / "home" / ".cache" / "geobp"


def test_the_verb_table_names_modules_and_functions_that_exist():
    import importlib

    assert set(LIGHTNING_VERBS) | set(COMMANDS) == set(VERBS)
    for verb, entry in VERBS.items():
        module, _, function = entry.target.partition(":")
        mod = importlib.import_module(module)
        assert callable(getattr(mod, function)), verb
        if verb in COMMANDS:
            assert mod.build_parser().prog == f"geobp {verb}"

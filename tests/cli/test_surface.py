"""The command line as a user meets it: the help page, the verbs, the shipped configs, no noise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from geobp.cli import COMMANDS, DEMO_CONFIG, VERBS, GeobpCLI, main

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_help_lists_every_verb_with_a_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    verbs = {*COMMANDS, *GeobpCLI.subcommands()}
    assert verbs == set(VERBS) == {"fit", "validate", "test", "infer", "vectorize", "export", "check", "report", "synth", "demo", "weights"}
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(lines) == verbs and all(len(line.split()) > 2 for line in lines.values())
    assert main([]) == 2 and "verbs:" in capsys.readouterr().out  # no verb: the same page, and a failure


def test_predict_is_not_a_verb_and_says_what_to_use(capsys):
    assert main(["predict", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "`geobp predict` is not a geobp verb" in err and "geobp infer" in err and "Traceback" not in err
    assert main(["fitt"]) == 2
    assert "unknown verb 'fitt'" in capsys.readouterr().err


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(config, capsys):
    """A renamed or removed option breaks the shipped configs: --print_config parses every key."""
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), "--print_config"])
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    original = yaml.safe_load(config.read_text())
    for section in ("trainer", "model", "data"):
        for key, value in original.get(section, {}).items():
            if not isinstance(value, (dict, list)):
                assert printed[section][key] == value, (config.name, section, key)


def test_demo_config_ships_inside_the_package():
    assert DEMO_CONFIG.is_file() and DEMO_CONFIG.parent.parent.name == "geobp"
    assert (REPO / "configs" / "demo.yaml").resolve() == DEMO_CONFIG.resolve()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'geobp = ["configs/*.yaml"]' in pyproject  # the wheel carries it


@pytest.mark.slow
def test_demo_runs_with_tiny_settings_and_prints_no_library_noise(tmp_path):
    """`geobp demo` in a subprocess from another folder (as an installed package is run), tiny."""
    cmd = [sys.executable, "-m", "geobp", "demo", "--data", str(tmp_path / "demo"), "--scenes", "3", "--size", "64",
           "--data.tile_size", "32", "--data.tiles_per_epoch", "8", "--data.batch_size", "4",
           "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--trainer.logger.save_dir", str(tmp_path / "runs")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean IoU" in proc.stdout
    assert len(list((tmp_path / "demo" / "images").glob("*.tif"))) == 3
    assert list((tmp_path / "runs" / "demo").rglob("last.ckpt"))
    noise = proc.stdout + proc.stderr
    for phrase in ("LightningCLI's args parameter", "Tip:", "litlogger", "Warning", "warn("):
        assert phrase not in noise, phrase


def test_check_quick(tmp_path, capsys):
    from geobp.data.synth import write_scenes

    write_scenes(tmp_path / "d", scenes=2, size=32, bands=3, classes=2, block_size=16)
    assert main(["check", str(tmp_path / "d"), "--quick", "--num-classes", "2"]) == 0
    assert "2 scenes, 0 unusable" in capsys.readouterr().err


def test_a_mistyped_option_gets_one_usage_line_and_the_closest_names(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--data.tile_sise", "64"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Did you mean --data.tile_size?" in err
    assert len(err.strip().splitlines()) <= 3 and "--trainer.max_epochs" not in err  # not the usage of every option
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  backbone: resnet18\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config)])
    err = capsys.readouterr().err
    assert "'model.backbone'. The options of model are: " in err and "encoder" in err and "class_weights+" not in err


def test_suggestions():
    from geobp.cli.common import suggest

    options = ["data.tile_size", "data.tiles_per_epoch", "model.encoder", "model.lr", "trainer.max_epochs"]
    assert suggest("trainer.max_epoch", options) == " Did you mean --trainer.max_epochs?"
    assert suggest("model.encodr", options) == " Did you mean --model.encoder?"
    assert suggest("model.backbone", options) == " The options of model are: encoder, lr."
    assert suggest("nothing", options) == ""


def test_sigterm_in_a_lightning_verb_exits_143_and_other_exits_pass_through(monkeypatch):
    """Lightning stops on SIGTERM with a SystemExit(None), which would read as success; main returns 128 + 15."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import geobp.cli.train as train

    def stopped(argv):
        raise SIGTERMException()

    monkeypatch.setattr(train, "lightning", stopped)
    assert main(["fit", "--config", "x.yaml"]) == 143

    def usage_error(argv):
        raise SystemExit(2)

    monkeypatch.setattr(train, "lightning", usage_error)
    with pytest.raises(SystemExit) as stop:
        main(["validate"])
    assert stop.value.code == 2

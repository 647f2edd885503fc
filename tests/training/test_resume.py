"""Resume with the same command: a run killed mid-epoch continues exactly where it stopped.

The runs use the settings of ``configs/cluster.yaml`` that make resuming work (``ckpt_path: last``,
a fixed logger version, a periodic ``last.ckpt`` every N steps, the CLI's checkpoint overwriting
the same ``last.ckpt``), on the CPU with a tiny model. ``python -m geobp fit`` runs in
subprocesses, is stalled at a step (``tests.ddp_helpers.StallAt``) and killed there, then the same
command is run again. Three cases: SIGKILL mid-epoch after a periodic save; SIGKILL just after an
epoch, whose last.ckpt is the one the validation wrote; and the time limit under
``scripts/slurm/train.sbatch`` (SIGTERM to the task, save at the next batch end, requeue).

What is equal, bit for bit, to a run that was never interrupted (``augment: true``,
``num_workers: 0``): the tiles of every step, their flips and rotations, the global step, the
weights, AdamW's state and the OneCycle scheduler's state. Four things make that so:

- the training DataLoader is resumable (:class:`~geobp.data.loader.ResumableTileLoader`): a
  plain DataLoader restarts the epoch's iterator and the resumed run trains on the epoch's first
  batches a second time (Lightning warns about it);
- tiles are drawn from (seed, epoch) alone, with the trainer's ``current_epoch``: after resuming
  from a checkpoint written by an epoch-end validation, Lightning 2.6 passes ``set_epoch`` a number
  one higher than the uninterrupted run did;
- each tile's augmentation is seeded by a number drawn with the tile (``TileSpec.aug_seed``), not
  by the generator of the process that reads it, whose state no checkpoint holds;
- nothing else in training draws random numbers (no dropout; the torch RNG, which Lightning does
  not checkpoint, is only used for DataLoader worker seeds).

Also not restored (Lightning keeps no metrics in checkpoints): logged metrics of the interrupted
epoch, so the resumed run's epoch-level ``train/*`` values cover only the batches after the
resume point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from geobp.data import GeoTiffDataModule
from geobp.data.synth import write_scenes

# one xdist worker runs this module: its module-scoped runs are made once, not once per worker
pytestmark = pytest.mark.xdist_group("resume")

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = {"encoder": "resnet18", "model_kwargs": {"decoder_channels": [16, 16, 8, 8, 8]}}
MAX_STEPS = 12  # 8 batches per epoch, then 4 more in the second epoch
SAVE_EVERY = 5  # periodic last.ckpt at steps 5 and 10; the CLI's checkpoint writes it at the validation of step 8


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume") / "scenes"
    write_scenes(root, scenes=3, size=64, bands=3, classes=3, block_size=32)
    return root


def resume_config(run_dir: Path, scenes: Path) -> Path:
    """A CPU version of configs/cluster.yaml's resume settings, with the test's recording callbacks."""
    cfg = {
        "seed_everything": 0,
        "ckpt_path": "last",
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": MAX_STEPS,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run_dir / "runs"), "name": "resume", "version": "fixed"},
            },
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"every_n_train_steps": SAVE_EVERY, "save_top_k": 0, "save_last": True,
                               "enable_version_counter": False}},
                # StallAt before RecordTiles: a batch is recorded only once it is going to be trained
                {"class_path": "tests.ddp_helpers.StallAt", "init_args": {"marker": str(run_dir / "stalled")}},
                {"class_path": "tests.ddp_helpers.RecordTiles", "init_args": {"out": str(run_dir / "record")}},
                {"class_path": "tests.ddp_helpers.SaveAtEnd", "init_args": {"path": str(run_dir / "final.ckpt")}},
            ],
        },
        "checkpoint": {"enable_version_counter": False},
        "gradflow": {"write_report": False},  # its matplotlib page costs 6 s a run and has no part in resuming
        "model": {**TINY_MODEL, "scheduler": "onecycle", "lr": 0.002},
        "data": {"root": str(scenes), "num_classes": 3, "tile_size": 32, "tiles_per_epoch": 32, "batch_size": 4,
                 "val_fraction": 0.34, "augment": True, "num_workers": 0},
    }
    path = run_dir / "resume.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def geobp_fit(config: Path, log: Path, stall_at: int | None = None) -> subprocess.Popen:
    """Start ``python -m geobp fit --config CONFIG`` (one thread, so that runs compare bit for bit)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("GEOBP_TEST_STALL_AT", None)
    if stall_at is not None:
        env["GEOBP_TEST_STALL_AT"] = str(stall_at)
    cmd = [sys.executable, "-m", "geobp", "fit", "--config", str(config)]
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"geobp fit did not finish in {timeout} s:\n{log.read_text()[-3000:]}")


def wait_for_stall(proc: subprocess.Popen, run_dir: Path, log: Path) -> None:
    """Wait until the run stalls (see tests.ddp_helpers.StallAt)."""
    deadline = time.monotonic() + 600
    while not (run_dir / "stalled").exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its stall:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no stall within 600 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def last_ckpt(run_dir: Path) -> Path:
    return run_dir / "runs" / "resume" / "fixed" / "checkpoints" / "last.ckpt"


def tiles(run_dir: Path) -> dict[int, list[tuple]]:
    """Tiles of each optimizer step: (epoch, scene, window) of its batch, in order.

    A batch trained again after a kill (its step was done but not yet checkpointed) replaces the
    lost one.
    """
    path = run_dir / "record" / "tiles_rank0.jsonl"
    by_step: dict[int, list[tuple]] = {}
    previous = None
    for r in map(json.loads, path.read_text().splitlines()):
        if (r["pid"], r["step"]) != previous:
            by_step[r["step"]] = []
        by_step[r["step"]].append((r["epoch"], r["scene"], tuple(r["window"])))
        previous = (r["pid"], r["step"])
    return by_step


def assert_same_state(a: dict, b: dict, processed_ahead: int = 0) -> None:
    """Same global step, epochs, weights, optimizer and scheduler state, bit for bit.

    ``processed_ahead``: Lightning's count of processed epochs in ``b`` is this much higher (see
    the epoch-end-validation case); its other epoch counters are equal.
    """
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["epoch"] == b["epoch"]
    pa, pb = a["loops"]["fit_loop"]["epoch_progress"], b["loops"]["fit_loop"]["epoch_progress"]
    for part in ("total", "current"):
        assert pb[part]["processed"] - pa[part]["processed"] == processed_ahead
        assert {**pa[part], "processed": 0} == {**pb[part], "processed": 0}
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"weights differ: {k}"
    (oa,), (ob,) = a["optimizer_states"], b["optimizer_states"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i, state in oa["state"].items():
        for k, v in state.items():
            assert torch.equal(v, ob["state"][i][k]), f"optimizer state differs: param {i} {k}"
    assert a["lr_schedulers"] == b["lr_schedulers"]


def drop_checkpoints(run_dir: Path) -> None:
    """The tiny model's checkpoints are 136 MB each (weights and AdamW moments): do not keep them."""
    for path in [*run_dir.rglob("*.ckpt")]:
        path.unlink()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, scenes):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    config = resume_config(run_dir, scenes)
    log = run_dir / "run.log"
    assert finish(geobp_fit(config, log), log) == 0, log.read_text()[-3000:]
    yield run_dir
    drop_checkpoints(run_dir)


def assert_interrupted_at(run_dir: Path, step: int, loader: dict[str, int]) -> None:
    """last.ckpt holds ``step`` and the training loader's position ``loader``."""
    state = load(last_ckpt(run_dir))
    assert state["global_step"] == step
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [loader]
    assert not (run_dir / "final.ckpt").exists()


def assert_resumed_like(run_dir: Path, log: Path, uninterrupted: Path, processed_ahead: int = 0) -> None:
    text = log.read_text()
    assert "Restored all states from the checkpoint" in text
    assert "dataloader is not resumable" not in text
    assert tiles(run_dir) == tiles(uninterrupted)
    try:
        assert_same_state(load(uninterrupted / "final.ckpt"), load(run_dir / "final.ckpt"), processed_ahead)
    finally:
        drop_checkpoints(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill_at", "saved_step", "loader", "processed_ahead"),
    [
        (10, 10, {"epoch": 1, "batches": 2}, 0),  # mid-epoch: the periodic last.ckpt of step 10
        # Killed at step 9: the newest last.ckpt is the one epoch 0's validation wrote at step 8 (the
        # trained step 8 is lost and done again). Resuming from it, Lightning 2.6 runs epoch 0's end
        # hooks a second time (without batches) and counts that as one more processed epoch: its
        # epoch_progress.processed stays 1 ahead for the rest of the run (and it passes that number
        # to set_epoch, which ResumableTileLoader overrides with current_epoch). All else is equal.
        (9, 8, {"epoch": 0, "batches": 8}, 1),
    ],
    ids=["periodic-mid-epoch", "epoch-end-validation"],
)
def test_sigkill_then_same_command_matches_uninterrupted(tmp_path, scenes, uninterrupted, kill_at, saved_step, loader,
                                                         processed_ahead):
    config = resume_config(tmp_path, scenes)
    log = tmp_path / "interrupted.log"
    proc = geobp_fit(config, log, stall_at=kill_at)
    wait_for_stall(proc, tmp_path, log)
    proc.kill()
    assert finish(proc, log) == -signal.SIGKILL
    assert_interrupted_at(tmp_path, saved_step, loader)

    log = tmp_path / "resumed.log"
    assert finish(geobp_fit(config, log), log) == 0, log.read_text()[-3000:]
    assert_resumed_like(tmp_path, log, uninterrupted, processed_ahead)


# ----- scripts/slurm/train.sbatch, with stand-ins for srun, scancel and scontrol ------------------

FAKE_SLURM = {
    # runs the command on this machine, as one task; records its pid for scancel
    "srun": '#!/bin/bash\necho $$ > "$FAKE_SLURM/srun.pid"\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
    "scancel": '#!/bin/bash\necho "scancel $*" >> "$FAKE_SLURM/calls"\nkill -TERM "$(cat "$FAKE_SLURM/srun.pid")"\n',
    "scontrol": '#!/bin/bash\necho "scontrol $*" >> "$FAKE_SLURM/calls"\n',
    "python": f'#!/bin/bash\nexec {sys.executable} "$@"\n',
}


def sbatch_env(tmp_path: Path, config: Path) -> dict[str, str]:
    """What SLURM gives the batch script of a one-node, one-task job, with fake SLURM commands first on PATH."""
    bin_dir = tmp_path / "fake_slurm"
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "activate").write_text("")
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "geobp-train", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost"}
    return {**os.environ, **slurm, "FAKE_SLURM": str(bin_dir), "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "GEOBP_VENV": str(tmp_path / "venv"), "GEOBP_CONFIG": str(config), "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def sbatch(env: dict[str, str], log: Path, stall_at: int | None = None) -> subprocess.Popen:
    env = {**env, **({"GEOBP_TEST_STALL_AT": str(stall_at)} if stall_at is not None else {})}
    with log.open("ab") as out:
        return subprocess.Popen(["bash", str(REPO / "scripts" / "slurm" / "train.sbatch")], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sbatch_time_limit_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path, scenes, uninterrupted):
    config = resume_config(tmp_path, scenes)
    env = sbatch_env(tmp_path, config)
    calls = tmp_path / "fake_slurm" / "calls"
    log = tmp_path / "job.log"
    job = sbatch(env, log, stall_at=10)
    wait_for_stall(job, tmp_path, log)
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` sends before the time limit
    assert finish(job, log) == 143, log.read_text()[-3000:]  # geobp's status after SIGTERM, passed on
    assert calls.read_text().splitlines() == ["scancel --signal=TERM 4242", "scontrol requeue 4242"]
    # CheckpointOnInterrupt, once the stalled batch is done: step 11, the 3rd batch of epoch 1
    assert_interrupted_at(tmp_path, 11, {"epoch": 1, "batches": 3})

    log = tmp_path / "requeued.log"  # SLURM runs the same script with the same arguments again
    assert finish(sbatch(env, log), log) == 0, log.read_text()[-3000:]
    assert len(calls.read_text().splitlines()) == 2  # finished: not requeued again
    assert_resumed_like(tmp_path, log, uninterrupted)


# ----- the loader on its own (fast) -------------------------------------------------------


def datamodule(scenes: Path, augment: bool) -> GeoTiffDataModule:
    return GeoTiffDataModule(str(scenes), num_classes=3, tile_size=32, tiles_per_epoch=24, batch_size=4,
                             val_fraction=0.34, augment=augment)


def epoch_batches(loader, epoch: int, state: dict | None = None) -> list[dict]:
    if state is not None:
        loader.load_state_dict(state)
    loader.sampler.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("augment", [False, True])
def test_loader_state_resumes_mid_epoch_and_then_goes_on(scenes, augment):
    loader = datamodule(scenes, augment).train_dataloader()
    full = epoch_batches(loader, 3)
    assert len(full) == len(loader) == 6

    it = iter(loader)  # lazy: the epoch is the one set before the first batch, as Lightning does
    loader.sampler.set_epoch(3)
    for _ in range(2):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 2}

    fresh = datamodule(scenes, augment).train_dataloader()  # as in a new process
    rest = epoch_batches(fresh, 3, state)
    assert len(fresh) == 6  # Lightning still counts the whole epoch
    assert len(rest) == 4
    for a, b in zip(rest, full[2:]):
        assert a["scene"] == b["scene"] and torch.equal(a["window"], b["window"])
        assert augment or torch.equal(a["raw"], b["raw"])
    assert fresh.state_dict() == {"epoch": 3, "batches": 6}
    # the next epoch is whole again, and a state saved in another epoch is ignored
    assert len(epoch_batches(fresh, 4)) == 6
    assert len(epoch_batches(fresh, 5, {"epoch": 4, "batches": 3})) == 6


def test_loader_draws_the_trainers_current_epoch_not_the_set_epoch_argument(scenes):
    dm = datamodule(scenes, augment=False)
    expected = [b["window"] for b in epoch_batches(dm.train_dataloader(), 1)]
    loader = dm.train_dataloader()
    loader.current_epoch = lambda: 1  # what GeoTiffDataModule passes: the trainer's current_epoch
    got = [b["window"] for b in epoch_batches(loader, 2)]  # Lightning's set_epoch one ahead after some resumes
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_augmentation_is_the_same_after_resume(scenes):
    # each tile's flips and rotation come from a seed the sampler draws with it, not from the
    # generator of the process that happens to read it
    full = epoch_batches(datamodule(scenes, augment=True).train_dataloader(), 0)
    rest = epoch_batches(datamodule(scenes, augment=True).train_dataloader(), 0, {"epoch": 0, "batches": 2})
    assert len(rest) == len(full) - 2
    assert all(torch.equal(a["raw"], b["raw"]) and torch.equal(a["mask"], b["mask"]) for a, b in zip(rest, full[2:], strict=True))
    plain = epoch_batches(datamodule(scenes, augment=False).train_dataloader(), 0)
    assert not all(torch.equal(a["raw"], b["raw"]) for a, b in zip(full, plain))  # augmentation did act


def test_augmentation_does_not_depend_on_the_worker_that_reads_a_tile(scenes):
    dm = GeoTiffDataModule(str(scenes), num_classes=3, tile_size=32, tiles_per_epoch=24, batch_size=4,
                           val_fraction=0.34, augment=True, num_workers=2)
    workers = epoch_batches(dm.train_dataloader(), 1)
    main_process = epoch_batches(datamodule(scenes, augment=True).train_dataloader(), 1)
    assert all(torch.equal(a["raw"], b["raw"]) for a, b in zip(workers, main_process, strict=True))

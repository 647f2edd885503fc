"""Render stored section results (``<results>/*.json``) as ``BENCHMARKS.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import SECTIONS, fmt

REGENERATE = ".venv/bin/python -m benchmarks run"
GPU_COMMAND = "python benchmarks/gpu.py --out benchmarks/results/gpu.json"

_TITLES = {
    "loading": "1. Training tile loading",
    "training": "2. Training step and gradient-flow monitoring",
    "inference": "3. Inference",
    "readers": "3b. Inference readers: threads and processes against the decode limit",
    "tta": "3c. Test-time augmentation: cost, and accuracy on a real scene",
    "export": "3d. Exported models: ONNX Runtime and TorchScript against the checkpoint",
    "gpu": "6. GPU",
    "labels": "4. Labels on another grid",
    "balance": "5. Rare classes: uniform and balanced tile sampling",
    "startup": "1b. Start-up before the first training step",
    "sources": "4b. Several sources on one grid",
    "imagery": "4c. Several local sources through the data module",
    "remote": "4d. Remote reads: bytes, requests and latency",
    "help": "5b. Command-line help",
    "vectorize": "3e. Polygons of a class map",
}


#: Measurements made outside ``python -m benchmarks`` (profiling in a commit's own run, the demo from a
#: clean clone, a lent GPU): section -> notes, each dated, with where and how as recorded then. They live
#: here, not in ``results/*.json``, so that re-running a section keeps them; BENCHMARKS.md is their one
#: home, and the docs and docstrings link them.
ELSEWHERE: dict[str, list[str]] = {
    "training": [
        "**2026-12-01 and 2026-11-23, the demo** (`bash scripts/run.sh demo` from a clean clone: 8 synthetic "
        "6-band scenes, U-Net ResNet-18, 8 epochs on the CPU): 0.984 mean IoU of the best checkpoint in 5 min 42 s "
        "of training on the otherwise idle 2-core development machine, an Intel Xeon at 2.8 GHz, on 2026-12-01 "
        "(commit b29ed90); 0.984 mean IoU in 2 min 13 s on the 2-core AMD EPYC development machine on 2026-11-23 "
        "(commit b80c3e5); a gradient-flow report of 0 findings both times.",
        "**2026-11-23, the gradient-flow monitor on an H100**, timed by component with "
        "`tests/callbacks/bench_gradflow_overhead.py` (the method `python -m benchmarks monitor-cost` uses now; "
        "commit 6eb9990): "
        "a recording of the ResNet-18 U-Net cost about 6.5 ms, with 25 ms steps of 16 x 6 x 256 x 256: 1.0% of a "
        "step at every 25 steps, the binding case for the default interval. Before the update ratios of issue 14 "
        "(2026-11-30).",
        "**2026-11-23, the gradient-flow monitor on the 2-core CPU** (commit f9ef647), with "
        "`python -m benchmarks monitor-cost` while other work loaded it (load 1.4-2.4), lower quartiles of 20/15 "
        "alternating steps: at 4 x 6 x 128 x 128, step 173 ms, per-step check 2.93 ms (1.7%), recording 3.1 ms "
        "(1.8%; skip taps not resolvable), expected 1.77% at every 25 steps; at 12 x 6 x 128 x 128 (the demo's "
        "batch), step 439 ms, per-step check 2.96 ms (0.67%), recording 13.1 ms (3.0%, skip taps 8.9 ms of it), "
        "expected 0.79% at every 25 steps. Before the update ratios of issue 14; the cost-by-component table "
        "above times the recording with them.",
        "**2026-11-30, the update ratios of issue 14 under load** (commit 40a3728), with "
        "`python -m benchmarks monitor-cost --steps 24 --warmup 4` (4 x 6 x 128 x 128, CPU, 2 threads) while other "
        "work loaded the 2 cores (load average 4.3 at the start, 5.8 at the end; a step took 3,101 ms, 18x a quiet "
        "step of that time): the monitor's hooks took 15.3 ms on a tracked step (0.49% of a step) and 247 ms on a "
        "recording step, of which the update ratios after the optimizer step 46.9 ms (1.5% of a step; 0.06% at "
        "every 25 steps). Under such load the shares are not comparable with a quiet machine's.",
        "**2026-11-23, the size of the monitor's state** (the recorded series, in `gradflow.json` and in each "
        "checkpoint; commit 0dd774c, how it was measured not recorded): about 1.7 kB a recording for a ResNet-18 "
        "U-Net (61 layers, 12 skips) and 2.5 kB for a ResNet-34 one, so about 3.4 MB and 5 MB at the default "
        "`max_recordings` of 2000, next to checkpoints of 170 MB and 290 MB.",
        "**2026-11-23, `SegmentationTask`'s per-step train metrics** (commit e7373a9), profiling a CPU step of "
        "this section's U-Net ResNet-18 at 4 x 6 x 128 x 128: argmax over the class dimension 7.5 ms at 1 thread, "
        "`max(dim).indices` (the same first-maximum indices) 1.0 ms; torchmetrics' update 6.5 ms with its label "
        "validation, 2.6 ms without; both scale badly to 2 threads.",
        "**2026-11-23, `grad_max_abs` on the CPU** (the monitor's per-layer maxima; commit c88d546), ResNet-18 "
        "U-Net gradients (92 tensors, 14.3M values) on the 2-core CPU, lower of 20: channels-last gradients "
        "25 ms as a strided `aminmax`, 2.1 ms over their memory in storage order; contiguous ones 1.8 ms and "
        "1.7 ms. The fused `torch._foreach_norm(ord=inf)` it avoids on the CPU was stated as about 100x an L2 "
        "norm (how it was measured not recorded).",
    ],
    "inference": [
        "**2026-11-30, logits against the thread count** (commit b8cf68e): the logits of a ResNet-18 U-Net on "
        "the CPU differed by up to 6e-8 between 1 and 2 torch threads (the thread count changes the order of "
        "floating-point sums).",
    ],
    "readers": [
        "**2026-11-23, decoding against normalising** (commit cac8b21), on the 2-core development machine: about "
        "12 ms to decode a 512 x 512 6-band DEFLATE tile on one core, against 1 ms to normalise it.",
    ],
    "imagery": [
        "**2026-12-07, before `warp_block_for`** (commit c76ef8c, this section's first run, with the data "
        "module's default flips and rotations; load average 2.4 to 5 on the 2-core AMD EPYC): bands on other grids "
        "were warped in blocks of the tile size (256 px), and a training tile, at any offset inside a reference "
        "block, spans up to 4 of them: the multi-source data module read 16.5 tiles/s (median of 3) against 38.3 "
        "for the pre-stacked file with 0 workers (0.43x), and 28.0 and 29.6 against 84.9 and 84.3 in two repeats "
        "with 2 workers (about 0.34x). Then `SceneStack.read` of 180 random unaligned 256 px windows of the same "
        "scene in one process (64 MiB cache, two runs): 36-39 CPU ms per tile with 256 px warp blocks, 14-16 with "
        "128, 16-17 with 64, 38-42 with 512; on block-aligned windows 128 px blocks were as fast as 256 (14.5-15.4 "
        "against 16.0-16.3 ms at 64 MiB, 32.2-32.6 against 33.6-34.4 at 16 MiB).",
    ],
    "labels": [
        "**2026-12-01, projecting bounds** (commit a04cfee): `rasterio.warp.transform_bounds` builds the PROJ "
        "transformation again on every call, about 20 ms for a datum change such as EPSG:3035 to UTM, which "
        "label alignment paid per label file, image and strip before `geobp.raster.project_bounds` kept a "
        "pyproj transformer per pair of CRSs.",
    ],
}


def _elsewhere(name: str) -> list[str]:
    """The section's measurements made outside the harness (:data:`ELSEWHERE`), as Markdown lines."""
    notes = ELSEWHERE.get(name, [])
    if not notes:
        return []
    return ["**Measured elsewhere** (not by `python -m benchmarks`; each note gives its date, machine and "
            "method as recorded then):", ""] + [f"- {n}" for n in notes] + [""]


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Latest stored result per section (``loading``, ``training``, ``inference``, ``gpu``)."""
    out = {}
    for name in (*SECTIONS, "gpu"):
        path = results_dir / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _machine_table(m: dict[str, Any]) -> list[str]:
    rows = [
        ["CPU", f"{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable)"],
        ["RAM", f"{m['ram_gib']} GiB"],
        ["load average (1 min) when the newest section started", f"{m.get('load_1min')}" + (
            " (the CPU was busy: other work, or the run's previous section, which a 1-minute average still "
            "shows; each section gives its own load)" if (m.get("load_1min") or 0) > 0.5 * (m["usable_cores"] or 1)
            else "")],
        ["OS, Python", f"{m['os']}, Python {m['python']}"],
        ["torch, lightning", f"{m['torch']}, {m['lightning']}"],
        ["rasterio, GDAL, torchgeo, numpy", f"{m['rasterio']}, {m['gdal']}, {m['torchgeo']}, {m['numpy']}"],
        ["geobp commit", m["commit"]],
        ["date", m["date"]],
    ]
    return _md_table(["", ""], rows)


def _gpu_section(gpu: dict[str, Any]) -> list[str]:
    """The GPU result file written by ``benchmarks/gpu.py`` (absolute numbers, that device only)."""
    d, r = gpu["device"], gpu["results"]
    about = ", ".join(x for x in (f"{d['memory_gib']} GiB" if d.get("memory_gib") else "",
                                  f"CUDA {d['cuda']}" if d.get("cuda") else "", f"torch {d.get('torch', '?')}") if x)
    lines = [
        f"Measured on **{d['name']}** ({about}) on {gpu['date']}, with `{gpu.get('command', GPU_COMMAND)}`. "
        "These numbers are absolute and hold on that device only.",
        "",
        f"Model: {gpu['model']}; batch {gpu['batch']}; medians of {gpu['repeats']} timed repeats of "
        f"{gpu['steps']} steps.",
        "",
    ]
    if gpu.get("dry_run"):
        lines += ["**Dry run** (tiny sizes, not a GPU measurement).", ""]
    n = r.get("matmul_n", 8192)
    train_gflop = r["train_gflop_per_image"]

    def share(ips: float, gflop: float) -> list[str]:
        tflops = ips * gflop / 1e3
        return [fmt(ips), fmt(tflops), f"{100 * tflops / r['matmul_tflops']:.0f}%"]

    rows = [[f"bf16 matmul {n}^3 (the measured limit)", "-", fmt(r["matmul_tflops"]), "100%"]]
    if "bare_train_images_per_s" in r:  # since issue 15: the hand-written loop beside Lightning's variants
        rows.append(["hand-written training step (fwd + bwd + clip + AdamW)", *share(r["bare_train_images_per_s"], train_gflop)])
        for name, v in r.get("train_variants", {}).items():
            rows.append([f"`Trainer.fit(SegmentationTask)`, monitor every {v['monitor_every_n_steps']} steps: {name}",
                         *share(v["images_per_s"], train_gflop)])
    else:
        rows.append(["training step (fwd + bwd + clip + AdamW)", fmt(r["train_images_per_s"]), fmt(r["train_tflops"]),
                     f"{100 * r['train_share']:.0f}%"])
    rows.append(["inference (forward)", fmt(r["infer_images_per_s"]), fmt(r["infer_tflops"]), f"{100 * r['infer_share']:.0f}%"])
    if "pipeline_images_per_s" in r:
        rows.append([f"`geobp infer` over {r['raster']}", fmt(r["pipeline_images_per_s"]), "-", "-"])
        rows.append([f"decode limit of that file ({r['cores']} cores x one core's rasterio read loop)",
                     fmt(r["decode_limit_images_per_s"]), "-", "-"])
    lines += _md_table(["what", "images/s", "model TFLOP/s", "share of matmul TFLOP/s"], rows)
    lines += ["", f"FLOPs per image (`torch.utils.flop_counter.FlopCounterMode`): forward "
              f"{fmt(r['forward_gflop_per_image'])} GFLOP, training step {fmt(train_gflop)} GFLOP."]
    if "train_config" in r:
        lines += ["", f"Fastest training configuration: **{r['train_config']}**, {fmt(r['train_images_per_s'])} images/s, "
                  f"{100 * r['train_share']:.0f}% of the measured matmul TFLOP/s (issue 15's target: 25%)."]
    if "pipeline_images_per_s" in r:
        lines += ["", f"`geobp infer` ran at {r['pipeline_over_forward']:.2f} of the forward rate and "
                  f"{r['pipeline_over_decode_limit']:.2f} of the file's decode limit (issue 15's target: 0.85 of either, "
                  "whichever bounds)."]
    if r.get("host_syncs_per_step") is not None:
        lines += ["", f"Host synchronisations per training step (`torch.cuda.set_sync_debug_mode`, fused variant): "
                  f"{r['host_syncs_per_step']:.1f}."]
    if gpu.get("skipped"):
        lines += ["", "Not measured in this run: " + ", ".join(f"{k} ({v.splitlines()[0]})" for k, v in gpu["skipped"].items()) + "."]
    if gpu.get("commit"):
        lines += ["", f"geobp commit {gpu['commit']}; profiler summaries of a few training steps: `benchmarks/results/gpu_profile.txt`."]
    return lines


def render(results: dict[str, dict[str, Any]], quick: bool = False) -> str:
    """The whole ``BENCHMARKS.md``."""
    cpu = [results[s] for s in SECTIONS if s in results]
    lines = ["# Benchmarks", ""]
    if quick or any(r.get("quick") for r in cpu):
        lines += ["> **Quick mode**: tiny sizes that only check the harness runs; the numbers mean nothing.", ""]
    lines += [
        "Side-by-side measurements of geobp against a peer (torchgeo), a hand-written PyTorch loop and the",
        "bare limits (raw rasterio reads, the model's forward pass), with the targets of issue 6.",
        "Every number is the median of several timed repeats (n in the tables); ratios are of the medians.",
        "",
        "## Reproduce",
        "",
        "```bash",
        f"{REGENERATE}                      # every CPU section, then BENCHMARKS.md",
        f"{REGENERATE} --only loading       # one section; the others keep their stored results",
        f"{REGENERATE} --quick --out /tmp/B.md  # tiny sizes (what the test suite runs)",
        f"{GPU_COMMAND}   # on a CUDA machine (parts 3-4 need Lightning and rasterio)",
        "bash scripts/gpu_bench.sh                                # the whole GPU run, on a lent machine (below)",
        ".venv/bin/python -m benchmarks render                   # rewrite BENCHMARKS.md from benchmarks/results/",
        "```",
        "",
        "Synthetic inputs are generated once into `benchmarks/.data/` (git-ignored; about 3 min and 1.1 GB for the",
        "full sizes). Results of each section are stored in `benchmarks/results/<section>.json`; the commands",
        "that produced each section are shown with it.",
        "",
        "The GPU section comes from one prepared script, `scripts/gpu_bench.sh`, budgeted (timeouts) to end",
        "within 8 minutes on a lent H100/H200: `bash scripts/gpu_wheels.sh` here first (the wheels the GPU",
        "machine lacks, rasterio among them, into the git-ignored `.whl/`), then the device tool's `run` with",
        "`command: \"GEOBP_COMMIT=<short commit> bash scripts/gpu_bench.sh\"`, `carry: [\".whl\"]`,",
        "`timeout_s: 540`. It installs the wheels into `/tmp/site`, runs `benchmarks/gpu.py` within a time",
        "budget and the GPU-marked tests, and leaves `gpu.json`, `gpu_profile.txt` and the logs in `$OUT`; copy",
        "those two to `benchmarks/results/` and render. `PY=.venv/bin/python DRY_RUN=1 SKIP_WHEELS=1 bash",
        "scripts/gpu_bench.sh` checks it on a CPU at tiny sizes.",
        "",
    ]
    if cpu:
        lines += ["## Machine", ""]
        # the timing sections' machine: the balance section (IoU, not speed) states its own
        timing = [r for r in cpu if r.get("section") != "balance"] or cpu
        lines += _machine_table(timing[-1]["machine"]) + [""]
        others = {r["machine"]["date"][:10] for r in cpu}
        if len(others) > 1:
            lines += ["Sections were measured on different days; each section states its own date.", ""]
        cpus: dict[str, list[str]] = {}
        for r in cpu:
            cpus.setdefault(r["machine"]["cpu"], []).append(r["section"])
        if len(cpus) > 1:
            lines += ["The table shows the machine of the last section; sections ran on different CPUs: "
                      + "; ".join(f"{', '.join(names)} on {name}" for name, names in cpus.items()) + ".", ""]
    checks = [t for r in cpu for t in r.get("targets", [])]
    if checks:
        lines += ["## Targets", ""]
        rows = [[t["name"], t["text"], t["target"], "PASS" if t["ok"] else "**MISS**"] for t in checks]
        lines += _md_table(["benchmark", "measured", "target", "result"], rows) + [""]
    for name in (*SECTIONS, "gpu"):
        lines += [f"## {_TITLES[name]}", ""]
        r = results.get(name)
        if r is None:
            how = f"`{GPU_COMMAND}`" if name == "gpu" else f"`{REGENERATE} --only {name}`"
            lines += [f"Not measured yet: run {how}.", ""] + _elsewhere(name)
            continue
        if name == "gpu":
            lines += _gpu_section(r) + [""] + _elsewhere(name)
            continue
        m = r["machine"]
        load = f"; load average {m.get('load_1min')} at the start, {m['load_1min_end']} at the end on " \
               f"{m['usable_cores']} cores" if m.get("load_1min_end") is not None else ""
        lines += [f"Measured {m['date']} in {r['elapsed_s']:.0f} s{load}, with `{r['command']}`.", ""]
        if r.get("error"):
            lines += [f"**The section failed**: `{r['error']}` (log: `{r.get('log', '?')}`).", ""] + _elsewhere(name)
            continue
        lines += [f"- {s}" for s in r.get("setup", [])] + [""]
        for t in r.get("tables", []):
            lines += [f"**{t['title']}**", ""] + _md_table(t["headers"], t["rows"]) + [""]
        if r.get("skipped"):
            lines += [f"*Skipped*: {r['skipped']}", ""]
        if r.get("targets"):
            lines += [
                "Targets: " + "; ".join(f"{t['name'].split(': ', 1)[-1]} {t['text']} "
                                        f"({t['target']}: {'PASS' if t['ok'] else 'MISS'})" for t in r["targets"]),
                "",
            ]
        lines += [f"- {n}" for n in r.get("notes", [])]
        if r.get("notes"):
            lines += [""]
        lines += _elsewhere(name)
    return "\n".join(lines).rstrip() + "\n"

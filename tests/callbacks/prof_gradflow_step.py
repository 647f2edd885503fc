"""Time the pieces of GradientFlowMonitor's per-step path (scratch profiling, not a test)."""

import time

import torch
import torch.nn.functional as F

from geobp.callbacks.measure import find_layers, grad_max_abs, grad_norms
from geobp.models import create_model

dev = "cuda" if torch.cuda.is_available() else "cpu"
model = create_model("unet", encoder="resnet18", in_channels=6, num_classes=5).to(dev)
x = torch.randn(16, 6, 256, 256, device=dev)
y = torch.randint(0, 5, (16, 256, 256), device=dev)
F.cross_entropy(model(x), y).backward()
layers, params = find_layers(model)
print(len(params), "params")


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def tm(name, fn, n=50):
    for _ in range(3):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    print(f"{name:40s} {1e6 * (time.perf_counter() - t) / n:8.1f} us")


state = {"nonfinite": torch.zeros((), dtype=torch.float64, device=dev),
         "first_bad": torch.full((), -1.0, dtype=torch.float64, device=dev),
         "bad_vec": torch.zeros(len(params), device=dev)}
tm("present list", lambda: [i for i, p in enumerate(params) if p.grad is not None])
grads = [p.grad for p in params]
tm("_foreach_norm only", lambda: torch._foreach_norm(grads))
tm("grad_norms (stack)", lambda: grad_norms(grads))
vec = grad_norms(grads)
tm("vector_norm", lambda: torch.linalg.vector_norm(vec))
total = torch.linalg.vector_norm(vec)


def counters():
    bad = ~torch.isfinite(total)
    state["nonfinite"] += bad
    new = bad & (state["first_bad"] < 0)
    state["first_bad"] = torch.where(new, 5.0, state["first_bad"])
    state["bad_vec"] = torch.where(new, vec, state["bad_vec"])


tm("counters", counters)
tm("grad_max_abs", lambda: grad_max_abs(grads))
tm("one .item()", lambda: total.item())


tm("get_total_norm", lambda: torch.nn.utils.get_total_norm(grads))
tm("stack of 92 zero-d", lambda: torch.stack(list(state.values())[:1] * 92))
from geobp.callbacks.measure import band_norms, layer_reduce
idx = torch.tensor([0] * len(params), device=dev)
mx = grad_max_abs(grads)
tm("layer_reduce", lambda: layer_reduce(vec, mx, idx, len(layers)))
tm("band_norms", lambda: band_norms(params[0].grad))
pieces = [vec] * 11
tm("cat 11 to f64 + tolist", lambda: torch.cat([p.to(torch.float64) for p in pieces]).tolist())


class FakeTrainer:
    global_step = 1
    world_size = 1
    is_global_zero = True
    loggers = []
    accumulate_grad_batches = 1


from geobp.callbacks import GradientFlowMonitor


class FakeModule(torch.nn.Module):
    pass


mon = GradientFlowMonitor(every_n_steps=1000, write_report=False)
# minimal setup by hand (no Trainer): mimic GradientFlowMonitor.setup
import types
tr = types.SimpleNamespace(log_dir="/tmp/x", default_root_dir="/tmp/x", precision="32-true", world_size=1,
                           gradient_clip_val=1.0, gradient_clip_algorithm=None, strategy=object(),
                           precision_plugin=object(), global_step=1, is_global_zero=True, loggers=[],
                           accumulate_grad_batches=1)
mon.setup(tr, model, "fit")
tm("monitor per-step hook (deferred)", lambda: mon.on_before_optimizer_step(tr, model, None))
mon._mode = "sync"
tm("monitor per-step hook (sync)", lambda: mon.on_before_optimizer_step(tr, model, None))
mon._mode = "deferred"
tr.global_step = 0
tm("monitor recording hook (no taps)", lambda: mon.on_before_optimizer_step(tr, model, None), n=20)

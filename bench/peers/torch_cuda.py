"""bench_cuda's MLP through PyTorch on the same GPU: y_{l+1} = relu(W_l y_l + b_l), loss mean(y^2),
float32 with TF32 products, under no checkpointing, torch.utils.checkpoint over the same
segments as ckpt's sqrt_n (segments of 4 of 16 layers, the last one recorded), and the same with
the checkpoints' saved boundaries offloaded to pinned host memory (save_on_cpu). Prints and
writes JSON: per variant the median step time and the peak of activation memory (what the step
allocates beyond the parameters and their gradients)."""
import argparse
import json
import math
import statistics
import time

import torch
from torch.utils.checkpoint import checkpoint


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda")
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([torch.nn.Linear(a.width, a.width) for _ in range(a.layers)]).to(dev)
    x = torch.rand(a.batch, a.width, device=dev) * 2 - 1
    k = math.ceil(math.sqrt(a.layers))

    def run(lo, hi, h):
        for i in range(lo, hi):
            h = torch.relu(layers[i](h))
        return h

    def forward(variant):
        h = x
        if variant == "none":
            return run(0, a.layers, h)
        i = 0
        while i + k < a.layers:
            if variant == "offload":
                with torch.autograd.graph.save_on_cpu(pin_memory=True):
                    h = checkpoint(run, i, i + k, h, use_reentrant=False)
            else:
                h = checkpoint(run, i, i + k, h, use_reentrant=False)
            i += k
        return run(i, a.layers, h)

    results = []
    for variant in ("none", "sqrt_n", "offload"):
        times = []
        peak = 0
        for step in range(a.steps + 3):
            for p in layers.parameters():
                p.grad = None if step == 0 else p.grad
            layers.zero_grad(set_to_none=False) if step > 0 else None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = forward(variant).square().mean()
            loss.backward()
            loss.item()
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            if step >= 3:
                times.append((t1 - t0) * 1e3)
                peak = max(peak, torch.cuda.max_memory_allocated() - base)
        results.append({"variant": variant, "ms": statistics.median(times), "peak_bytes": peak})
        print(f"torch {variant:8s} {results[-1]['ms']:9.2f} ms  peak {peak / 2**20:9.1f} MiB", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""PyTorch's side of the comparison with ckpt (see bench/peers/README.md).

    torch_peer.py check DIR            loss and every gradient against ckpt's (exit 2 on a mismatch)
    torch_peer.py time DIR --mode M    times one mode, prints a JSON line
    torch_peer.py empty                peak RSS of a process that imported torch and did nothing

DIR is written by `peer_ckpt export`: meta.json, params/*.npy (float32, Fortran order, ckpt's
column-major features x batch layout) and ckpt/<policy>/{loss,grad_*}.npy.

The models are the ones of bench/peers/peer_models.hpp, in PyTorch's row-major batch x features
layout (the same bytes as ckpt's column-major features x batch):
    mlp:  h = relu(F.linear(h, W_i, b_i))                         W_i, b_i trainable
    lora: h = relu(lin_i(h)), lin_i(h) = addmm(F.linear(h, W_i, b_i), h A_i^T, B_i^T, alpha=s)
          W_i, b_i frozen
    lora_res: h = h + lin_{2i+1}(relu(lin_{2i}(h)))   (bench_lora's residual blocks)
    loss = mean(h^2)

Modes: none; every4 / sqrt_n / per_block: segments of k layers, each run through
torch.utils.checkpoint.checkpoint(..., use_reentrant=False) exactly as ckpt's sequential<every<k>>
cuts them (the last segment is recorded as usual); every4_seq / sqrt_n_seq / per_block_seq: the
same cut through torch.utils.checkpoint.checkpoint_sequential, which in torch 1.13 has no
use_reentrant argument and is therefore reentrant (it needs the input to require grad, so it
computes one more product, dx of the first layer). preserve_rng_state=False: the models have no
randomness, ckpt does not save an RNG state either.

Gradients are kept allocated and zeroed in place before each step (torch 1.13's
zero_grad(set_to_none=False) default; ckpt does the same), so the RSS growth during the steps is
activation memory on both sides.
"""
import argparse
import ctypes
import gc
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as tcp

TOL = 1e-5


def maxrss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def rss_kb():
    return status_kb("VmRSS")


def openblas_info():
    try:
        lib = ctypes.CDLL("libopenblas.so.0")
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return lib.openblas_get_corename().decode(), lib.openblas_get_num_threads()
    except (OSError, AttributeError):
        return "?", -1


def sqrt_k(n):
    k = int(math.sqrt(n))
    while k * k < n:
        k += 1
    return k


def segment_length(mode, n):
    base = mode[:-4] if mode.endswith("_seq") else mode
    return {"none": 0, "every4": 4, "per_block": 1, "sqrt_n": sqrt_k(n)}[base]


class Model:
    def __init__(self, d, dtype=torch.float32):
        with open(os.path.join(d, "meta.json")) as f:
            self.meta = json.load(f)
        m = self.meta
        self.kind, self.depth = m["model"], m["depth"]
        p = os.path.join(d, "params")

        def load(name):  # Fortran-ordered (rows, cols) -> C-contiguous torch tensor, same indices
            return torch.from_numpy(np.ascontiguousarray(np.load(os.path.join(p, name + ".npy")))).to(dtype)

        # x: features x batch in ckpt == batch x features row-major here (a transposed view is free)
        self.x = torch.from_numpy(np.load(os.path.join(p, "x.npy")).T).to(dtype)
        assert self.x.is_contiguous()
        L = self.depth
        nl = 2 * L if self.kind == "lora_res" else L  # linear layers
        self.W = [load("W_%03d" % i) for i in range(nl)]
        self.b = [load("b_%03d" % i).reshape(-1) for i in range(nl)]
        if self.kind == "mlp":
            for t in self.W + self.b:
                t.requires_grad_(True)
            self.trainable = [("W_%03d" % i, t) for i, t in enumerate(self.W)] + [("b_%03d" % i, t) for i, t in enumerate(self.b)]
            self.layers = [self._mlp_layer(i) for i in range(L)]
        else:
            self.scale = float(np.float32(m["scale"]))
            self.A = [load("A_%03d" % i).requires_grad_(True) for i in range(nl)]
            self.B = [load("B_%03d" % i).requires_grad_(True) for i in range(nl)]
            self.trainable = [("A_%03d" % i, t) for i, t in enumerate(self.A)] + [("B_%03d" % i, t) for i, t in enumerate(self.B)]
            if self.kind == "lora":
                self.layers = [self._lora_layer(i) for i in range(L)]
            else:
                self.layers = [self._lora_res_block(i) for i in range(L)]
        for _, t in self.trainable:  # allocated once, zeroed in place (as ckpt's Parameter)
            t.grad = torch.zeros_like(t)

    def _mlp_layer(self, i):
        W, b = self.W[i], self.b[i]
        return lambda h: torch.relu(F.linear(h, W, b))

    def _lora_layer(self, i):
        W, b, A, B, s = self.W[i], self.b[i], self.A[i], self.B[i], self.scale
        return lambda h: torch.relu(torch.addmm(F.linear(h, W, b), F.linear(h, A), B.t(), alpha=s))

    def _lora_res_block(self, i):
        l1, l2 = self._lora_linear(2 * i), self._lora_linear(2 * i + 1)
        return lambda h: h + l2(torch.relu(l1(h)))

    def _lora_linear(self, j):
        W, b, A, B, s = self.W[j], self.b[j], self.A[j], self.B[j], self.scale
        return lambda h: torch.addmm(F.linear(h, W, b), F.linear(h, A), B.t(), alpha=s)

    def forward(self, mode):
        n = self.depth
        k = segment_length(mode, n)
        h = self.x
        if k == 0 or k >= n:
            for f in self.layers:
                h = f(h)
            return h
        if mode.endswith("_seq"):
            segments = n // k
            assert segments * k == n, "checkpoint_sequential cuts like ckpt only when k divides the depth"
            h = h.detach().requires_grad_(True)  # reentrant: without it the checkpointed params get no grad
            return tcp.checkpoint_sequential(self.layers, segments, h, preserve_rng_state=False)

        def segment(a, e):
            def run(v):
                for j in range(a, e):
                    v = self.layers[j](v)
                return v
            return run

        i = 0
        while i + k < n:
            h = tcp.checkpoint(segment(i, i + k), h, use_reentrant=False, preserve_rng_state=False)
            i += k
        for j in range(i, n):
            h = self.layers[j](h)
        return h

    def step(self, mode):
        for _, t in self.trainable:
            t.grad.zero_()
        h = self.forward(mode)
        loss = h.square().mean()
        loss.backward()
        return loss


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    d = np.max(np.abs(a - b)) if a.size else 0.0
    s = np.max(np.abs(b)) if b.size else 0.0
    if s == 0.0:
        return 0.0 if d == 0.0 else math.inf
    return d / s


def torch_modes(kind, depth):
    modes = ["none", "every4", "sqrt_n"] + (["per_block"] if kind != "mlp" else [])
    return modes + [m + "_seq" for m in modes[1:] if depth % segment_length(m, depth) == 0]


def cmd_check(a):
    model = Model(a.dir)
    cdir = os.path.join(a.dir, "ckpt")
    policies = sorted(os.listdir(cdir))
    if "none" not in policies:
        sys.exit("torch_peer: %s has no ckpt/none" % cdir)
    worst = {"tensor": None, "rel": 0.0}
    checked = 0
    arbitrated = []
    exact = {}  # the same model and values in float64, computed when first needed

    def float64_reference(name):
        if not exact:
            m64 = Model(a.dir, torch.float64)
            exact["loss"] = m64.step("none").detach().numpy().copy()
            for n, t in m64.trainable:
                exact["grad " + n] = t.grad.numpy().copy()
        return exact[name]

    def compare(what, name, mine, theirs):
        nonlocal checked
        r = rel_err(mine, theirs)
        checked += 1
        if r > worst["rel"]:
            worst.update(tensor="%s %s" % (what, name), rel=r)
        if not (r <= TOL):
            # Two float implementations of a deep chain can drift apart by a little more than
            # TOL while both stay within TOL of the exact values: the float64 run decides whether
            # they compute the same model. Either side off by more than TOL from it stops the run.
            ref = float64_reference(name)
            e_mine, e_theirs = rel_err(mine, ref), rel_err(theirs, ref)
            record = {"tensor": "%s %s" % (what, name), "rel_err": r, "vs_float64": [e_mine, e_theirs]}
            if e_mine <= TOL and e_theirs <= TOL:
                arbitrated.append(record)
                return
            print(json.dumps({"check": "FAILED", "dir": a.dir, "tol": TOL, **record}))
            sys.stderr.write("torch_peer: gradient mismatch: %s %s: relative error %.3g > %g, against float64 %.3g and %.3g (%s)\n" % (
                what, name, r, TOL, e_mine, e_theirs, a.dir))
            sys.exit(2)

    def ckpt_result(policy):
        d = os.path.join(cdir, policy)
        loss = np.load(os.path.join(d, "loss.npy"))
        grads = {name: np.load(os.path.join(d, "grad_%s.npy" % name)) for name, _ in model.trainable}
        return loss, grads

    ref_loss, ref_grads = ckpt_result("none")
    # every torch mode against ckpt's policy::none
    torch_none = None
    modes = a.modes.split(",") if a.modes else torch_modes(model.kind, model.depth)
    if "none" not in modes:
        modes = ["none"] + modes
    for mode in modes:
        loss = model.step(mode)
        compare("torch:" + mode + " vs ckpt:none", "loss", loss.detach().numpy(), ref_loss)
        for name, t in model.trainable:
            compare("torch:" + mode + " vs ckpt:none", "grad " + name, t.grad.numpy(), ref_grads[name])
        if mode == "none":
            torch_none = (loss.detach().numpy().copy(), {n: t.grad.numpy().copy() for n, t in model.trainable})
    # every ckpt policy against torch's none
    for p in policies:
        loss, grads = ckpt_result(p)
        compare("ckpt:" + p + " vs torch:none", "loss", loss, torch_none[0])
        for name, _ in model.trainable:
            compare("ckpt:" + p + " vs torch:none", "grad " + name, grads[name], torch_none[1][name])
    print(json.dumps({"check": "ok", "dir": a.dir, "tensors_compared": checked, "tol": TOL, "worst": worst,
                      "arbitrated_by_float64": arbitrated, "torch_modes": modes, "ckpt_policies": policies}))


def tiny_warmup():
    """Initialises the libraries a step uses (BLAS, OpenMP pool, autograd) before the baseline."""
    a = torch.ones(8, 8, requires_grad=True)
    torch.relu(F.linear(a, a, a[0])).square().mean().backward()


def cmd_time(a):
    torch.set_num_threads(a.threads)
    rss_start = rss_kb()
    model = Model(a.dir)
    tiny_warmup()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the loading's freed buffers back (as peer_ckpt)
    rss_loaded, maxrss_loaded = rss_kb(), maxrss_kb()
    times, cpu = [], []
    loss = None
    for r in range(a.warmup + a.reps):
        c0 = time.process_time()  # CPU time of the process, all threads (as peer_ckpt's)
        t0 = time.perf_counter()
        loss = model.step(a.mode)
        t1 = time.perf_counter()
        c1 = time.process_time()
        if r == 0:
            maxrss_first = maxrss_kb()  # after the first step, before the allocator has seen a second one
        if r >= a.warmup:
            times.append((t1 - t0) * 1e3)
            cpu.append((c1 - c0) * 1e3)
    maxrss_end = maxrss_kb()
    core, blas_threads = openblas_info()
    m = model.meta
    print(json.dumps({
        "side": "torch", "model": m["model"], "depth": m["depth"], "width": m["width"], "batch": m["batch"],
        "rank": m["rank"] if m["model"] != "mlp" else 0, "policy": a.mode, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "openblas_core": core, "openblas_threads": blas_threads,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS", ""),
        "openblas_num_threads_env": os.environ.get("OPENBLAS_NUM_THREADS", ""),
        "openblas_coretype_env": os.environ.get("OPENBLAS_CORETYPE", ""),
        "warmup": a.warmup, "reps": a.reps, "loss": float(loss), "median_ms": float(np.median(times)), "min_ms": min(times),
        "cpu_median_ms": float(np.median(cpu)),
        "rss_start_kb": rss_start, "rss_loaded_kb": rss_loaded, "maxrss_loaded_kb": maxrss_loaded, "maxrss_first_kb": maxrss_first, "maxrss_end_kb": maxrss_end,
        "hwm_end_kb": status_kb("VmHWM"), "times_ms": times}))


def cmd_empty(a):
    core, blas_threads = openblas_info()
    print(json.dumps({"side": "torch", "mode": "empty", "maxrss_kb": maxrss_kb(), "rss_kb": rss_kb(), "hwm_kb": status_kb("VmHWM"), "torch": torch.__version__,
                      "torch_threads": torch.get_num_threads(), "openblas_core": core, "openblas_threads": blas_threads}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("dir")
    c.add_argument("--modes", default="", help="comma-separated torch modes (default: all that apply)")
    t = sub.add_parser("time")
    t.add_argument("dir")
    t.add_argument("--mode", default="none")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--reps", type=int, default=15)
    sub.add_parser("empty")
    a = ap.parse_args()
    {"check": cmd_check, "time": cmd_time, "empty": cmd_empty}[a.cmd](a)


if __name__ == "__main__":
    main()

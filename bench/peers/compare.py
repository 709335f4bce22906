#!/usr/bin/python3
"""Runs the ckpt / PyTorch comparison (see bench/peers/README.md); called by compare.sh.

For every model configuration: `peer_ckpt export` writes the initial values and ckpt's loss and
gradients per policy, `torch_peer.py check` compares them with PyTorch's (a mismatch stops the
run), then the two sides are timed in separate processes, alternating ckpt / torch run by run,
for each thread count. Writes results.json, results.md (the README table) and the PNG plots.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY = "/usr/bin/python3"
TORCH_PEER = os.path.join(HERE, "torch_peer.py")



def stock_openblas_core():
    """The core OpenBLAS picks by itself on this machine (openblas_get_corename)."""
    import ctypes
    try:
        lib = ctypes.CDLL("libopenblas.so.0")
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return lib.openblas_get_corename().decode()
    except OSError:
        return "?"


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


# Debian's OpenBLAS 0.3.21 takes recent Xeons (family 6 model 207, Emerald Rapids) for a
# "Prescott" and runs its SSE3 kernel, 6-7x slower. There OPENBLAS_CORETYPE selects the newest
# kernel the processor runs (SkylakeX with AVX-512, else Haswell), on both sides: PyTorch's
# products then use that kernel, and ckpt's dispatch (backend/cpu/cpu.hpp: OpenBLAS unless it
# reports an old core) sends its products to the same kernel, so both sides do the same GEMMs
# with the same code. Where OpenBLAS knows the processor (an AMD EPYC: "Zen"), nothing is set.
# (Forcing SkylakeX on a processor without AVX-512 is an illegal instruction.) Context:
# "torch-stock" (as installed) and "ckpt-eigen" (CKPT_GEMM=eigen: Eigen's GEMM).
STOCK_CORE = stock_openblas_core()
OLD_CORES = {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom", "Katmai", "Coppermine", "Northwood", "Banias",
             "Unknown", "?"}
if STOCK_CORE in OLD_CORES and "avx512f" in cpu_flags():
    TUNED = {"OPENBLAS_CORETYPE": "SkylakeX"}
elif STOCK_CORE in OLD_CORES and "avx2" in cpu_flags():
    TUNED = {"OPENBLAS_CORETYPE": "Haswell"}
else:
    TUNED = {}
KERNEL = TUNED.get("OPENBLAS_CORETYPE", STOCK_CORE)

# ckpt policy -> the PyTorch mode that cuts the chain the same way (None: nothing in torch.utils.checkpoint)
TORCH_OF = {"none": "none", "every4": "every4", "sqrt_n": "sqrt_n", "per_block": "per_block",
            "binomial4": None, "selective_matmul": None}


def load_avg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def run_json(cmd, env_extra, timeout=300):
    """Runs cmd with env_extra over the environment (a value None unsets the variable); returns
    (rc, the last JSON line of stdout, stderr)."""
    env = dict(os.environ)
    for k, v in env_extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    # Through a shell that forks the command (it is not the shell's last one): a child's
    # ru_maxrss starts at its parent's RSS at fork time (Linux copies the high-water mark with
    # the address space, and exec keeps it), and this Python process is larger than what is
    # measured; the shell is ~1 MB.
    p = subprocess.Popen(["/bin/sh", "-c", '"$@"; exit $?', "sh"] + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)  # the shell and the command it forked: their own session
        p.communicate()
        return 124, None, "timed out after %d s" % timeout
    p = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        return p.returncode, (lines and json.loads(lines[-1])) or None, p.stderr.strip()
    return 0, json.loads(lines[-1]), p.stderr.strip()


def name_of(c):
    s = "%s_L%d_w%d_n%d" % (c["model"], c["depth"], c["width"], c["batch"])
    return s + ("_r%d" % c["rank"] if c["model"] != "mlp" else "")


def plan(quick):
    """(config, what to time). Policies are ckpt's; each is paired with its torch mode(s)."""
    mlp_pol = ["none", "every4", "sqrt_n", "binomial4", "selective_matmul"]
    lora_pol = ["none", "per_block", "every4", "sqrt_n", "binomial4"]
    fixed = [
        (dict(model="mlp", depth=64, width=256, batch=64), mlp_pol),     # bench_checkpoint's first size
        (dict(model="mlp", depth=256, width=128, batch=32), mlp_pol),    # its second size
        (dict(model="lora", depth=64, width=256, batch=64, rank=8), lora_pol),
        # bench_lora's residual blocks and two of its sizes (blocks, width, batch, rank)
        (dict(model="lora_res", depth=16, width=512, batch=128, rank=16), ["none", "per_block", "sqrt_n", "binomial4"]),
    ]
    # last, so that its check cannot stop the others (on 2026-11-30 ckpt's loss was off by 1.1e-5
    # there: ckpt::mean summed 65,536 floats in one float accumulator, since fixed)
    last = [(dict(model="lora_res", depth=8, width=1024, batch=64, rank=16), ["none", "per_block", "sqrt_n", "binomial4"])]
    widths = [32, 64, 128, 256, 512] if quick else [32, 64, 128, 256, 512, 1024]
    sweep = [(dict(model="mlp", depth=64, width=w, batch=64), ["none", "sqrt_n"]) for w in widths]
    sweep += [(dict(model="lora", depth=64, width=w, batch=64, rank=8), ["none", "per_block"]) for w in widths if w >= 64]
    if quick:
        fixed = fixed[:1] + fixed[2:3]
    out, seen = [], {}
    for c, pols in fixed + sweep + last:
        c.setdefault("rank", 8)
        n = name_of(c)
        if n in seen:
            seen[n]["policies"] = list(dict.fromkeys(seen[n]["policies"] + pols))
            seen[n]["sweep"] = True
            continue
        e = {"config": c, "name": n, "policies": pols, "sweep": (c, pols) in sweep, "fixed": (c, pols) in fixed + last}
        seen[n] = e
        out.append(e)
    return out


def model_args(c):
    a = ["--model", c["model"], "--depth", str(c["depth"]), "--width", str(c["width"]), "--batch", str(c["batch"]), "--rank", str(c["rank"])]
    if c["model"] == "lora_res":
        a += ["--alpha", str(2 * c["rank"])]  # bench_lora's alpha
    return a


def torch_modes_for(policy, depth):
    base = TORCH_OF.get(policy)
    if base is None:
        return []
    if base == "none":
        return ["none"]
    k = {"every4": 4, "per_block": 1}.get(base)
    if k is None:  # sqrt_n
        k = 1
        while k * k < depth:
            k += 1
    return [base] + ([base + "_seq"] if depth % k == 0 else [])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--driver", required=True)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--data", default="build-peers/peers-data")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=2, help="alternating ckpt/torch rounds per run (1-thread)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="fewer sizes (a smoke test)")
    ap.add_argument("--only", default="", help="run only the configurations whose name contains this")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the configurations run now in an existing OUT/results.json (with --only)")
    ap.add_argument("--plots-only", action="store_true", help="redraw from OUT/results.json")
    ap.add_argument("--memory-only", action="store_true", help="redo the live-bytes runs into OUT/results.json")
    ap.add_argument("--context-only", action="store_true", help="redo the ckpt-eigen context runs into OUT/results.json")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.plots_only:
        with open(os.path.join(a.out, "results.json")) as f:
            res = json.load(f)
        finish(res, a.out)
        return

    if a.context_only:
        with open(os.path.join(a.out, "results.json")) as f:
            res = json.load(f)
        res["runs"] = [r for r in res["runs"] if r["variant"] not in ("ckpt-eigen", "ckpt-blas")]
        for e in plan(a.quick):
            if not e["sweep"] or (a.only and a.only not in e["name"]):
                continue
            c, n = e["config"], e["name"]
            d = os.path.join(a.data, n)
            shutil.rmtree(d, ignore_errors=True)
            args = model_args(c)
            rc, js, err = run_json([a.driver, "export", d] + args + ["--policies", "none"], {"OMP_NUM_THREADS": "1"})
            if rc:
                sys.exit("peer_ckpt export %s failed: %s" % (n, err))
            big = c["width"] >= 1024
            reps, warm = (10, 2) if big else (a.reps, a.warmup)
            env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **TUNED, "CKPT_GEMM": "eigen"}
            for r in range(a.rounds):
                load = load_avg()
                rc, js, err = run_json([a.driver, "time", d, "--policy", "none", "--warmup", str(warm), "--reps", str(reps)], env)
                if rc:
                    sys.exit("ckpt-eigen %s failed: %s" % (n, err))
                js.update(config=n, variant="ckpt-eigen", policy="none", threads=1, round=r, load=load)
                res["runs"].append(js)
                print("%-28s t=1 r=%d ckpt-eigen  none  wall %9.3f ms  cpu %9.3f ms  load %.2f" % (n, r, js["median_ms"], js["cpu_median_ms"], load[0]), flush=True)
            shutil.rmtree(d, ignore_errors=True)
            save(res, a.out)
        finish(res, a.out)
        return

    if a.memory_only:
        with open(os.path.join(a.out, "results.json")) as f:
            res = json.load(f)
        res["memory_runs"] = []
        for e in plan(a.quick):
            if a.only and a.only not in e["name"]:
                continue
            c, n = e["config"], e["name"]
            d = os.path.join(a.data, n)
            shutil.rmtree(d, ignore_errors=True)
            args = model_args(c)
            rc, js, err = run_json([a.driver, "export", d] + args + ["--policies", "none"], {"OMP_NUM_THREADS": "1"})
            if rc:
                sys.exit("peer_ckpt export %s failed: %s" % (n, err))
            env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **TUNED}
            jobs = []
            for p in e["policies"]:
                jobs.append(("ckpt", "ckpt", p, [a.driver, "time", d, "--policy", p, "--warmup", "0"], env))
                for m in torch_modes_for(p, c["depth"]):
                    jobs.append(("torch", "torch", m, [PY, TORCH_PEER, "time", d, "--mode", m, "--threads", "1", "--warmup", "0"], env))
            memory_runs(res, n, jobs, print)
            shutil.rmtree(d, ignore_errors=True)
            save(res, a.out)
        finish(res, a.out)
        return

    threads = [int(t) for t in a.threads.split(",")]
    if a.merge:  # keep the previous results aside; save() below writes this run's own as it goes
        shutil.copy(os.path.join(a.out, "results.json"), os.path.join(a.out, "results.json.before-merge"))
    torch_version = subprocess.run([PY, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True).stdout.strip()
    res = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": cpu_model(), "cores": os.cpu_count(), "kernel": platform.release(),
        "torch": torch_version, "command": os.environ.get("PEERS_COMMAND", " ".join(sys.argv)).strip(),
        "checkpoint_mode": "torch.utils.checkpoint.checkpoint(use_reentrant=False) per segment; checkpoint_sequential "
                           "(torch 1.13: no use_reentrant argument, so reentrant) as *_seq",
        "torch_env": TUNED, "warmup": a.warmup, "reps": a.reps, "rounds_1thread": a.rounds,
        "checks": [], "empty": {}, "runs": [], "load_start": load_avg(),
    }
    log = lambda *x: print(*x, flush=True)
    log("machine:", res["machine"], "| torch", res["torch"], "| load", res["load_start"])

    # empty-process baselines, per side and thread count (median of 3)
    for t in threads:
        env = {"OMP_NUM_THREADS": str(t), "OPENBLAS_NUM_THREADS": str(t), **TUNED}
        for side, cmd in (("ckpt", [a.driver, "empty"]), ("torch", [PY, TORCH_PEER, "empty"])):
            vals = []
            for _ in range(3):
                rc, js, err = run_json(cmd, env)
                if rc:
                    sys.exit("empty %s failed: %s" % (side, err))
                vals.append(js["maxrss_kb"])
            res["empty"]["%s/%d" % (side, t)] = statistics.median(vals)
    log("empty-process peak RSS (kB):", res["empty"])

    for e in plan(a.quick):
        if a.only and a.only not in e["name"]:
            continue
        c, n = e["config"], e["name"]
        d = os.path.join(a.data, n)
        shutil.rmtree(d, ignore_errors=True)
        args = model_args(c)
        modes = [m for p in e["policies"] for m in torch_modes_for(p, c["depth"])]
        rc, js, err = run_json([a.driver, "export", d] + args + ["--policies", ",".join(e["policies"])], {"OMP_NUM_THREADS": "1"})
        if rc:
            sys.exit("peer_ckpt export %s failed: %s" % (n, err))
        # the gradient cross-check, first: torch (tuned) must agree; stock torch where it is timed
        stock_ok = None
        for variant, env in (("torch", TUNED), ("torch-stock", {"OPENBLAS_CORETYPE": None})):
            if variant == "torch-stock" and not (TUNED and e["sweep"] and "none" in e["policies"]):
                continue  # (without TUNED, stock torch is the main row)
            rc, chk, err = run_json([PY, TORCH_PEER, "check", d, "--modes", ",".join(modes if variant == "torch" else ["none"])],
                                    {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **env})
            chk = chk or {"check": "error", "stderr": err}
            chk.update(config=n, variant=variant, biases_nudged=js.get("biases_nudged_off_kinks"))
            res["checks"].append(chk)
            log("check %-28s %-12s %s worst %s" % (n, variant, chk["check"], chk.get("worst") or chk.get("tensor")))
            if variant == "torch" and chk["check"] != "ok":
                msg = "STOP: %s: ckpt and PyTorch disagree on %s (relative error %s > 1e-5)" % (n, chk.get("tensor"), chk.get("rel_err"))
                res["stopped"] = msg
                shutil.rmtree(d, ignore_errors=True)
                wrap_up(res, a)  # the table and plots of what ran before
                sys.exit(msg)
            if variant == "torch-stock":
                stock_ok = chk["check"] == "ok"
        big = c["width"] >= 1024 or (c["width"] >= 512 and c["model"] == "mlp" and c["depth"] > 64)
        reps, warm = (10, 2) if big else (a.reps, a.warmup)
        for t in threads:
            env = {"OMP_NUM_THREADS": str(t), "OPENBLAS_NUM_THREADS": str(t), **TUNED}
            rounds = a.rounds if t == 1 else 1
            jobs = []  # (side, variant, policy/mode, cmd, env)
            for p in e["policies"]:
                jobs.append(("ckpt", "ckpt", p, [a.driver, "time", d, "--policy", p, "--warmup", str(warm), "--reps", str(reps)], env))
                for m in torch_modes_for(p, c["depth"]):
                    jobs.append(("torch", "torch", m, [PY, TORCH_PEER, "time", d, "--mode", m, "--threads", str(t),
                                                       "--warmup", str(warm), "--reps", str(reps)], env))
            if e["sweep"] and t == 1:
                # context: ckpt with Eigen's GEMM (its choice without OPENBLAS_CORETYPE); torch as installed
                jobs.append(("ckpt", "ckpt-eigen", "none", [a.driver, "time", d, "--policy", "none", "--warmup", str(warm), "--reps", str(reps)],
                             {**env, "CKPT_GEMM": "eigen"}))
                if stock_ok:
                    stock_env = {**env, "OPENBLAS_CORETYPE": None}
                    jobs.append(("torch", "torch-stock", "none", [PY, TORCH_PEER, "time", d, "--mode", "none", "--threads", str(t),
                                                                  "--warmup", str(warm), "--reps", str(reps)], stock_env))
            if t == 1:
                memory_runs(res, n, jobs, log)
            for r in range(rounds):
                for side, variant, pol, cmd, jenv in (jobs if r % 2 == 0 else jobs[::-1]):
                    load = load_avg()
                    rc, js, err = run_json(cmd, jenv)
                    if rc == 124:  # a run that takes this long is a result too (2 threads under load)
                        res.setdefault("timeouts", []).append(dict(config=n, variant=variant, policy=pol, threads=t, load=load))
                        log("%-28s t=%d r=%d %-11s %-17s TIMED OUT (%s), load %.2f" % (n, t, r, variant, pol, err, load[0]))
                        continue
                    if rc:
                        sys.exit("%s %s %s failed: %s" % (variant, n, pol, err))
                    js.update(config=n, variant=variant, policy=pol, threads=t, round=r, load=load)
                    res["runs"].append(js)
                    log("%-28s t=%d r=%d %-11s %-17s wall %9.3f ms  cpu %9.3f ms  rss+ %7d kB  load %.2f" % (
                        n, t, r, variant, pol, js["median_ms"], js["cpu_median_ms"], js["maxrss_end_kb"] - js["rss_loaded_kb"], load[0]))
        shutil.rmtree(d, ignore_errors=True)
        save(res, a.out)
    wrap_up(res, a)


def wrap_up(res, a):
    """Merges into the previous results (--merge), writes the table and the plots."""
    res["load_end"] = load_avg()
    before = os.path.join(a.out, "results.json.before-merge")
    if a.merge and os.path.exists(before):
        with open(before) as f:
            old = json.load(f)
        done = {r["config"] for k in ("runs", "checks") for r in res.get(k, [])}
        for k in ("runs", "checks", "memory_runs"):
            old[k] = [r for r in old.get(k, []) if r.get("config") not in done] + res.get(k, [])
        old.setdefault("merged", []).append({k: res.get(k) for k in ("date", "command", "load_start", "load_end", "stopped")} |
                                            {"configs": sorted(done)})
        if res.get("stopped"):
            old["stopped"] = res["stopped"]
        res = old
        os.remove(before)
    finish(res, a.out)


MMAP_THRESHOLD = "4096"


def memory_runs(res, n, jobs, log):
    """Untimed one-step runs for the live-bytes figure: with glibc's mmap threshold fixed at one
    page every tensor buffer is its own mapping, unmapped when freed, so peak RSS growth tracks
    the live tensor bytes on both sides instead of glibc's heap high-water mark."""
    for side, variant, pol, cmd, jenv in jobs:
        if variant not in ("ckpt", "torch"):
            continue
        mcmd = cmd[:cmd.index("--warmup")] + ["--warmup", "0", "--reps", "1"]
        rc, js, err = run_json(mcmd, {**jenv, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
        if rc:
            sys.exit("%s %s %s (memory run) failed: %s" % (variant, n, pol, err))
        js.update(config=n, variant=variant, policy=pol, threads=1, load=load_avg(), malloc_mmap_threshold=MMAP_THRESHOLD)
        res.setdefault("memory_runs", []).append(js)
        log("%-28s t=1     %-11s %-17s live-bytes run: %7d kB" % (n, variant, pol, js["maxrss_first_kb"] - js["rss_loaded_kb"]))


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for l in out.splitlines():
            if l.startswith("Model name:"):
                return l.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def save(res, out):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, separators=(",", ":"))


# ------------------------------------------------------------------ summary


def summarise(res):
    """One row per (config, threads, variant, policy): pooled over rounds."""
    groups = {}
    for r in res["runs"]:
        k = (r["config"], r["threads"], r["variant"], r["policy"])
        groups.setdefault(k, []).append(r)
    rows = []
    for (cfg, t, variant, pol), rs in groups.items():
        times = [x for r in rs for x in r["times_ms"]]
        side = rs[0]["side"]
        empty = res["empty"].get("%s/%d" % (side, t), 0)
        rows.append({
            "config": cfg, "model": rs[0]["model"], "depth": rs[0]["depth"], "width": rs[0]["width"], "batch": rs[0]["batch"],
            "threads": t, "side": side, "variant": variant, "policy": pol,
            "median_ms": statistics.median(times), "min_ms": min(times), "steps": len(times),
            "cpu_median_ms": statistics.median([r["cpu_median_ms"] for r in rs]),
            "act_rss_kb": max(r["maxrss_end_kb"] - r["rss_loaded_kb"] for r in rs),
            "act_first_kb": max(r["maxrss_first_kb"] - r["rss_loaded_kb"] for r in rs),
            "rss_over_empty_kb": max(r["maxrss_end_kb"] for r in rs) - empty,
            "tape_peak_bytes": rs[0].get("tape_peak_bytes"),
            "load": max(r["load"][0] for r in rs),
            "threads_used": (rs[0].get("eigen_threads") if side == "ckpt" else "%s torch / %s BLAS" % (rs[0].get("torch_threads"), rs[0].get("openblas_threads"))),
        })
    for m in res.get("memory_runs", []):
        r = find(rows, config=m["config"], threads=m["threads"], variant=m["variant"], policy=m["policy"])
        if r:
            r["live_kb"] = m["maxrss_first_kb"] - m["rss_loaded_kb"]
    res["summary"] = rows
    return rows


def finish(res, out):
    rows = summarise(res)
    save(res, out)
    write_table(res, rows, out)
    plot(res, rows, out)


def find(rows, **k):
    for r in rows:
        if all(r.get(a) == b for a, b in k.items()):
            return r
    return None


def write_table(res, rows, out):
    L = []
    L.append("Measured %s on %s (%d cores), torch %s, command `%s`. Load average (1 min) at the start %.2f, at the end %s." % (
        res["date"], res["machine"], res["cores"], res["torch"], res["command"], res["load_start"][0],
        "%.2f" % res["load_end"][0] if "load_end" in res else "?"))
    for m in res.get("merged", []):
        L.append("")
        L.append("Rows of %s: from `%s`, %s, load %.2f at the start%s." % (
            ", ".join(m["configs"]), m["command"], m["date"], m["load_start"][0], "; it stopped" if m.get("stopped") else ""))
    eng = sorted({"%s: GEMM %s, OMP_NUM_THREADS=%s, OPENBLAS_NUM_THREADS=%s%s" % (
        r["variant"], r.get("gemm_engine") or "OpenBLAS " + str(r.get("openblas_core")), r.get("omp_num_threads_env"),
        r.get("openblas_num_threads_env"), ", torch threads %s" % r["torch_threads"] if "torch_threads" in r else "")
        for r in res["runs"]})
    L.append("")
    L.append("Threads and GEMM per run (from the runs' own records): " + "; ".join(eng) + ". ckpt's `blas` is "
             "OpenBLAS's %s kernel%s (the kernel PyTorch uses too); ckpt's elementwise loops are single-threaded." % (
                 KERNEL, " (OPENBLAS_CORETYPE=%s)" % KERNEL if TUNED else ", OpenBLAS's own choice"))
    L.append("")
    L.append("Step = forward + backward; median over %s steps (wall clock) after warm-up; `cpu` = median process CPU time per step; "
             "speed-up = torch / ckpt on the wall median (on the CPU-time median); `act MB` = peak RSS (getrusage ru_maxrss) growth "
             "over the RSS before the first step, after the first step / after all steps (same method both sides; PyTorch's grows after "
             "the first step: glibc serves the freed tensors' sizes from its heap, ckpt's tape keeps its buffers in a pool); `live MB` = "
             "the first step's growth in a separate untimed run with MALLOC_MMAP_THRESHOLD_=4096 (every tensor buffer its own mapping, "
             "unmapped when freed: RSS follows the live tensor bytes on both sides); `RSS over empty` = peak RSS minus an empty process's "
             "(peer_ckpt empty / python3 with torch imported); "
             "`tape MB` = ckpt's `tape.peak_bytes()`; `load` = highest 1-min load average seen at the start of the runs." % (
                 "%d-%d" % (min(r["steps"] for r in rows), max(r["steps"] for r in rows)) if rows else "?"))
    L.append("")
    L.append("| model | thr | policy | ckpt ms (cpu) | torch ms (cpu) | speed-up wall (cpu) | ckpt act MB first/all (tape MB) | torch act MB first/all | live MB ckpt / torch | RSS over empty MB ckpt / torch | load |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    cfgs = []
    for r in rows:
        if r["config"] not in cfgs:
            cfgs.append(r["config"])
    for cfg in cfgs:
        for t in sorted({r["threads"] for r in rows if r["config"] == cfg}):
            for r in [r for r in rows if r["config"] == cfg and r["threads"] == t and r["variant"] == "ckpt"]:
                tm = TORCH_OF.get(r["policy"])
                tr = find(rows, config=cfg, threads=t, variant="torch", policy=tm) if tm else None
                trs = find(rows, config=cfg, threads=t, variant="torch", policy=(tm or "") + "_seq") if tm else None
                tcol = "%.2f (%.2f)" % (tr["median_ms"], tr["cpu_median_ms"]) if tr else "n/a"
                if trs:
                    tcol += "; seq %.2f" % trs["median_ms"]
                sp = "%.2fx (%.2fx)" % (tr["median_ms"] / r["median_ms"], tr["cpu_median_ms"] / r["cpu_median_ms"]) if tr else "-"
                live = "%s / %s" % tuple("%.1f" % (x["live_kb"] / 1024) if x and "live_kb" in x else "-" for x in (r, tr))
                L.append("| %s | %d | %s | %.2f (%.2f) | %s | %s | %.1f/%.1f (%.1f) | %s | %s | %.0f / %s | %.1f |" % (
                    cfg, t, r["policy"], r["median_ms"], r["cpu_median_ms"], tcol, sp, r["act_first_kb"] / 1024, r["act_rss_kb"] / 1024,
                    (r["tape_peak_bytes"] or 0) / 2**20, "%.1f/%.1f" % (tr["act_first_kb"] / 1024, tr["act_rss_kb"] / 1024) if tr else "-", live,
                    r["rss_over_empty_kb"] / 1024, "%.0f" % (tr["rss_over_empty_kb"] / 1024) if tr else "-",
                    max(r["load"], tr["load"] if tr else 0)))
    extra = [r for r in rows if r["variant"] in ("ckpt-eigen", "torch-stock")]
    if extra:
        L.append("")
        L.append(("Context, policy none, 1 thread, wall-clock median ms: the main figures (both sides on OpenBLAS's %s kernel), " % KERNEL) +
                 "ckpt with CKPT_GEMM=eigen (Eigen's GEMM%s) and PyTorch as " % (": ckpt's choice on this machine without OPENBLAS_CORETYPE" if TUNED else "") +
                 "installed (OpenBLAS's %s kernel):" % STOCK_CORE)
        L.append("")
        L.append("| model | ckpt (OpenBLAS %s) | ckpt-eigen | torch (OpenBLAS %s) | torch-stock (%s) |" % (KERNEL, KERNEL, STOCK_CORE))
        L.append("|---|---|---|---|---|")
        for cfg in cfgs:
            cb = find(rows, config=cfg, threads=1, variant="ckpt-eigen")
            if not cb:
                continue
            ce = find(rows, config=cfg, threads=1, variant="ckpt", policy="none")
            tt = find(rows, config=cfg, threads=1, variant="torch", policy="none")
            ts = find(rows, config=cfg, threads=1, variant="torch-stock")
            f = lambda r: "%.2f" % r["median_ms"] if r else "-"
            L.append("| %s | %s | %s | %s | %s |" % (cfg, f(ce), f(cb), f(tt), f(ts) if ts else "check failed" if any(
                c["config"] == cfg and c["variant"] == "torch-stock" and c["check"] != "ok" for c in res["checks"]) else "-"))
    L.append("")
    if res.get("stopped"):
        L.append("**The run stopped:** %s" % res["stopped"])
        L.append("")
    bad = [c for c in res["checks"] if c["check"] != "ok"]
    ok = [c for c in res["checks"] if c["check"] == "ok"]
    L.append("Gradient cross-check: %d of %d passed (%d tensors compared in all; worst %.2g, %s)." % (
        len(ok), len(res["checks"]), sum(c.get("tensors_compared", 0) for c in ok),
        max((c["worst"]["rel"] for c in ok), default=0), max(ok, key=lambda c: c["worst"]["rel"])["worst"]["tensor"] if ok else "-"))
    for c in bad:
        L.append("- %s, %s: %s on %s, relative error %.3g" % (c["config"], c["variant"], c["check"], c.get("tensor"), c.get("rel_err", float("nan"))))
    arb = [(c["config"], x) for c in ok for x in c.get("arbitrated_by_float64", [])]
    if arb:
        L.append("")
        L.append("Tensors on which the two sides differ by more than 1e-5 relative while each is within 1e-5 of the same "
                 "model run in float64 (torch, float64 weights and input): passed, decided by the float64 run.")
        L.append("")
        L.append("| model | tensor | ckpt vs torch | ckpt vs float64 | torch vs float64 |")
        L.append("|---|---|---|---|---|")
        for cfg, x in arb:
            mine, theirs = x["vs_float64"]
            if x["tensor"].startswith("ckpt:"):  # 'mine' is ckpt's side
                ck, tc = mine, theirs
            else:
                ck, tc = theirs, mine
            L.append("| %s | %s | %.3g | %.3g | %.3g |" % (cfg, x["tensor"], x["rel_err"], ck, tc))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    write_short_table(res, rows, cfgs, out)


def write_short_table(res, rows, cfgs, out):
    """The README's table: every policy with a PyTorch counterpart, wall-clock medians."""
    L = ["| model (L layers, width, batch) | policy | 1 thread: ckpt / torch ms | speed-up (CPU time) | "
         "2 threads: ckpt / torch ms | live act. MB ckpt / torch | peak RSS MB ckpt / torch | load |",
         "|---|---|---|---|---|---|---|---|"]
    for cfg in cfgs:
        for r in [r for r in rows if r["config"] == cfg and r["threads"] == 1 and r["variant"] == "ckpt"]:
            tm = TORCH_OF.get(r["policy"])
            if not tm:
                continue
            tr = find(rows, config=cfg, threads=1, variant="torch", policy=tm)
            c2 = find(rows, config=cfg, threads=2, variant="ckpt", policy=r["policy"])
            t2 = find(rows, config=cfg, threads=2, variant="torch", policy=tm)
            if not tr:
                continue
            live = lambda x: "%.1f" % (x["live_kb"] / 1024) if x and "live_kb" in x else "-"
            L.append("| %s | %s | %.2f / %.2f | %.2fx (%.2fx) | %s | %s / %s | %.0f / %.0f | %.1f |" % (
                cfg.split("_L")[0] + " L" + cfg.split("_L")[1].replace("_", " "), r["policy"],
                r["median_ms"], tr["median_ms"], tr["median_ms"] / r["median_ms"], tr["cpu_median_ms"] / r["cpu_median_ms"],
                "%.1f / %.1f" % (c2["median_ms"], t2["median_ms"]) if c2 and t2 else "-",
                live(r), live(tr), r["rss_over_empty_kb"] / 1024, tr["rss_over_empty_kb"] / 1024, max(r["load"], tr["load"])))
    with open(os.path.join(out, "results_short.md"), "w") as f:
        f.write("\n".join(L) + "\n")


def plot(res, rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ths = sorted({r["threads"] for r in rows})
    fixed = [e["name"] for e in plan(False) if e["fixed"] and any(r["config"] == e["name"] for r in rows)]
    if fixed:
        fig, axes = plt.subplots(len(ths), len(fixed), figsize=(4.6 * len(fixed), 4.0 * len(ths)), squeeze=False)
        for i, t in enumerate(ths):
            for j, cfg in enumerate(fixed):
                ax = axes[i][j]
                for variant, color, marker in (("ckpt", "tab:blue", "o"), ("torch", "tab:red", "s")):
                    pts = [r for r in rows if r["config"] == cfg and r["threads"] == t and r["variant"] == variant]
                    for r in pts:
                        mk = "^" if r["policy"].endswith("_seq") else marker
                        ax.scatter(r["act_rss_kb"] / 1024, r["median_ms"], color=color, marker=mk, s=40, zorder=3)
                        ax.annotate(r["policy"], (r["act_rss_kb"] / 1024, r["median_ms"]), fontsize=7, xytext=(4, 3),
                                    textcoords="offset points", color=color)
                    for r in pts:  # hollow: ckpt's tape.peak_bytes, torch's live bytes (fixed mmap threshold)
                        x = (r["tape_peak_bytes"] or 0) / 2**20 if variant == "ckpt" else r.get("live_kb", 0) / 1024
                        if x > 0:
                            ax.scatter(x, r["median_ms"], facecolors="none", edgecolors=color,
                                       marker="^" if r["policy"].endswith("_seq") else marker, s=30)
                ax.set_title("%s, %d thread%s" % (cfg, t, "s" if t > 1 else ""), fontsize=9)
                ax.set_xlabel("peak activation memory, MB: filled RSS growth (glibc default);\nhollow: ckpt tape.peak_bytes, PyTorch live bytes (fixed mmap threshold)", fontsize=7)
                ax.set_ylabel("step time, ms (median)", fontsize=8)
                ys = [r["median_ms"] for r in rows if r["config"] == cfg and r["threads"] == t and r["variant"] in ("ckpt", "torch")]
                if ys and max(ys) > 10 * min(ys):
                    ax.set_yscale("log")
                else:
                    ax.set_ylim(bottom=0)
                ax.set_xlim(left=0)
                ax.grid(alpha=0.3)
        from matplotlib.lines import Line2D
        handles = [Line2D([], [], color="tab:blue", marker="o", ls="", label="ckpt"),
                   Line2D([], [], color="tab:blue", marker="o", ls="", mfc="none", label="ckpt, tape.peak_bytes"),
                   Line2D([], [], color="tab:red", marker="s", ls="", label="PyTorch checkpoint(use_reentrant=False)"),
                   Line2D([], [], color="tab:red", marker="s", ls="", mfc="none", label="PyTorch, live bytes"),
                   Line2D([], [], color="tab:red", marker="^", ls="", label="PyTorch checkpoint_sequential (reentrant)")]
        fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7.5)
        fig.suptitle("Step time against peak activation memory, one point per policy (%s, %s)" % (res["machine"], res["date"][:10]), fontsize=10)
        fig.tight_layout(rect=(0, 0.05, 1, 0.96))
        fig.savefig(os.path.join(out, "time_vs_memory.png"), dpi=90)
        plt.close(fig)

    models = [m for m in ("mlp", "lora") if any(r["model"] == m and r["depth"] == 64 and r["batch"] == 64 for r in rows)]
    if models:
        fig, axes = plt.subplots(1, len(models) + 1, figsize=(5.6 * (len(models) + 1), 4.6), squeeze=False)
        styles = {("ckpt", "none"): ("tab:blue", "-", "o"), ("ckpt", "ckpt"): ("tab:blue", "--", "o"),
                  ("torch", "none"): ("tab:red", "-", "s"), ("torch", "ckpt"): ("tab:red", "--", "s"),
                  ("ckpt-eigen", "none"): ("tab:cyan", ":", "x"), ("torch-stock", "none"): ("tab:orange", ":", "x")}
        for j, m in enumerate(models):
            ax = axes[0][j]
            ck = "sqrt_n" if m == "mlp" else "per_block"
            for t in ths:
                for variant, pol, kind in (("ckpt", "none", "none"), ("ckpt", ck, "ckpt"), ("torch", "none", "none"), ("torch", ck, "ckpt"),
                                           ("ckpt-eigen", "none", "none"), ("torch-stock", "none", "none")):
                    pts = sorted([r for r in rows if r["model"] == m and r["depth"] == 64 and r["batch"] == 64 and r["threads"] == t
                                  and r["variant"] == variant and r["policy"] == pol], key=lambda r: r["width"])
                    if len(pts) < 2:
                        continue
                    color, ls, mk = styles[(variant, kind)]
                    ax.plot([r["width"] for r in pts], [r["median_ms"] for r in pts], color=color, ls=ls, marker=mk,
                            alpha=1.0 if t == 1 else 0.45, lw=1.6 if t == 1 else 1.0,
                            label="%s %s, %d thr" % (variant, pol, t))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("width (depth 64, batch 64%s)" % (", rank 8" if m == "lora" else ""), fontsize=8)
            ax.set_ylabel("step time, ms (median)", fontsize=8)
            ax.set_title("%s stack: step time against width (faint: 2 threads)" % m.upper(), fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6.5, ncol=2)
        ax = axes[0][len(models)]  # speed-up: torch / ckpt, 1 thread
        for m, pol, color in (("mlp", "none", "tab:blue"), ("mlp", "sqrt_n", "tab:cyan"), ("lora", "none", "tab:green"),
                              ("lora", "per_block", "tab:olive")):
            pairs = []
            for r in rows:
                if r["model"] == m and r["depth"] == 64 and r["batch"] == 64 and r["threads"] == 1 and r["variant"] == "ckpt" and r["policy"] == pol:
                    tr = find(rows, config=r["config"], threads=1, variant="torch", policy=pol)
                    if tr:
                        pairs.append((r["width"], tr["median_ms"] / r["median_ms"], tr["cpu_median_ms"] / r["cpu_median_ms"]))
            pairs.sort()
            if len(pairs) >= 2:
                ax.plot([p[0] for p in pairs], [p[1] for p in pairs], color=color, marker="o", label="%s %s, wall" % (m, pol))
                ax.plot([p[0] for p in pairs], [p[2] for p in pairs], color=color, marker=".", ls=":", label="%s %s, CPU time" % (m, pol))
        ax.axhline(1.5, color="k", lw=0.8, ls="--")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axvline(256, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width (1 thread; dashed: the 1.5x goal, up to width 256)", fontsize=8)
        ax.set_ylabel("speed-up: PyTorch step time / ckpt step time", fontsize=8)
        ax.set_title("ckpt's speed-up over PyTorch", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6.5)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "time_vs_width.png"), dpi=90)
        plt.close(fig)


if __name__ == "__main__":
    main()

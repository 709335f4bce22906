"""Reads bench_cuda's JSON (and torch_cuda.py's, when given) and prints the short table that
bench/gpu_check.sh ends with: each figure next to its goal."""
import json
import sys


def load_benchmarks(path):
    """Google Benchmark writes its JSON a run at a time: a run cut short by the time limit
    leaves a file without its closing brackets, which is read up to its last complete run."""
    text = open(path).read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        end = text.rfind("\n    }")
        if end < 0:
            raise
        bench = json.loads(text[: end + len("\n    }")] + "\n  ]\n}")
        print(f"(bench_cuda was stopped before the end: {len(bench['benchmarks'])} runs read)")
        return bench


def main():
    bench = load_benchmarks(sys.argv[1])
    torch = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else None
    runs = [b for b in bench["benchmarks"] if b.get("run_type", "iteration") == "iteration"]
    rows = {b["name"].split("/")[0]: b for b in runs if not b.get("error_occurred")}
    for b in runs:
        if b.get("error_occurred"):
            print(f"**{b['name']} failed: {b.get('error_message', '?')}**")

    def ms(name):
        return rows[name]["real_time"] if name in rows else float("nan")

    def mib(name):
        return rows[name].get("peak_bytes", float("nan")) / 2**20 if name in rows else float("nan")

    ctx = bench.get("context", {})
    print(f"\n## bench_cuda on {torch['device'] if torch else ctx.get('host_name', '?')}, {ctx.get('date', '')}")
    print("MLP step, 16 layers, width 4096, batch 4096, float, TF32 products (forward + backward)\n")
    print("| variant | ms / step | TFLOP/s | peak activation MiB |")
    print("| --- | ---: | ---: | ---: |")
    for name in ("cublas_hand", "none", "sqrt_n", "offload"):
        if name in rows:
            print(f"| {name if name == 'cublas_hand' else 'ckpt ' + name} | {ms(name):.2f} | {rows[name].get('tflops', float('nan')):.1f} | {mib(name):.0f} |")
    if torch:
        for r in torch["results"]:
            print(f"| torch {r['variant']} | {r['ms']:.2f} | | {r['peak_bytes'] / 2**20:.0f} |")
    matches = rows.get("cublas_hand", {}).get("matches_ckpt", 1)
    if matches == 0:
        print("\n**The hand-written step's gradients did not match ckpt's before timing: its row compares unlike steps.**")
    elif matches != 1:
        print("\n**The check of the hand-written step against ckpt failed to run (see bench_cuda.txt).**")
    print("\n| goal | measured | target |")
    print("| --- | ---: | ---: |")
    print(f"| ckpt none speed / hand-written cuBLAS step | {ms('cublas_hand') / ms('none'):.2f} | >= 0.80 |")
    bw = rows.get("elementwise", {}).get("bytes_per_second", float("nan"))
    cp = rows.get("copy", {}).get("bytes_per_second", float("nan"))
    print(f"| fused elementwise bandwidth / device copy ({bw / 1e12:.2f} / {cp / 1e12:.2f} TB/s) | {bw / cp:.2f} | >= 0.70 |")
    for name, what in (("softmax", "4096 features"), ("layer_norm", "4096 features"), ("softmax_short", "16 features"),
                       ("softmax_long", "65536 features, 1024 columns")):
        b = rows.get(name, {}).get("bytes_per_second", float("nan"))
        print(f"| {name} forward bandwidth / device copy ({what}; {b / 1e12:.2f} TB/s, one read + one write) | {b / cp:.2f} | |")
    copies = ms("offload_copies")
    hidden = 1 - max(0.0, ms("offload") - ms("sqrt_n")) / copies if copies == copies and copies > 0 else float("nan")
    print(f"| offload copies hidden ({copies:.2f} ms of copies, offload - sqrt_n = {ms('offload') - ms('sqrt_n'):.2f} ms) | {hidden:.2f} | >= 0.90 |")
    print(f"| sqrt_n time / none | {ms('sqrt_n') / ms('none'):.2f} | |")
    print(f"| sqrt_n peak / none | {mib('sqrt_n') / mib('none'):.2f} | |")


if __name__ == "__main__":
    main()

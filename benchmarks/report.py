"""Turn a `gpu_check.json` into the dated Markdown table committed under benchmarks/results/.

    python benchmarks/report.py results/2026-11-23-h100-final-check.json > results/2026-11-23-h100-final-check.md

Only for gpu_check.py's output (its "bench" section: the first timings); benchmarks/bench.py writes its
own .md beside its .json.
"""

import json
import sys


def _cell(pair) -> str:
    return f"{pair[0]:.1e} ({pair[1]:.1e})"


def _worst(errors: dict) -> str:
    grads = [k for k in errors if k not in ("out", "lse")]
    if not grads:
        return "-"
    w = max(grads, key=lambda k: errors[k][0] / max(errors[k][1], 1e-30))
    return f"{w}: {_cell(errors[w])}"


def report(d: dict) -> str:
    i = d["info"]
    out = [f"# GPU check: {i['date']}, {i['device']}", "",
           f"torch {i['torch']}, triton {i['triton']}, CUDA {i['cuda']}. "
           "Command: `python benchmarks/gpu_check.py`.", ""]
    if d.get("correctness"):
        ok = sum(r["ok"] for r in d["correctness"])
        out += ["## Correctness at S=4096", "",
                "Every example against the interpreter with an fp64 golden (`attngen/verify.py`): the kernel's error",
                "must be at most K x the interpreter's error in the same dtype (K = 2 for 16-bit) plus a few ulps of",
                "the tensor's scale. Rows with grads check dq, dk, dv and learnable inputs from a random dO and dLSE.",
                "Each cell: kernel error (interpreter error).", "",
                "| spec | dtype | shape | grads | out | lse | worst gradient | ok | kernels |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in d["correctness"]:
            e = r["errors"]
            ran = ", ".join(r.get("kernels", [])) or "-"  # recorded since 2026-11-27
            out.append(f"| {r['name']} | {r['dtype']} | {r['shape']} | {'yes' if r['grad'] else 'no'} | "
                       f"{_cell(e['out'])} | {_cell(e['lse'])} | {_worst(e)} | {'yes' if r['ok'] else 'NO'} | {ran} |")
        out += ["", f"{ok} passed, {len(d['correctness']) - ok} failed.", ""]
    if d.get("determinism"):
        det = d["determinism"]
        out += [f"Learnable-input gradients bit-identical across two runs (relative_bias, bf16, B=2, H=16, S=4096): "
                f"default mode {det['default']}, deterministic mode {det['deterministic']}.", ""]
    if d.get("bench"):
        out += ["## Timings", "",
                "bf16, B=2, H=16, S=8192, D=128; `triton.testing.do_bench` medians in one process on the same inputs,",
                "outputs compared with Flex's first. TFLOP/s count visible entries; fwd+bwd counts 3.5 x the",
                "forward.", "",
                "| variant | density | attngen fwd ms | Flex fwd ms | cuDNN fwd ms | attngen TF/s | attngen/Flex fwd | "
                "attngen fwd+bwd ms | Flex fwd+bwd ms | attngen/Flex fwd+bwd |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["bench"]:
            cudnn = f"{r['cudnn_ms']:.3f}" if r.get("cudnn_ms") else "-"
            out.append(f"| {r['variant']} | {r['density']:.2f} | {r['attngen_ms']:.3f} | {r['flex_ms']:.3f} | "
                       f"{cudnn} | {r['attngen_tflops']:.0f} | {r['flex_ms'] / r['attngen_ms']:.2f} | "
                       f"{r['attngen_fb_ms']:.3f} | {r['flex_fb_ms']:.3f} | "
                       f"{r['flex_fb_ms'] / r['attngen_fb_ms']:.2f} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(report(json.load(open(sys.argv[1]))))

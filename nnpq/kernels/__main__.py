"""Check the Triton INT8 kernels at ANI sizes: errors against the plain-torch references and
times against torch's matmuls (fp32, tf32, bf16, fp16, and `torch._int_mm` with the activation
quantization in separate kernels).

    python -m nnpq.kernels --json kernels.json            # CUDA: under a minute, Triton compiles included
    python -m nnpq.kernels --json kernels.json --dry-run  # CPU: Triton's interpreter, tiny sizes

Shapes: ANI-2x layer 0 (K = 1008 AEV features) of the 8 ensemble members side by side, N = 8 x 256
(H) and 8 x 192 (O), for the 555-atom water box (O 185, H 370 atoms) and its 3x3x3 replica
(14,985 atoms: O 4,995, H 9,990). Every forward op includes the bias and CELU (alpha 0.1); the
torch ops run them as cuBLAS's bias epilogue plus one CELU kernel. Input-gradient ops include
the CELU derivative. Times are medians after a first call whose wall time, Triton compile and
autotuning included, is reported as ``first_call_s``: ``ms`` per eager call (CUDA events around
each call, so Python and launch costs count where they exceed the GPU's; triton.testing.do_bench)
and ``graph_ms`` per replay of the call captured in a CUDA graph (GPU time alone; the speed-up
columns of the printed table use these).
A soft time limit writes what was measured so far; a hard one (20 s later) ends the process.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nnpq.atomic_io import write_text_atomic

ALPHA = 0.1
MEMBERS = 8
K_AEV, K_RADIAL, GROUP = 1008, 112, 28  # "g32" on 1008 inputs: the largest divisor <= 32
WIDTH = {"O": 192, "H": 256}  # ANI-2x layer-0 width per member
SYSTEMS = {"water-555": {"O": 185, "H": 370}, "water-14985": {"O": 4995, "H": 9990}}
# dry run: the same K and groups, few atoms and channels (the interpreter is slow)
DRY_SYSTEMS = {"tiny": {"O": 5, "H": 17}}
DRY_WIDTH = {"O": 4, "H": 8}


class _OutOfTime(Exception):
    pass


def _on_alarm(signum, frame):
    raise _OutOfTime()


@dataclass
class LayerData:
    """One layer-0 product: AEV-like inputs, int8 codes in both layouts, and the dense weights they stand for."""

    x32: Tensor
    q: Tensor            # codes of the group-wise asymmetric layout (also used with channel scales)
    scale_g: Tensor
    zero_g: Tensor
    col: Tensor
    scale_c: Tensor      # per-channel symmetric scales (N, 1) for q
    wscale: Tensor       # the same per channel, (N,), for W8A8
    bias: Tensor
    w_g: Tensor          # dense float32 weight of (q, scale_g, zero_g, col)
    grad_y: Tensor


def _layer_data(m: int, n: int, device: str, seed: int) -> LayerData:
    from nnpq.kernels.int8 import dequantize_weight

    gen = torch.Generator().manual_seed(seed)
    # AEV-like: non-negative, angular terms an order of magnitude below the radial ones
    x = torch.rand(m, K_AEV, generator=gen)
    x[:, K_RADIAL:] *= 0.1
    q = torch.randint(-127, 128, (n, K_AEV), dtype=torch.int8, generator=gen)
    scale_g = (torch.rand(n, K_AEV // GROUP, generator=gen) + 0.5) * 2e-3
    zero_g = torch.randint(-20, 21, (n, K_AEV // GROUP), dtype=torch.int8, generator=gen)
    col = torch.rand(K_AEV, generator=gen) + 0.5
    scale_c = (torch.rand(n, 1, generator=gen) + 0.5) * 2e-3
    bias = torch.randn(n, generator=gen) * 0.1
    w_g = dequantize_weight(q, scale_g, zero_g, GROUP, col)
    grad_y = torch.randn(m, n, generator=gen)
    return LayerData(*(t.to(device) for t in (x, q, scale_g, zero_g, col, scale_c, scale_c.reshape(n).contiguous(),
                                                bias, w_g, grad_y)))


@contextmanager
def _tf32(enabled: bool):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _int8_unfused(x: Tensor, q: Tensor, wscale: Tensor, bias: Tensor) -> Tensor:
    """W8A8 as separate torch kernels: row absmax, quantize, torch._int_mm, rescale, bias, CELU."""
    amax = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    xq = torch.clamp(torch.round(x * (127.0 / amax)), -127, 127).to(torch.int8)
    acc = torch._int_mm(xq, q.t())
    return F.celu(acc.to(torch.float32) * (amax / 127.0) * wscale + bias, alpha=ALPHA)


@dataclass
class Op:
    """One timed product: ``run`` against ``reference``; ``tuner`` is the Triton autotuner behind it, if any."""

    name: str
    kind: str  # "forward" or "input-grad"
    run: Callable[[], Tensor]
    reference: Callable[[], Tensor]
    tuner: object = None
    tf32: bool = False


def _ops(d: LayerData) -> list[Op]:
    """The Triton kernels and the torch baselines on one layer's data."""
    from nnpq.kernels import reference as R
    from nnpq.kernels import triton_int8 as T

    k = K_AEV
    x16, xb = d.x32.half(), d.x32.bfloat16()
    g16 = d.grad_y.half()
    with _tf32(False):
        y32 = R.w8_linear_reference(d.x32, d.q, d.scale_g, d.zero_g, GROUP, d.bias, d.col, ALPHA)
    y16 = y32.half()
    w16, wb = d.w_g.half(), d.w_g.bfloat16()
    lin, grad, gt = T._w8_linear_tuned, T._w8_input_grad_tuned, T._w8a8_tuned

    def ref_g(xin):
        return lambda: R.w8_linear_reference(xin, d.q, d.scale_g, d.zero_g, GROUP, d.bias, d.col, ALPHA)

    def torch_linear(xin, w, b):
        return lambda: F.celu(F.linear(xin, w, b), alpha=ALPHA)

    def torch_grad(g, y, w):
        return lambda: (g * torch.where(y > 0, 1.0, y / ALPHA + 1.0)) @ w

    return [Op(*spec) for spec in [
        ("w8a16-fp16-g28-asym", "forward",
         lambda: T.w8_linear(x16, d.q, d.scale_g, d.zero_g, GROUP, d.bias, d.col, ALPHA), ref_g(x16), lin),
        ("w8a16-fp16-g28-asym-unfolded", "forward",
         lambda: T.w8_linear(x16, d.q, d.scale_g, d.zero_g, GROUP, d.bias, d.col, ALPHA, fold_scales=False),
         ref_g(x16), lin),
        ("w8a16-fp16-channel-sym", "forward",
         lambda: T.w8_linear(x16, d.q, d.scale_c, None, k, d.bias, None, ALPHA),
         lambda: R.w8_linear_reference(x16, d.q, d.scale_c, None, k, d.bias, None, ALPHA), lin),
        ("w8a16-bf16-g28-asym", "forward",
         lambda: T.w8_linear(xb, d.q, d.scale_g, d.zero_g, GROUP, d.bias, d.col, ALPHA), ref_g(xb), lin),
        ("w8a32-tf32-g28-asym", "forward",
         lambda: T.w8_linear(d.x32, d.q, d.scale_g, d.zero_g, GROUP, d.bias, d.col, ALPHA, precision="tf32"),
         ref_g(d.x32), lin),
        ("w8a8-row", "forward", lambda: T.w8a8_linear(d.x32, d.q, d.wscale, d.bias, ALPHA),
         lambda: R.w8a8_linear_reference(d.x32, d.q, d.wscale, d.bias, ALPHA), gt),
        ("w8a8-row-split112", "forward",
         lambda: T.w8a8_linear(d.x32, d.q, d.wscale, d.bias, ALPHA, act_splits=(K_RADIAL,)),
         lambda: R.w8a8_linear_reference(d.x32, d.q, d.wscale, d.bias, ALPHA, (K_RADIAL,)), gt),
        ("torch-fp32", "forward", torch_linear(d.x32, d.w_g, d.bias), ref_g(d.x32), None),
        ("torch-tf32", "forward", torch_linear(d.x32, d.w_g, d.bias), ref_g(d.x32), None, True),
        ("torch-bf16", "forward", torch_linear(xb, wb, d.bias.bfloat16()), ref_g(d.x32), None),
        ("torch-fp16", "forward", torch_linear(x16, w16, d.bias.half()), ref_g(d.x32), None),
        ("torch-int8-unfused", "forward", lambda: _int8_unfused(d.x32, d.q, d.wscale, d.bias),
         lambda: R.w8a8_linear_reference(d.x32, d.q, d.wscale, d.bias, ALPHA), None),
        ("grad-w8a16-fp16-g28-asym", "input-grad",
         lambda: T.w8_linear_input_grad(g16, d.q, d.scale_g, d.zero_g, GROUP, d.col, y16, ALPHA),
         lambda: R.w8_linear_input_grad_reference(g16, d.q, d.scale_g, d.zero_g, GROUP, d.col, y16, ALPHA), grad),
        ("grad-w8a32-tf32-g28-asym", "input-grad",
         lambda: T.w8_linear_input_grad(d.grad_y, d.q, d.scale_g, d.zero_g, GROUP, d.col, y32, ALPHA),
         lambda: R.w8_linear_input_grad_reference(d.grad_y, d.q, d.scale_g, d.zero_g, GROUP, d.col, y32, ALPHA), grad),
        ("grad-torch-fp32", "input-grad", torch_grad(d.grad_y, y32, d.w_g),
         lambda: R.w8_linear_input_grad_reference(d.grad_y, d.q, d.scale_g, d.zero_g, GROUP, d.col, y32, ALPHA), None),
        ("grad-torch-tf32", "input-grad", torch_grad(d.grad_y, y32, d.w_g),
         lambda: R.w8_linear_input_grad_reference(d.grad_y, d.q, d.scale_g, d.zero_g, GROUP, d.col, y32, ALPHA), None, True),
        ("grad-torch-bf16", "input-grad", torch_grad(d.grad_y.bfloat16(), y32.bfloat16(), wb),
         lambda: R.w8_linear_input_grad_reference(d.grad_y, d.q, d.scale_g, d.zero_g, GROUP, d.col, y32, ALPHA)),
    ]]


def _median_ms(fn: Callable[[], Tensor], cuda: bool, rep_ms: int) -> float:
    """Median wall time per eager call: CUDA events around each call, so host-side launch cost counts when it exceeds the GPU's."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _measure(system: str, element: str, m: int, n: int, op: Op, cuda: bool, rep_ms: int) -> dict:
    row = {"system": system, "element": element, "M": m, "N": n, "K": K_AEV, "op": op.name, "kind": op.kind}
    try:
        with _tf32(op.tf32):
            start = time.perf_counter()
            out = op.run()
            if cuda:
                torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - start, 3)
        with _tf32(False):
            ref = op.reference()
        err = (out.double() - ref.double()).abs().max().item()
        row["max_abs_err"] = err
        row["rel_err"] = err / max(ref.abs().max().item(), 1e-30)
        if cuda and getattr(op.tuner, "best_config", None) is not None:
            row["config"] = str(op.tuner.best_config)
        with _tf32(op.tf32):
            row["ms"] = _median_ms(op.run, cuda, rep_ms)
            if cuda:
                import triton.testing

                # replayed from a CUDA graph: GPU time alone, as in a graph-captured MD step
                row["graph_ms"] = float(triton.testing.do_bench_cudagraph(op.run, rep=rep_ms, return_mode="median"))
    except _OutOfTime:
        raise
    except Exception as exc:  # one failing op must not hide the others' numbers
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return row


def _add_ratios(rows: list[dict]) -> None:
    """speedup_vs_torch_{fp32,bf16} (eager) and graph_speedup_vs_torch_{fp32,bf16} (CUDA graph) per row."""
    for timing, label in (("ms", "speedup"), ("graph_ms", "graph_speedup")):
        base = {(r["system"], r["element"], r["op"]): r[timing] for r in rows if timing in r}
        for r in rows:
            if timing not in r:
                continue
            prefix = "grad-" if r["kind"] == "input-grad" else ""
            for ref in ("fp32", "bf16"):
                t = base.get((r["system"], r["element"], f"{prefix}torch-{ref}"))
                if t:
                    r[f"{label}_vs_torch_{ref}"] = round(t / r[timing], 3)


def _table(rows: list[dict]) -> str:
    head = f"{'system':<12} {'el':<2} {'M':>5} {'N':>5} {'op':<28} {'ms':>7} {'graph':>7} {'vs fp32':>7} " \
           f"{'vs bf16':>7} {'max|err|':>9} {'rel err':>8} {'1st s':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['system']:<12} {r['element']:<2} {r['M']:>5} {r['N']:>5} {r['op']:<28} FAILED {r['error']}")
            continue
        # ratios from graph replays where measured (GPU), else from eager calls
        label = "graph_speedup" if "graph_ms" in r else "speedup"
        lines.append(f"{r['system']:<12} {r['element']:<2} {r['M']:>5} {r['N']:>5} {r['op']:<28} {r['ms']:>7.4f} "
                     f"{r.get('graph_ms', float('nan')):>7.4f} {r.get(f'{label}_vs_torch_fp32', float('nan')):>7.2f} "
                     f"{r.get(f'{label}_vs_torch_bf16', float('nan')):>7.2f} "
                     f"{r['max_abs_err']:>9.2e} {r['rel_err']:>8.1e} {r['first_call_s']:>6.2f}")
    return "\n".join(lines)


def _run(args: argparse.Namespace, rows: list[dict]) -> None:
    cuda = not args.dry_run
    device = "cuda" if cuda else "cpu"
    systems, width = (DRY_SYSTEMS, DRY_WIDTH) if args.dry_run else (SYSTEMS, WIDTH)
    for si, (system, atoms) in enumerate(systems.items()):
        for ei, (element, m) in enumerate(atoms.items()):
            n = MEMBERS * width[element]
            data = _layer_data(m, n, device, seed=10 * si + ei)
            for op in _ops(data):
                row = _measure(system, element, m, n, op, cuda, args.rep_ms)
                rows.append(row)
                print(f"  {system} {element} {op.name}: " + (row.get("error") or f"{row['ms']:.4f} ms, rel err {row['rel_err']:.1e}"),
                      flush=True)
            del data
            if cuda:
                torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnpq.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results (JSON)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    parser.add_argument("--time-limit", type=int, default=100, help="seconds before stopping with partial results")
    parser.add_argument("--rep-ms", type=int, default=30, help="benchmark time per op (ms)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    elif not torch.cuda.is_available():
        print("no CUDA device: use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    import triton

    faulthandler.dump_traceback_later(args.time_limit + 20, exit=True)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(args.time_limit)
    started = time.perf_counter()
    result = {"device": torch.cuda.get_device_name() if not args.dry_run else f"cpu ({platform.processor() or 'interpreter'})",
              "torch": torch.__version__, "triton": triton.__version__, "dry_run": args.dry_run,
              "alpha": ALPHA, "complete": False, "rows": []}
    try:
        _run(args, result["rows"])
        result["complete"] = True
    except _OutOfTime:
        result["stopped"] = f"time limit of {args.time_limit} s reached"
    finally:
        signal.alarm(0)
        faulthandler.cancel_dump_traceback_later()
    result["total_s"] = round(time.perf_counter() - started, 1)
    _add_ratios(result["rows"])
    print(_table(result["rows"]))
    write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")
    failed = [r["op"] for r in result["rows"] if "error" in r]
    print(f"{len(result['rows'])} rows in {result['total_s']} s, {'complete' if result['complete'] else result['stopped']}"
          f", {len(failed)} failed; JSON: {args.json}")
    return 0 if result["complete"] and not failed else 1


if __name__ == "__main__":
    sys.exit(main())

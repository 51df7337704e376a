"""`nnpq bench`: rows other tools can read, ratios from the same run, a memory measure that adds up."""

from __future__ import annotations

import json

import pytest
import torch

from nnpq.bench import _peak_transient_mb, rows_to_json, run_bench
from tests.conftest import requires_ani2x


def test_peak_transient_memory_follows_allocations_and_frees():
    def call():
        a = torch.randn(1000, 1000)  # 4 MB
        b = a.to(torch.float64)  # 8 MB (to -> _to_copy -> empty_strided: counted once)
        del a  # back to 8 MB
        c = b * 2  # 16 MB held at once
        return c.sum()

    assert _peak_transient_mb(call, "cpu") == pytest.approx(16.0, abs=0.01)


@requires_ani2x
def test_bench_rows_carry_the_fields_and_same_run_ratios(w8_path, tmp_path):
    rows = run_bench(str(w8_path), systems=("alanine-dipeptide",), modes=("exact", "fast"), repeats=2,
                     md_steps=False)
    data = json.loads(json.dumps(rows_to_json(rows)))
    keys = {"system", "atoms", "device", "runtime", "mode", "ms_per_call", "speedup_vs_torchani_fp32", "peak_memory_mb"}
    assert all(keys <= set(r) for r in data)
    found = {(r["runtime"], r["mode"], r["model"]) for r in data}
    name = w8_path.name
    assert found == {("torchani-fp32", None, None), ("torchani-fp32-infer", None, None), ("nnpq", "fp32", "ani2x"),
                     ("nnpq", "exact", name), ("nnpq", "fast", name)}
    base = next(r for r in data if r["runtime"] == "torchani-fp32")["ms_per_call"]
    for r in data:
        assert r["atoms"] == 22 and r["device"] == "cpu" and r["ms_per_call"] > 0 and r["peak_memory_mb"] > 0
        assert r["speedup_vs_torchani_fp32"] == pytest.approx(base / r["ms_per_call"])

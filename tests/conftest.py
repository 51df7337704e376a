"""Shared fixtures: the real ANI-2x weights (TORCHANI_DATA_DIR) and one quantized artifact per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TORCHANI_NO_WARN_EXTENSIONS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.environ.get("TORCHANI_DATA_DIR"):
    shared = Path(__file__).resolve().parents[2] / "shared" / "torchani"
    if (shared / "StateDicts").is_dir():
        os.environ["TORCHANI_DATA_DIR"] = str(shared)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run the long end-to-end versions too")
    parser.addoption("--fuzz-examples", type=int, metavar="N",
                     help="examples per fuzz test of the .nnpq loader (default: a bounded CI run); "
                     "same as NNPQ_FUZZ_EXAMPLES=N")


def pytest_configure(config: pytest.Config) -> None:
    # Hypothesis settings are fixed when the fuzz module is imported, so the option travels as an env var
    if config.getoption("--fuzz-examples"):
        os.environ["NNPQ_FUZZ_EXAMPLES"] = str(config.getoption("--fuzz-examples"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="long run: use --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _weights_available(name: str) -> bool:
    data = os.environ.get("TORCHANI_DATA_DIR")
    from nnpq.models.fp32 import model_spec

    return bool(data) and (Path(data) / "StateDicts" / model_spec(name).state_dict_file).is_file()


requires_ani2x = pytest.mark.skipif(not _weights_available("ani2x"),
                                    reason="ANI-2x weights not found: set TORCHANI_DATA_DIR (see README)")


@pytest.fixture(scope="session")
def fp32_ani2x():
    """The real FP32 ANI-2x as an `ANIPotential` (all-pairs neighbour list)."""
    if not _weights_available("ani2x"):
        pytest.skip("ANI-2x weights not found: set TORCHANI_DATA_DIR")
    from nnpq.models import load_potential

    return load_potential("ani2x")


@pytest.fixture(scope="session")
def w8_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ANI-2x with every hidden layer rounded to nearest per-channel INT8 (no calibration needed)."""
    if not _weights_available("ani2x"):
        pytest.skip("ANI-2x weights not found: set TORCHANI_DATA_DIR")
    from nnpq.artifact import save_artifact
    from nnpq.models import load_fp32
    from nnpq.pipeline import source_info
    from nnpq.quant.apply import quantize_model
    from nnpq.spec.plan import default_plan

    path = tmp_path_factory.mktemp("artifact") / "ani2x-w8.nnpq"
    save_artifact(path, quantize_model(load_fp32("ani2x"), default_plan()), default_plan(), source_info("ani2x"))
    return path


@pytest.fixture(scope="session")
def w8_ani2x(w8_path: Path):
    """The fused runtime (exact mode) loaded from `w8_path`."""
    from nnpq.models import load_potential

    return load_potential(w8_path)


@pytest.fixture(scope="session")
def w8_reference(w8_path: Path):
    """The same file through TorchANI's per-member quantized layers: the plain-torch reference runtime."""
    from nnpq.models import load_quantized

    return load_quantized(w8_path, mode="reference")

"""Fuzzing the ``.nnpq`` loader with Hypothesis: whatever bytes it is handed, the outcome is either
a model holding exactly the tensors the file stores, or one `NnpqError` line naming the file.

The CI run is bounded (a few hundred examples in all, fixed seed); ``--fuzz-examples N`` or
``NNPQ_FUZZ_EXAMPLES=N`` gives every test N examples from a fresh random seed (the long run).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Callable

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st

from nnpq.artifact import MANIFEST_KEY, parse_artifact, read_artifact, save_artifact, tensors_sha256
from nnpq.errors import NnpqError
from nnpq.models import load_quantized
from nnpq.models.fp32 import weights_path
from nnpq.models.runtime import empty_runtime
from nnpq.spec.formats import ActivationFormat, TensorFormat, code_range
from nnpq.spec.packing import decode_codes, unpack_codes
from nnpq.spec.plan import PlanRule, QuantPlan

pytestmark = pytest.mark.skipif(not weights_path("ani2x").is_file(),
                                reason="ANI-2x weights not found: set TORCHANI_DATA_DIR")

LONG_RUN = int(os.environ.get("NNPQ_FUZZ_EXAMPLES", "0"))
NAME = "fuzz.nnpq"


def fuzz_settings(ci_examples: int) -> settings:
    """``ci_examples`` with a fixed seed in CI; the long run's count from a random seed otherwise."""
    return settings(max_examples=LONG_RUN or ci_examples, deadline=None, database=None, derandomize=not LONG_RUN,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# a plan touching every code path of the reader: symmetric and asymmetric codes, per-channel,
# per-tensor and grouped scales, 4- and 6-bit packing, fp16, bf16, dynamic activations, fp32 layers
FUZZ_PLAN = QuantPlan((
    PlanRule(TensorFormat("int", 8, "channel")),
    PlanRule(TensorFormat("fp32"), layer=3),
    PlanRule(TensorFormat("int", 4, "group", 32, False), element="H", layer=0, member=0),
    PlanRule(TensorFormat("int", 6, "tensor"), element="C", layer=1, member=1),
    PlanRule(TensorFormat("fp16"), element="N", layer=2),
    PlanRule(TensorFormat("bf16"), element="O", layer=2),
    PlanRule(TensorFormat("int", 8, "group", 16, False), element="S", layer=0),
    PlanRule(TensorFormat("int", 8, "channel"), element="F", layer=1, activation=ActivationFormat("dynamic")),
), description="fuzz target")


@dataclass
class Original:
    """The valid file and its parts, kept apart so each example rebuilds a file in milliseconds."""

    data: bytes
    header: dict
    body: bytes
    manifest: dict
    stored: dict[str, torch.Tensor]  # as on disk (narrow codes packed)
    tensors: dict[str, torch.Tensor]  # as loaded (codes unpacked)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of small tensor ops per example: torch's thread pool only adds overhead here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Original:
    from nnpq.models import load_fp32
    from nnpq.pipeline import source_info
    from nnpq.quant.apply import quantize_model

    model = quantize_model(load_fp32("ani2x"), FUZZ_PLAN)
    path = save_artifact(tmp_path_factory.mktemp("fuzz") / NAME, model, FUZZ_PLAN, source_info("ani2x"))
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    # H layer 0 of member 0 bit-packed; C layer 1 of member 1 and the per-channel INT8 layers entropy-coded
    assert list(manifest["packed_shapes"]) == ["potentials.nnp.neural_networks.members.0.atomics.H.layers.0.qweight"]
    assert "potentials.nnp.neural_networks.members.1.atomics.C.layers.1.qweight" in manifest["coded_shapes"]
    loaded = load_quantized(path, mode="reference").ani.state_dict()
    memory = model.state_dict()
    assert all(torch.equal(loaded[k], memory[k]) and loaded[k].dtype == memory[k].dtype for k in memory)
    return Original(data, header, data[8 + size:], manifest, safetensors.torch.load(data), read_artifact(path).tensors)


_models: dict[str, torch.nn.Module] = {}


def _load(artifact) -> dict[str, torch.Tensor]:
    """The state of a runtime model filled from ``artifact`` (one empty model per plan, reused)."""
    key = json.dumps(artifact.plan.to_dict(), sort_keys=True)
    if key not in _models:
        _models[key] = empty_runtime(artifact.model_name, artifact.plan)
    _models[key].load_state_dict(artifact.tensors, strict=True)
    return _models[key].state_dict()


def _assert_in_range(state: dict[str, torch.Tensor], plan: QuantPlan) -> None:
    """What the loader promises of any model it builds: finite floats, codes within their width, positive scales."""
    for key, t in state.items():
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()), key
        parts = key.split(".")
        if "atomics" not in parts or parts[-1] not in ("qweight", "scale", "zero"):
            continue
        member, element = int(parts[parts.index("members") + 1]), parts[parts.index("atomics") + 1]
        layer = 3 if parts[-2] == "final_layer" else int(parts[-2])
        fmt = plan.format_for(member, element, layer)
        lo, hi = code_range(fmt)
        values = t.numpy()
        if parts[-1] == "scale":
            assert (values > 0).all(), key
        elif parts[-1] == "qweight" or not fmt.symmetric:
            assert lo <= values.min() and values.max() <= hi, key
        else:
            assert not values.any(), key


def check(data: bytes, expected: Callable[[], dict[str, torch.Tensor]]) -> str:
    """Load ``data``: either a model whose state equals ``expected()`` (same dtypes, same values), or one
    NnpqError line naming the file. Any other exception fails the test. Returns which it was."""
    try:
        artifact = parse_artifact(data, NAME)
    except NnpqError as exc:
        message = str(exc)
        assert "\n" not in message and NAME in message, message
        _event("refused: " + message.removeprefix(NAME).split("(")[0].split(":")[0].strip())
        return "refused"
    state = _load(artifact)
    # the checksum covers names, dtypes, shapes and bytes: equal digests, equal state
    assert tensors_sha256(state) == tensors_sha256(expected())
    _assert_in_range(state, artifact.plan)
    _event("loaded")
    return "loaded"


def _event(text: str) -> None:
    """Hypothesis statistics inside a @given test; nothing for the plain control tests."""
    try:
        event(text)
    except InvalidArgument:
        pass


def assemble(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def with_manifest(original: Original, manifest) -> bytes:
    header = dict(original.header)
    header["__metadata__"] = {MANIFEST_KEY: json.dumps(manifest)}
    return assemble(header, original.body)


def with_tensors(original: Original, stored: dict[str, torch.Tensor]) -> bytes:
    """A file of ``stored`` with the manifest's checksum updated, so only the loader's own checks can object.

    Tensors of unchanged dtype and shape are spliced into the original bytes (fast); others re-serialized.
    """
    manifest = dict(original.manifest, tensors_sha256=tensors_sha256(stored))
    metadata = {MANIFEST_KEY: json.dumps(manifest)}
    body = bytearray(original.body)
    for key, t in stored.items():
        old = original.stored[key]
        if t is old:
            continue
        if t.dtype != old.dtype or t.shape != old.shape:
            return safetensors.torch.save(stored, metadata=metadata)
        begin, end = original.header[key]["data_offsets"]
        body[begin:end] = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return assemble(dict(original.header, __metadata__=metadata), bytes(body))


def loaded_form(original: Original, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``stored`` as a model holds it: packed codes expanded with the plan's widths, coded ones decoded,
    bfloat16-stored floats widened."""
    out = dict(stored)
    for key in original.manifest["bf16_tensors"]:
        out[key] = stored[key].to(torch.float32)
    for key, shape in original.manifest["coded_shapes"].items():
        out[key] = decode_codes(stored[key], tuple(shape))
    for key, shape in original.manifest["packed_shapes"].items():
        parts = key.split(".")
        fmt = FUZZ_PLAN.format_for(int(parts[parts.index("members") + 1]), parts[parts.index("atomics") + 1],
                                   int(parts[-2]))
        out[key] = unpack_codes(stored[key], fmt.bits, code_range(fmt)[0], tuple(shape))
    return out


# --- JSON values and paths -------------------------------------------------------------------

SPECIAL = st.sampled_from([None, True, False, 0, -1, 1, 2, 7, 8, 9, 32, 1.5, 32.0, -0.0, 2**63, -(2**63), 10**400,
                           float("nan"), float("inf"), "", "nnpq", "int", "group", "H", "ani2x", "ani1x", [], {},
                           [0], [1, 2], {"a": 1}, "x" * 300])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text())
JSON = st.recursive(SCALARS | SPECIAL, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def json_paths(value, prefix=()) -> list[tuple]:
    """Every path to a value inside a JSON tree (dict keys and list indices), the root excluded."""
    paths = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        paths.append(prefix + (key,))
        paths += json_paths(child, prefix + (key,))
    return paths


def mutate(tree, path: tuple, action: str, new):
    """A deep copy of ``tree`` with the value at ``path`` replaced, deleted, or given a new sibling key."""
    tree = json.loads(json.dumps(tree))
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent, dict):
        parent["fuzz_" + str(new)[:8]] = new
    else:
        parent[last] = new
    return tree


@st.composite
def json_edit(draw, paths: list[tuple]):
    return draw(st.sampled_from(paths)), draw(st.sampled_from(["replace", "replace", "delete", "add"])), draw(JSON)


# --- the fuzz tests ----------------------------------------------------------------------------

@fuzz_settings(100)
@given(st.binary(max_size=4096), st.booleans())
def test_random_bytes(original, data, with_length):
    if with_length:  # a plausible header length in front, so the fuzz reaches the JSON parser
        data = struct.pack("<Q", len(data)) + data
    assert check(data, dict) == "refused"


@fuzz_settings(60)
@given(JSON, st.one_of(st.none(), JSON))
def test_random_json_headers(original, header, manifest):
    if manifest is not None:
        header = {"__metadata__": {MANIFEST_KEY: json.dumps(manifest)}, "t": header}
    assert check(assemble(header, b""), dict) == "refused"


@fuzz_settings(80)
@given(st.data())
def test_mutated_manifests(original, data):
    path, action, new = data.draw(json_edit(json_paths(original.manifest)))
    check(with_manifest(original, mutate(original.manifest, path, action, new)), lambda: original.tensors)


@fuzz_settings(40)
@given(st.data())
def test_mutated_headers(original, data):
    table = {k: v for k, v in original.header.items() if k != "__metadata__"}
    path, action, new = data.draw(json_edit(json_paths(table)))
    header = dict(mutate(table, path, action, new), __metadata__=original.header["__metadata__"])
    check(assemble(header, original.body), lambda: original.tensors)


@fuzz_settings(20)
@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(1, 255)), min_size=1, max_size=8))
def test_flipped_tensor_bytes(original, flips):
    body = bytearray(original.body)
    for position, mask in flips:
        body[position % len(body)] ^= mask
    outcome = check(assemble(original.header, bytes(body)), lambda: original.tensors)
    assert outcome == ("refused" if body != original.body else "loaded")  # two flips may cancel


@fuzz_settings(40)
@given(st.data())
def test_altered_tensor_values_with_a_valid_checksum(original, data):
    """Bytes of one tensor replaced and the checksum recomputed: loaded exactly as stored, or refused."""
    key = data.draw(st.sampled_from(sorted(original.stored)))
    raw = original.stored[key].contiguous().reshape(-1).view(torch.uint8).clone()
    for _ in range(data.draw(st.integers(1, 4))):
        start = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        chunk = data.draw(st.binary(min_size=1, max_size=8))[: len(raw) - start]
        raw[start:start + len(chunk)] = torch.tensor(list(chunk), dtype=torch.uint8)
    stored = dict(original.stored)
    stored[key] = raw.view(original.stored[key].dtype).reshape(original.stored[key].shape)
    check(with_tensors(original, stored), lambda: loaded_form(original, stored))


DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.bool]


@fuzz_settings(25)
@given(st.data())
def test_changed_dtypes(original, data):
    """One tensor converted to another dtype (checksum recomputed) or relabelled in the header alone."""
    key = data.draw(st.sampled_from(sorted(original.stored)))
    dtype = data.draw(st.sampled_from([d for d in DTYPES if d != original.stored[key].dtype]))
    if data.draw(st.booleans()):
        stored = dict(original.stored, **{key: original.stored[key].to(dtype)})
        assert check(with_tensors(original, stored), dict) == "refused"
    else:
        names = {"I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                 "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                 "BOOL": torch.bool}
        header = json.loads(json.dumps(original.header))
        header[key]["dtype"] = next(name for name, d in names.items() if d == dtype)
        assert check(assemble(header, original.body), dict) == "refused"


@fuzz_settings(40)
@given(st.sampled_from(["length", "header", "data"]), st.floats(0, 1, exclude_max=True), st.binary(max_size=16))
def test_truncations_and_trailing_bytes(original, region, where, tail):
    header_end = 8 + struct.unpack("<Q", original.data[:8])[0]
    start, stop = {"length": (0, 8), "header": (8, header_end), "data": (header_end, len(original.data))}[region]
    cut = start + int(where * (stop - start))
    assert check(original.data[:cut], dict) == "refused"
    if tail:
        assert check(original.data + tail, dict) == "refused"


def test_unchanged_file_loads_equal(original):
    """The control: the untouched bytes, and a re-serialized manifest, load to the original tensors."""
    assert check(original.data, lambda: original.tensors) == "loaded"
    assert check(with_manifest(original, original.manifest), lambda: original.tensors) == "loaded"
    assert check(with_tensors(original, original.stored), lambda: original.tensors) == "loaded"

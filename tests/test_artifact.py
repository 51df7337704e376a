"""The ``.nnpq`` file: round trip, manifest, on-disk layout, and one-line errors for bad files."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import nnpq
from nnpq.artifact import FORMAT_VERSION, MANIFEST_KEY, read_artifact, save_artifact, tensors_sha256
from nnpq.cli import main as cli_main
from nnpq.errors import NnpqError
from nnpq.models import ANIPotential, energy_and_forces, load_fp32, load_potential
from nnpq.models.fp32 import file_sha256, weights_path
from nnpq.quant.apply import quantize_model
from nnpq.spec.plan import QuantPlan, default_plan
from nnpq.systems import get_system

# sha256 of TorchANI's published ani2x_state_dict.pt (the file in TORCHANI_DATA_DIR/StateDicts)
ANI2X_STATE_DICT_SHA256 = "1dd25bb0a3971494f1ee54586d9793d006b074e123e73c70562e2c5e78c9d178"

pytestmark = pytest.mark.skipif(not weights_path("ani2x").is_file(),
                                reason="ANI-2x weights not found: set TORCHANI_DATA_DIR")


@pytest.fixture(scope="module")
def in_memory_w8():
    """The default-plan INT8 ANI-2x made in memory, never written to disk."""
    return quantize_model(load_fp32("ani2x"), default_plan())


@pytest.fixture(scope="module")
def w4_path(tmp_path_factory) -> Path:
    """ANI-2x with 4-bit asymmetric codes in groups of 32, bit-packed on disk."""
    from nnpq.pipeline import source_info
    from nnpq.spec.formats import TensorFormat
    from nnpq.spec.plan import uniform_plan

    plan = uniform_plan(TensorFormat("int", 4, "group", 32, False))
    path = tmp_path_factory.mktemp("w4") / "w4.nnpq"
    save_artifact(path, quantize_model(load_fp32("ani2x"), plan), plan, source_info("ani2x"))
    return path


def _energy_forces(potential: ANIPotential, name: str) -> tuple[float, np.ndarray]:
    system = get_system(name)
    return energy_and_forces(potential, system.atomic_numbers, system.positions, system.box)


def _header(data: bytes) -> dict:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size])


def _rewrite_manifest(src: Path, dst: Path, edit) -> Path:
    """Copy ``src`` to ``dst`` with ``edit(manifest)`` applied; tensors (and their checksum) unchanged."""
    data = src.read_bytes()
    manifest = json.loads(_header(data)["__metadata__"][MANIFEST_KEY])
    edit(manifest)
    tensors = safetensors.torch.load(data)
    dst.write_bytes(safetensors.torch.save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)}))
    return dst


def _rewrite_tensors(src: Path, dst: Path, edit, stored: bool = False) -> Path:
    """Copy ``src`` to ``dst`` with ``edit(tensors)`` applied and the checksum recomputed, so that
    only the loader's own checks can catch the change. ``edit`` sees entropy-coded codes decoded
    and bfloat16-stored floats widened (and results of the stored type are stored so again; others
    are left plain), or with ``stored`` the bytes as stored."""
    from nnpq.spec.packing import decode_codes, encode_codes

    data = src.read_bytes()
    manifest = json.loads(_header(data)["__metadata__"][MANIFEST_KEY])
    tensors = safetensors.torch.load(data)
    coded = {} if stored else manifest.get("coded_shapes", {})
    narrowed = [] if stored else manifest.get("bf16_tensors", [])
    for key, shape in coded.items():
        tensors[key] = decode_codes(tensors[key], tuple(shape))
    for key in narrowed:
        tensors[key] = tensors[key].to(torch.float32)
    edit(tensors)
    for key in list(coded):
        if tensors[key].dtype == torch.int8:
            tensors[key] = encode_codes(tensors[key])
        else:
            del manifest["coded_shapes"][key]
    for key in list(narrowed):
        if tensors[key].dtype == torch.float32:
            tensors[key] = tensors[key].to(torch.bfloat16)
        else:
            narrowed.remove(key)
    manifest["tensors_sha256"] = tensors_sha256(tensors)
    dst.write_bytes(safetensors.torch.save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)}))
    return dst


def _first(tensors: dict, suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def _one_line_error(path: Path, phrase: str) -> str:
    """Both the reader and the model loader reject ``path`` with one line containing ``phrase``."""
    with pytest.raises(NnpqError) as info:
        read_artifact(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert phrase in message, message
    with pytest.raises(NnpqError, match=re.escape(phrase)):
        load_potential(path)
    return message


# --- round trip ----------------------------------------------------------------------------

def test_loading_twice_is_bit_identical(w8_path):
    first, second = load_potential(w8_path), load_potential(w8_path)
    for name in ("aspirin", "sfcl-sulfonamide"):
        e1, f1 = _energy_forces(first, name)
        e2, f2 = _energy_forces(second, name)
        assert e1 == e2
        assert np.array_equal(f1, f2)


def test_file_equals_in_memory_quantized_model(w8_path, w8_reference, in_memory_w8):
    memory = ANIPotential(in_memory_w8, "memory", "ani2x")
    loaded_state, memory_state = w8_reference.state_dict(), memory.state_dict()
    assert set(loaded_state) == set(memory_state)
    for key, value in memory_state.items():
        assert loaded_state[key].dtype == value.dtype, key
        assert torch.equal(loaded_state[key], value), key
    for name in ("aspirin", "sfcl-sulfonamide"):
        e_file, f_file = _energy_forces(w8_reference, name)
        e_mem, f_mem = _energy_forces(memory, name)
        assert e_file == e_mem
        assert np.array_equal(f_file, f_mem)
    # and it is not simply the FP32 model
    e_fp32, _ = _energy_forces(ANIPotential(load_fp32("ani2x"), "fp32", "ani2x"), "aspirin")
    assert e_fp32 != e_mem


def test_save_and_read_back(tmp_path, in_memory_w8):
    source = {"model": "ani2x", "sha256": "0" * 64}
    path = save_artifact(tmp_path / "copy.nnpq", in_memory_w8, default_plan(), source, metrics={"x": 1.5})
    artifact = read_artifact(path)
    assert artifact.model_name == "ani2x"
    assert artifact.manifest["metrics"] == {"x": 1.5}
    state = in_memory_w8.state_dict()
    assert set(artifact.tensors) == set(state)
    for key, value in state.items():
        assert torch.equal(artifact.tensors[key], value), key
    with safe_open(str(path), "pt") as f:  # the checksum covers the tensors as stored (codes coded)
        assert artifact.manifest["tensors_sha256"] == tensors_sha256({k: f.get_tensor(k) for k in f.keys()})


# --- manifest and on-disk layout -----------------------------------------------------------

def test_manifest_contents(w8_path):
    artifact = read_artifact(w8_path)
    manifest = artifact.manifest
    assert manifest["format"] == "nnpq"
    assert manifest["format_version"] == FORMAT_VERSION == 3
    assert manifest["nnpq_version"] == nnpq.__version__
    assert manifest["source"]["model"] == "ani2x" == artifact.model_name
    assert manifest["source"]["state_dict_file"] == "ani2x_state_dict.pt"
    assert manifest["source"]["sha256"] == ANI2X_STATE_DICT_SHA256
    assert file_sha256(weights_path("ani2x")) == ANI2X_STATE_DICT_SHA256
    assert artifact.plan == default_plan()
    assert QuantPlan.from_dict(manifest["plan"]) == default_plan()
    with safe_open(str(w8_path), "pt") as f:  # over the tensors as stored
        assert manifest["tensors_sha256"] == tensors_sha256({k: f.get_tensor(k) for k in f.keys()})
    # per-channel INT8 codes are entropy-coded; only narrower codes are ever bit-packed
    assert manifest["packed_shapes"] == {} and len(manifest["coded_shapes"]) == 8 * 7 * 3
    assert manifest["metrics"] == {}  # saved without an evaluation (the pipeline tests cover metrics)


def test_file_is_safetensors_with_int8_codes(w8_path):
    data = w8_path.read_bytes()
    # safetensors: little-endian u64 header length, then a JSON object; never a pickle/zip
    assert not data.startswith((b"PK", b"\x80"))
    (size,) = struct.unpack("<Q", data[:8])
    assert 0 < size < len(data) - 8
    assert data[8:9] == b"{"
    header = json.loads(data[8:8 + size])
    assert MANIFEST_KEY in header["__metadata__"]

    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    coded = manifest["coded_shapes"]
    with safe_open(str(w8_path), framework="pt") as fh:
        keys = list(fh.keys())
        qweights = [k for k in keys if k.endswith(".qweight")]
        assert len(qweights) == 8 * 7 * 3
        for key in qweights[:: 21]:  # per-channel INT8 codes: entropy-coded uint8 streams of the int8 codes
            assert key in coded and fh.get_tensor(key).dtype == torch.uint8, key
            scale = key[: -len("qweight")] + "scale"  # on the bfloat16 grid, stored so
            assert scale in manifest["bf16_tensors"] and fh.get_tensor(scale).dtype == torch.bfloat16
        assert header[qweights[-1]]["dtype"] == "U8"
        # final layers are kept as FP32 Linear weights
        assert any(k.endswith("final_layer.weight") and header[k]["dtype"] == "F32" for k in keys)
    assert all(read_artifact(w8_path).tensors[k].dtype == torch.int8 for k in qweights)
    # coded INT8 weights take ~1/5 of the FP32 state dict on disk (measured 10.6 MB vs 54.8 MB of networks)
    assert len(data) < 0.22 * weights_path("ani2x").stat().st_size


# --- bad files -----------------------------------------------------------------------------

def test_truncated_file(w8_path, tmp_path):
    data = w8_path.read_bytes()
    bad = tmp_path / "truncated.nnpq"
    bad.write_bytes(data[: len(data) // 2])
    _one_line_error(bad, "not a valid nnpq model file")
    # cut inside the header too
    bad.write_bytes(data[:100])
    _one_line_error(bad, "not a valid nnpq model file")


def test_altered_file_fails_checksum(w8_path, tmp_path):
    data = bytearray(w8_path.read_bytes())
    (size,) = struct.unpack("<Q", bytes(data[:8]))
    position = len(data) - 10
    assert position > 8 + size  # inside the tensor data, not the header
    data[position] ^= 0x01
    bad = tmp_path / "altered.nnpq"
    bad.write_bytes(bytes(data))
    message = _one_line_error(bad, "corrupt")
    assert "checksum" in message


def test_foreign_safetensors(tmp_path):
    bad = tmp_path / "foreign.nnpq"
    safetensors.torch.save_file({"weight": torch.randn(4, 4), "codes": torch.zeros(3, dtype=torch.int8)}, str(bad))
    _one_line_error(bad, "not an nnpq model")
    safetensors.torch.save_file({"weight": torch.randn(2)}, str(bad), metadata={"author": "someone"})
    _one_line_error(bad, "not an nnpq model")


def test_pickle_file_is_rejected_without_unpickling(tmp_path):
    bad = tmp_path / "pickled.nnpq"
    torch.save({"weight": torch.randn(4, 4)}, bad)
    _one_line_error(bad, "not a valid nnpq model file")
    legacy = tmp_path / "legacy.nnpq"
    torch.save({"weight": torch.randn(4, 4)}, legacy, _use_new_zipfile_serialization=False)
    _one_line_error(legacy, "not a valid nnpq model file")


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.nnpq"
    empty.write_bytes(b"")
    _one_line_error(empty, "not a valid nnpq model file")
    message = _one_line_error(tmp_path / "nowhere.nnpq", "not found")
    assert "nnpq quantize" in message


def test_newer_format_version(w8_path, tmp_path):
    # control: rewriting the manifest unchanged gives a valid file
    same = _rewrite_manifest(w8_path, tmp_path / "same.nnpq", lambda m: None)
    assert read_artifact(same).manifest["format_version"] == FORMAT_VERSION

    newer = _rewrite_manifest(w8_path, tmp_path / "newer.nnpq", lambda m: m.update(format_version=999))
    message = _one_line_error(newer, "newer")
    assert "999" in message and "upgrade nnpq" in message


def test_damaged_manifest(w8_path, tmp_path):
    no_plan = _rewrite_manifest(w8_path, tmp_path / "noplan.nnpq", lambda m: m.pop("plan"))
    _one_line_error(no_plan, "damaged nnpq manifest")
    other = _rewrite_manifest(w8_path, tmp_path / "other.nnpq", lambda m: m.update(format="onnx"))
    _one_line_error(other, "damaged nnpq manifest")
    bad_json = tmp_path / "badjson.nnpq"
    bad_json.write_bytes(safetensors.torch.save({"w": torch.zeros(2)}, metadata={MANIFEST_KEY: "{not json"}))
    _one_line_error(bad_json, "damaged nnpq manifest")


def test_tensors_that_do_not_fit_the_named_model(w8_path, tmp_path):
    """ANI-2x tensors labelled as ANI-1x: refused before anything is built, naming the misfit."""
    mislabelled = _rewrite_manifest(w8_path, tmp_path / "mislabelled.nnpq",
                                    lambda m: m["source"].update(model="ani1x"))
    message = _one_line_error(mislabelled, "does not fit the ani1x architecture")
    assert "unexpected tensor" in message and "atomics.Cl" in message


# --- CLI -----------------------------------------------------------------------------------

def test_cli_info_bad_file_one_line_no_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.nnpq"
    bad.write_bytes(b"definitely not a model")
    assert cli_main(["info", str(bad)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("nnpq: error: ")
    assert "bad.nnpq" in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""

    assert cli_main(["info", str(tmp_path / "missing.nnpq")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nnpq: error: ") and "not found" in err[0]


def test_cli_info_good_file(w8_path, capsys):
    assert cli_main(["info", str(w8_path)]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["format"] == "nnpq"
    assert manifest["source"]["sha256"] == ANI2X_STATE_DICT_SHA256
    assert "metrics" not in manifest  # only with --json


# --- atomic writes -------------------------------------------------------------------------

def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, in_memory_w8):
    path = tmp_path / "out" / "model.nnpq"
    source = {"model": "ani2x", "sha256": ANI2X_STATE_DICT_SHA256}
    save_artifact(path, in_memory_w8, default_plan(), source)
    assert os.listdir(path.parent) == ["model.nnpq"]
    first = path.read_bytes()
    # overwrite in place: still one complete, valid file and no leftovers
    save_artifact(path, in_memory_w8, default_plan(), source, metrics={"run": 2})
    assert os.listdir(path.parent) == ["model.nnpq"]
    assert read_artifact(path).manifest["metrics"] == {"run": 2}
    assert len(path.read_bytes()) > 0.9 * len(first)
    # a failed rename (target is a folder) cleans its temporary file up
    blocked = tmp_path / "out" / "folder.nnpq"
    blocked.mkdir()
    with pytest.raises(OSError):
        save_artifact(blocked, in_memory_w8, default_plan(), source)
    assert sorted(os.listdir(path.parent)) == ["folder.nnpq", "model.nnpq"]
    assert not any(name.endswith(".tmp") for name in os.listdir(path.parent))


def test_checksum_handles_scalar_tensors():
    from nnpq.artifact import tensors_sha256

    a = tensors_sha256({"s": torch.tensor(1.0), "v": torch.ones(3)})
    b = tensors_sha256({"s": torch.tensor(2.0), "v": torch.ones(3)})
    assert a != b


def test_narrow_codes_are_bit_packed_and_round_trip(w4_path):
    """4-bit codes take 4 bits on disk and load back to the very same model."""
    from nnpq.spec.formats import TensorFormat
    from nnpq.spec.plan import uniform_plan

    plan = uniform_plan(TensorFormat("int", 4, "group", 32, False))
    model = quantize_model(load_fp32("ani2x"), plan)
    assert w4_path.stat().st_size < 10e6  # int8 storage of the same codes would take ~14 MB
    manifest = read_artifact(w4_path).manifest  # each layer packed, or coded where that is 5% smaller
    assert len(manifest["packed_shapes"]) + len(manifest["coded_shapes"]) == 8 * 7 * 3
    assert manifest["packed_shapes"] and not set(manifest["packed_shapes"]) & set(manifest["coded_shapes"])
    mol = get_system("ethanol")
    e1, f1 = energy_and_forces(ANIPotential(model, "mem", "ani2x"), mol.atomic_numbers, mol.positions)
    e2, f2 = energy_and_forces(load_potential(w4_path, mode="reference"), mol.atomic_numbers, mol.positions)
    assert e1 == e2 and np.array_equal(f1, f2)


# --- untrusted files: each case of issue 11 is refused with its own one-line message -------

def test_deeply_nested_header_is_refused_not_a_recursion_error(tmp_path, capsys):
    nested = b"[" * 200_000 + b"]" * 200_000
    bad = tmp_path / "nested.nnpq"
    bad.write_bytes(struct.pack("<Q", len(nested)) + nested)
    _one_line_error(bad, "not a valid nnpq model file")
    assert cli_main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nested.nnpq is not a valid nnpq model file" in err
    assert "Traceback" not in err and "RecursionError" not in err


def test_deeply_nested_manifest(tmp_path):
    bad = tmp_path / "nested-manifest.nnpq"
    bad.write_bytes(safetensors.torch.save({"w": torch.zeros(2)}, metadata={MANIFEST_KEY: "[" * 100_000}))
    message = _one_line_error(bad, "damaged nnpq manifest (not valid JSON")
    assert "nested-manifest.nnpq" in message


def test_header_size_is_capped(tmp_path):
    bad = tmp_path / "huge-header.nnpq"
    bad.write_bytes(struct.pack("<Q", 2**40) + b"{}" + bytes(64))
    _one_line_error(bad, "over the 100 MB limit")


def test_duplicate_keys_and_overlapping_tensor_data(w8_path, tmp_path):
    data = w8_path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + size]
    duplicate = header[:-1].rstrip() + b',"__metadata__":{}}'
    bad = tmp_path / "duplicate.nnpq"
    bad.write_bytes(struct.pack("<Q", len(duplicate)) + duplicate + data[8 + size:])
    _one_line_error(bad, "not a valid nnpq model file")
    table = json.loads(header)
    key = sorted(k for k in table if k != "__metadata__")[1]
    table[key]["data_offsets"] = [0, table[key]["data_offsets"][1] - table[key]["data_offsets"][0]]
    text = json.dumps(table).encode()
    bad.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])
    _one_line_error(bad, "overlapping or with gaps")


def test_format_version_zero(w8_path, tmp_path):
    zero = _rewrite_manifest(w8_path, tmp_path / "v0.nnpq", lambda m: m.update(format_version=0))
    _one_line_error(zero, "format_version 0 is not a format version; nnpq writes 1 to 3")
    text = _rewrite_manifest(w8_path, tmp_path / "vtext.nnpq", lambda m: m.update(format_version="1"))
    _one_line_error(text, "field format_version must be an integer, got '1'")


def test_float_group_size(w8_path, tmp_path):
    def edit(m):
        m["plan"]["rules"][0]["weight"].update(granularity="group", group_size=32.0)

    bad = _rewrite_manifest(w8_path, tmp_path / "float-group.nnpq", edit)
    _one_line_error(bad, "field plan.rules[0].weight.group_size must be an integer, got 32.0")


def test_plan_rules_out_of_range(w8_path, tmp_path):
    cases = {
        "bits": (lambda r: r["weight"].update(bits=9), "weight.bits must be from 2 to 8, got 9"),
        "element": (lambda r: r.update(element="Xe"), "element must be one of H, C, N, O, S, F, Cl"),
        "layer": (lambda r: r.update(layer=4), "layer must be a layer index from 0 to 3, got 4"),
        "member": (lambda r: r.update(member=8), "member must be an ensemble member from 0 to 7, got 8"),
        "kind": (lambda r: r["weight"].update(kind="int3"), "weight.kind must be one of int, fp32, fp16, bf16"),
        "unknown": (lambda r: r.update(colour="red"), "unexpected field plan.rules[0].colour"),
        "rounding": (lambda r: r.update(rounding="gptq"), "rounding must be 'nearest' or null, got 'gptq'"),
    }
    for label, (edit, phrase) in cases.items():
        bad = _rewrite_manifest(w8_path, tmp_path / f"{label}.nnpq", lambda m: edit(m["plan"]["rules"][0]))
        _one_line_error(bad, phrase)


def test_wrong_packed_shapes(w4_path, tmp_path):
    key = sorted(read_artifact(w4_path).manifest["packed_shapes"])[0]
    swapped = _rewrite_manifest(w4_path, tmp_path / "swapped.nnpq",
                                lambda m: m["packed_shapes"].update({key: m["packed_shapes"][key][::-1]}))
    message = _one_line_error(swapped, "damaged nnpq manifest (packed_shapes")
    shape = read_artifact(w4_path).manifest["packed_shapes"][key]
    assert f"is {shape[::-1]}, the layer is {shape}" in message
    missing = _rewrite_manifest(w4_path, tmp_path / "missing.nnpq", lambda m: m["packed_shapes"].pop(key))
    _one_line_error(missing, f"packed_shapes lacks {key}")
    mangled = _rewrite_manifest(w4_path, tmp_path / "mangled.nnpq",
                                lambda m: m["packed_shapes"].update({key: "160x1008"}))
    _one_line_error(mangled, "must be a list of sizes")


def test_codes_outside_their_range(w8_path, tmp_path):
    def edit(tensors):
        tensors[_first(tensors, "qweight")][0, 0] = -128  # symmetric int8 codes stop at -127

    bad = _rewrite_tensors(w8_path, tmp_path / "codes.nnpq", edit)
    _one_line_error(bad, "codes outside the int8/channel range [-127, 127] (found -128)")


def test_zero_points_outside_their_range(w8_path, w4_path, tmp_path):
    asym = _rewrite_tensors(w4_path, tmp_path / "zero4.nnpq", lambda t: t[_first(t, "zero")].view(-1)[0].fill_(8))
    _one_line_error(asym, "zero points outside the int4/g32/asym range [-8, 7] (found 8)")
    sym = _rewrite_tensors(w8_path, tmp_path / "zero8.nnpq", lambda t: t[_first(t, "zero")].fill_(3))
    _one_line_error(sym, "zero points must be 0 for the symmetric int8/channel (found 3)")


def test_nan_and_negative_scales(w8_path, tmp_path):
    nan = _rewrite_tensors(w8_path, tmp_path / "nan.nnpq", lambda t: t[_first(t, ".scale")].view(-1)[5].fill_(float("nan")))
    _one_line_error(nan, "NaN or infinite values")
    negative = _rewrite_tensors(w8_path, tmp_path / "negative.nnpq", lambda t: t[_first(t, ".scale")].view(-1)[5].fill_(-0.5))
    _one_line_error(negative, "scales must be positive (found -0.5)")
    zero = _rewrite_tensors(w8_path, tmp_path / "zero.nnpq", lambda t: t[_first(t, ".scale")].view(-1)[5].fill_(0.0))
    _one_line_error(zero, "scales must be positive (found 0)")
    col = _rewrite_tensors(w8_path, tmp_path / "col.nnpq", lambda t: t[_first(t, "col_scale")].fill_(2.0))
    _one_line_error(col, "col_scale: must be 1 for a layer without input equalization (found 2)")
    bias = _rewrite_tensors(w8_path, tmp_path / "bias.nnpq", lambda t: t[_first(t, "final_layer.bias")].fill_(float("inf")))
    _one_line_error(bias, "final_layer.bias: NaN or infinite values")


def test_wrong_dtypes_are_refused_not_cast(w8_path, tmp_path):
    cases = {
        ".scale": (torch.float64, "is float64 [224, 1], expected float32 [224, 1]"),
        "qweight": (torch.int16, "is int16 [224, 1008], expected int8 [224, 1008]"),
        "final_layer.weight": (torch.float16, "is float16 [1, 160], expected float32 [1, 160]"),
    }
    for suffix, (dtype, phrase) in cases.items():
        def edit(tensors):
            key = _first(tensors, suffix)
            tensors[key] = tensors[key].to(dtype)

        bad = _rewrite_tensors(w8_path, tmp_path / "dtype.nnpq", edit)
        message = _one_line_error(bad, phrase)
        assert "does not fit the ani2x architecture" in message


def test_index_tables_must_match_the_architecture(w8_path, tmp_path):
    def edit(tensors):
        tensors["species_converter.conv_tensor"] = tensors["species_converter.conv_tensor"].clone()
        tensors["species_converter.conv_tensor"][1] = 99  # hydrogen -> an out-of-range network index

    bad = _rewrite_tensors(w8_path, tmp_path / "table.nnpq", edit)
    _one_line_error(bad, "index table species_converter.conv_tensor differs")


# --- entropy-coded codes -----------------------------------------------------------------------

def test_coded_codes_round_trip_and_cost_their_information(w8_path, in_memory_w8):
    """Per-channel INT8 codes concentrate near zero: the file pays ~5.6 bits a code, not 8, and
    loads back the very codes, so the model equals the one in memory."""
    from nnpq.artifact import stored_tensor_bytes

    artifact = read_artifact(w8_path)
    memory = in_memory_w8.state_dict()
    assert all(torch.equal(artifact.tensors[k], memory[k]) for k in memory)
    codes = sum(t.numel() for k, t in memory.items() if k.endswith("qweight"))
    with safe_open(str(w8_path), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    coded_bytes = sum(stored[k].numel() for k in artifact.manifest["coded_shapes"])
    assert 5.0 < 8 * coded_bytes / codes < 6.5
    assert stored_tensor_bytes(in_memory_w8, default_plan()) == sum(t.numel() * t.element_size()
                                                                    for t in stored.values())


def test_decode_refuses_streams_that_do_not_hold_the_layer():
    from nnpq.spec.packing import decode_codes, encode_codes

    codes = torch.randint(-127, 128, (16, 8), dtype=torch.int8)
    assert torch.equal(decode_codes(encode_codes(codes), (16, 8)), codes)
    with pytest.raises(ValueError, match="does not hold exactly 64 codes"):
        decode_codes(encode_codes(codes), (16, 4))  # more data than the layer: never inflated past it
    with pytest.raises(ValueError, match="does not hold exactly 128 codes"):
        decode_codes(encode_codes(codes[:8]), (16, 8))
    with pytest.raises(ValueError, match="not a valid xz stream"):
        decode_codes(torch.arange(40, dtype=torch.uint8), (16, 8))
    bomb = encode_codes(torch.zeros(2000, 10_000, dtype=torch.int8))  # 20 MB of zeros in a few kB
    with pytest.raises(ValueError, match="does not hold exactly 128 codes"):
        decode_codes(bomb, (16, 8))


def test_scales_sit_on_the_bfloat16_grid_and_never_clip():
    """Scales are rounded up onto bfloat16 (so a file stores them in 2 bytes, losslessly): the
    step grows by at most 2^-7 and the largest weight of every row still gets a code."""
    from nnpq.quant.quantizers import quant_params, quantize_nearest
    from nnpq.spec.formats import TensorFormat
    from nnpq.spec.packing import bf16_ceil, narrows_to_bf16

    values = torch.rand(10_000) * 10.0 ** torch.randint(-8, 3, (10_000,)).float()
    up = bf16_ceil(values)
    assert torch.all(up >= values) and torch.all(up <= values * (1 + 2.0 ** -7))
    assert torch.equal(up.to(torch.bfloat16).to(torch.float32), up) and torch.equal(bf16_ceil(up), up)
    w = torch.randn(64, 1008) * torch.rand(64, 1)
    for fmt in (TensorFormat("int", 8, "channel"), TensorFormat("int", 6, "group", 32, False)):
        scale, _, _ = quant_params(w, fmt)
        assert narrows_to_bf16(scale) or scale.numel() < 64
        qw = quantize_nearest(w, fmt)
        step = scale.repeat_interleave(qw.group_size, dim=1)
        assert torch.all((qw.dequantize() - w).abs() <= step / 2 * (1 + 1e-5))  # nothing clipped


def test_bfloat16_list_is_checked(w8_path, tmp_path):
    key = read_artifact(w8_path).manifest["bf16_tensors"][0]
    codes = _first(read_artifact(w8_path).tensors, "qweight")
    _one_line_error(_rewrite_manifest(w8_path, tmp_path / "list.nnpq", lambda m: m["bf16_tensors"].append(codes)),
                    f"bf16_tensors names {codes}, which is not a float32 tensor")
    _one_line_error(_rewrite_manifest(w8_path, tmp_path / "twice.nnpq", lambda m: m["bf16_tensors"].append(key)),
                    "field bf16_tensors must be a list of distinct tensor names")

    def widen(tensors):
        tensors[key] = tensors[key].to(torch.float32)

    _one_line_error(_rewrite_tensors(w8_path, tmp_path / "wide.nnpq", widen, stored=True),
                    f"{key} is float32, listed as stored in bfloat16")


def test_damaged_coded_stream_is_one_line(w8_path, tmp_path):
    key = sorted(read_artifact(w8_path).manifest["coded_shapes"])[0]

    def cut(tensors):
        tensors[key] = tensors[key][:-10].clone()

    _one_line_error(_rewrite_tensors(w8_path, tmp_path / "cut.nnpq", cut, stored=True), f"coded codes {key}")
    stray = _rewrite_manifest(w8_path, tmp_path / "stray.nnpq",
                              lambda m: m["packed_shapes"].update({key: m["coded_shapes"][key]}))
    _one_line_error(stray, f"packed_shapes has a stray entry for {key}")

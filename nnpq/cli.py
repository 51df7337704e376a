"""The ``nnpq`` command line: systems, quantize, sensitivity, evaluate, validate, compare, simulate, bench, info."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from nnpq.errors import NnpqError


def _cmd_systems(args: argparse.Namespace) -> None:
    from nnpq.systems import MIXED_SYSTEMS, SYSTEMS, get_system

    print(f"{'name':<28}{'atoms':>6}  {'periodic':<9}description")
    for name, description in sorted(SYSTEMS.items()) + sorted(MIXED_SYSTEMS.items()):
        system = get_system(name)
        print(f"{name:<28}{system.n_atoms:>6}  {'yes' if system.is_periodic else 'no':<9}{description}")


def _parse_size(text: str) -> float:
    """Bytes from ``8MB``, ``500kB``, ``1.5GB`` or a plain number of bytes."""
    units = {"gb": 1e9, "mb": 1e6, "kb": 1e3, "b": 1.0}
    low = text.strip().lower()
    for suffix, factor in units.items():
        if low.endswith(suffix):
            low, scale = low[: -len(suffix)], factor
            break
    else:
        scale = 1.0
    try:
        value = float(low) * scale
    except ValueError:
        raise NnpqError(f"cannot read size '{text}'; write e.g. 8MB or 500kB") from None
    if value <= 0:
        raise NnpqError(f"size '{text}' must be positive")
    return value


def _calibration_settings(args: argparse.Namespace):
    from nnpq.quant.calibration import DEFAULT_SYSTEMS, CalibrationSettings
    from nnpq.systems import get_system

    systems = DEFAULT_SYSTEMS if not args.calibration_systems else tuple(args.calibration_systems.split(","))
    for name in systems:
        get_system(name)  # one-line error for unknown names, before any work starts
    return CalibrationSettings(systems=systems, seed=args.seed, files=tuple(args.calibration or ()),
                               topology=args.calibration_topology, library=not args.no_library)


def _rounding(args: argparse.Namespace):
    from nnpq.quant.apply import RoundingSettings

    return RoundingSettings(method=args.rounding, force_weight=args.force_weight)


def _cmd_quantize(args: argparse.Namespace) -> None:
    from nnpq.models import model_spec
    from nnpq.pipeline import QuantizeOptions, format_result, quantize_to_file
    from nnpq.spec.formats import ActivationFormat, TensorFormat
    from nnpq.quant.refit import RefitSettings

    for name, value in (("--max-force-rmse", args.max_force_rmse), ("--max-energy-rmse", args.max_energy_rmse)):
        if value is not None and not value > 0:
            raise NnpqError(f"{name} must be a positive number (kcal/mol/Å or kcal/mol per atom), got {value}")
    if args.objective == "latency" and (args.max_size is not None or
                                        (args.max_force_rmse is None and args.max_energy_rmse is None)):
        raise NnpqError("--objective latency minimizes time under an error budget: give --max-force-rmse and/or "
                        "--max-energy-rmse, and no --max-size")
    if not 0 <= args.min_coverage <= 1:
        raise NnpqError(f"--min-coverage is a share between 0 and 1, got {args.min_coverage}")
    from nnpq.quant.sensitivity import DEFAULT_CANDIDATES

    candidates = DEFAULT_CANDIDATES if not args.candidates else tuple(
        TensorFormat.parse(label) for label in args.candidates.split(","))
    options = QuantizeOptions(
        candidates=candidates, weight=TensorFormat.parse(args.weight),
        later=None if args.later_layers == "same" else TensorFormat.parse(args.later_layers),
        min_coverage=args.min_coverage, activation=ActivationFormat(mode=args.activation),
        rounding=_rounding(args), max_force_rmse=args.max_force_rmse, max_energy_rmse=args.max_energy_rmse,
        max_bytes=None if args.max_size is None else _parse_size(args.max_size),
        calibration=_calibration_settings(args), report_dir=args.report_dir, baselines=not args.no_baselines,
        refit=RefitSettings(steps=args.refit_steps), objective=args.objective, latency_mode=args.latency_mode)
    output = args.output or f"{model_spec(args.model).name}-w8.nnpq"
    result = quantize_to_file(args.model, output, options, progress=not args.quiet)
    print(format_result(result))


def _cmd_sensitivity(args: argparse.Namespace) -> None:
    import json

    from nnpq.atomic_io import write_text_atomic
    from nnpq.models import ANIPotential, load_fp32, model_spec
    from nnpq.pipeline import sensitivity_csv
    from nnpq.quant.calibration import build_calibration_set
    from nnpq.quant.figures import sensitivity_heatmap
    from nnpq.quant.sensitivity import measure_sensitivity
    from nnpq.validation.report import to_jsonable

    spec = model_spec(args.model)
    fp32 = load_fp32(spec.name, neighborlist="cell_list")
    calib = build_calibration_set(ANIPotential(fp32, spec.name, spec.name), _calibration_settings(args),
                                  progress=not args.quiet)
    table = measure_sensitivity(fp32, spec.name, calib.calibration, rounding=_rounding(args), seed=args.seed,
                                progress=not args.quiet)
    out = Path(args.output or f"{spec.name}-sensitivity")
    files = [write_text_atomic(out / "sensitivity.csv", sensitivity_csv(table)),
             write_text_atomic(out / "sensitivity.json", json.dumps(to_jsonable(table.to_dict()), indent=2)),
             sensitivity_heatmap(table, out / "sensitivity.png")]
    labels = [label for label in table.formats if label != "fp32"]
    print(f"force RMSE (kcal/mol/Å) on {calib.summary()} when one unit alone is quantized:")
    print(f"{'unit':<10}" + "".join(f"{label:>14}" for label in labels))
    for unit in table.units():
        print(f"{unit[0] + '/' + str(unit[1]):<10}" + "".join(f"{table.entry(unit, c).force_rmse:>14.4f}" for c in labels))
    print(f"proxy vs measured, Spearman rank correlation: {table.proxy_rank_correlation():.3f}")
    print("files: " + ", ".join(str(f) for f in files))


def _thresholds(args: argparse.Namespace):
    from nnpq.validation.metrics import Thresholds

    absolute = {}
    for item in args.threshold or ():
        name, _, value = item.partition("=")
        try:
            absolute[name.strip()] = float(value)
        except ValueError:
            raise NnpqError(f"--threshold {item!r}: write METRIC=VALUE, e.g. force_rmse=20") from None
    return Thresholds(noise_factor=args.noise_factor, noise_sigmas=args.noise_sigmas, absolute=absolute)


def _cmd_validate(args: argparse.Namespace) -> None:
    import dataclasses

    from nnpq.validation.protocol import FULL, SHORT
    from nnpq.validation.report import VERDICT_HEADER, print_table, verdict_rows
    from nnpq.validation.validate import Execution, campaign_for, validate

    lengths = {k: getattr(args, k) for k in ("equilibration_ps", "nve_ps", "nvt_ps", "stress_ps", "frame_interval_fs")
               if getattr(args, k) is not None}
    protocol = dataclasses.replace(SHORT if args.short else FULL, platform=args.platform, engine=args.engine,
                                   **lengths)
    out = args.out or f"validate-{Path(args.model[0]).stem}"
    modes = None if args.modes is None else tuple(args.modes.split(","))
    thresholds = _thresholds(args)
    campaign = campaign_for(args.model, args.systems, args.seeds, out, protocol, modes)
    report = validate(campaign, thresholds, Execution(serial=args.serial, scheduler=args.scheduler,
                                                             workers=args.workers, report_only=args.report_only))
    print_table(report["title"], VERDICT_HEADER, verdict_rows(report))
    tasks = report["execution"]["tasks"]
    print(f"tasks: {tasks['done']} run, {tasks['reused']} reused, {tasks['failed']} failed; "
          f"{len(report['missing'])} missing")
    print(f"report: {Path(out) / 'report.html'} (JSON: {Path(out) / 'report.json'})")


def _cmd_compare(args: argparse.Namespace) -> None:
    from nnpq.validation.compare import compare

    print(f"written: {compare(args.reports, args.output)}")


def _cmd_simulate(args: argparse.Namespace) -> None:
    from nnpq.md.simulate import SimulationSettings, format_summary, load_input, run_simulation

    settings = SimulationSettings(
        ensemble=args.ensemble, steps=args.steps, timestep_fs=args.timestep, temperature_k=args.temperature,
        pressure_bar=args.pressure, friction_per_ps=args.friction, report_interval=args.report_interval,
        checkpoint_interval=args.checkpoint_interval, minimize_steps=args.minimize_steps, seed=args.seed,
        trajectory=args.trajectory, engine=args.engine, platform=args.platform, backend=args.backend, mode=args.mode)
    inp = load_input(args.system, args.input)
    out = args.out or f"simulate-{Path(args.system or args.input).stem}-{args.ensemble}"
    print(format_summary(run_simulation(args.model, inp, settings, out, resume=args.resume, progress=not args.quiet)))


def _cmd_info(args: argparse.Namespace) -> None:
    import json

    from nnpq.artifact import read_artifact

    artifact = read_artifact(args.model)
    manifest = dict(artifact.manifest)
    if not args.json:
        manifest.pop("metrics", None)
    print(json.dumps(manifest, indent=2, sort_keys=True))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    import json

    from nnpq.atomic_io import write_text_atomic
    from nnpq.validation.user_eval import evaluate_files, format_evaluation

    result = evaluate_files(args.model, args.input, topology=args.topology, reference=args.reference,
                            progress=not args.quiet, mode=args.mode)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.output:
        try:
            write_text_atomic(args.output, text + "\n")
        except OSError as exc:
            raise NnpqError(f"cannot write {args.output} ({exc.strerror or type(exc).__name__})") from None
    if args.json:
        print(text)
    else:
        print(format_evaluation(result))
        if args.output:
            print(f"JSON: {args.output}")


def _cmd_bench(args: argparse.Namespace) -> None:
    import json

    from nnpq.atomic_io import write_text_atomic
    from nnpq.bench import DEFAULT_SYSTEMS, format_rows, rows_to_json, run_bench

    systems = DEFAULT_SYSTEMS if not args.systems else tuple(args.systems)
    rows = run_bench(args.model, args.device, systems, tuple(args.modes.split(",")), args.repeats,
                     md_steps=not args.no_md, progress=not args.quiet and not args.json)
    text = json.dumps(rows_to_json(rows), indent=2)
    if args.output:
        write_text_atomic(args.output, text + "\n")
    print(text if args.json else format_rows(rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnpq", description="Quantized ANI potentials for molecular dynamics.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("systems", help="list the built-in molecular systems")
    p.set_defaults(func=_cmd_systems)

    def calibration_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=0, help="seed of calibration MD, displacements and split")
        p.add_argument("--calibration", action="append", metavar="FILE",
                       help="extra calibration structures (XYZ, extended XYZ, PDB, DCD); repeatable")
        p.add_argument("--calibration-topology", metavar="PDB", help="topology for DCD calibration files")
        p.add_argument("--calibration-systems", metavar="NAMES",
                       help="comma-separated built-in systems to sample (default: ethanol, aspirin, "
                       "alanine-dipeptide, sfcl-sulfonamide, water-box)")
        p.add_argument("--no-library", action="store_true",
                       help="calibrate on the built-in systems and your files only, without the ~200-molecule "
                       "calibration library (and so without a held-out chemistry split)")
        p.add_argument("--rounding", choices=["gptq", "nearest"], default="gptq",
                       help="error-compensating GPTQ (default) or round-to-nearest")
        p.add_argument("--force-weight", type=float, default=0.5,
                       help="GPTQ objective: 0 = layer outputs, 1 = force tangents (default 0.5)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("quantize", help="quantize a published ANI model into an .nnpq file")
    p.add_argument("model", help="ani2x, ani1x or ani1ccx")
    p.add_argument("-o", "--output", help="output file (default: MODEL-w8.nnpq)")
    p.add_argument("--weight", default="int8/g8/asym",
                   help="uniform weight format without a budget: int8/g8/asym (default), int8/g32/asym, int8/channel, "
                   "fp16, ...")
    p.add_argument("--later-layers", default="fp16", metavar="FORMAT",
                   help="without a budget, format of the hidden layers after the first: fp16 (default; they hold "
                   "~20%% of the weights and most of the INT8 error on unseen chemistry), or 'same' for --weight")
    p.add_argument("--min-coverage", type=float, default=0.9, metavar="SHARE",
                   help="without a budget, keep the first layer in fp16 for element networks whose calibration "
                   "excites less than this share of their AEV inputs (default 0.9; 0 turns it off)")
    p.add_argument("--activation", choices=["none", "dynamic", "static"], default="none",
                   help="INT8 input activations of integer layers (forces then not exact gradients)")
    p.add_argument("--max-force-rmse", type=float, help="choose precisions per element and layer: force RMSE "
                   "budget in kcal/mol/Å on the calibration configurations of every system")
    p.add_argument("--max-energy-rmse", type=float, help="per-atom energy RMSE budget, kcal/mol")
    p.add_argument("--max-size", help="size budget of the file, e.g. 10MB (MB = 10^6 bytes): the plan that fits whose "
                   "worst molecule's force error, relative to int8/channel round-to-nearest on it, is smallest")
    p.add_argument("--candidates", help="comma-separated formats a budgeted plan may use per element and layer, "
                   "e.g. int8/g32/asym,int8/g16/asym,int8/channel for an all-INT8 plan (FP32 is always allowed)")
    p.add_argument("--objective", choices=["size", "latency"], default="size",
                   help="what a plan under an error budget minimizes: file size (default), or the time per call "
                   "of the runtime, timed on this machine per element, layer and format")
    p.add_argument("--latency-mode", choices=["exact", "fast"], default="exact",
                   help="runtime mode --objective latency times (default exact)")
    p.add_argument("--report-dir", help="folder for sensitivity and frontier files (default OUTPUT-report)")
    p.add_argument("--no-baselines", action="store_true", help="skip the baseline plans in the held-out table")
    p.add_argument("--refit-steps", type=int, default=30, metavar="N",
                   help="steps of force/energy matching of the FP32 biases and final layers after rounding "
                   "(default 30; 0 turns it off)")
    calibration_args(p)
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("sensitivity", help="force/energy error of each (element, layer) at each precision")
    p.add_argument("model", help="ani2x, ani1x or ani1ccx")
    p.add_argument("-o", "--output", help="output folder (default MODEL-sensitivity)")
    calibration_args(p)
    p.set_defaults(func=_cmd_sensitivity)

    p = sub.add_parser("validate", help="FP32 vs quantized MD on several systems and seeds: drift, errors, "
                       "observables against the FP32 noise floor, stress; report.json + report.html")
    p.add_argument("model", nargs="+", help=".nnpq files (the FP32 reference they came from is added)")
    p.add_argument("--systems", nargs="+", required=True, metavar="NAME", help="built-in systems (see 'nnpq systems')")
    p.add_argument("--seeds", type=int, default=3, help="seeds per system and model (default 3)")
    p.add_argument("--short", action="store_true", help="short protocol (0.1 ps per stage): a smoke test; "
                   "without it the full protocol runs 20 ps per NVE time step and for observables")
    for name, what in (("equilibration-ps", "Langevin equilibration of the shared start"),
                       ("nve-ps", "each NVE run"), ("nvt-ps", "the NVT run of the observables"),
                       ("stress-ps", "each stress run"), ("frame-interval-fs", "time between recorded frames")):
        p.add_argument(f"--{name}", type=float, help=f"override the protocol: {what}")
    p.add_argument("--modes", help="comma-separated runtime modes of the quantized models (default: every mode "
                   "the runtime offers, e.g. exact,fast)")
    p.add_argument("--engine", default="openmm", help="MD engine of the stages: openmm (default) or ase "
                   "(VelocityVerlet and Langevin; the shared starts are OpenMM's either way)")
    p.add_argument("--platform", default="auto", help="OpenMM platform (default: CUDA mixed, else CPU); with "
                   "--engine ase, of the shared starts")
    p.add_argument("--out", help="output folder (default validate-MODEL); reruns resume from it")
    p.add_argument("--threshold", action="append", metavar="METRIC=VALUE",
                   help="absolute threshold for one metric in its report unit, e.g. force_rmse=20; repeatable")
    p.add_argument("--noise-factor", type=float, default=1.5, help="default verdict: distance <= max(FACTOR x floor, "
                   "floor + SIGMAS x spread) (default 1.5)")
    p.add_argument("--noise-sigmas", type=float, default=2.0, help="see --noise-factor (default 2)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler of an existing cluster (default: a local one)")
    p.add_argument("--workers", type=int, default=2, help="worker processes of the local Dask cluster (default 2)")
    p.add_argument("--serial", action="store_true", help="run the tasks one by one in this process")
    p.add_argument("--report-only", action="store_true", help="run nothing; report what --out holds")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("compare", help="several validation reports side by side: one table and compare.html")
    p.add_argument("reports", nargs="+", help="report.json files (or their folders)")
    p.add_argument("-o", "--output", default="compare.html", help="HTML output (default compare.html)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("simulate", help="MD of a built-in system or your structure with a quantized or FP32 model")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--system", help="built-in system (see 'nnpq systems')")
    source.add_argument("--input", metavar="FILE", help="PDB, XYZ or extended XYZ (cell from CRYST1 / Lattice)")
    p.add_argument("--model", required=True, help="a .nnpq file or an FP32 model name (ani2x)")
    p.add_argument("--engine", choices=["openmm", "ase"], default="openmm")
    p.add_argument("--ensemble", choices=["nve", "nvt", "npt"], default="nvt",
                   help="NVE (Verlet), NVT (Langevin, default) or NPT (Langevin + barostat)")
    p.add_argument("--steps", type=int, default=1000, help="total steps (default 1000)")
    p.add_argument("--timestep", type=float, default=0.5, help="time step in fs (default 0.5)")
    p.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    p.add_argument("--pressure", type=float, default=1.0, help="NPT pressure in bar (default 1)")
    p.add_argument("--friction", type=float, default=1.0, help="Langevin friction in 1/ps (default 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of velocities, thermostat and barostat")
    p.add_argument("--minimize-steps", type=int, default=200, help="minimizer iterations first (0: none)")
    p.add_argument("--report-interval", type=int, default=10, help="steps between frames and CSV rows")
    p.add_argument("--checkpoint-interval", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--trajectory", choices=["dcd", "xtc"], default="dcd", help="trajectory format")
    p.add_argument("--platform", help="OpenMM platform (default: fastest available, CUDA then CPU)")
    p.add_argument("--backend", choices=["auto", "torchforce", "pythonforce"], default="auto",
                   help="OpenMM force: TorchForce where the model scripts (auto), or PythonForce")
    p.add_argument("--mode", help="runtime mode of a quantized model, where the runtime has modes")
    p.add_argument("--out", help="output folder (default simulate-SYSTEM-ENSEMBLE)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("evaluate", help="errors of a model against its FP32 reference on your structure files")
    p.add_argument("model", help="a .nnpq file (or an FP32 model name)")
    p.add_argument("--input", required=True, nargs="+", action="extend", metavar="FILE",
                   help="XYZ, extended XYZ, PDB or DCD files; every frame is evaluated")
    p.add_argument("--topology", metavar="PDB", help="topology for DCD inputs")
    p.add_argument("--reference", help="model to compare against (default: the FP32 model it was made from)")
    p.add_argument("--mode", choices=("exact", "fast"), default=None,
                   help="runtime mode: exact (default for .nnpq files; weight-only, forces are the exact gradient) "
                        "or fast (INT8 activations on integer matrix products)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("-o", "--output", metavar="OUT.json", help="also write the JSON results to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("bench", help="time energy+forces per call and per MD step against FP32 TorchANI")
    p.add_argument("model", nargs="+", help=".nnpq files of one FP32 model, timed in the same rounds (or an FP32 "
                   "model name for the FP32 rows only)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--systems", nargs="+", metavar="NAME",
                   help="built-in systems, or water-box-2x / water-box-3x (4,440 / 14,985 atoms); "
                   "default: alanine-dipeptide water-box water-box-2x")
    p.add_argument("--modes", default="exact,fast", help="nnpq runtime modes to time (default exact,fast)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed calls per runtime (default 5)")
    p.add_argument("--no-md", action="store_true", help="skip the per-MD-step rows")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("-o", "--output", metavar="OUT.json", help="also write the JSON rows to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("info", help="print the manifest of an .nnpq file")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="include stored metrics")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line and exit with status 2."""
    os.environ.setdefault("TORCHANI_NO_WARN_EXTENSIONS", "1")
    warnings.filterwarnings("ignore", category=UserWarning, module="torchani")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except NnpqError as exc:
        print(f"nnpq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = {"validate": " (rerun the same command to resume from its checkpoints)",
                "simulate": " (add --resume to continue from the last checkpoint)"}.get(args.command, "")
        print(f"nnpq: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. head, which closed early
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

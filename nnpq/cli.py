"""The ``nnpq`` command line: systems, quantize, validate, info."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from nnpq.errors import NnpqError


def _cmd_systems(args: argparse.Namespace) -> None:
    from nnpq.systems import SYSTEMS, get_system

    print(f"{'name':<20}{'atoms':>6}  {'periodic':<9}description")
    for name in sorted(SYSTEMS):
        system = get_system(name)
        print(f"{name:<20}{system.n_atoms:>6}  {'yes' if system.is_periodic else 'no':<9}{SYSTEMS[name]}")


def _cmd_quantize(args: argparse.Namespace) -> None:
    from nnpq.models import model_spec
    from nnpq.pipeline import format_result, quantize_to_file

    output = args.output or f"{model_spec(args.model).name}-w8.nnpq"
    result = quantize_to_file(args.model, output, systems=args.system, progress=not args.quiet)
    print(format_result(result))


def _cmd_validate(args: argparse.Namespace) -> None:
    from nnpq.validation.nve import NVESettings
    from nnpq.validation.report import summary_table
    from nnpq.validation.validate import validate

    settings = NVESettings(steps=args.steps, timestep_fs=args.timestep, temperature_k=args.temperature,
                           equilibration_steps=args.equilibration_steps, report_interval=args.report_interval,
                           platform=args.platform, seed=args.seed)
    out = args.out or f"validate-{Path(args.model).stem}-{args.system}"
    report = validate(args.model, args.system, settings, out, progress=not args.quiet)
    print(summary_table(report))
    print(f"report: {report['files']['markdown']} (JSON: {report['files']['json']}, "
          f"{len(report['files']['figures'])} figures)")


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
                            progress=not args.quiet)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnpq", description="Quantized ANI potentials for molecular dynamics.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("systems", help="list the built-in molecular systems")
    p.set_defaults(func=_cmd_systems)

    p = sub.add_parser("quantize", help="quantize a published ANI model into an .nnpq file")
    p.add_argument("model", help="ani2x, ani1x or ani1ccx")
    p.add_argument("-o", "--output", help="output file (default: MODEL-w8.nnpq)")
    p.add_argument("--system", action="append", help="evaluate on this built-in system only (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("validate", help="FP32 vs quantized NVE trajectories: drift, errors, RMSD")
    p.add_argument("model", help="a .nnpq file")
    p.add_argument("--system", required=True, help="built-in system (see 'nnpq systems')")
    p.add_argument("--steps", type=int, default=2000, help="NVE steps per run (default 2000)")
    p.add_argument("--timestep", type=float, default=0.5, help="time step in fs (default 0.5)")
    p.add_argument("--temperature", type=float, default=300.0, help="equilibration temperature in K")
    p.add_argument("--equilibration-steps", type=int, default=200, help="Langevin steps before NVE")
    p.add_argument("--report-interval", type=int, default=10, help="steps between recorded frames")
    p.add_argument("--platform", default="Reference", help="OpenMM platform (default Reference: double)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="report folder (default validate-MODEL-SYSTEM); reruns resume from it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("evaluate", help="errors of a model against its FP32 reference on your structure files")
    p.add_argument("model", help="a .nnpq file (or an FP32 model name)")
    p.add_argument("--input", required=True, nargs="+", action="extend", metavar="FILE",
                   help="XYZ, extended XYZ, PDB or DCD files; every frame is evaluated")
    p.add_argument("--topology", metavar="PDB", help="topology for DCD inputs")
    p.add_argument("--reference", help="model to compare against (default: the FP32 model it was made from)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("-o", "--output", metavar="OUT.json", help="also write the JSON results to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_evaluate)

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
        print("nnpq: interrupted (validation runs resume from their checkpoints)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

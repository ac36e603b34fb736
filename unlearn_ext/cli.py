"""The ``unlearn`` command: ``demo`` (the main job), ``run`` (one method), ``apply`` (deletion requests on
a deployed checkpoint: checkpoint in, verified checkpoint out, audit record; classifiers and, for
concept requests, multimodal checkpoints), ``mmu`` (SIU and its baselines on the MiniMMU multimodal
model), ``export-minimmu`` (MiniMMU as a deployable multimodal checkpoint) and ``info``.

Exit codes: 0 done (or nothing to do), 2 bad input or an error, 3 ``apply`` rejected by a gate.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

_SKIP_FLAGS = {"seed", "inplace", "progress", "classes", "codes", "w0"}  # tensors: Python API only


def _flag_type(field: dataclasses.Field):
    ann = str(field.type)
    if "bool" in ann:
        return lambda s: {"true": True, "1": True, "false": False, "0": False}[s.lower()]
    for name, typ in (("int", int), ("float", float), ("str", str)):
        if ann.startswith(name) or f"{name} |" in ann or f"| {name}" in ann:
            return typ
    return str


def _hparam_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every method hyperparameter: ``{field name: (field, [methods that have it])}``."""
    from unlearn_ext.methods import available_methods, method_class

    out: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for m in available_methods():
        for f in dataclasses.fields(method_class(m)):
            if f.init and f.name not in _SKIP_FLAGS:
                out.setdefault(f.name, (f, []))[1].append(m)
    return out


def _flag(name: str) -> str:
    return "--" + name.rstrip("_").replace("_", "-")


def _add_common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--dataset", choices=("mnist", "digits"), default="mnist", help="bundled dataset (default mnist)")
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="architecture (default mlp, the paper's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, training and methods (default 0)")
    p.add_argument("--out", type=Path, default=Path(default_out), help=f"output folder (default {default_out})")
    p.add_argument("--fresh", action="store_true", help="retrain the cached original and retrained models")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the model cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--strategy",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="under torchrun: data-parallel engine of the fine-tuning methods (default ddp; fsdp = FSDP2)",
    )
    p.add_argument(
        "--no-deep",
        action="store_true",
        help="skip the deep-forgetting metrics (recovery attacks, CKA, linear probe; a few seconds per method)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn", description="Fast machine unlearning for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the main job: every method on one forgotten MNIST class, table + report")
    _add_common(demo, "unlearn-demo")
    demo.add_argument("--forget-class", type=int, nargs="+", default=[0], metavar="K", help="class(es) to forget")
    demo.add_argument("--methods", nargs="+", metavar="M", help="methods to run (default: all implemented)")

    run = sub.add_parser("run", help="one method on a bundled dataset, evaluated against the retrained model")
    from unlearn_ext.methods import available_methods

    run.add_argument("--method", required=True, help=f"one of: {', '.join(available_methods())}")
    _add_common(run, "unlearn-run")
    which = run.add_mutually_exclusive_group(required=True)
    which.add_argument("--forget-class", type=int, nargs="+", metavar="K", help="class(es) to forget")
    which.add_argument("--forget-fraction", type=float, metavar="F", help="forget a random fraction in (0, 1)")
    hp = run.add_argument_group("method hyperparameters (each applies to the methods named)")
    for name, (field, methods) in _hparam_fields().items():
        hp.add_argument(
            _flag(name),
            dest=f"hp_{name}",
            type=_flag_type(field),
            default=argparse.SUPPRESS,
            metavar=field.name.rstrip("_").upper(),
            help=", ".join(methods),
        )

    mmu = sub.add_parser(
        "mmu", help="forget a digit from MiniMMU (SmolLM2 + a digit vision encoder) with SIU, GA, GA+KL, PO"
    )
    from unlearn_ext.siu.benchmark import add_spec_arguments

    add_spec_arguments(mmu)
    mmu.add_argument("--out", type=Path, default=Path("unlearn-mmu"), help="output folder (default unlearn-mmu)")
    mmu.add_argument("--no-progress", action="store_true", help="no progress bars")

    apply = sub.add_parser(
        "apply",
        help="apply deletion requests to a safetensors checkpoint: gated, atomic, audited",
        description="Apply deletion requests (JSON) to a checkpoint; publish the unlearned checkpoint only if every "
        "acceptance gate passes (exit 3 otherwise); record everything in an append-only audit log.",
    )
    apply.add_argument("--checkpoint", type=Path, required=True, help="input .safetensors (only read)")
    apply.add_argument("--request", type=Path, nargs="+", required=True, metavar="JSON",
                       help="request file(s), each one request or a list; all are merged into one run")  # fmt: skip
    apply.add_argument("--out", type=Path, required=True, help="output .safetensors (never the input)")
    apply.add_argument("--audit", type=Path, help="audit log (default: unlearn-audit.jsonl beside --out)")
    apply.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    apply.add_argument("--device", default="cpu", help="device to unlearn on (default cpu)")
    apply.add_argument("--json", action="store_true", help="print the result as JSON")
    apply.add_argument("--no-progress", action="store_true", help="no progress bars")

    export = sub.add_parser(
        "export-minimmu",
        help="write the MiniMMU multimodal model as one self-contained checkpoint (for concept requests)",
        description="Build (or take from the cache) the MiniMMU model and write it, with its tokenizer, as a "
        "safetensors checkpoint that `unlearn apply` takes concept requests for; optionally write test-split "
        "digit images to file requests with.",
    )
    export.add_argument("--out", type=Path, required=True, help="output .safetensors")
    export.add_argument("--images", type=Path, help="folder for digit<d>_<k>.png test images")
    export.add_argument("--per-digit", type=int, default=3, help="images per digit with --images (default 3)")
    export.add_argument("--no-progress", action="store_true", help="no progress bars")

    info = sub.add_parser("info", help="versions, build and the backends usable on each device")
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def _run_and_report(spec, args) -> int:
    from rich.console import Console

    from unlearn_ext._progress import progress_session
    from unlearn_ext.distributed import init_from_env, is_main_process
    from unlearn_ext.experiment import run_experiment
    from unlearn_ext.report import print_table, write_report

    distributed = init_from_env()  # torchrun: one process per rank, rank 0 reports
    main = is_main_process()
    try:
        t0 = time.perf_counter()
        with progress_session(not args.no_progress and main):
            report = run_experiment(spec, progress=not args.no_progress and main)
        report["wall_seconds"] = time.perf_counter() - t0
        if main:
            print_table(report)
            paths = write_report(report, args.out)
            Console().print(f"wrote {', '.join(str(p) for p in paths)} in {report['wall_seconds']:.1f} s")
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _mmu(args) -> int:
    from rich.console import Console

    from unlearn_ext._progress import progress_print, progress_session
    from unlearn_ext.report import print_mmu_table, write_mmu_report
    from unlearn_ext.siu.benchmark import run_minimmu, spec_from_args

    try:
        spec = spec_from_args(args)
        with progress_session(not args.no_progress):
            report = run_minimmu(spec, progress=not args.no_progress, log=progress_print)
    except (ValueError, FileNotFoundError) as e:
        print(f"unlearn mmu: error: {e}", file=sys.stderr)
        return 2
    print_mmu_table(report)
    paths = write_mmu_report(report, args.out)
    Console().print(f"wrote {', '.join(str(p) for p in paths)} in {report['wall_seconds']:.1f} s")
    return 0


def _apply(args) -> int:
    import json

    from rich.console import Console

    from unlearn_ext._progress import progress_session
    from unlearn_ext.production import LockedError, apply_requests

    try:
        with progress_session(not args.no_progress):
            result = apply_requests(
                args.checkpoint, args.request, args.out, audit=args.audit, overwrite=args.overwrite,
                device=args.device, progress=not args.no_progress,
            )  # fmt: skip
    except (ValueError, FileNotFoundError, NotImplementedError, LockedError, OSError) as e:
        print(f"unlearn apply: error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, RuntimeError) as e:  # audited as failed when it happened under the lock
        what = "error" if isinstance(e, FloatingPointError) else f"failed: {type(e).__name__}"
        print(f"unlearn apply: {what}: {e}; nothing was published", file=sys.stderr)
        return 2 if isinstance(e, FloatingPointError) else 1
    console = Console(soft_wrap=True)  # no wrapping: the lines are log lines
    if args.json:
        print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}, default=str))
        return 0 if result.status != "rejected" else 3  # stdout holds the JSON document only
    ids = ", ".join(result.request_ids)
    if result.status == "noop":
        state = result.earlier["output_state"]
        console.print(
            f"requests {ids}: already applied in run {result.earlier['run_id']} -> {result.output} "
            f"(sha256 {result.output_sha256[:12]}..., file {state}); nothing to do"
        )
        return 0
    for name, g in result.gates.items():
        console.print(
            f"{'PASS' if g['pass'] else 'FAIL'}  {name}: {g['metric']} = {g['value']:.4f} (limit {g['limit']:.4f})"
        )
    if not result.gates:
        console.print("no acceptance gates in the requests: the result is published unchecked")
    before, after = result.metrics_before, result.metrics_after
    console.print("  ".join(f"{k} {100 * before[k]:.1f} -> {100 * after[k]:.1f}%" for k in after if k in before))
    if result.details:
        answers_after = result.details["after"].get("forget_image_answers", {})
        for question, answer in result.details["before"].get("forget_image_answers", {}).items():
            console.print(f"  {question!r}: {answer!r} -> {answers_after.get(question)!r}", markup=False)
    if result.status == "rejected":
        print(f"unlearn apply: rejected: gate(s) {', '.join(result.failed_gates)} failed; nothing was published "
              f"(audit: {result.audit})", file=sys.stderr)  # fmt: skip
        return 3
    console.print(f"published {result.output} (sha256 {result.output_sha256[:12]}...) for {ids}; audit: {result.audit}")
    return 0


def _export_minimmu(args) -> int:
    from unlearn_ext._progress import progress_session
    from unlearn_ext.siu.checkpoint import export_minimmu

    if args.per_digit < 1:
        print("unlearn export-minimmu: error: --per-digit must be >= 1", file=sys.stderr)
        return 2
    try:
        with progress_session(not args.no_progress):
            out = export_minimmu(args.out, images=args.images, per_digit=args.per_digit, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, OSError) as e:
        print(f"unlearn export-minimmu: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {out['checkpoint']} ({out['bytes'] / 2**20:.1f} MiB)"
        + (f" and {len(out['images'])} images in {args.images}" if out["images"] else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from unlearn_ext import info

        return info.main(["--json"] if args.json else [])

    if args.command == "mmu":
        return _mmu(args)
    if args.command == "apply":
        return _apply(args)
    if args.command == "export-minimmu":
        return _export_minimmu(args)

    from unlearn_ext.experiment import ExperimentSpec
    from unlearn_ext.methods import method_class

    common = {
        "dataset": args.dataset,
        "arch": args.model,
        "seed": args.seed,
        "fresh": args.fresh,
        "use_cache": not args.no_cache,
        "deep": not args.no_deep,
        "strategy": args.strategy,
    }
    try:
        if args.command == "demo":
            for m in args.methods or ():
                method_class(m)
            spec = ExperimentSpec(classes=tuple(args.forget_class), methods=tuple(args.methods or ()), **common)
        else:
            cls = method_class(args.method)
            given = {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_")}
            own = {f.name for f in dataclasses.fields(cls)}
            foreign = sorted(_flag(k) for k in given if k not in own)
            if foreign:
                parser.error(f"method {args.method!r} has no hyperparameter(s) {', '.join(foreign)}")
            spec = ExperimentSpec(
                classes=tuple(args.forget_class) if args.forget_class else None,
                fraction=args.forget_fraction,
                methods=(args.method,),
                hparams={args.method: given} if given else {},
                **common,
            )
        return _run_and_report(spec, args)
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        print(f"unlearn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

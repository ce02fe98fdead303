"""The ``memdec`` command line: argument parsing only; each command calls one stage module.

Every command's options are the fields of a dataclass config: ``--block-size`` maps to
``block_size`` and so on. Errors the user can fix print as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import shutil
import sys
import time
import types
import typing

from transformers.utils import logging as hf_logging

from .adapt import AdaptConfig, adapt
from .baselines import BASELINE_HELP, BaselineConfig, train_baseline
from .datastore import DatastoreConfig, build_datastore, is_main_process
from .store import describe
from .errors import MemdecError
from .evaluate import EvalConfig, format_sweep, format_table, run_eval_report, write_report_json
from .generate import GenerateConfig, format_generations, run_generate
from .options import flag_of
from .report import format_summary
from .routing import (
    DomainRouterConfig,
    RouterConfig,
    format_domain_summary,
    format_router_summary,
    train_domain_router,
    train_router,
)
from .serve import ServeConfig, serve
from .tasks import TasksConfig, run_lm_eval, run_tasks
from .train import TrainConfig, train
from .transfer import TransferConfig, transfer
from .vllm.export import ExportConfig, export_vllm, format_export


def _field_type(tp):
    """(python type, is_optional) of a dataclass field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, config_cls, helps: dict[str, str] | None = None,
                       omit: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per dataclass field (``memdec.options``: its declaration); fields without a default
    are required. A field's help is ``helps[name]``, else its ``metadata["help"]``; a field whose metadata
    says ``cli=False`` has no flag; a ``nested`` field (another stage's whole config) adds that config's
    flags, but those it omits; ``omit``: fields of ``config_cls`` that get no flag."""
    helps = helps or {}
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in omit or f.metadata.get("positional") or f.metadata.get("cli") is False:  # no flag
            continue
        if f.metadata.get("nested"):
            add_dataclass_args(parser, hints[f.name], helps, f.metadata["omit"])
            continue
        flag = flag_of(f)
        tp, _ = _field_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = helps.get(f.name) or f.metadata.get("help", "")
        if required:
            help_text += " (required)"
        elif default is not None and default is not False:
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            help_text += f" (default: {shown})"
        elif default is None and f.metadata.get("note"):  # what None stands for
            help_text += f" (default: {f.metadata['note']})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %: a literal one must be doubled
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text,
                                dest=f.name)
        elif typing.get_origin(tp) is list and f.metadata.get("action") == "append":  # a repeatable flag
            (inner,) = typing.get_args(tp)
            parser.add_argument(flag, type=inner, action="append", default=default, required=required,
                                help=help_text + " (repeatable)", metavar=flag.lstrip("-").replace("-", "_").upper(),
                                dest=f.name)
        elif typing.get_origin(tp) is list:
            (inner,) = typing.get_args(tp)
            parser.add_argument(flag, type=inner, nargs="+", default=default, required=required, help=help_text,
                                dest=f.name)
        else:
            parser.add_argument(flag, type=tp, default=default, required=required, help=help_text,
                                metavar=flag.lstrip("-").replace("-", "_").upper(), dest=f.name)


def config_from_args(config_cls, args: argparse.Namespace, omit: tuple[str, ...] = ()):
    """``config_cls`` from the parsed flags: each field from its flag's value, a ``nested`` config from its own
    flags (the fields it omits keep their defaults)."""
    hints, given, values = typing.get_type_hints(config_cls), vars(args), {}
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("nested"):
            values[f.name] = config_from_args(hints[f.name], args, f.metadata["omit"])
        elif f.name in given and f.name not in omit:
            values[f.name] = given[f.name]
    return config_cls(**values)


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvalConfig, args)
    report = run_eval_report(cfg)
    print(format_table(report.rows, report.n_tokens, cfg.corpus, cfg.general))
    if sweep := format_sweep(report.extra):
        print(sweep)
    if cfg.json:
        write_report_json(cfg.json, cfg.corpus, report.n_tokens, report.rows, **report.extra)
        print(f"wrote {cfg.json}")
    if cfg.plot:
        print(f"wrote {cfg.plot}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    results = run_generate(config_from_args(GenerateConfig, args))
    print(format_generations(results, width=min(shutil.get_terminal_size((120, 20)).columns, 160)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    out = train(config_from_args(TrainConfig, args))
    print(f"memory decoder checkpoint: {out}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    out = transfer(config_from_args(TransferConfig, args))
    print(f"transferred memory decoder checkpoint: {out}")
    return 0


def cmd_router(args: argparse.Namespace) -> int:
    print(format_router_summary(train_router(config_from_args(RouterConfig, args))))
    return 0


def cmd_router_domains(args: argparse.Namespace) -> int:
    print(format_domain_summary(train_domain_router(config_from_args(DomainRouterConfig, args))))
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    cfg = config_from_args(BaselineConfig, args)
    out = train_baseline(cfg)
    print(f"{cfg.method} baseline: {out}")
    return 0


def cmd_datastore(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = build_datastore(config_from_args(DatastoreConfig, args))
    if is_main_process():  # under accelerate launch / torchrun, rank 0 speaks for all
        print(describe(out))
        print(f"  wall time: {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    run = adapt(config_from_args(AdaptConfig, args))
    print(format_summary(run))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    serve(config_from_args(ServeConfig, args))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    for path in run_tasks(config_from_args(TasksConfig, args)):
        print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    print(format_export(export_vllm(config_from_args(ExportConfig, args))))
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    return run_lm_eval(args.lm_eval_args)


def build_parser() -> argparse.ArgumentParser:
    commands = [  # (name, help, config dataclass, flag help beyond its fields' own, handler), in pipeline order
        ("adapt", "the main job: datastore, memory decoder, lambda, evaluation and a report, resumable",
         AdaptConfig, None, cmd_adapt),
        ("datastore", "build a kNN datastore: keys/values, faiss index, sparse kNN targets (resumable)",
         DatastoreConfig, None, cmd_datastore),
        ("train", "train a memory decoder on a datastore's kNN targets", TrainConfig, None, cmd_train),
        ("transfer", "move a memory decoder to a base model with another tokenizer: new embeddings, brief training",
         TransferConfig, None, cmd_transfer),
        ("baseline", "train a baseline (dapt, lora or ce-decoder) on the same tokens and budget as `train`",
         BaselineConfig, BASELINE_HELP, cmd_baseline),
        ("router", "train a token router: λ_t per position between the base and a memory decoder, both frozen",
         RouterConfig, None, cmd_router),
        ("router-domains", "train a domain router: one decoder (or none) per request, from the base's view of the "
                           "prompt (also `memdec router --domains`)", DomainRouterConfig, None, cmd_router_domains),
        ("eval", "perplexity of the base model, base+kNN-LM, base+MemDec and baselines, with a λ sweep",
         EvalConfig, None, cmd_eval),
        ("generate", "continue prompts with base+MemDec; --compare prints the base model's beside",
         GenerateConfig, None, cmd_generate),
        ("serve", "serve the base model and memory decoders over an OpenAI-compatible HTTP API",
         ServeConfig, None, cmd_serve),
    ]
    parser = argparse.ArgumentParser(prog="memdec", description="Adapt a causal LM to a domain with a Memory Decoder.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, config_cls, flag_help, handler in commands:
        p = sub.add_parser(name, help=help_text)
        add_dataclass_args(p, config_cls, flag_help)
        p.set_defaults(func=handler)
        if name == "router":  # main() hands `memdec router --domains ...` to router-domains
            p.add_argument("--domains", action="store_true", help="train a domain router over several decoders "
                                                                  "instead (see `memdec router --domains --help`)")
    p = sub.add_parser("tasks", help="write an lm-eval task from text: facts (recall of the user's names and numbers) "
                                     "or general (LAMBADA-style last word and a cloze, outside the domain)")
    p.add_argument("kind", choices=["facts", "general"], help="which task to write")
    add_dataclass_args(p, TasksConfig)
    p.set_defaults(func=cmd_tasks)
    p = sub.add_parser("export", help="write a folder an inference engine loads as one model: the base and its memory "
                                      "decoder mixed (`memdec export vllm`, docs/vllm.md)")
    p.add_argument("engine", choices=["vllm"], help="the engine: vllm (vLLM, with memdec's plugin installed)")
    add_dataclass_args(p, ExportConfig)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness's own command line with the `memdec` "
                                                        "model registered: every argument passes through")
    p.set_defaults(func=cmd_lm_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["router"] and "--domains" in argv:  # the domain router: its own flags
        argv = ["router-domains", *(a for a in argv[1:] if a != "--domains")]
    args, rest = parser.parse_known_args(argv)
    if args.command == "lm-eval":
        args.lm_eval_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    hf_logging.disable_progress_bar()  # our own bars say what is happening
    try:
        return args.func(args)
    except MemdecError as exc:
        print(f"memdec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memdec: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only or forbidden folder: what escaped every check
        print(f"memdec: error: {os_error_line(exc)}", file=sys.stderr)
        return 1


def os_error_line(exc: OSError) -> str:
    """One line for an OSError that reached ``main``: the file, the reason, and what is kept."""
    reason = exc.strerror or str(exc)
    if exc.errno in errno.errorcode:
        reason += f" ({errno.errorcode[exc.errno]})"
    where = f"{exc.filename}: " if exc.filename is not None else ""
    return (f"{where}{reason}; nothing was half-written: the previous complete file or step is kept, and a rerun "
            f"resumes from it once the cause is fixed")


if __name__ == "__main__":
    sys.exit(main())

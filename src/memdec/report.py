"""The report of a ``memdec adapt`` run: ``RUN/report.json``, ``RUN/report.md`` with its plots, and the
table for the terminal, all read from the stages' outputs in the run folder.

It also owns the names that the stages and the report share: the candidate decoders' folders and
labels, how the samples are drawn, and the lm-eval tasks' names and shape.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from .checkpoint import read_memdec_json
from .checks import BOOL, OBJECT, SCORE, TEXT, UNIT, WHOLE, Kind, check_field, check_fields, check_items
from .decoders import FULL_COPY, is_full_copy, recorded_shape_name
from .errors import MemdecError
from .eval_results import check_eval_json, read_eval_json
from .files import atomic_write, atomic_write_json, atomic_write_text, read_json, read_json_object, read_jsonl
from .store import read_manifest
from .tables import Column, render_columns, render_table

SAMPLING = dict(do_sample=True, top_p=0.9, temperature=0.8, seed=0)  # how the report's samples are drawn
# the lm-eval tasks of the tasks stage (memdec.tasks): fixed, so that every run's tasks are alike
TASK_SEED = 0
FACTS_CONTEXT_TOKENS = 64
GENERAL_CONTEXT_WORDS = 60
TASK_CHOICES = 4
FACTS_TASK, GENERAL_TASK = "memdec_facts", "memdec_general"
# the report's columns: task name -> column; the LAMBADA-style task is in tasks.json and report.json
TASK_COLUMNS = {FACTS_TASK: "facts acc", f"{GENERAL_TASK}_cloze": "general acc"}
# the router stage (memdec.adapt): λ_t along the first positions of the test text, for the report's plot
ROUTER_LAMBDA_JSON = "lambda_t.json"  # in RUN/router/
ROUTER_PLOT_TOKENS = 300
ROUTER_PLOT = "router_lambda.png"
ROUTER_MARKED = 6  # the positions of highest and of lowest λ_t named on the plot


def candidate_name(alpha: float, beta: float) -> str:
    """The candidate's folder under RUN/candidates: ``alpha-0.25`` or ``alpha-0.5-base-0.5``."""
    return f"alpha-{alpha:g}" + (f"-base-{beta:g}" if beta else "")


TWO_PHASE_PREFIX = "two-phase-"
PHASE_ONE = "two-phase-ce"  # the shared first phase of the two-phase candidates, under RUN/candidates


def two_phase_name(alpha: float) -> str:
    """The two-phase candidate's folder under RUN/candidates: ``two-phase-0.5``."""
    return f"{TWO_PHASE_PREFIX}{alpha:g}"


def candidate_label(name: str) -> str:
    """``alpha-0.5-base-0.5`` -> ``α=0.5, β=0.5`` (β: the base model's weight in the teacher);
    ``two-phase-0.5`` -> ``CE, then α=0.5``."""
    if name.startswith(TWO_PHASE_PREFIX):
        return f"CE, then α={name[len(TWO_PHASE_PREFIX):]}"
    return name.replace("alpha-", "α=").replace("-base-", ", β=")


def warn(message: str) -> None:
    """One line on the terminal about something the report leaves out (a record it cannot use)."""
    print(f"warning: {message}", flush=True)


_STEP_FIELDS: dict[str, Kind] = {"step": WHOLE, "loss": SCORE, "ce": SCORE}  # every record of a decoder's log.jsonl
_VALID_FIELDS: dict[str, Kind] = {"best_ppl": SCORE, "valid_ppl_memdec": SCORE, "valid_ppl_base": SCORE}  # validations


def training_records(log: Path) -> list[dict]:
    """The records of a decoder's ``log.jsonl`` that the training plot can use, read through the checked
    reader; the others (a line that is no JSON object, a field missing or of another type) are skipped,
    with one warning saying how many and why the first was."""
    problems: list[str] = []
    records = []
    for i, record in enumerate(read_jsonl(log, skip=problems.append), 1):
        try:
            check_fields(record, f"record {i}", _STEP_FIELDS)
            if "best_ppl" in record:
                check_fields(record, f"record {i}", _VALID_FIELDS)
        except MemdecError as exc:
            problems.append(str(exc))
            continue
        records.append(record)
    if problems:
        first = problems[0].removeprefix(f"{log}: ")
        warn(f"{log}: skipped {len(problems)} record{'s' if len(problems) > 1 else ''} the training plot cannot use "
             f"({first})")
    return records


def _plot_training(run: Path) -> str | None:
    """Training loss and validation curves of every decoder trained (each α candidate), one colour each."""
    candidates = sorted((run / "candidates").glob("alpha-*/log.jsonl")) or [run / "memdec" / "log.jsonl"]
    logs = {p.parent.name if p.parent.name.startswith("alpha-") else "memdec": p for p in candidates if p.is_file()}
    if not logs:
        return None
    import matplotlib  # optional and heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = (run / "memdec").resolve().name
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    base = None
    for i, (name, log) in enumerate(logs.items()):
        records = training_records(log)
        label = candidate_label(name) + (" (chosen)" if name == chosen and len(logs) > 1 else "")
        color = f"C{i}"
        ax1.plot([r["step"] for r in records], [r["loss"] for r in records], color=color, label=f"{label}: loss")
        ax1.plot([r["step"] for r in records], [r["ce"] for r in records], color=color, ls=":", label=f"{label}: CE")
        val = [r for r in records if "best_ppl" in r]
        if val:
            steps = [r["step"] for r in val]
            ax2.plot(steps, [r["best_ppl"] for r in val], "-o", color=color, label=f"{label}: joint, best λ")
            ax2.plot(steps, [r["valid_ppl_memdec"] for r in val], "--", color=color, label=f"{label}: decoder alone")
            base = val[0]["valid_ppl_base"]
    ax1.set_xlabel("optimizer step"), ax1.set_ylabel("nats"), ax1.set_title("training loss"), ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    if base is not None:
        ax2.axhline(base, color="gray", ls=":", label="base")
        ax2.set_xlabel("optimizer step"), ax2.set_ylabel("validation perplexity"), ax2.set_title("validation")
        ax2.grid(alpha=0.3), ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run / "training.png")
    plt.close(fig)
    return "training.png"


def plot_router_lambdas(record: dict, out: Path) -> None:
    """λ_t along a passage (``RUN/router/lambda_t.json``: ``tokens``, ``lambda_t``, ``fixed_lambda``): the line,
    the fixed λ, each position coloured by λ_t, the ``ROUTER_MARKED`` highest and lowest named by their token.
    Written through ``atomic_write``."""
    import matplotlib  # optional and heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam, tokens = record["lambda_t"], record["tokens"]
    x = list(range(len(lam)))
    fig, ax = plt.subplots(figsize=(12, 3.6), dpi=110)
    ax.plot(x, lam, color="0.6", lw=0.8)
    points = ax.scatter(x, lam, c=lam, cmap="coolwarm", vmin=0, vmax=1, s=10, zorder=3)
    ax.axhline(record["fixed_lambda"], color="k", ls=":", label=f"fixed λ = {record['fixed_lambda']:.2f}")
    order = sorted(x, key=lambda i: lam[i])
    for i in order[:ROUTER_MARKED] + order[-ROUTER_MARKED:]:
        ax.annotate(repr(tokens[i])[1:-1][:12], (i, lam[i]), textcoords="offset points", xytext=(0, 6), fontsize=7,
                    ha="center", rotation=45)
    fig.colorbar(points, ax=ax, label="λ_t")
    kept = "kept" if record.get("kept") else "not kept"
    ax.set_xlabel(f"position in {record['corpus']}"), ax.set_ylabel("λ_t (decoder's weight)"), ax.set_ylim(0, 1.05)
    ax.set_title(f"token router ({kept}): where the decoder takes over"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _router_lines(run: Path, stages: dict) -> list[str]:
    """The router stage's verdict and its λ_t plot (written here), or nothing when the stage did not run."""
    summary = _summary(stages, "router")
    if not summary:
        return []
    lines = ["", "## Token router", "", f"The router stage: {summary['why']}."]
    if summary.get("kept"):
        lines.append("It is kept in `memdec/` (router.json), where it loads by default; the table's `memdec+router` "
                     "row mixes the decoder at its λ_t per position.")
    record_file = run / "router" / ROUTER_LAMBDA_JSON
    if record_file.is_file():
        record = read_router_lambdas(record_file)
        plot_router_lambdas(record, run / ROUTER_PLOT)
        lam = record["lambda_t"]
        lines += [
            "",
            f"λ_t along the first {len(lam)} positions of {record['corpus']} (mean {sum(lam) / len(lam):.3f}, "
            f"from {min(lam):.3f} to {max(lam):.3f}; the fixed λ is {record['fixed_lambda']:.2f}):",
            "",
            f"![λ_t along a test passage]({ROUTER_PLOT})",
        ]
    return lines


def _folder_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


DISK_PARTS = ("memdec", "candidates", "baselines", "datastore")  # in this order; the rest of the run is "other"


def disk_bytes(run: Path) -> dict[str, int]:
    """Bytes the run leaves on disk, per part: ``memdec`` (the chosen decoder, through its link),
    ``candidates`` (the others), ``baselines``, ``datastore``, ``other`` (reports, plots, tasks...) and
    ``total``. A file is counted once, in the first part that holds it: a hard link (the ce-decoder's
    reuse of the α=0 candidate) or the link ``memdec -> candidates/...`` takes no space twice."""
    seen: set[tuple[int, int]] = set()

    def count(root: Path) -> int:
        total = 0
        for p in [root] if root.is_file() else (root.rglob("*") if root.is_dir() else []):
            st = p.lstat()
            if p.is_file() and not p.is_symlink() and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
        return total

    sizes = {"memdec": count((run / "memdec").resolve())}
    sizes.update({part: count(run / part) for part in DISK_PARTS[1:]})
    sizes["other"] = count(run)
    sizes["total"] = sum(sizes.values())
    return sizes


# --- the stages' outputs the report reads, each checked: one MemdecError line naming the file and the field


_SAMPLE_FIELDS: dict[str, Kind] = {"prompt": TEXT, "base": TEXT, "memdec": TEXT, "lambda": UNIT}


def read_samples(file: Path) -> list[dict]:
    """``RUN/samples.json``: a list of {prompt, base, memdec, lambda}, checked."""
    return check_items({"samples": read_json(file, "samples")}, "samples", file, _SAMPLE_FIELDS)


_ENTRY_FIELDS: dict[str, Kind] = {"acc": UNIT, "n": WHOLE,
                                  "ci95": Kind("a list of two numbers in [0, 1]", lambda v: isinstance(v, list) and
                                               len(v) == 2 and all(UNIT.test(x) for x in v))}


def check_tasks_json(tasks: dict, where) -> dict:
    """The tasks record (``RUN/tasks.json``, or report.json's ``tasks``): each task written, each system's
    scores, the tasks skipped, as the report's table and notes read them."""
    check_field(tasks, "skipped", where, OBJECT, optional=True)
    for task in check_field(tasks, "tasks", where, OBJECT):
        check_field(tasks, f"tasks.{task}.items", where, WHOLE)
        if task == FACTS_TASK:
            check_field(tasks, f"tasks.{task}.heldout", where, TEXT)
        elif task.startswith(GENERAL_TASK):
            check_field(tasks, f"tasks.{task}.corpus", where, TEXT)
    for i, row in enumerate(check_items(tasks, "results", where, {"system": TEXT, "tasks": OBJECT})):
        for task in row["tasks"]:
            check_fields(row, f"{where} (results item {i})", {f"tasks.{task}.{k}": v for k, v in _ENTRY_FIELDS.items()})
    return tasks


def read_tasks_json(file: Path) -> dict:
    """``RUN/tasks.json``, checked as ``check_tasks_json`` says."""
    return check_tasks_json(read_json_object(file, "tasks report"), file)


_LAMBDA_FIELDS: dict[str, Kind] = {
    "corpus": TEXT, "fixed_lambda": UNIT,
    "lambda_t": Kind("a non-empty list of numbers in [0, 1]", lambda v: isinstance(v, list) and len(v) > 0 and
                     all(UNIT.test(x) for x in v)),
    "tokens": Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)),
}


def read_router_lambdas(file: Path) -> dict:
    """``RUN/router/lambda_t.json``: λ_t along a test passage with its tokens (one each), checked."""
    record = read_json_object(file, "router λ_t record")
    check_fields(record, file, _LAMBDA_FIELDS)
    check_field(record, "kept", file, BOOL, optional=True)
    if len(record["tokens"]) != len(record["lambda_t"]):
        raise MemdecError(f'{file}: field "tokens" holds {len(record["tokens"])} tokens, "lambda_t" '
                          f'{len(record["lambda_t"])} values')
    return record


def read_report_json(file: Path) -> dict:
    """``RUN/report.json``, checked where the terminal's summary reads it."""
    report = check_eval_json(read_json_object(file, "report"), file)
    check_fields(report, file, {"stage_seconds": OBJECT})
    if report.get("tasks") is not None:
        check_tasks_json(check_field(report, "tasks", file, OBJECT), f"{file} (tasks)")
    return report


def write_report(run: Path, settings: dict, stages: dict, wall_s: float) -> None:
    """Write RUN/report.json, then RUN/report.md, from the stages' outputs: ``settings``, the run's
    (``RUN/settings.json``), ``stages``, its stage record (``RUN/stages.json``)."""
    report = report_json(run, settings, stages, wall_s)
    atomic_write_json(run / "report.json", report, ensure_ascii=False)
    lines = report_markdown(run, report, _plot_training(run))
    routed = _router_lines(run, stages) if settings.get("router", "off") != "off" else []
    atomic_write_text(run / "report.md", "\n".join(lines + routed))


def _summary(stages: dict, name: str) -> dict:
    return stages.get(name, {}).get("summary", {})


def report_json(run: Path, settings: dict, stages: dict, wall_s: float) -> dict:
    """Everything the report shows, as one JSON object."""
    s = SimpleNamespace(**settings)
    ev = read_eval_json(run / "eval.json")
    samples_file = run / "samples.json"
    samples = read_samples(samples_file) if samples_file.is_file() else []
    tasks_file = run / "tasks.json"
    tasks = read_tasks_json(tasks_file) if s.task_items and tasks_file.is_file() else None
    info = read_memdec_json(run / "memdec")
    manifest = read_manifest(run / "datastore")
    sizes = {"datastore_keys": manifest.n_keys, "datastore_bytes": _folder_bytes(run / "datastore"),
             "memdec_parameters": info.get("n_parameters"), "memdec_init": info.get("init"),
             "memdec_bytes": sum(p.stat().st_size for p in (run / "memdec").glob("*.safetensors")),
             "memdec_transfer": info.get("transfer"), "memdec_shape": recorded_shape_name(info),
             "memdec_trainable": info.get("trainable_parameters")}
    return {"model": s.model, "train_corpus": s.corpus, "valid_corpus": s.valid, "tokens": ev["tokens"],
            "corpus": ev["corpus"], "results": ev["results"], "sweep": ev.get("sweep"), "general": ev.get("general"),
            "recurring": ev.get("recurring"), "sizes": sizes, "disk_bytes": disk_bytes(run),
            "stage_seconds": {name: e.get("seconds") for name, e in stages.items()},
            "wall_seconds_this_call": round(wall_s, 1), "settings": settings, "samples": samples, "tasks": tasks,
            "alpha_choice": _summary(stages, "train").get("valid_joint_ppl"),
            "skipped": _summary(stages, "train").get("skipped"),
            "candidate_seconds": _summary(stages, "train").get("train_seconds"),
            "candidates_kept": _summary(stages, "train").get("keep_candidates"),
            "candidate_weights_removed": _summary(stages, "train").get("weights_removed"),
            "ce_decoder_reused_from": _summary(stages, "ce-decoder").get("reused_from")}


def _decoder_size(sizes: dict) -> str:
    """"134.5 M parameters" for a copy; a shape sharing the base's tensors: what it owns and trains."""
    if is_full_copy(sizes.get("memdec_shape", FULL_COPY)) or sizes.get("memdec_trainable") is None:
        return f"{(sizes['memdec_parameters'] or 0) / 1e6:.1f} M parameters"
    return (f"{sizes['memdec_trainable'] / 1e6:.2f} M parameters of its own (a {sizes['memdec_shape']} decoder on the "
            f"base's {((sizes['memdec_parameters'] or 0) - sizes['memdec_trainable']) / 1e6:.1f} M)")


def report_markdown(run: Path, report: dict, training_png: str | None) -> list[str]:
    """The lines of RUN/report.md."""
    s = SimpleNamespace(**report["settings"])
    lines = [f"# memdec report: {s.model} adapted to {s.corpus}", "",
             f"Run folder `{run}`; wall time of this call {report['wall_seconds_this_call'] / 60:.1f} min.", "",
             f"Test: {report['tokens']} tokens of {report['corpus']}; λ of each system chosen on {s.valid} "
             f"({s.valid_tokens or 'all'} tokens). The test text is never used in training or in choosing λ.", ""]
    lines += results_table(report["results"], report["general"], report["recurring"], report.get("tasks"))
    lines += _teacher_lines(s, report)
    if s.baselines:
        lines += [
            "",
            f"Baselines (`memdec baseline`) trained on the datastore's token stream with the memory decoder's "
            f"budget: the same windows of {s.train_block_size} tokens, batch {s.batch_size}, "
            f"{'max_steps ' + str(s.max_steps) if s.max_steps else f'{s.epochs:g} epoch(s)'}, the same warm-up "
            f"and cosine schedule, peak lr {s.lr:g} (LoRA: {s.lora_lr:g}, rank {s.lora_r}), next-token "
            f"cross-entropy only. dapt and lora are scored alone (LoRA merged into the base); ce-decoder is the "
            f"memory decoder's recipe with alpha=0, mixed with the base at its own λ.",
        ]
        if report["ce_decoder_reused_from"]:
            lines.append(f"The ce-decoder is `{report['ce_decoder_reused_from']}`, the α=0 teacher candidate: the same "
                         f"recipe on the same tokens, so it was not trained twice.")
    sizes = report["sizes"]
    lines += [
        "",
        "## Sizes",
        "",
        f"- datastore: {sizes['datastore_keys']:,} keys, {sizes['datastore_bytes'] / 2**20:.1f} MiB on disk",
        f"- memory decoder: {_decoder_size(sizes)}, {sizes['memdec_bytes'] / 2**20:.1f} MiB ({sizes['memdec_init']})",
        *_origin_lines(sizes.get("memdec_transfer")),
        "",
        _shape_note(settings_shape(report["settings"])),
        "",
    ]
    lines += _disk_lines(report.get("disk_bytes"), report["settings"], report)
    lines += ["## Stage times", ""]
    lines += render_table(["stage", "seconds"], [[k, str(v)] for k, v in report["stage_seconds"].items()])
    lines += ["", "## Plots", ""]
    if training_png:
        lines.append(f"![training curves]({training_png})")
    if (run / "lambda.png").is_file():
        lines.append("![perplexity against λ](lambda.png)")
    lines += _sample_lines(report["samples"])
    lines += ["", "Load the adapted model in one line (its λ is the one chosen above):", "", "```python",
              "from memdec import MemoryDecoderModel",
              f"model = MemoryDecoderModel.from_pretrained(\"{s.model}\", \"{run / 'memdec'}\")", "```", ""]
    return lines


def settings_shape(settings: dict) -> str:
    """The decoder shape a run's settings name (``RUN/settings.json``; runs before shapes hold a copy)."""
    return settings.get("decoder") or FULL_COPY


def _shape_note(shape: str) -> str:
    """Why the run's decoder has its shape: the default is chosen by its worst domain (docs/domains.md)."""
    if is_full_copy(shape):
        return ("The decoder is a full copy of the base, adapt's default: the only shape that beat DAPT on every "
                "domain measured (docs/domains.md). A compact decoder, `--decoder lora:16` at 4% of its bytes, came "
                "within 1.1% of it on prose, code, reference documentation and a medical ontology, but 8.7% behind "
                "it on licence texts (near copies, where retrieval counts most): try it where disk or serving "
                "memory matters and compare the two reports.")
    return (f"The decoder is `{shape}` (chosen with --decoder), which shares the base's tensors. adapt's default is "
            f"a full copy: compact shapes hold on some domains and not others (`lora:16` was within 1.1% of the "
            f"copy on four domains and 8.7% behind it on licence texts, docs/domains.md); compare with a "
            f"`--decoder copy` run before relying on it.")


def _candidates_text(report: dict) -> str:
    """What ``candidates/`` holds: whose weights this run kept or removed, and why."""
    if not report.get("candidates_kept"):
        return "the other candidate decoders (weights removed unless --keep-candidates: their logs stay)"
    removed = report.get("candidate_weights_removed") or []
    gone = (f"; those of {', '.join(candidate_label(n) for n in removed)} were removed by an earlier call without it"
            if removed else "")
    return f"the other candidate decoders, their weights kept (--keep-candidates{gone})"


def _disk_lines(disk: dict | None, settings: dict, report: dict | None = None) -> list[str]:
    """The report's "Disk" section: what the run leaves on disk, per folder."""
    if not disk:
        return []
    what = {"memdec": f"the chosen memory decoder (`{settings.get('decoder', 'copy')}`)",
            "candidates": _candidates_text(report or {}),
            "baselines": "the baselines", "datastore": "keys, index and kNN targets",
            "other": "reports, plots, tasks, records"}
    rows = [[f"`{k}`" if k != "other" else k, f"{disk[k] / 2**20:.1f} MiB", what[k]] for k in (*DISK_PARTS, "other")]
    rows.append(["total", f"{disk['total'] / 2**20:.1f} MiB", "trainer state is dropped when a run finishes "
                 "(unless --keep-trainer-state)"])
    return ["## Disk", "", *render_table(["folder", "on disk", "what"], rows), ""]


def _origin_lines(origin: dict | None) -> list[str]:
    """Where a transferred decoder comes from (``memdec.json``'s ``transfer`` record)."""
    if not origin:
        return []
    cov = origin.get("mapping") or {}
    return [
        f"- origin: transferred from `{origin.get('source_decoder')}` (a decoder for "
        f"`{origin.get('source_base_model')}`, tokenizer {origin.get('source_tokenizer_hash')}), {origin.get('init')} "
        f"embedding and LM-head rows; the mapping covers {100 * cov.get('coverage', 0):.1f}% of the "
        f"{cov.get('tokens', '?')} tokens ({cov.get('single_piece', '?')} as one source piece, "
        f"{cov.get('fallback', '?')} given the mean row)"
    ]


def _teacher_lines(s: SimpleNamespace, report: dict) -> list[str]:
    choice = report["alpha_choice"] or {}
    if len(choice) < 2:
        return []
    ranked = sorted(choice.items(), key=lambda kv: kv[1])
    def label(n):
        return candidate_label(
            n if n.startswith(("alpha-", TWO_PHASE_PREFIX)) else f"alpha-{n}"
        )  # older runs: keys were α
    secs = report.get("candidate_seconds") or {}
    took = lambda n: f", {secs[n]:.0f} s" if secs.get(n) is not None else ""  # noqa: E731 - wall time of its training
    lines = ["", f"Teacher chosen on {s.valid} (α: weight of the kNN distillation term; β: the base model's share "
                 f"of the teacher; every candidate trained for the same steps): **{label(ranked[0][0])}** "
                 f"(joint valid ppl {ranked[0][1]:.2f}{took(ranked[0][0])}); runner-up "
                 + ", ".join(f"{label(a)} ({p:.2f}{took(a)})" for a, p in ranked[1:])
                 + (". α=0 is next-token cross-entropy only: at this scale the kNN targets did not beat plain "
                    "cross-entropy as a teacher." if label(ranked[0][0]) == "α=0" else ".")]
    if report.get("skipped"):
        lines.append(
            f"Not trained (training budget spent): {', '.join(candidate_label(n) for n in report['skipped'])}."
        )
    return lines


def _sample_lines(samples: list[dict]) -> list[str]:
    if not samples:
        return []
    how = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in SAMPLING.items() if k != "do_sample")
    lines = ["", f"## Samples (sampled: {how}; the same seed for both)", ""]
    for smp in samples:
        lines += [f"**Prompt:** …{smp['prompt'][-200:]}", "", f"- **base:** {smp['base']}",
                  f"- **memdec (λ={smp['lambda']:.2f}):** {smp['memdec']}", ""]
    return lines


def _pct(x: float | None, ref: float | None) -> str:
    return "" if x is None or not ref else f"{(x / ref - 1) * 100:+.1f}%"


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return "0" if n == 0 else f"{n / 1e6:.2f} M"


def _train_time(r: dict) -> str:
    t = r.get("train_seconds")
    if r["system"] == "base":
        return "-"
    text = "-" if t is None else f"{t:.0f} s"
    if r.get("datastore_seconds") is not None:
        text += f" (+ {r['datastore_seconds']:.0f} s datastore)"
    return text


def task_cell(entry: dict | None) -> str:
    """``0.62 ± 0.09 (n=100)``: the accuracy, half the width of its 95% Wilson interval, the items."""
    if not entry:
        return "-"
    lo, hi = entry["ci95"]
    return f"{entry['acc']:.2f} ± {(hi - lo) / 2:.2f} (n={entry['n']})"


def task_columns(tasks: dict | None) -> dict[str, str]:
    """{task: column} of the tasks that tasks.json scored."""
    written = (tasks or {}).get("tasks") or {}
    return {task: column for task, column in TASK_COLUMNS.items() if task in written}


def _lambda(r: dict) -> str:
    return "-" if r.get("lambda") is None else f"{r['lambda']:.2f}"


def _value(key: str, spec: str) -> Callable[[dict], str]:
    """The cell of ``r[key]`` formatted with ``spec``; ``-`` where the row has none."""
    return lambda r: "-" if r.get(key) is None else format(r[key], spec)


def _vs_base(key: str, base: dict, on_base: bool = False) -> Callable[[dict], str]:
    """The change of ``r[key]`` against the base row's, in percent; the base row's own cell left empty
    unless ``on_base``."""
    return lambda r: "" if r is base and not on_base else _pct(r.get(key), base.get(key))


def _task_columns(tasks: dict | None, rename: Callable[[str], str] = str) -> list[Column]:
    """One column per lm-eval task that ``tasks.json`` scored: each system's accuracy and interval."""
    by_system = {r["system"]: r["tasks"] for r in (tasks or {}).get("results", [])}
    return [Column(rename(column), lambda r, task=task: task_cell(by_system.get(r["system"], {}).get(task)))
            for task, column in task_columns(tasks).items()]


def _ratio(r: dict, base: dict) -> float:
    """The base model's tokens/s over the row's: its measured inference ratio when the row has one."""
    return r.get("inference_ratio") or (base["tokens_per_s"] / r["tokens_per_s"])


def results_table(rows: list[dict], general: dict | None, recurring: dict | None = None,
                  tasks: dict | None = None) -> list[str]:
    """The report's Markdown table: test, recurring-token and general perplexity, the lm-eval tasks'
    accuracies (``RUN/tasks.json``), and each system's budget."""
    base = next(r for r in rows if r["system"] == "base")
    recurring = recurring if recurring and any(r.get("recurring_ppl") is not None for r in rows) else None
    columns = task_columns(tasks)
    table = [Column("system", lambda r: r["system"], "<"), Column("λ", _lambda),
             Column("test ppl", _value("ppl", ".2f")), Column("vs base", _vs_base("ppl", base))]
    for key, head, on in (("recurring_ppl", "recurring ppl", recurring), ("general_ppl", "general ppl", general)):
        table += [Column(head, _value(key, ".2f")), Column("vs base", _vs_base(key, base))] if on else []
    table += _task_columns(tasks)
    table += [
        Column("trainable params", lambda r: _params(r.get("trainable_parameters"))),
        Column("train time", _train_time),
        Column("tokens/s", _value("tokens_per_s", ".1f")),
        Column("inference time vs base", lambda r: f"{_ratio(r, base):.2f}×"),
    ]
    lines = render_columns(rows, table)
    lines += [
        "",
        "Every row is scored on the same tokens. *trainable params*: parameters that training changes "
        "(kNN-LM trains none; its cost is building the datastore's keys and index, shown as its train time). "
        "*train time*: wall time of the training loop, validation included; the memory decoder also needs the "
        "datastore with its kNN targets, shown beside it. *inference time vs base*: the base model's tokens/s over "
        "the system's, measured in this evaluation (a mixture runs the base and its second model).",
    ]
    if recurring:
        lines += [
            "",
            f"*recurring ppl*: the {recurring['tokens']} test tokens that belong to names and numbers also found in "
            f"the datastore's text (`memdec.knowledge`): the facts a memory is for.",
        ]
    lines += _task_notes(tasks, columns)
    if general:
        lines += ["", f"*general ppl*: {general['tokens']} tokens of `{general['corpus']}`, general text far from the "
                  f"training domain, scored by every system at the λ chosen above: a rise over the base is forgetting."]
    return lines


def _task_notes(tasks: dict | None, columns: dict[str, str]) -> list[str]:
    if not tasks:
        return []
    written = tasks.get("tasks") or {}
    lines = []
    if FACTS_TASK in columns:
        w = written[FACTS_TASK]
        lines += [
            "",
            f"*facts acc*: factual recall, {w['items']} multiple-choice item(s) ({TASK_CHOICES} options) from "
            f"`{w['heldout']}`: a name or number of the test text that also occurs in the training text, "
            f"after the {FACTS_CONTEXT_TOKENS} tokens before it; the distractors are other names or numbers "
            f"of the training text (lm-eval task `{FACTS_TASK}` in `tasks/`).",
        ]
    if f"{GENERAL_TASK}_cloze" in columns:
        w = written[f"{GENERAL_TASK}_cloze"]
        lines += [
            "",
            f"*general acc*: general ability, {w['items']} passages of `{w['corpus']}`, the last word of each "
            f"to pick among {TASK_CHOICES} (`{GENERAL_TASK}_cloze`); a drop against the base is forgetting. "
            f"The LAMBADA-style exact match of the same words (`{GENERAL_TASK}_lambada`) is in report.json.",
        ]
    if columns:
        lines += ["", "Accuracies: each system through lm-evaluation-harness (the `memdec` model) at the λ chosen "
                      "above; ± is half the width of the 95% Wilson interval, n the number of items."]
    for kind, why in (tasks.get("skipped") or {}).items():
        lines += ["", f"No {kind} task: {why}."]
    return lines


def format_summary(run: Path) -> str:
    """The report's table, for the terminal."""
    report = read_report_json(Path(run) / "report.json")
    rows = report["results"]
    base = next(r for r in rows if r["system"] == "base")
    table = [
        Column("system", lambda r: r["system"], "<"),
        Column("lambda", _lambda),
        Column("ppl", _value("ppl", ".3f")),
        Column("vs base", _vs_base("ppl", base, on_base=True)),
    ]
    if base.get("general_ppl") is not None:
        table += [
            Column("general", _value("general_ppl", ".3f")),
            Column("vs base", _vs_base("general_ppl", base, True)),
        ]
    table += _task_columns(report.get("tasks"), lambda c: c.replace(" acc", ""))
    table += [Column("tok/s", _value("tokens_per_s", ".1f")),
              Column("trainable", lambda r: _params(r.get("trainable_parameters"))),
              Column("train s", _value("train_seconds", ".0f"))]
    out = [f"{report['tokens']} test tokens of {report['corpus']}", *render_columns(rows, table, "text")]
    out.append("stage seconds: " + ", ".join(f"{k} {v}" for k, v in report["stage_seconds"].items()))
    out.append(f"report: {Path(run) / 'report.md'}")
    return "\n".join(out)

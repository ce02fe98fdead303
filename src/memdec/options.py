"""Every command's options, declared once: ``option`` puts a field's help, check, flag and fingerprint
rule beside the field of the config that owns it; ``option_from`` reuses another config's declaration.

A command's options are the fields of a dataclass config (``TrainConfig``, ``DatastoreConfig``,
``RouterConfig``, adapt's stage inputs, ...); ``cli.add_dataclass_args`` makes one flag per field from
this metadata. A command that offers another stage's option (``memdec adapt --lr``) takes the
declaration from that stage's config (``option_from(TrainConfig, "lr")``): its help and check are
written once, where the option belongs.

Run fingerprints (``fingerprint``) follow one versioned rule: a field or entry that joined a
fingerprint after its first version declares the value every run had before it existed (``before``),
and enters the hash only when it differs from that value, so that runs made earlier keep their
fingerprint; a field that never makes another run (``identity=False``: an output folder, a device, a
logging interval) never enters it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Mapping

ALWAYS = object()  # ``before``'s default: the field was part of its fingerprint from the first version


def option(help: str, default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           check: Callable | None = None, each: bool = False, fallback: Any = None, key: str | None = None,
           before: Any = ALWAYS, identity: bool = True, flag: str | None = None, cli: bool = True,
           action: str | None = None, note: str | None = None) -> Any:
    """A config field declared with everything a command needs to offer it.

    ``help``: what ``--help`` shows (the default is appended by the CLI); ``default`` /
    ``default_factory``: as ``dataclasses.field`` (neither: a required flag); ``check(value, flag)``:
    the one check of its value (of each element with ``each``; None is never checked: ``check_fields``);
    ``fallback``: the value a None stands for where a preset has none (adapt); ``key``: its name in a
    fingerprint (default: the field's); ``before``: the value every run had before the field existed
    (it then enters a fingerprint only when it differs, ``fingerprint_fields``); ``identity=False``: never
    part of a run's fingerprint; ``flag``: a flag that is not ``--field-name``; ``cli=False``: no flag;
    ``action="append"``: a repeatable flag of a list field; ``note``: what a None default stands for in
    this command (``--help`` shows "(default: NOTE)").
    """
    meta = {"help": help, "check": check, "each": each, "fallback": fallback, "key": key, "before": before,
            "identity": identity, "cli": cli}
    if flag:
        meta["flag"] = flag
    if action:
        meta["action"] = action
    if note:
        meta["note"] = note
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def nested(omit: tuple[str, ...] = ()) -> Any:
    """A field that holds another stage's whole config (a ``TransferConfig``'s ``TrainConfig``): the CLI offers
    each of its options as a flag of this command, but those of ``omit`` (that this command declares itself,
    or that do not apply to it)."""
    return dataclasses.field(metadata={"nested": True, "omit": tuple(omit)})


def declared(config_cls, name: str) -> dataclasses.Field:
    """The field ``name`` of the dataclass ``config_cls`` (its declaration: default and metadata)."""
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            return f
    raise KeyError(f"{config_cls.__name__} has no option {name!r}")


def option_from(config_cls, name: str, default: Any = dataclasses.MISSING, **changes) -> Any:
    """The option ``name`` as ``config_cls`` declares it, for another command that offers it: its help and
    check (and ``each``) taken from there, its default too unless ``default`` is given. ``changes`` are
    ``option``'s keywords for the command that offers it (its fingerprint rule, flag, a stricter check...);
    ``help`` may hold ``{help}``, the owner's text."""
    f = declared(config_cls, name)
    own = {"help": f.metadata.get("help", ""), "check": f.metadata.get("check"), "each": f.metadata.get("each", False)}
    if "help" in changes:
        changes["help"] = changes["help"].format(help=own["help"])
    factory = dataclasses.MISSING
    if default is dataclasses.MISSING:
        default, factory = f.default, f.default_factory
    return option(**{**own, **changes}, default=default, default_factory=factory)


def help_of(config_cls) -> dict[str, str]:
    """Each field's help, by field name: what ``--help`` shows for the command of ``config_cls``."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config_cls)}


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of the field ``f``: its declared ``flag``, else ``--field-name``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_options(config, of=None) -> None:
    """Each field of ``config`` (those ``of`` declares: a dataclass among its bases) through the check
    declared beside it (None is never checked)."""
    for f in dataclasses.fields(of or config):
        value, check = getattr(config, f.name), f.metadata.get("check")
        if check is None or value is None:
            continue
        for v in (value if f.metadata.get("each") else [value]):
            check(v, flag_of(f))


def since_first(payload: Mapping[str, Any], before: Mapping[str, Any]) -> dict:
    """``payload`` without each entry that joined it after the first version (a key of ``before``) and
    still holds the value every run had before it existed: the one rule that keeps old fingerprints."""
    return {k: v for k, v in payload.items() if k not in before or v != before[k]}


def fingerprint_fields(config, omit_unchanged: bool = True) -> dict:
    """The fields of ``config`` that make a run what it is (``identity``), each under its fingerprint
    key; with ``omit_unchanged``, those added later (``before``) left out at their earlier value."""
    payload, before = {}, {}
    for f in dataclasses.fields(config):
        if not f.metadata.get("identity", True):
            continue
        key = f.metadata.get("key") or f.name
        payload[key] = getattr(config, f.name)
        if f.metadata.get("before", ALWAYS) is not ALWAYS:
            before[key] = f.metadata["before"]
    return since_first(payload, before) if omit_unchanged else payload


def fingerprint(payload: Mapping[str, Any], before: Mapping[str, Any] | None = None, length: int = 16) -> str:
    """``length`` hex digits of the sha256 of ``payload`` as sorted JSON, after ``since_first(payload,
    before)``: the one hash of a training run (16 digits) and of an adapt stage's inputs (12)."""
    kept = since_first(payload, before or {})  # default=str: a value JSON has no type for (a Path) as its text
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:length]

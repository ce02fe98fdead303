"""One registry for every kind (``memdec.registry``): its lines for unknown names, its order, and the four
sorts of kind on it: a router kind defined here (a gate that trusts the decoder more where the base is
unsure, the whole of it in this file) is saved, checked and loaded through ``save_router`` /
``load_router`` with no other file touched, and no module compares a kind's name outside its own file."""

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from memdec import baselines, checkpoint, decoders, index, router
from memdec.errors import DatastoreError, MemdecError
from memdec.registry import Registry, discover
from memdec.router import (ROUTERS, ConstantRouter, Router, load_router, register_router, save_router,
                           unregister_router)

SRC = Path(__file__).resolve().parent.parent / "src" / "memdec"


class Thing:
    def __init__(self, name: str, rank: int = 0):
        self.name, self.rank = name, rank


def test_register_get_names_and_the_line_for_an_unknown_name():
    things: Registry[Thing] = Registry("thing", reserved=("auto",))
    a = things.register(Thing("a"))
    things.register(Thing("b"))
    assert things.get("a") is a and things.names() == ("a", "b") and list(things) == ["a", "b"] and "b" in things
    with pytest.raises(MemdecError, match=r"^unknown thing 'c'; choose one of: a, b$"):
        things.get("c")
    with pytest.raises(MemdecError, match=r"^f.json: unknown thing 3; choose one of: a, b$"):
        things.get(3, where="f.json")
    assert things.find("c") is None and things.find(["a"]) is None
    for bad in (Thing("a"), Thing(""), Thing("auto")):
        with pytest.raises(ValueError):
            things.register(bad)
    things.unregister("a")
    assert things.names() == ("b",)


def test_an_order_sorts_names_values_and_the_message_and_a_decorator_registers_a_class():
    ranked: Registry[Thing] = Registry("thing", order=lambda t: t.rank, error=DatastoreError,
                                       unknown='{where}: field "kind" must be one of {shown_names}, got {shown}')
    ranked.register(Thing("late", 2))
    ranked.register(Thing("early", 1))
    assert ranked.names() == ("early", "late") and [t.rank for t in ranked.values()] == [1, 2]
    with pytest.raises(DatastoreError, match=r'^x.json: field "kind" must be one of "early", "late", got "mid"$'):
        ranked.get("mid", where="x.json")
    classes: Registry[type] = Registry("class")

    @classes.register
    class Named:
        name = "named"

    assert classes.get("named") is Named


def test_the_four_sorts_of_kind_use_the_one_registry():
    assert isinstance(baselines.METHODS, Registry) and baselines.METHODS.names() == ("ce-decoder", "dapt", "lora")
    assert isinstance(index.KINDS, Registry) and index.KINDS.names() == ("flat", "ivfpq", "ivfpq-disk", "torch")
    assert isinstance(decoders.SHAPES, Registry) and decoders.SHAPES.names() == ("copy", "fork", "lora")
    assert isinstance(ROUTERS, Registry) and set(ROUTERS) == {"constant", "mlp"}
    assert checkpoint.DECODER_RECORDS.names() == decoders.SHAPES.names()  # each shape registered its record
    assert set(checkpoint.ROUTER_KINDS) == set(ROUTERS)
    assert discover("memdec.baselines", baselines.__path__, skip=("base", "config")) == ["ce_decoder", "dapt", "lora"]


def _string_constants(path: Path) -> set[str]:
    """Every string compared with ``==``, ``!=``, ``in`` or ``not in`` in a module (a literal operand)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            for part in (node.left, *node.comparators):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    found.add(part.value)
    return found


@pytest.mark.parametrize("module", ["checkpoint.py", "joint", "baselines/base.py", "baselines/__init__.py",
                                    "baselines/config.py", "report.py", "transfer.py", "registry.py"])
def test_no_kind_name_is_compared_outside_its_own_file(module):
    kinds = {*decoders.SHAPES, *ROUTERS, *baselines.METHODS}
    files = sorted((SRC / module).rglob("*.py")) if (SRC / module).is_dir() else [SRC / module]
    assert {f.name: sorted(_string_constants(f) & kinds) for f in files} == {f.name: [] for f in files}


# --- a router kind of this test's own: λ_t = λ_max · (the base's entropy / log V) -------------------


class EntropyRouter(Router):
    """λ_t grows with the base's uncertainty: λ_max times its entropy over log V (no weights, one field)."""

    kind = "entropy-test"

    def __init__(self, lambda_max: float, vocab: int, d_base: int = 1, d_mem: int = 1):
        super().__init__()
        self.lambda_max, self.vocab, self.d_base, self.d_mem = lambda_max, vocab, d_base, d_mem

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        entropy = features[..., self.d_base + self.d_mem]  # SCALARS[0]: the base's entropy
        return (self.lambda_max * entropy / math.log(self.vocab)).clamp(1e-6, 1 - 1e-6)

    def logit(self, features: torch.Tensor) -> torch.Tensor:
        lam = self(features)
        return torch.log(lam) - torch.log1p(-lam)

    def record(self) -> dict:
        return {"kind": self.kind, "lambda_max": self.lambda_max, "vocab": self.vocab, "d_base": self.d_base,
                "d_mem": self.d_mem, "hidden": 1, "scalars": list(router.SCALARS)}

    @classmethod
    def check_record(cls, info: dict, file: Path) -> None:
        lam = info.get("lambda_max")
        if not isinstance(lam, float) or not 0 < lam < 1:
            raise MemdecError(f'{file}: field "lambda_max" must be a number in (0, 1), got {lam!r}')

    @classmethod
    def from_record(cls, info: dict, folder: Path) -> "EntropyRouter":
        return cls(info["lambda_max"], info["vocab"], info["d_base"], info["d_mem"])


INFO = {"base_model": "tiny", "tokenizer_hash": "t", "decoder_fingerprint": "d"}


@pytest.fixture
def entropy_kind():
    """EntropyRouter registered (its one line: ``register_router``) for one test."""
    register_router(EntropyRouter)
    yield EntropyRouter
    unregister_router(EntropyRouter.kind)


def test_a_router_kind_of_its_own_saves_checks_and_loads_through_the_registry(entropy_kind, tmp_path):
    gate = EntropyRouter(0.8, vocab=50, d_base=2, d_mem=2)
    folder = save_router(gate, tmp_path / "r", INFO)
    assert not (folder / checkpoint.ROUTER_WEIGHTS).exists()  # no weights: nothing but router.json
    loaded, info = load_router(folder)
    assert type(loaded) is EntropyRouter and info["kind"] == "entropy-test" and loaded.lambda_max == 0.8
    features = torch.tensor([[0.0, 0.0, 0.0, 0.0, math.log(50) / 2, 1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(loaded(features), torch.tensor([0.4])) and torch.allclose(loaded(features), gate(features))
    record = json.loads((folder / checkpoint.ROUTER_JSON).read_text())
    (folder / checkpoint.ROUTER_JSON).write_text(json.dumps({**record, "lambda_max": 1.5}))
    with pytest.raises(MemdecError, match=r'router.json: field "lambda_max" must be a number in \(0, 1\), got 1.5$'):
        load_router(folder)
    (folder / checkpoint.ROUTER_JSON).write_text(json.dumps({**record, "kind": "entropy"}))
    with pytest.raises(MemdecError, match=r'field "kind" must be one of .*"entropy-test".*, got "entropy"$'):
        load_router(folder)


def test_the_built_in_router_kinds_keep_their_records(tmp_path):
    folder = save_router(ConstantRouter(0.25), tmp_path / "c", INFO)
    loaded, info = load_router(folder)
    assert type(loaded) is ConstantRouter and loaded.lmbda == 0.25 and info["kind"] == "constant"
    assert {k: info[k] for k in ("d_base", "d_mem", "hidden", "scalars")} == {"d_base": 1, "d_mem": 1, "hidden": 1,
                                                                              "scalars": []}
    with pytest.raises(MemdecError, match="cannot save a Router: only a registered router kind"):
        save_router(Router(), tmp_path / "none", INFO)

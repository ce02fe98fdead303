"""Loading and saving a joint model: ``LoadingMixin`` (``from_pretrained``, ``save_pretrained``), a
router checked against the models it routes between (``attach_router``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoTokenizer

from ..checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, check_checkpoint_tokenizer, decoder_fingerprint,
                          is_router_folder, read_memdec_json, read_router_json, write_memdec_json)
from ..decoders import decoder_shape, load_decoder, shared_split
from ..errors import MemdecError, TokenizerMismatchError
from ..models import check_base_identity, load_model, loaded_folder, tokenizer_fingerprint
from ..router import Router, load_router

if TYPE_CHECKING:  # the class these methods are mixed into
    from .model import MemoryDecoderModel


class LoadingMixin:
    """``MemoryDecoderModel.from_pretrained`` (a base and a checkpoint folder, with its router) and
    ``save_pretrained`` (the decoder only, peft-style, with ``memdec.json``)."""

    @classmethod
    def from_pretrained(
        cls,
        base_model,
        memdec_path: str | Path,
        lmbda: float | None = None,
        *,
        tokenizer=None,
        temperature: float | None = None,
        check_tokenizer: bool = True,
        router: str | Path | Router | None = None,
        auto_router: bool = True,
    ) -> "MemoryDecoderModel":
        """Pair a base model with the memory decoder checkpoint at ``memdec_path``.

        base_model: a loaded causal LM, or a model spec string (``memdec.models.load_model``).
        lmbda: λ; default: the checkpoint's recommended value (``memdec.json`` ``lambda``).
        tokenizer: the base model's tokenizer. Its fingerprint must equal the checkpoint's
            ``tokenizer_hash``, else TokenizerMismatchError. If omitted, it is loaded from
            ``base_model.name_or_path``; if that fails, MemdecError asks for one. Pass
            ``check_tokenizer=False`` to skip the fingerprint check (the vocabulary sizes of the
            two models are always compared).
        temperature: divides the decoder's logits; default ``memdec.json`` ``temperature`` or 1.

        router: a router folder (``memdec router``) or a ``Router``: λ_t per position in place of λ.
            Without one, router files in the checkpoint folder itself are used when ``auto_router``
            and no ``lmbda`` is given, unless the router lost to the fixed λ on its validation text.

        The decoder is loaded onto the base model's device, in its dtype.
        """
        auto_router = auto_router and router is None and lmbda is None  # a λ given: the fixed mixture
        if isinstance(base_model, (str, Path)):
            base_model, loaded_tok = load_model(str(base_model))
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        info = read_memdec_json(memdec_path)
        if check_tokenizer:
            if tokenizer is None:
                tokenizer = _tokenizer_of(base_model)
            check_checkpoint_tokenizer(tokenizer, info, f"memory decoder {memdec_path}")
        lmbda = info["lambda"] if lmbda is None else lmbda
        temperature = float(info.get("temperature") or 1.0) if temperature is None else temperature
        memdec = load_decoder(memdec_path, info, base_model)
        joint = cls(base_model, memdec, lmbda=lmbda, temperature=temperature, memdec_info=info)
        if auto_router and is_router_folder(memdec_path):
            router = _auto_router(memdec_path)
        if router is not None:
            joint.router = router if isinstance(router, Router) else attach_router(joint, router, memdec_path)
        return joint

    def save_pretrained(self, folder: str | Path, tokenizer=None, **kwargs) -> Path:
        """Save the memory decoder only, peft-style: its model folder (a fork of this base: its own
        blocks, ``memdec.decoders``) plus ``memdec.json``, with the current λ and temperature as the
        recommended ones. ``tokenizer`` (the shared one) is saved
        beside it and, for a wrapper not loaded from a checkpoint, gives ``tokenizer_hash``."""
        info = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "base_model": self.base.name_or_path,
                "alpha": None, "k": None,
                "knn_temperature": None, "datastore_manifest_hash": None, "train_stats": {}, **self.memdec_info}
        if tokenizer is not None:
            info["tokenizer_hash"] = tokenizer_fingerprint(tokenizer)
        if "tokenizer_hash" not in info:
            raise MemdecError("save_pretrained needs tokenizer=... to record the memory decoder's tokenizer hash")
        info.update({"lambda": self.lmbda, "temperature": self.temperature})
        folder = Path(folder)
        info.pop("decoder", None)
        if shared_split(self.base, self.memdec) is None:
            self.memdec.save_pretrained(folder, **kwargs)
        else:  # a fork of this base (fork:K, lora:R@K...): what it owns only
            info["decoder"] = decoder_shape(self.base, self.memdec).save(self.memdec, folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_memdec_json(folder, info)  # last: it commits the checkpoint
        return folder


def attach_router(joint: MemoryDecoderModel, folder: str | Path, memdec_path: str | Path) -> Router:
    """The router saved in ``folder``, checked against the models it is to route between (one MemdecError
    line each): the decoder's weights (``decoder_fingerprint``), the tokenizer, the hidden sizes and,
    where both are known, the base model's weights. On the base model's device."""
    router, info = load_router(folder)
    where = Path(folder).expanduser() / "router.json"
    mine = decoder_fingerprint(memdec_path)
    if info["decoder_fingerprint"] != mine:
        raise MemdecError(f"{where}: trained for another memory decoder (decoder_fingerprint "
                          f"{info['decoder_fingerprint']}, {memdec_path} has {mine}); train one with `memdec router`")
    if joint.memdec_info.get("tokenizer_hash") not in (None, info["tokenizer_hash"]):
        raise TokenizerMismatchError(f"{where}: trained with another tokenizer than the memory decoder {memdec_path}'s")
    if router.needs_features:  # a router that reads both models' hidden states must fit their sizes
        sizes = (joint.base.config.get_text_config().hidden_size, joint.memdec.config.get_text_config().hidden_size)
        if sizes != (info["d_base"], info["d_mem"]):
            raise MemdecError(f"{where}: trained on hidden sizes {info['d_base']} (base) and {info['d_mem']} "
                              f"(decoder); "
                              f"these models have {sizes[0]} and {sizes[1]}")
    check_base_identity(info.get("base_fingerprint"), loaded_folder(joint.base), str(where))
    return router.to(joint.base.get_input_embeddings().weight.device)


def _auto_router(memdec_path: str | Path) -> str | None:
    """The checkpoint folder itself as a router folder, unless its router lost to the fixed λ on the
    validation text it was measured on (a router that loses is not used)."""
    valid = read_router_json(memdec_path).get("valid") or {}
    if valid.get("router_ppl") is not None and valid.get("fixed_ppl") is not None \
            and valid["router_ppl"] > valid["fixed_ppl"]:
        warnings.warn(f"{memdec_path}: its router lost to the fixed λ on {valid.get('corpus', 'its validation text')} "
                      f"({valid['router_ppl']:.3f} > {valid['fixed_ppl']:.3f}); mixing with the fixed λ", stacklevel=3)
        return None
    return str(memdec_path)


def _tokenizer_of(model):
    """The tokenizer saved beside a loaded model (``name_or_path``), or MemdecError."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "name_or_path", None)
    if name:
        try:
            return AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means: we cannot tell
            pass
    raise MemdecError(
        f"cannot load the base model's tokenizer from {name!r} to check it against the memory decoder's; "
        f"pass tokenizer=... (or check_tokenizer=False to skip the check)"
    )

"""Recurring names and numbers: exact tokens on a known text, and the vectorised spans against a plain loop."""

import numpy as np

from memdec.data import load_token_stream
from memdec.knowledge import recurring_positions, token_classes, word_spans


def encode(tokenizer, text):
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def test_recurring_names_and_numbers_exact(tokenizer):
    memory = encode(tokenizer, "They said Tilney lived at 1798 Milsom Street, with Mr Allen.")
    held_out = encode(
        tokenizer, "Then Tilney met Catherine. She gave him 1798 pounds. Then Tilney and Isabella left with Allen."
    )
    mask = recurring_positions(held_out, memory, tokenizer)
    assert mask.shape == (len(held_out) - 1,)
    # "Then" and "She" open sentences; Catherine and Isabella never occur in the memory
    assert tokenizer.decode(held_out[1:][mask]) == " Tilney1798 TilneyAllen"  # the lone space tokens belong to no word


def reference_spans(tokens, tokenizer):
    """The same rule, one position at a time."""
    texts = [tokenizer.decode([t]) for t in tokens]
    spans, i = [], 0
    while i < len(tokens):
        t, prev = texts[i], texts[i - 1] if i else None
        prev_ends = (
            prev is None
            or int(tokens[i - 1]) in tokenizer.all_special_ids
            or (
                prev.strip(" ") != ""
                and (
                    prev.rstrip(" ").endswith((".", "!", "?", '"', "'", "\u201d", "\u2019", ":", ";"))
                    or prev.endswith("\n")
                )
            )
        )
        if any(c.isdigit() for c in t):
            j = i + 1
            while j < len(tokens) and any(c.isdigit() for c in texts[j]):
                j += 1
            spans.append((i, j))
            i = j
            continue
        after_space = (
            i >= 2
            and prev == " "
            and not (
                texts[i - 2].rstrip(" ").endswith((".", "!", "?", '"', "'", "\u201d", "\u2019", ":", ";"))
                or texts[i - 2].endswith("\n")
                or int(tokens[i - 2]) in tokenizer.all_special_ids
            )
        )
        if t != " I" and (
            len(t) > 1 and t[0] == " " and t[1].isupper() and not prev_ends or t[:1].isupper() and after_space
        ):
            j = i + 1
            while j < len(tokens) and texts[j].isalpha():
                j += 1
            spans.append((i, j))
            i = j
            continue
        i += 1
    return spans


def test_word_spans_match_a_plain_loop(tokenizer):
    tokens = load_token_stream("austen:valid", tokenizer, 3000)
    starts, ends = word_spans(tokens, token_classes(tokenizer))
    assert list(zip(starts.tolist(), ends.tolist())) == reference_spans(tokens, tokenizer)
    assert len(starts) > 20


def test_eval_reports_recurring_token_perplexity(tiny_llama_dir, store, tokenizer):
    """Every row's recurring_ppl is its perplexity over exactly the masked positions."""
    import math

    from memdec.evaluate import EvalConfig, run_eval_report
    from memdec.scoring import base_scorer, score_tokens
    from memdec.models import load_model

    cfg = EvalConfig(model=str(tiny_llama_dir), corpus="austen:valid", max_tokens=900, block_size=64, stride=32,
                     knn=str(store), knn_temp=1.0, lmbda=0.3, recurring=str(store))
    report = run_eval_report(cfg)
    tokens = load_token_stream("austen:valid", tokenizer, 900)
    memory = np.load(store / "tokens.npy")
    mask = recurring_positions(tokens, memory, tokenizer)
    assert report.extra["recurring"]["tokens"] == int(mask.sum()) > 0
    model, _ = load_model(str(tiny_llama_dir))
    nll, _ = score_tokens(base_scorer(model), tokens, 64, 32, progress=False)
    base = report.rows[0]
    assert math.isclose(
        base.extra["recurring_ppl"], math.exp(float(np.mean(nll[mask], dtype=np.float64))), rel_tol=1e-4
    )
    assert [r.system for r in report.rows] == ["base", "knn-lm"] and report.rows[1].extra["recurring_ppl"] > 0

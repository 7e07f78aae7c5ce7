"""Lego-MT flows against the single multilingual baseline on the held-out pairs.

For a direction ``X -> Y`` (``gX``/``gY`` the groups of X and Y) the rows are:

* Enc-Flow ``enc[gX] -> m2m``, Dec-Flow ``main -> dec[gY]``, Mix-Flow ``main -> m2m``;
* ``enc[gX] -> dec[gY]``, the two group branches combined (never trained together);
* the baseline (one flow of the same shape trained on every pair, :mod:`pretrain.lego.baseline`).

Each encoder/decoder combination is detached from the run's partitions once and scores every
direction that uses it. The result is one table (BLEU / chrF per direction and the unweighted
average), a JSON file, and one MLflow run per row.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from pretrain.lego.detach import detach_from_run, load_flow, partition_steps
from pretrain.lego.eval_tracking import averages
from pretrain.lego.store import partition_name
from pretrain.lego.translate import read_heldout, score_pairs

ROWS = {
    "enc": "Enc-Flow (enc[X] -> m2m)",
    "dec": "Dec-Flow (main -> dec[Y])",
    "mix": "Mix-Flow (main -> m2m)",
    "enc-dec": "enc[X] -> dec[Y]",
    "baseline": "baseline (one flow, all pairs)",
}


def route(row: str, src_group: str, tgt_group: str) -> tuple[str, str]:
    """``(encoder, decoder)`` of a Lego-MT ``row`` for a direction between these groups."""
    return {
        "enc": (src_group, "m2m"),
        "dec": ("main", tgt_group),
        "mix": ("main", "m2m"),
        "enc-dec": (src_group, tgt_group),
    }[row]


def run_meta(run_dir: Path) -> dict[str, Any]:
    """The data ``meta.json`` of a finished Lego-MT run (tags, tokenizer, groups)."""
    from pretrain.lego.data import read_meta

    config = Path(run_dir) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir}: not a finished Lego-MT run (no config.json)")
    cfg = json.loads(config.read_text())
    meta = read_meta(Path(cfg["train"]["data_dir"]))
    meta.setdefault("groups", {g: [g] for g in cfg["model"]["groups"]})
    return meta


def compare(
    run_dir: Path,
    heldout: Path,
    *,
    baseline: Path | None = None,
    limit: int | None = None,
    beam: int = 1,
    max_len: int = 64,
    directions: list[str] | None = None,
) -> dict[str, Any]:
    """``{"directions", "rows": {row: {direction: {"bleu", "chrf", "n", "flow"}, "avg": ...}}}``."""
    from data_pipeline.tokenizer import SentencePieceTokenizer

    meta = run_meta(run_dir)
    group_of = {lang: g for g, langs in meta["groups"].items() for lang in langs}
    by_dir = read_heldout(heldout, directions=directions, limit=limit)
    unknown = sorted({lang for d in by_dir for lang in d.split("-")} - set(group_of))
    if unknown:
        raise ValueError(f"{heldout}: languages {unknown} are in no group of {run_dir} ({meta['groups']})")
    trained = set(partition_steps(run_dir)[0])

    def available(enc: str, dec: str) -> bool:
        return (enc == "main" or partition_name("enc", enc) in trained) and (
            dec == "m2m" or partition_name("dec", dec) in trained
        )

    jobs: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    skipped = []  # rows with a branch the run never trained (e.g. no stage 2)
    for row in ("enc", "dec", "mix", "enc-dec"):
        routes = {d: route(row, *(group_of[lang] for lang in d.split("-"))) for d in by_dir}
        if not all(available(*r) for r in routes.values()):
            skipped.append(row)
            continue
        for d, r in routes.items():
            jobs[r].append((row, d))
    tok = SentencePieceTokenizer(meta["tokenizer"])
    rows: dict[str, dict[str, Any]] = {r: {} for r in ROWS if r != "baseline" and r not in skipped}
    for (enc, dec), uses in jobs.items():  # each combination detached once, then dropped
        flow = detach_from_run(run_dir, encoder=enc, decoder=dec)
        flow_meta = {**meta, "encoder": enc, "decoder": dec}
        for row, d in uses:
            scores = score_pairs(flow, tok, by_dir[d], meta=flow_meta, beam=beam, max_len=max_len)
            rows[row][d] = {**scores, "flow": f"{enc} -> {dec}"}
        del flow
    if baseline is not None:
        flow, bmeta = load_flow(baseline)
        btok = SentencePieceTokenizer(bmeta["tokenizer"]) if "tokenizer" in bmeta else tok
        rows["baseline"] = {
            d: {
                **score_pairs(flow, btok, pairs, meta=bmeta, beam=beam, max_len=max_len),
                "flow": "main -> m2m",
            }
            for d, pairs in by_dir.items()
        }
    for scores in rows.values():
        ordered = {d: scores[d] for d in by_dir}
        scores.clear()
        scores.update(ordered, avg=averages(ordered))
    return {
        "run_dir": str(run_dir),
        "baseline": str(baseline) if baseline is not None else None,
        "heldout": str(heldout),
        "limit": limit,
        "beam": beam,
        "directions": list(by_dir),
        "labels": {r: ROWS[r] for r in rows},
        "rows": rows,
        "skipped": skipped,
    }


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per flow (and the baseline), ``BLEU / chrF`` per direction."""
    dirs = result["directions"]
    lines = [
        "| flow (BLEU / chrF) | " + " | ".join(dirs) + " | avg |",
        "|---|" + "---|" * (len(dirs) + 1),
    ]
    for row, scores in result["rows"].items():
        cells = [f"{scores[d]['bleu']:.1f} / {scores[d]['chrf']:.1f}" for d in [*dirs, "avg"]]
        lines.append(f"| {result['labels'][row]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def log_rows(result: dict[str, Any], *, tracking_uri: str, experiment: str) -> dict[str, str]:
    """One MLflow run per row (metrics as ``lego eval`` logs them); returns ``{row: run_id}``."""
    from pretrain.lego.eval_tracking import log_scores

    params = {k: result[k] for k in ("run_dir", "baseline", "heldout", "limit", "beam")}
    ids = {}
    for row, scores in result["rows"].items():
        per_dir = {d: s for d, s in scores.items() if d != "avg"}
        ids[row] = log_scores(
            per_dir,
            tracking_uri=tracking_uri,
            experiment=experiment,
            run_name=f"compare {row}",
            params={**params, **{f"flow.{d}": s["flow"] for d, s in per_dir.items()}},
            tags={"lego.compare_row": row},
        )
    return ids

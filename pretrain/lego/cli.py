"""The ``lego-mt`` command group (also ``lego``) and ``pretrain translate``, registered into
``pretrain``'s parser by :func:`add_lego_commands`::

    pretrain lego-mt data OUT_DIR [--langs en de fr] [--vocab-size N] [--max-pairs N]
    pretrain lego-mt train CONFIG --run-dir DIR [--set KEY=VALUE ...] [--nproc-per-node N]
    pretrain lego-mt baseline CONFIG --run-dir DIR [--set KEY=VALUE ...]
    pretrain lego-mt detach RUN_DIR --encoder main|GROUP --decoder m2m|GROUP --out DIR
    pretrain lego-mt translate FLOW_DIR --src-lang en --tgt-lang de [--input FILE] [--beam N]
    pretrain lego-mt eval FLOW_DIR --heldout FILE [--beam N] [--limit N] [--tracking-uri URI]
    pretrain lego-mt compare RUN_DIR --baseline DIR [--heldout FILE] [--limit N] [--json FILE]
    pretrain translate FLOW_DIR --src-lang en --tgt-lang de [--input FILE] [--beam N]

``python -m pretrain.lego.cli lego-mt ...`` runs the same commands without the entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pretrain.config import add_overrides_argument
from pretrain.lego.eval_tracking import EVAL_EXPERIMENT

SET_HELP = "override a config key, e.g. --set train.lr=3e-4 --set parallel.engine=deepspeed (repeatable)"


def add_lego_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``lego`` and its subcommands; dispatch is ``args.handler`` (= :func:`cmd_lego`)."""
    lego = subparsers.add_parser(
        "lego-mt",
        aliases=["lego"],
        help="Lego-MT: bitext, localized training, baseline, detachable flows, translation, scores",
        description="Multi-way translation with per-language-group branches (Lego-MT).",
    )
    lego.set_defaults(handler=cmd_lego)
    sub = lego.add_subparsers(dest="lego_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser(
        "data", help="bitext (gettext catalogs or TSV/JSONL) -> groups, tokenizer, tokenized pairs"
    )
    p.add_argument("out_dir", type=Path)
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="[SRC-TGT:]PATH",
        help="pair file, repeatable: *.tsv (src<TAB>tgt; languages from SRC-TGT or an 'en<TAB>de' "
        "header) or *.jsonl ({src_lang,tgt_lang,src,tgt} or {translation:{en,de}}), .gz/.zst ok",
    )
    p.add_argument("--gettext", action="store_true", help="also read the gettext catalogs with --input")
    p.add_argument(
        "--langs", nargs="+", default=None, help="default: en de fr es it pt, or the languages of --input"
    )
    p.add_argument("--locale-root", default="/usr/share/locale")
    p.add_argument("--no-lang-check", action="store_true", help="keep pairs whatever language ID says")
    p.add_argument(
        "--lang-check-threshold", type=float, default=None, help="drop at this confidence (default 0.9)"
    )
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--max-pairs", type=int, default=None, help="cap on training pairs per direction")
    p.add_argument("--heldout-fraction", type=float, default=0.02)

    p = sub.add_parser("train", help="localized training (re-running the command resumes)")
    p.add_argument("config", type=Path, help="e.g. configs/lego-mt-tiny.yaml")
    p.add_argument("--run-dir", type=Path, required=True)
    add_overrides_argument(p, help=SET_HELP)
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="start N local ranks (parallel.engine=deepspeed, or megatron with parallel.tp); "
        "under torchrun or srun leave it at 1",
    )

    p = sub.add_parser(
        "baseline",
        help="one flow trained on every group's pairs, at the Lego-MT run's step count (resumes)",
        description="Train the single multilingual model of one flow's shape that a Lego-MT run "
        "of the same CONFIG and --set is compared against: same steps in total, batch size, LR "
        "schedule shape, seed and initial weights. Writes RUN_DIR/flow.",
    )
    p.add_argument("config", type=Path, help="the Lego-MT run's config, e.g. configs/lego-mt-tiny.yaml")
    p.add_argument("--run-dir", type=Path, required=True)
    add_overrides_argument(p, help=SET_HELP)

    p = sub.add_parser("detach", help="save one encoder -> decoder flow as a standalone model")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--encoder", required=True, help="main or a group name")
    p.add_argument("--decoder", required=True, help="m2m or a group name")
    p.add_argument("--out", type=Path, required=True)

    add_translate_arguments(sub.add_parser("translate", help="translate lines from --input or stdin"))

    p = sub.add_parser("eval", help="BLEU/chrF per direction on held-out pairs, logged to MLflow")
    p.add_argument("flow", type=Path, help="directory written by `lego-mt detach` (or a baseline run)")
    _add_eval_arguments(p, max_len=128)

    p = sub.add_parser(
        "compare",
        help="every flow of a run and the baseline: one BLEU/chrF table per direction",
        description="Score Enc-Flow, Dec-Flow, Mix-Flow and enc[X] -> dec[Y] of RUN_DIR per direction "
        "X -> Y, and the baseline; print a Markdown table, write JSON, log one MLflow run per row.",
    )
    p.add_argument("run_dir", type=Path, help="a finished `lego-mt train` run directory")
    p.add_argument("--baseline", type=Path, default=None, help="a `lego-mt baseline` run directory")
    p.add_argument("--json", type=Path, default=None, help="default RUN_DIR/compare.json")
    _add_eval_arguments(p, max_len=64, heldout_help="default: heldout.jsonl beside the run's data_dir")

    p = subparsers.add_parser(
        "translate",
        help="translate with a detached Lego-MT flow (greedy or beam search)",
        description="Translate lines from --input or stdin with a flow written by `pretrain lego-mt "
        "detach` (or a `lego-mt baseline` run directory).",
    )
    add_translate_arguments(p)
    p.set_defaults(handler=cmd_translate)
    return lego


def add_translate_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments ``pretrain translate`` and ``pretrain lego-mt translate`` share."""
    p.add_argument("flow", type=Path, help="directory written by `lego-mt detach` (or a baseline run)")
    p.add_argument(
        "--src-lang",
        required=True,
        metavar="LANG",
        help="language of the input; must be one the flow knows (e.g. en)",
    )
    p.add_argument("--tgt-lang", required=True, metavar="LANG", help="language to translate into (e.g. de)")
    p.add_argument(
        "--input",
        type=Path,
        default=None,
        metavar="FILE",
        help="text file, one sentence a line (default stdin)",
    )
    p.add_argument("--beam", type=int, default=1, help="beam size; 1 = greedy")
    p.add_argument("--max-len", type=int, default=128, help="longest output, in tokens")


def _add_eval_arguments(p: argparse.ArgumentParser, *, max_len: int, heldout_help: str | None = None) -> None:
    if heldout_help is None:
        p.add_argument("--heldout", type=Path, required=True, help="heldout.jsonl from `lego-mt data`")
    else:
        p.add_argument("--heldout", type=Path, default=None, help=heldout_help)
    p.add_argument("--limit", type=int, default=None, help="pairs per direction")
    p.add_argument("--directions", nargs="*", default=None, help="e.g. en-de de-en")
    p.add_argument("--beam", type=int, default=1, help="1 = greedy")
    p.add_argument("--max-len", type=int, default=max_len)
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store; default $MLFLOW_TRACKING_URI, else sqlite in the flow's source run directory",
    )
    p.add_argument(
        "--experiment", default=EVAL_EXPERIMENT, help=f"MLflow experiment (default {EVAL_EXPERIMENT})"
    )
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def cmd_lego(args: argparse.Namespace) -> int:
    cmd = args.lego_command
    if cmd == "data":
        from data_pipeline.bitext import BitextConfig, parse_input_spec, prepare
        from data_pipeline.bitext.pipeline import input_langs

        inputs = [parse_input_spec(spec) for spec in args.inputs]
        langs = args.langs or (input_langs(inputs) if inputs else BitextConfig().langs)
        check: dict[str, Any] = {"enabled": not args.no_lang_check}
        if args.lang_check_threshold is not None:
            check["threshold"] = args.lang_check_threshold
        cfg = BitextConfig(
            langs=langs,
            inputs=inputs,
            gettext=True if args.gettext else None,
            locale_root=args.locale_root,
            language_check=check,
            vocab_size=args.vocab_size,
            max_pairs_per_direction=args.max_pairs,
            heldout_fraction=args.heldout_fraction,
        )
        stats = prepare(cfg, args.out_dir)
        print(json.dumps({k: v for k, v in stats.items() if k != "steps"}, indent=1))
        print(f"per-step counts: {args.out_dir / 'stats.json'}; bad lines: {args.out_dir / 'quarantine'}")
        print(
            f"training data: {args.out_dir / 'tok'} (train.data_dir); held out: {args.out_dir / 'heldout.jsonl'}"
        )
        return 0
    handler = {
        "train": _train,
        "baseline": _baseline,
        "detach": _detach,
        "translate": _translate,
        "eval": _eval,
        "compare": _compare,
    }[cmd]
    return _guarded(handler, args)


def cmd_translate(args: argparse.Namespace) -> int:
    """``pretrain translate``: the same code path as ``pretrain lego-mt translate``."""
    return _guarded(_translate, args)


def _guarded(handler: Any, args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except ValueError as exc:  # unknown language, group or direction: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from pretrain.lego.train import LegoRunConfig, train

    cfg = LegoRunConfig.from_yaml(args.config, args.overrides)  # fail on typos before launching
    if args.nproc_per_node > 1 and "RANK" not in os.environ:
        from cluster.env import relaunch_local

        cmd = ["pretrain.cli", "lego-mt", "train", str(args.config), "--run-dir", str(args.run_dir)]
        return relaunch_local(args.nproc_per_node, cmd + [x for s in args.overrides for x in ("--set", s)])
    res = train(cfg, args.run_dir)
    if int(os.environ.get("RANK", "0")):
        return 0
    losses = res["losses"]
    last = losses[max(losses)] if losses else float("nan")
    print(f"done: {res['global_step']} steps, last loss {last:.4f}; partitions in {args.run_dir / 'parts'}")
    if res.get("mlflow_tracking_uri"):
        print(f"mlflow: {res['mlflow_tracking_uri']} run {res['mlflow_run_id']}")
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from pretrain.lego.baseline import train_baseline
    from pretrain.lego.train import LegoRunConfig

    res = train_baseline(LegoRunConfig.from_yaml(args.config, args.overrides), args.run_dir)
    print(
        f"baseline: {res['global_step']} steps x {res['batch_size']} pairs over {res['pairs']} pairs "
        f"({len(res['directions'])} directions); flow in {res['flow']}"
    )
    if res.get("mlflow_tracking_uri"):
        print(f"mlflow: {res['mlflow_tracking_uri']} run {res['mlflow_run_id']}")
    return 0


def _detach(args: argparse.Namespace) -> int:
    from pretrain.lego.compare import run_meta
    from pretrain.lego.detach import detach_from_run, save_flow

    meta = run_meta(args.run_dir)
    flow = detach_from_run(args.run_dir, encoder=args.encoder, decoder=args.decoder)
    tok = meta.get("tokenizer")
    path = save_flow(flow, args.out, meta=meta, tokenizer=Path(tok) if tok else None, source=args.run_dir)
    n = sum(p.numel() for p in flow.parameters())
    print(f"{args.encoder} -> {args.decoder}: {n / 1e6:.2f}M params, read {flow.loaded}; saved {path}")
    return 0


def _load(flow_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    from data_pipeline.tokenizer import SentencePieceTokenizer
    from pretrain.lego.detach import load_flow

    flow, meta = load_flow(flow_dir)
    if "tokenizer" not in meta:
        raise FileNotFoundError(f"{flow_dir}: the flow has no spm.model")
    return flow, SentencePieceTokenizer(meta["tokenizer"]), meta


def _translate(args: argparse.Namespace) -> int:
    from pretrain.lego.translate import check_languages, translate_texts

    if args.input is not None and not args.input.is_file():
        raise FileNotFoundError(f"{args.input}: no such input file")
    flow, tok, meta = _load(args.flow)
    check_languages(meta, src_lang=args.src_lang, tgt_lang=args.tgt_lang)  # before waiting on stdin
    stream = args.input.open() if args.input else sys.stdin
    texts = [line.rstrip("\n") for line in stream]
    outs = translate_texts(
        flow,
        tok,
        texts,
        src_lang=args.src_lang,
        tgt_lang=args.tgt_lang,
        meta=meta,
        beam=args.beam,
        max_len=args.max_len,
    )
    for line in outs:
        print(line)
    return 0


def _tracking_uri(args: argparse.Namespace, store_dir: Path) -> str | None:
    from pretrain.lego.eval_tracking import resolve_eval_uri

    return None if args.no_tracking else resolve_eval_uri(args.tracking_uri, store_dir)


def _eval(args: argparse.Namespace) -> int:
    from pretrain.lego.eval_tracking import averages, default_store_dir, log_scores
    from pretrain.lego.translate import evaluate

    flow, tok, meta = _load(args.flow)
    scores = evaluate(
        flow,
        tok,
        args.heldout,
        meta=meta,
        beam=args.beam,
        limit=args.limit,
        directions=args.directions,
        max_len=args.max_len,
    )
    for d, s in scores.items():
        print(f"{d}\tBLEU {s['bleu']:.2f}\tchrF {s['chrf']:.2f}\tn={s['n']}")
    avg = averages(scores)
    print(f"avg\tBLEU {avg['bleu']:.2f}\tchrF {avg['chrf']:.2f}")
    uri = _tracking_uri(args, default_store_dir(meta, args.flow))
    if uri is not None:
        run_id = log_scores(
            scores,
            tracking_uri=uri,
            experiment=args.experiment,
            run_name=f"eval {meta['encoder']} -> {meta['decoder']}",
            params={
                "flow": meta["path"],
                "encoder": meta["encoder"],
                "decoder": meta["decoder"],
                "heldout": args.heldout,
                "beam": args.beam,
                "limit": args.limit,
                "max_len": args.max_len,
            },
        )
        print(f"mlflow: {uri} run {run_id}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pretrain.lego.compare import compare, format_table, log_rows

    heldout = args.heldout
    if heldout is None:  # `lego-mt data OUT` writes OUT/tok (the run's data_dir) and OUT/heldout.jsonl
        heldout = Path(json.loads((args.run_dir / "config.json").read_text())["train"]["data_dir"]).parent
        heldout = heldout / "heldout.jsonl"
    result = compare(
        args.run_dir,
        heldout,
        baseline=args.baseline,
        limit=args.limit,
        beam=args.beam,
        max_len=args.max_len,
        directions=args.directions,
    )
    print(format_table(result))
    if result["skipped"]:
        print(f"skipped (branches never trained): {result['skipped']}")
    out = args.json or args.run_dir / "compare.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"json: {out}")
    uri = _tracking_uri(args, args.run_dir)
    if uri is not None:
        result["mlflow_runs"] = log_rows(result, tracking_uri=uri, experiment=args.experiment)
        out.write_text(json.dumps({**result, "mlflow_tracking_uri": uri}, indent=1))
        print(f"mlflow: {uri} experiment {args.experiment}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lego")
    add_lego_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

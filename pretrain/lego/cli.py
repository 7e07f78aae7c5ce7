"""The ``lego`` command group, registered into ``pretrain``'s parser by :func:`add_lego_commands`::

    pretrain lego data OUT_DIR [--langs en de fr] [--vocab-size N] [--max-pairs N]
    pretrain lego train CONFIG --run-dir DIR [--set KEY=VALUE ...]
    pretrain lego detach RUN_DIR --encoder main|GROUP --decoder m2m|GROUP --out DIR
    pretrain lego translate FLOW_DIR --tgt-lang de [--input FILE] [--beam N]
    pretrain lego eval FLOW_DIR --heldout FILE [--beam N] [--limit N]

``python -m pretrain.lego.cli lego ...`` runs the same commands without the entry point.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_lego_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``lego`` and its subcommands; dispatch is ``args.handler`` (= :func:`cmd_lego`)."""
    lego = subparsers.add_parser(
        "lego",
        help="Lego-MT: bitext, localized training, detachable flows, translation",
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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("detach", help="save one encoder -> decoder flow as a standalone model")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--encoder", required=True, help="main or a group name")
    p.add_argument("--decoder", required=True, help="m2m or a group name")
    p.add_argument("--out", type=Path, required=True)

    for name, text in (
        ("translate", "translate lines from --input or stdin"),
        ("eval", "BLEU/chrF per direction"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("flow", type=Path, help="directory written by `lego detach`")
        p.add_argument("--beam", type=int, default=1, help="1 = greedy")
        p.add_argument("--max-len", type=int, default=128)
        if name == "translate":
            p.add_argument("--tgt-lang", required=True)
            p.add_argument(
                "--input", type=Path, default=None, help="text file, one sentence a line (default stdin)"
            )
        else:
            p.add_argument("--heldout", type=Path, required=True, help="heldout.jsonl from `lego data`")
            p.add_argument("--limit", type=int, default=None, help="pairs per direction")
            p.add_argument("--directions", nargs="*", default=None, help="e.g. en-de de-en")
    return lego


def _meta_for(run_dir: Path) -> dict[str, Any]:
    from pretrain.lego.data import read_meta

    cfg = json.loads((run_dir / "config.json").read_text())
    return read_meta(Path(cfg["train"]["data_dir"]))


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
    if cmd == "train":
        from pretrain.lego.train import LegoRunConfig, train

        cfg = LegoRunConfig.from_yaml(args.config, args.overrides)
        res = train(cfg, args.run_dir)
        losses = res["losses"]
        last = losses[max(losses)] if losses else float("nan")
        print(
            f"done: {res['global_step']} steps, last loss {last:.4f}; partitions in {args.run_dir / 'parts'}"
        )
        if res.get("mlflow_tracking_uri"):
            print(f"mlflow: {res['mlflow_tracking_uri']} run {res['mlflow_run_id']}")
        return 0
    if cmd == "detach":
        from pretrain.lego.detach import detach_from_run, save_flow

        meta = _meta_for(args.run_dir)
        flow = detach_from_run(args.run_dir, encoder=args.encoder, decoder=args.decoder)
        tok = meta.get("tokenizer")
        path = save_flow(flow, args.out, meta=meta, tokenizer=Path(tok) if tok else None)
        n = sum(p.numel() for p in flow.parameters())
        print(f"{args.encoder} -> {args.decoder}: {n / 1e6:.2f}M params, read {flow.loaded}; saved {path}")
        return 0
    from data_pipeline.tokenizer import SentencePieceTokenizer
    from pretrain.lego.detach import load_flow
    from pretrain.lego.translate import evaluate, translate_texts

    flow, meta = load_flow(args.flow)
    if "tokenizer" not in meta:
        raise FileNotFoundError(f"{args.flow}: the flow has no spm.model")
    tok = SentencePieceTokenizer(meta["tokenizer"])
    if cmd == "translate":
        stream = args.input.open() if args.input else sys.stdin
        texts = [line.rstrip("\n") for line in stream]
        for line in translate_texts(
            flow, tok, texts, tgt_lang=args.tgt_lang, meta=meta, beam=args.beam, max_len=args.max_len
        ):
            print(line)
        return 0
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
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lego")
    add_lego_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

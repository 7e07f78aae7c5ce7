import argparse
import json

import pytest
from mlflow.tracking import MlflowClient

from pretrain.cli import main as pretrain_main
from pretrain.lego.cli import add_lego_commands, main

DIRECTIONS = {"en-de", "en-fr", "de-en", "de-fr", "fr-en", "fr-de"}
TINY = [
    "model.vocab_size=400",
    "model.d_model=32",
    "model.ffn_dim=64",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
    "train.stage1_steps=2",
    "train.stage2_steps=1",
    "train.batch_size=4",
    "tracking.enabled=false",
]


def test_registers_into_a_parent_parser():
    parser = argparse.ArgumentParser()
    add_lego_commands(parser.add_subparsers(dest="command"))
    for name in ("lego", "lego-mt"):
        args = parser.parse_args([name, "detach", "run", "--encoder", "de", "--decoder", "m2m", "--out", "x"])
        assert args.handler.__name__ == "cmd_lego" and args.lego_command == "detach"
        assert (args.run_dir.name, args.encoder, args.decoder, args.out.name) == ("run", "de", "m2m", "x")
    args = parser.parse_args(["translate", "flow", "--src-lang", "en", "--tgt-lang", "de", "--beam", "3"])
    assert args.handler.__name__ == "cmd_translate" and (args.src_lang, args.tgt_lang, args.beam) == (
        "en",
        "de",
        3,
    )
    with pytest.raises(SystemExit):  # the source language is part of the command
        parser.parse_args(["translate", "flow", "--tgt-lang", "de"])


@pytest.fixture(scope="module")
def pipeline(locale_root, tmp_path_factory):
    """`lego data` on the fixture catalogs, then a tiny `lego train` and its matched baseline."""
    root = tmp_path_factory.mktemp("lego_cli")
    data, run, base = root / "data", root / "run", root / "baseline"
    argv = ["lego-mt", "data", str(data), "--langs", "en", "de", "fr", "--locale-root", str(locale_root)]
    assert main([*argv, "--vocab-size", "400", "--heldout-fraction", "0.2"]) == 0
    sets = [x for s in [f"train.data_dir={data / 'tok'}", *TINY] for x in ("--set", s)]
    assert main(["lego", "train", "configs/lego-mt-tiny.yaml", "--run-dir", str(run), *sets]) == 0
    assert main(["lego-mt", "baseline", "configs/lego-mt-tiny.yaml", "--run-dir", str(base), *sets]) == 0
    return {"data": data, "run": run, "baseline": base, "root": root}


@pytest.fixture(scope="module")
def flow(pipeline):
    out = pipeline["root"] / "de-fr"
    assert (
        main(
            [
                "lego-mt",
                "detach",
                str(pipeline["run"]),
                "--encoder",
                "de",
                "--decoder",
                "fr",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_lego_mt_detach_writes_a_standalone_flow(flow, pipeline):
    from pretrain.lego.detach import load_flow

    loaded, meta = load_flow(flow)
    assert (loaded.encoder_name, loaded.decoder_name) == (meta["encoder"], meta["decoder"]) == ("de", "fr")
    assert meta["groups"] == {"en": ["en"], "de": ["de"], "fr": ["fr"]}
    assert meta["run_dir"] == str(pipeline["run"].resolve())
    assert (flow / "step_00000000" / "spm.model").is_file()


@pytest.mark.parametrize("flow_dir", ["flow", "baseline"])
def test_pretrain_translate_from_file(flow_dir, flow, pipeline, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("Datei offen jetzt-de\nfenster neu jetzt-de\n")
    path = flow if flow_dir == "flow" else pipeline["baseline"]
    argv = ["translate", str(path), "--src-lang", "de", "--tgt-lang", "fr", "--input", str(src)]
    capsys.readouterr()
    assert pretrain_main([*argv, "--beam", "2", "--max-len", "8"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_translate_errors_are_messages(flow, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("x\n")
    assert (
        pretrain_main(["translate", str(flow), "--src-lang", "xx", "--tgt-lang", "fr", "--input", str(src)])
        == 2
    )
    assert "unknown source language 'xx'" in capsys.readouterr().err
    assert (
        main(["lego", "translate", str(flow), "--src-lang", "de", "--tgt-lang", "es", "--input", str(src)])
        == 2
    )
    assert "unknown target language 'es'" in capsys.readouterr().err
    missing = tmp_path / "nope"
    assert pretrain_main(["translate", str(missing), "--src-lang", "de", "--tgt-lang", "fr"]) == 2
    assert f"{missing}: no such flow directory" in capsys.readouterr().err


def test_eval_logs_per_direction_metrics_to_mlflow(flow, pipeline, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    heldout = pipeline["data"] / "heldout.jsonl"
    argv = ["lego-mt", "eval", str(flow), "--heldout", str(heldout), "--limit", "2", "--max-len", "6"]
    capsys.readouterr()
    assert main([*argv, "--directions", "de-fr", "de-en"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("de-en\tBLEU") and "\nde-fr\tBLEU" in out and "\navg\tBLEU" in out
    # default store: the sqlite database of the run the flow was detached from
    uri = f"sqlite:///{(pipeline['run'] / 'mlflow.db').resolve()}"
    assert f"mlflow: {uri} run " in out
    client = MlflowClient(uri)
    run = client.get_run(out.split(" run ")[-1].strip())
    assert client.get_experiment(run.info.experiment_id).name == "lego-mt-eval"
    metrics = run.data.metrics
    assert {"bleu_de-en", "chrf_de-en", "bleu_de-fr", "chrf_de-fr", "bleu_avg", "chrf_avg"} <= set(metrics)
    printed = {line.split("\t")[0]: line.split("\t")[1] for line in out.splitlines() if "\tBLEU" in line}
    assert printed["de-fr"] == f"BLEU {metrics['bleu_de-fr']:.2f}"
    assert metrics["bleu_avg"] == pytest.approx((metrics["bleu_de-en"] + metrics["bleu_de-fr"]) / 2)
    assert metrics["n_de-en"] == 2 and run.data.params["encoder"] == "de"


def test_baseline_matches_the_lego_step_count(pipeline):
    res = json.loads((pipeline["baseline"] / "results.json").read_text())
    assert res["global_step"] == 3 * (2 + 1) and res["batch_size"] == 4  # 3 groups x (stage 1 + stage 2)
    assert set(res["directions"]) == DIRECTIONS


def test_compare_has_every_flow_and_the_baseline(pipeline, tmp_path, capsys):
    out = tmp_path / "compare.json"
    argv = ["lego-mt", "compare", str(pipeline["run"]), "--baseline", str(pipeline["baseline"])]
    tracking = ["--tracking-uri", f"sqlite:///{tmp_path / 'cmp.db'}", "--experiment", "cmp"]
    capsys.readouterr()
    assert main([*argv, "--limit", "2", "--max-len", "6", "--json", str(out), *tracking]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    labels = ["Enc-Flow", "Dec-Flow", "Mix-Flow", "enc[X] -> dec[Y]", "baseline"]
    assert len(table) == 1 + len(labels) and all(
        table[i + 1].startswith(f"| {x}") for i, x in enumerate(labels)
    )
    assert table[0].count("|") == 2 + len(DIRECTIONS) + 1  # flow, 6 directions, avg
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"enc", "dec", "mix", "enc-dec", "baseline"}
    assert set(result["directions"]) == DIRECTIONS
    rows = result["rows"]
    for scores in rows.values():
        assert set(scores) == DIRECTIONS | {"avg"}
        assert all(0 <= scores[d][k] <= 100 for d in DIRECTIONS for k in ("bleu", "chrf"))
    assert rows["enc"]["de-fr"]["flow"] == "de -> m2m" and rows["dec"]["de-fr"]["flow"] == "main -> fr"
    assert rows["mix"]["de-fr"]["flow"] == "main -> m2m" and rows["enc-dec"]["de-fr"]["flow"] == "de -> fr"
    client = MlflowClient(result["mlflow_tracking_uri"])
    for row, run_id in result["mlflow_runs"].items():
        assert client.get_run(run_id).data.metrics["bleu_avg"] == pytest.approx(rows[row]["avg"]["bleu"])

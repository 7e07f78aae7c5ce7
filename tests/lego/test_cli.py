import argparse

from pretrain.lego.cli import add_lego_commands, main


def test_registers_into_a_parent_parser():
    parser = argparse.ArgumentParser()
    add_lego_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lego", "detach", "run", "--encoder", "de", "--decoder", "m2m", "--out", "x"])
    assert args.handler.__name__ == "cmd_lego" and args.lego_command == "detach"


def test_data_train_detach_translate_eval(locale_root, tmp_path, capsys):
    data, run, flow = tmp_path / "data", tmp_path / "run", tmp_path / "flow"
    assert (
        main(
            [
                "lego",
                "data",
                str(data),
                "--langs",
                "en",
                "de",
                "fr",
                "--locale-root",
                str(locale_root),
                "--vocab-size",
                "400",
                "--heldout-fraction",
                "0.2",
            ]
        )
        == 0
    )
    sets = [
        f"train.data_dir={data / 'tok'}",
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
    argv = ["lego", "train", "configs/lego-mt-tiny.yaml", "--run-dir", str(run)]
    assert main([*argv, *[x for s in sets for x in ("--set", s)]]) == 0
    assert main(["lego", "detach", str(run), "--encoder", "de", "--decoder", "fr", "--out", str(flow)]) == 0
    src = tmp_path / "in.txt"
    src.write_text("open the file now\nsave the window now\n")
    capsys.readouterr()
    assert (
        main(
            [
                "lego",
                "translate",
                str(flow),
                "--tgt-lang",
                "fr",
                "--input",
                str(src),
                "--beam",
                "2",
                "--max-len",
                "8",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert (
        main(
            [
                "lego",
                "eval",
                str(flow),
                "--heldout",
                str(data / "heldout.jsonl"),
                "--limit",
                "2",
                "--max-len",
                "6",
                "--directions",
                "en-fr",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("en-fr\tBLEU") and "chrF" in out

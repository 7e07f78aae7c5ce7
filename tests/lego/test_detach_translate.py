import json

import pytest
import torch

from data_pipeline.bitext import BitextConfig, prepare
from data_pipeline.tokenizer import SentencePieceTokenizer
from pretrain.lego.detach import detach_from_run, load_flow, save_flow
from pretrain.lego.store import SHARED_PARTS, PartitionStore
from pretrain.lego.translate import (
    _src_tensor,
    beam_search,
    check_languages,
    evaluate,
    greedy,
    read_heldout,
    translate_ids,
    translate_texts,
)
from pretrain.models.lego_mt import LegoMTConfig, detach
from pretrain.models.lego_mt.config import tiny


def _full_model(run_dir):
    store = PartitionStore(run_dir / "parts")
    index = store.read_index()
    model = LegoMTConfig.from_dict(index["model"]).build().eval()
    steps = index["partitions"]
    shared = store.load("shared", steps["shared"])
    for p in SHARED_PARTS:
        getattr(model, p).load_state_dict(shared[p])
    for g in model.resident:
        model.enc_branches[g].load_state_dict(store.load(f"enc_{g}", steps[f"enc_{g}"])["encoder"])
        model.dec_branches[g].load_state_dict(store.load(f"dec_{g}", steps[f"dec_{g}"])["decoder"])
    return model


@pytest.mark.parametrize(
    ("encoder", "decoder"), [("de", "fr"), ("main", "m2m"), ("en", "m2m"), ("main", "de")]
)
def test_detach_from_run_reads_only_its_partitions(full_run, encoder, decoder, tmp_path):
    run_dir, _ = full_run
    flow = detach_from_run(run_dir, encoder=encoder, decoder=decoder)
    names = {name for name, _ in flow.loaded}
    assert len(names) <= 3 and ("shared", "embed") in flow.loaded
    assert not any(encoder != g and f"enc_{g}" in names for g in ("en", "de", "fr"))
    ref = detach(_full_model(run_dir), encoder=encoder, decoder=decoder).eval()
    src = torch.tensor([[12, 13, 14, 3], [20, 21, 3, 0]])
    tgt_in = torch.tensor([[5, 21, 22], [6, 29, 30]])
    assert torch.equal(flow(src, tgt_in), ref(src, tgt_in))
    meta = {"lang_tags": {"en": 4, "de": 5, "fr": 6}, "eos_id": 3}
    saved = save_flow(flow, tmp_path / "flow", meta=meta)
    again, md = load_flow(tmp_path / "flow")
    assert md["encoder"] == encoder and md["path"] == str(saved)
    assert torch.equal(again(src, tgt_in), flow(src, tgt_in))


def test_detach_rejects_unknown_parts(full_run):
    with pytest.raises(ValueError, match="groups"):
        detach_from_run(full_run[0], encoder="xx", decoder="m2m")


def test_greedy_equals_beam_of_one_and_beam_is_no_worse():
    torch.manual_seed(0)
    flow = detach(tiny(["en"], vocab_size=48).build(), encoder="main", decoder="m2m").eval()
    src = _src_tensor([[10, 11, 12, 13], [20, 21]], eos=3, pad=0, max_len=16)
    out = greedy(flow, src, bos=5, eos=3, max_new=8)
    for i in range(2):
        one, _ = beam_search(flow, src[i : i + 1], bos=5, eos=3, max_new=8, beam=1)
        assert one == out[i]

    def logprob(seq, s):
        ys = torch.tensor([[5, *seq]])
        lp = flow(s, ys).log_softmax(-1)[0]
        target = [*seq, 3] if len(seq) < 8 else seq
        return sum(lp[j, t].item() for j, t in enumerate(target))

    for i in range(2):
        s = src[i : i + 1, : (src[i] != 0).sum()]
        g = greedy(flow, s, bos=5, eos=3, max_new=8)[0]
        b, score = beam_search(flow, s, bos=5, eos=3, max_new=8, beam=4, length_penalty=0.0)
        if len(b) < 8 and len(g) < 8:
            assert score >= logprob(g, s) - 1e-4


@pytest.fixture(scope="module")
def bitext(locale_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bitext")
    prepare(
        BitextConfig(
            langs=["en", "de", "fr"], locale_root=str(locale_root), heldout_fraction=0.2, vocab_size=400
        ),
        out,
    )
    return out


def test_translate_and_evaluate_per_direction(bitext):
    meta = json.loads((bitext / "tok" / "meta.json").read_text())
    tok = SentencePieceTokenizer(meta["tokenizer"])
    torch.manual_seed(0)
    flow = detach(tiny(["en"], vocab_size=tok.vocab_size).build(), encoder="main", decoder="m2m").eval()
    out = translate_texts(flow, tok, ["open the file now"], tgt_lang="de", meta=meta, max_len=6)
    assert len(out) == 1 and isinstance(out[0], str)
    with pytest.raises(ValueError, match="unknown target"):
        translate_texts(flow, tok, ["x"], tgt_lang="xx", meta=meta)
    scores = evaluate(flow, tok, bitext / "heldout.jsonl", meta=meta, limit=3, max_len=6, beam=2)
    assert set(scores) == {"en-de", "en-fr", "de-en", "de-fr", "fr-en", "fr-de"}
    for s in scores.values():
        assert 0 <= s["bleu"] <= 100 and 0 <= s["chrf"] <= 100 and 1 <= s["n"] <= 3


def test_read_heldout_spreads_the_limit_and_refuses_missing_directions(tmp_path):
    path = tmp_path / "heldout.jsonl"
    rows = [("en", "de", i) for i in range(10)] + [("de", "en", i) for i in range(3)]
    path.write_text(
        "".join(
            json.dumps({"src_lang": a, "tgt_lang": b, "src": f"s{i}", "tgt": f"t{i}"}) + "\n"
            for a, b, i in rows
        )
    )
    got = read_heldout(path, limit=4)
    assert list(got) == ["de-en", "en-de"]
    assert [r["src"] for r in got["en-de"]] == ["s0", "s2", "s5", "s7"]  # evenly spaced, not the first 4
    assert len(got["de-en"]) == 3
    with pytest.raises(ValueError, match="no pairs for \\['en-fr'\\]"):
        read_heldout(path, directions=["en-de", "en-fr"])
    with pytest.raises(FileNotFoundError, match="no held-out pairs"):
        read_heldout(tmp_path / "missing.jsonl")


def test_check_languages_refuses_unknown_and_notes_branches_outside_their_group():
    meta = {
        "lang_tags": {"en": 4, "de": 5},
        "groups": {"en": ["en"], "de": ["de"]},
        "encoder": "de",
        "decoder": "m2m",
    }
    assert check_languages(meta, src_lang="de", tgt_lang="en") == []
    assert check_languages(meta, src_lang="en", tgt_lang="de") == [
        "the encoder branch 'de' was trained on ['de'], not on 'en'"
    ]
    with pytest.raises(ValueError, match="unknown source language 'xx'; this flow knows \\['de', 'en'\\]"):
        check_languages(meta, src_lang="xx", tgt_lang="en")
    with pytest.raises(ValueError, match="unknown target language 'fr'"):
        check_languages(meta, src_lang=None, tgt_lang="fr")


class _NoEos(torch.nn.Module):
    """A flow that always predicts token 7: decoding ends only at the length budget."""

    def __init__(self):
        super().__init__()
        self.cfg = tiny(["en"])

    def encode(self, src):
        return torch.zeros(src.shape[0], src.shape[1], 4)

    def decode(self, memory, src, ys):
        return torch.nn.functional.one_hot(torch.full_like(ys, 7), 16).float()


@pytest.mark.parametrize("beam", [1, 2])
def test_outputs_stop_at_the_source_length_budget_in_input_order(beam):
    rows = [[10] * 5, [11], [12] * 40]
    out = translate_ids(_NoEos(), rows, tgt_tag=5, eos=3, beam=beam, max_len=64)
    assert [len(r) for r in out] == [2 * 6 + 10, 2 * 2 + 10, 64]  # len_a * (tokens + eos) + len_b, capped


def test_load_flow_names_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such flow directory"):
        load_flow(tmp_path / "nope")

import json

import pytest
import torch

from data_pipeline.bitext import BitextConfig, prepare
from data_pipeline.tokenizer import SentencePieceTokenizer
from pretrain.lego.detach import detach_from_run, load_flow, save_flow
from pretrain.lego.store import SHARED_PARTS, PartitionStore
from pretrain.lego.translate import _src_tensor, beam_search, evaluate, greedy, translate_texts
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

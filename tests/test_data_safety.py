"""No run loses or leaks data: outputs never land on inputs, overlapping runs never corrupt a
committed variant, links never carry outside files into a variant, and an edited input is a new
identity."""
import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import upload_folder

from expo_ray.api import extrapolate, make_plan
from expo_ray.cli import main
from expo_ray.errors import StorageError
from expo_ray.publish.manifest import verify_variant
from expo_ray.storage import LocalStorage

ALPHA = "0.5"


def run_cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def digest_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(result, *needles):
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    return errors[0]


@pytest.fixture
def copies(bf16_pair, tmp_path):
    sft, aligned = tmp_path / "sft", tmp_path / "aligned"
    shutil.copytree(bf16_pair[0], sft)
    shutil.copytree(bf16_pair[1], aligned)
    return sft, aligned


@pytest.mark.parametrize("where", ["contains", "is", "inside", "link"])
def test_destination_overlapping_an_input_is_refused(copies, tmp_path, where):
    sft, aligned = copies
    if where == "contains":  # the input sits where a variant would be written
        outer = tmp_path / "ov"
        outer.mkdir()
        aligned = Path(shutil.move(str(aligned), outer / f"alpha_{ALPHA}"))
        out, role = outer, "aligned"
    elif where == "is":
        out, role = sft, "sft"
    elif where == "inside":
        out, role = aligned / "variants", "aligned"
    else:  # another spelling of the SFT folder: a link to it
        out, role = tmp_path / "alias", "sft"
        out.symlink_to(sft)
    before = digest_tree(sft) | {f"a/{k}": v for k, v in digest_tree(aligned).items()}
    result = run_cli("extrapolate", "--sft", str(sft), "--aligned", str(aligned), "--alpha", ALPHA,
                     "--out", str(out), "--no-progress")
    one_error(result, f"the {role} model folder", "choose another destination")
    assert digest_tree(sft) | {f"a/{k}": v for k, v in digest_tree(aligned).items()} == before
    assert not list(Path(out).rglob("expo-ray-index.json")) and not list(Path(out).rglob(".expo-ray"))


def test_s3_destination_overlapping_an_input_is_refused(s3_client, bf16_pair):
    sft = upload_folder(s3_client, bf16_pair[0], "overlap", "m/sft")
    aligned = upload_folder(s3_client, bf16_pair[1], "overlap", "m/aligned")
    before = {o["Key"]: o["ETag"] for o in s3_client.list_objects_v2(Bucket="overlap")["Contents"]}
    result = run_cli("extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", ALPHA, "--out", "s3://overlap//m/",
                     "--no-progress")
    one_error(result, "contains the sft model folder")
    assert {o["Key"]: o["ETag"] for o in s3_client.list_objects_v2(Bucket="overlap")["Contents"]} == before


def test_search_refuses_a_destination_over_an_input(copies, tmp_path):
    sft, aligned = copies
    result = run_cli("search", "--sft", str(sft), "--aligned", str(aligned), "--out", str(aligned / "search-out"),
                     "--prompts", str(tmp_path / "none.jsonl"), "--reward-model", str(aligned))
    one_error(result, "lies inside the aligned model folder")
    assert not (aligned / "search-out").exists()


def test_sweep_check_refuses_a_destination_over_an_input(copies, tmp_path):
    sft, aligned = copies
    spec = tmp_path / "s.yaml"
    spec.write_text(f"destination: {tmp_path}\nalphas: [0.5]\n"
                    f"pairs:\n  - name: p\n    sft: {sft}\n    aligned: {aligned}\n")
    result = run_cli("sweep", "--check", str(spec))
    assert result.exit_code == 0, result.output  # the pair's variants go to DEST/p-ID/variants, beside the inputs
    spec.write_text(f"destination: {aligned}\nalphas: [0.5]\n"
                    f"pairs:\n  - name: p\n    sft: {sft}\n    aligned: {aligned}\n")
    one_error(run_cli("sweep", "--check", str(spec)), "lies inside the aligned model folder")


def test_side_file_linked_outside_the_folder_is_refused(copies, tmp_path):
    sft, aligned = copies
    secret = tmp_path / "secret.json"
    secret.write_text('{"private": "do not publish"}')
    (aligned / "tokenizer.json").unlink()
    (aligned / "tokenizer.json").symlink_to(secret)
    out = tmp_path / "out"
    result = run_cli("extrapolate", "--sft", str(sft), "--aligned", str(aligned), "--alpha", ALPHA, "--out", str(out),
                     "--no-progress")
    one_error(result, "tokenizer.json", "outside the folder")
    assert not out.exists()


def test_links_inside_the_folder_and_hf_cache_blobs_are_allowed(tmp_path):
    snapshot = tmp_path / "models--org--m" / "snapshots" / ("a" * 40)
    blobs = tmp_path / "models--org--m" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "123").write_text("{}")
    (snapshot / "config.json").symlink_to("../../blobs/123")
    (snapshot / "same.json").symlink_to("config.json")
    store = LocalStorage(snapshot)
    assert store.read_bytes("config.json") == b"{}" and store.read_bytes("same.json") == b"{}"
    (tmp_path / "outside").write_text("x")
    (snapshot / "escape.json").symlink_to(tmp_path / "outside")
    with pytest.raises(StorageError, match="outside the folder"):
        store.read_bytes("escape.json")


@pytest.mark.parametrize("edit", ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
def test_every_copied_file_is_part_of_the_identity(copies, edit):
    sft, aligned = copies
    before = make_plan(str(sft), str(aligned), (0.5,)).source_fingerprint
    path = aligned / edit
    path.write_bytes(path.read_bytes().replace(b"}", b" }", 1)
                     if edit != "chat_template.jinja" else path.read_bytes() + b"\n")
    assert make_plan(str(sft), str(aligned), (0.5,)).source_fingerprint != before


def test_rerun_after_an_input_edit_is_not_already_complete(ray_local, copies, tmp_path):
    sft, aligned = copies
    out = tmp_path / "out"
    args = ("extrapolate", "--sft", str(sft), "--aligned", str(aligned), "--alpha", ALPHA,
            "--out", str(out), "--no-progress")
    assert run_cli(*args).exit_code == 0
    committed = digest_tree(out / f"alpha_{ALPHA}")
    template = aligned / "chat_template.jinja"
    template.write_text(template.read_text() + "{# edited #}\n")
    one_error(run_cli(*args), f"alpha_{ALPHA}", "made from other inputs or settings")
    assert digest_tree(out / f"alpha_{ALPHA}") == committed


def test_every_spelling_of_one_job_commits_the_same_bytes(ray_local, copies, tmp_path, monkeypatch):
    sft, aligned = copies
    (tmp_path / "link").symlink_to(tmp_path)
    monkeypatch.chdir(tmp_path)
    extrapolate("sft", "./aligned", (0.5,), str(tmp_path / "a"), show_progress=False)
    extrapolate(str(tmp_path / "link" / "sft"), str(aligned) + "/", (0.5,), "b", show_progress=False)
    a, b = digest_tree(tmp_path / "a" / "alpha_0.5"), digest_tree(tmp_path / "b" / "alpha_0.5")
    manifest_a = json.loads((tmp_path / "a" / "alpha_0.5" / "manifest.json").read_text())
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {k: v for k, v in b.items() if k != "manifest.json"}
    assert manifest_a["files"] == json.loads((tmp_path / "b" / "alpha_0.5" / "manifest.json").read_text())["files"]
    card = (tmp_path / "a" / "alpha_0.5" / "README.md").read_text()
    assert f"--sft {sft} --aligned {aligned} --alpha 0.5" in card and "link" not in card


def test_overlapping_runs_of_one_job_both_succeed(ray_local, copies, tmp_path, monkeypatch):
    """Two runs of one job at once, their --out spelled differently: one commits, the other sees the
    commit; both succeed and the variants verify."""
    sft, aligned = copies
    monkeypatch.setenv("EXPO_RAY_CHUNK_DELAY_S", "0.05")
    monkeypatch.chdir(tmp_path)
    outcomes, errors = [], []

    def run(out):
        try:
            outcomes.append(extrapolate(str(sft), str(aligned), (0.2, 0.5), out, chunk_mib=0.0625,
                                        show_progress=False).variants)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(out,)) for out in ("out", str(tmp_path / "out") + "/")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(outcomes) == 2, errors
    for name in ("alpha_0.2", "alpha_0.5"):
        states = sorted(o[name] for o in outcomes)
        assert states[1] == "written" and states[0] in ("already committed by another run", "already complete"), states
        assert verify_variant(LocalStorage(tmp_path / "out" / name)).ok
    assert not [p for p in (tmp_path / "out").rglob(".expo-partial-*")]


def test_overlapping_runs_with_different_inputs_never_commit_a_mix(ray_local, copies, tmp_path, monkeypatch):
    """Two different jobs into one destination at once: whatever the interleaving, a committed
    variant holds exactly what its manifest says, and a run that cannot commit says why."""
    sft, aligned = copies
    monkeypatch.setenv("EXPO_RAY_CHUNK_DELAY_S", "0.05")
    out = str(tmp_path / "out")
    outcomes, errors = [], []

    def run(**rules):
        try:
            outcomes.append(extrapolate(str(sft), str(aligned), (0.5,), out, chunk_mib=0.0625, show_progress=False,
                                        **rules).variants)
        except Exception as exc:  # noqa: BLE001 - checked below
            errors.append(str(exc))

    threads = [threading.Thread(target=run), threading.Thread(target=run, kwargs={"scales": ["*.mlp.*=2"]})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(outcomes) + len(errors) == 2 and len(outcomes) <= 1, (outcomes, errors)
    for message in errors:
        assert any(s in message for s in ("another run", "made from other inputs or settings")), message
    if outcomes:
        assert outcomes[0] == {"alpha_0.5": "written"}
        assert verify_variant(LocalStorage(tmp_path / "out" / "alpha_0.5")).ok
    else:  # both refused: nothing committed, and a re-run of either job completes
        assert not (tmp_path / "out" / "alpha_0.5" / "manifest.json").exists()

"""The repeated convergence protocol: schedules, seeds, statistics, resuming, trained checkpoints."""
import json
import pytest
import torch

from ddetr_minimal.training import checkpoints, protocol, repeated


def test_each_model_drops_its_lr_at_the_same_fraction_of_its_own_schedule():
    assert protocol.schedule(100, 0.8) == 80 and protocol.schedule(10, 0.8) == 8
    assert protocol.schedule(500, 0.8) == 400 and protocol.schedule(50, 0.8) == 40  # the paper's
    with pytest.raises(ValueError, match="not a whole epoch"):
        protocol.schedule(12, 0.8)  # 9.6
    with pytest.raises(ValueError, match="drop_fraction must be in"):
        protocol.schedule(10, 1.0)
    with pytest.raises(ValueError, match="epochs must be an integer >= 2"):
        protocol.schedule(1, 0.5)


def test_plan_gives_deformable_a_tenth_of_detr_epochs_and_every_seed():
    runs = protocol.plan(100, [0, 1, 2], 0.8, 10, ("single_scale", "refine", "two_stage"), [0])
    by = {r.name: r for r in runs}
    # the kept seed first (DETR, the longest, leading), then the other seeds longest first
    assert [r.name for r in runs] == ["detr_s0", "deformable_s0", "single_scale_s0", "refine_s0", "two_stage_s0",
                                      "detr_s1", "detr_s2", "deformable_s1", "deformable_s2"]
    assert {r.epochs for r in runs if r.group == "detr"} == {100}
    assert {r.epochs for r in runs if r.group != "detr"} == {10}
    assert all(r.lr_drop / r.epochs == 0.8 for r in runs)
    assert by["detr_s0"].eval_every == 5 and by["deformable_s1"].eval_every == 1
    # snapshots for the first seed only: DETR and Deformable DETR at 0, 10, 50, 100 %, the variants at the end
    assert by["detr_s0"].save_epochs == [0, 10, 50, 100] and by["deformable_s0"].save_epochs == [0, 1, 5, 10]
    assert by["refine_s0"].save_epochs == [10] and by["detr_s1"].save_epochs == [] == by["deformable_s2"].save_epochs
    # a seed changes the run's --seed; the model's flags follow its group
    a = by["single_scale_s0"].train_args()
    assert a[a.index("--n-levels") + 1] == "1" and a[a.index("--seed") + 1] == "0"
    assert "--two-stage" in by["two_stage_s0"].train_args() and "--with-box-refine" in by["two_stage_s0"].train_args()
    assert "--detr-focal" in by["detr_s2"].train_args() and by["detr_s2"].train_args()[1] == "detr"
    with pytest.raises(ValueError, match="multiple of epoch_ratio"):
        protocol.plan(95, [0])
    with pytest.raises(ValueError, match="distinct integers"):
        protocol.plan(100, [1, 1])
    with pytest.raises(ValueError, match="extra_groups: unknown"):
        protocol.plan(100, [0], extra_groups=("bogus",))


def _curve(aps, every=1, ap_s=None):
    rows = []
    for e in range(1, len(aps) + 1):
        row = {"epoch": e, "loss": 1.0 / e}
        if e % every == 0 or e == len(aps):
            row.update({k: aps[e - 1] for k in protocol.AP_KEYS})
            row["AP_S"] = aps[e - 1] if ap_s is None else ap_s
        rows.append(row)
    return rows


def _run(group, seed, aps, ap_s=None, finished=True, every=1):
    return {"group": group, "seed": seed, "epochs": len(aps), "lr_drop": round(0.8 * len(aps)), "finished": finished,
            "curve": _curve(aps, every, ap_s), "wall_seconds": 10.0 * len(aps)}


def test_summary_statistics_over_seeds_and_the_claims():
    assert protocol.mean_sd([1.0, 2.0, 3.0]) == {"mean": 2.0, "sd": 1.0, "n": 3, "min": 1.0, "max": 3.0}
    assert protocol.mean_sd([None, 4.0])["sd"] == 0.0 and protocol.mean_sd([None])["mean"] is None
    detr = [_run("detr", s, [0.01 * e for e in range(1, 21)], ap_s=0.01, every=5) for s in range(3)]  # final 0.20
    fast = [_run("deformable", 0, [0.04, 0.12, 0.22], ap_s=0.10), _run("deformable", 1, [0.06, 0.09, 0.21], ap_s=0.12),
            _run("deformable", 2, [0.02, 0.08, 0.23], ap_s=0.08)]
    unfinished = _run("refine", 0, [0.5, 0.5], finished=False)
    s = protocol.summarize(detr + fast + [unfinished])
    assert set(s["groups"]) == {"detr", "deformable"}  # an unfinished run is not summarized
    assert s["detr_mean_final_AP"] == pytest.approx(0.20)
    f = s["groups"]["deformable"]
    assert f["final"]["AP"]["mean"] == pytest.approx(0.22) and f["final"]["AP"]["sd"] == pytest.approx(0.01)
    assert f["epochs_to"]["AP 5"]["per_seed"] == [2, 1, 2]
    assert f["epochs_to"]["AP 10"]["per_seed"] == [2, 3, 3] and f["epochs_to"]["AP 10"]["mean"] == pytest.approx(8 / 3)
    assert f["epochs_to"]["DETR final AP"]["per_seed"] == [3, 3, 3]
    # DETR is evaluated every 5 epochs: it reaches AP 5 at its fifth epoch, AP 10 at its tenth
    assert s["groups"]["detr"]["epochs_to"]["AP 5"]["per_seed"] == [5, 5, 5]
    assert s["groups"]["detr"]["epochs_to"]["AP 10"]["mean"] == 10
    assert s["groups"]["detr"]["wall_seconds"]["mean"] == 200.0
    c = s["claims"]
    assert c["detr_mean_final_AP_at_least_10"] and c["deformable_mean_final_AP_at_least_detr"]
    assert c["deformable_AP_S_gap"]["gap"] == pytest.approx(0.09)
    assert c["deformable_AP_S_gap"]["summed_sd"] == pytest.approx(0.02)
    assert c["deformable_AP_S_above_detr_by_5_points_and_2_summed_sd"]
    # the same gap with a wide spread fails the claim; a small gap fails it too
    wide = [_run("deformable", i, [0.2, 0.2, 0.2], ap_s=a) for i, a in enumerate((0.0, 0.1, 0.2))]
    assert not protocol.summarize(detr + wide)["claims"]["deformable_AP_S_above_detr_by_5_points_and_2_summed_sd"]
    close = [_run("deformable", i, [0.2, 0.2, 0.2], ap_s=0.04) for i in range(3)]
    c = protocol.summarize(detr + close)["claims"]
    assert c["deformable_AP_S_gap"]["summed_sd"] == 0.0
    assert not c["deformable_AP_S_above_detr_by_5_points_and_2_summed_sd"]
    weak = [_run("detr", s, [0.05] * 20, every=5) for s in range(3)]
    c = protocol.summarize(weak + close)["claims"]
    assert c["detr_mean_final_AP_at_least_10"] is False
    assert protocol.summarize(weak)["claims"]["deformable_mean_final_AP_at_least_detr"] is None


def _fake_run_dir(path, epochs_done):
    path.mkdir(parents=True)
    rows = [{"epoch": e, "lr": 1e-4, "train_loss": 1.0, "train_seconds": 1.0, **{k: 0.1 for k in protocol.AP_KEYS}} for e in range(1, epochs_done + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "checkpoint.pth").write_bytes(b"x")


def test_resume_skips_finished_runs_and_continues_partial_ones(tmp_path, monkeypatch):
    runs = protocol.plan(20, [0, 1], 0.5, extra_groups=())
    done, half = tmp_path / "runs" / "detr_s1", tmp_path / "runs" / "deformable_s1"
    _fake_run_dir(done, 20)
    _fake_run_dir(half, 1)
    assert repeated.run_state(runs[2], done) == "finished" and runs[2].name == "detr_s1"
    assert repeated.run_state(runs[3], half) == "partial" and runs[3].name == "deformable_s1"
    assert repeated.run_state(runs[0], tmp_path / "runs" / "detr_s0") == "new"
    launched = {}

    def fake_run_jobs(jobs, runs_dir, parallel, threads, on_finish):
        launched.update(jobs)
        return None

    monkeypatch.setattr(repeated, "run_jobs", fake_run_jobs)
    monkeypatch.setattr(repeated, "pretrained_backbone", lambda args, d: {"weights": str(d / "backbone.pth")})
    monkeypatch.setattr(repeated, "toy_dataset", lambda *a, **k: {"num_train": 4})
    out = tmp_path / "record.json"
    argv = ["--detr-epochs", "20", "--drop-fraction", "0.5", "--seeds", "0,1", "--extra", "",
            "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--checkpoints-dir", str(tmp_path / "ck")]
    crashed = tmp_path / "runs" / "deformable_s0"  # stopped after writing its first metrics, before a checkpoint
    crashed.mkdir(parents=True)
    (crashed / "metrics.jsonl").write_text("")
    record = repeated.seeds([*argv, "--resume"])
    assert sorted(launched) == ["deformable_s0", "deformable_s1", "detr_s0"]  # detr_s1 finished: not trained again
    assert "--resume" in launched["deformable_s1"] and "--resume" not in launched["detr_s0"]
    assert "--force" in launched["deformable_s0"] and "--force" not in launched["detr_s0"]
    assert record["runs"]["detr_s1"]["finished"] and not record["runs"]["deformable_s1"]["finished"]
    assert record["runs"]["detr_s1"]["lr_drop"] == 10 and record["runs"]["deformable_s1"]["epochs"] == 2
    assert record["runs"]["detr_s1"]["seed"] == 1 and record["runs"]["deformable_s1"]["seed"] == 1
    assert [r["epoch"] for r in record["runs"]["deformable_s1"]["curve"]] == [1]
    assert record["summary"]["groups"]["detr"]["seeds"] == [1]  # only finished runs are summarized
    assert {"command", "commit", "machine", "date"} <= set(record) and len(record["invocations"]) == 1
    with pytest.raises(SystemExit, match="already holds a record"):  # never overwritten silently
        repeated.seeds(argv)
    again = repeated.seeds([*argv, "--resume"])
    assert len(again["invocations"]) == 2
    assert repeated.seeds([*argv, "--table"]) == json.loads(out.read_text())  # only reads the record


def test_trained_checkpoints_load_and_a_mismatch_names_the_file_and_keys(tmp_path):
    from ddetr_minimal.training.train import build_model_from_args, resolve_args

    args = resolve_args(["--model", "deformable", "--data-path", str(tmp_path), "--d-model", "32", "--n-heads", "2",
                         "--enc-layers", "1", "--dec-layers", "1", "--dim-feedforward", "64", "--num-queries", "8",
                         "--n-levels", "2", "--image-size", "160"])
    model, _, _ = build_model_from_args(args, 5)
    info = {"file": "tiny.pth", "run": "deformable_s0", "epoch": 3, "AP": 0.1, "command": "c", "commit": "x"}
    checkpoints.write_trained(tmp_path / "tiny.pth", model.state_dict(), vars(args), ["a", "b", "c", "d", "e"], info)
    checkpoints.write_manifest(tmp_path, {"tiny": info}, {"command": "c", "commit": "x"})
    assert checkpoints.list_trained(tmp_path) == ["tiny"]
    loaded, post, meta = checkpoints.load_trained("tiny", tmp_path)
    assert meta["epoch"] == 3 and meta["class_names"][0] == "a" and not loaded.training
    for k, v in model.state_dict().items():  # half precision on disk, float32 back
        w = loaded.state_dict()[k]
        assert w.dtype == v.dtype and torch.allclose(w, v, rtol=1e-2, atol=1e-3), k
    assert (tmp_path / "tiny.pth").stat().st_size < 3e6
    with pytest.raises(KeyError, match="no trained checkpoint named 'other'"):
        checkpoints.load_trained("other", tmp_path)
    # weights of a model with another width under the same hyper-parameters: every mismatch is named
    ckpt = torch.load(tmp_path / "tiny.pth", weights_only=True)
    ckpt["model"]["class_embed.0.weight"] = torch.zeros(7, 32)
    ckpt["model"]["extra.weight"] = torch.zeros(1)
    del ckpt["model"]["query_embed.weight"]
    torch.save(ckpt, tmp_path / "tiny.pth")
    with pytest.raises(ValueError) as err:
        checkpoints.load_trained("tiny", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "tiny.pth") in msg and "missing keys ['query_embed.weight']" in msg
    assert "unexpected keys ['extra.weight']" in msg and "class_embed.0.weight has shape (7, 32)" in msg


def test_training_keeps_half_precision_weights_at_the_asked_epochs_and_they_load(tmp_path):
    from ddetr_minimal.datasets.synthetic import generate
    from ddetr_minimal.training import train

    data = generate(tmp_path / "toy", num_train=4, num_val=2, image_size=160, seed=0, progress=False)
    args = ["--model", "deformable", "--n-levels", "1", "--data-path", str(data), "--d-model", "32", "--n-heads", "2",
            "--enc-layers", "1", "--dec-layers", "1", "--dim-feedforward", "64", "--num-queries", "8",
            "--batch-size", "2", "--no-progress", "--threads", "1", "--device", "cpu", "--epochs", "2",
            "--eval-every", "5", "--save-epochs", "0,2", "--output-dir", str(tmp_path / "run")]
    train.main(args)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("model_e*.pth")) == ["model_e000.pth", "model_e002.pth"]
    first, last = (torch.load(run / f"model_e{e:03d}.pth", weights_only=True) for e in (0, 2))
    final = torch.load(run / "checkpoint.pth", weights_only=False)["model"]
    assert all(v.dtype == torch.float16 for v in last.values() if v.is_floating_point())
    assert any(not torch.equal(first[k], last[k]) for k in first)  # trained in between
    for k, v in final.items():
        assert torch.allclose(last[k].float(), v.float(), rtol=1e-2, atol=1e-3), k
    assert sum(v.numel() for k, v in final.items() if k.startswith("input_proj")) > 0
    assert not any(k.startswith("input_proj.1") for k in final)  # one level: one input projection
    with pytest.raises(SystemExit, match="--save-epochs must lie in 0..2"):
        train.resolve_args([*args[:-2], "--save-epochs", "3"])


def test_subset_spread_is_zero_for_perfect_detections_and_positive_for_noisy_ones(tmp_path):
    from ddetr_minimal.datasets.coco import build_dataset
    from ddetr_minimal.datasets.synthetic import generate
    from ddetr_minimal.training.noise import subset_spread

    data = generate(tmp_path / "toy", num_train=1, num_val=40, image_size=160, seed=3, progress=False)
    ds = build_dataset(data, "val", "toy", 160)
    gt = ds.coco_gt()
    anns = gt.loadAnns(gt.getAnnIds())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in anns]
    s = subset_spread(gt, perfect, ds.image_ids(), repeats=4)
    assert s["AP"]["mean"] == pytest.approx(1.0) and s["standard_error"]["AP"] == pytest.approx(0.0, abs=1e-9)
    # every other image's detections are shifted away: the AP depends on which images are drawn
    noisy = [dict(r, bbox=[r["bbox"][0] + 40, *r["bbox"][1:]]) if r["image_id"] % 2 else r for r in perfect]
    s = subset_spread(gt, noisy, ds.image_ids(), repeats=6)
    assert 0.2 < s["AP"]["mean"] < 0.8 and s["standard_error"]["AP"] > 0.01
    with pytest.raises(ValueError, match="fraction must be in"):
        subset_spread(gt, perfect, ds.image_ids(), fraction=1.0)


def test_summary_sets_the_evaluation_noise_beside_the_seed_spread():
    runs = [_run("deformable", s, [0.1, 0.2 + 0.02 * s], ap_s=0.05 + 0.01 * s) for s in range(3)]
    se = {k: 0.005 for k in protocol.AP_KEYS}
    g = protocol.summarize(runs, noise={"deformable": {"standard_error": se}})["groups"]["deformable"]
    assert g["evaluation_noise"]["AP"]["seed_sd"] == pytest.approx(0.02)
    assert g["evaluation_noise"]["AP"]["seed_sd_over_standard_error"] == pytest.approx(4.0)
    assert g["evaluation_noise"]["AP_S"]["seed_sd_over_standard_error"] == pytest.approx(2.0)


@pytest.mark.slow
def test_seeds_command_end_to_end_records_exports_and_resumes(tmp_path):
    tiny = [f"--train-arg={a}" for a in ("--d-model=32", "--n-heads=2", "--enc-layers=1", "--dec-layers=1",
                                         "--dim-feedforward=64", "--num-queries=8", "--n-points=2",
                                         "--batch-size=2", "--device=cpu", "--max-val-images=3")]
    argv = ["--data", str(tmp_path / "toy"), "--num-train", "4", "--num-val", "3", "--image-size", "160",
            "--pretrain-data", str(tmp_path / "pre"), "--pretrain-num-train", "4", "--pretrain-num-val", "2",
            "--pretrain-epochs", "1", "--detr-epochs", "4", "--epoch-ratio", "2", "--drop-fraction", "0.5",
            "--seeds", "0", "--extra", "single_scale", "--detr-eval-every", "2", "--runs-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "record.json"), "--checkpoints-dir", str(tmp_path / "ck"), *tiny]
    record = repeated.seeds(argv)
    assert set(record["runs"]) == {"detr_s0", "deformable_s0", "single_scale_s0"}
    d, f = record["runs"]["detr_s0"], record["runs"]["deformable_s0"]
    assert d["finished"] and (d["epochs"], d["lr_drop"]) == (4, 2) and (f["epochs"], f["lr_drop"]) == (2, 1)
    assert [r["epoch"] for r in d["curve"] if "AP" in r] == [2, 4] and all("loss" in r for r in d["curve"])
    assert [r["lr"] for r in d["curve"]] == pytest.approx([2e-4, 2e-4, 2e-5, 2e-5])
    assert "evaluation_noise" in d and record["summary"]["groups"]["detr"]["evaluation_noise"]["AP"]
    manifest = checkpoints.read_manifest(tmp_path / "ck")
    assert sorted(manifest) == ["deformable_s0_e000", "deformable_s0_e001", "deformable_s0_e002", "detr_s0_e000",
                                "detr_s0_e002", "detr_s0_e004", "single_scale_s0_e002"]
    model, _, info = checkpoints.load_trained("single_scale_s0_e002", tmp_path / "ck")
    assert info["epoch"] == 2 and info["run"] == "single_scale_s0" and info["commit"] == record["commit"]
    assert len(model.input_proj) == 1  # the single-scale control reads one map
    before = (tmp_path / "runs" / "detr_s0" / "checkpoint.pth").read_bytes()
    again = repeated.seeds([*argv, "--resume"])  # everything finished: nothing trains again
    assert (tmp_path / "runs" / "detr_s0" / "checkpoint.pth").read_bytes() == before
    assert again["runs"]["detr_s0"]["curve"] == d["curve"] and len(again["invocations"]) == 2


def test_an_existing_pretrained_backbone_is_reused_with_its_record(tmp_path):
    from ddetr_minimal.datasets.synthetic import generate
    from ddetr_minimal.training.pretrain import pretrain

    pre = generate(tmp_path / "pre", num_train=2, num_val=2, image_size=160, seed=1, progress=False)
    weights = tmp_path / "backbone.pth"
    pretrain(pre, weights, epochs=1, batch_size=2, log=lambda *a: None)
    base = ["--pretrain-data", str(pre), "--pretrain-num-train", "2", "--pretrain-num-val", "2",
            "--image-size", "160", "--small-sides", "10,24", "--data", str(tmp_path / "toy")]
    args = repeated.build_parser().parse_args([*base, "--backbone-weights", str(weights)])
    record = repeated.pretrained_backbone(args, tmp_path / "runs")
    assert record["weights"] == str(weights) and record["epochs"] == 1 and len(record["sha256"]) == 64
    assert record["dataset"]["seed"] == 1 and not (tmp_path / "runs" / "backbone.pth").exists()
    other = generate(tmp_path / "other", num_train=2, num_val=2, image_size=160, seed=2, progress=False)
    args = repeated.build_parser().parse_args([*base[:1], str(other), *base[2:], "--pretrain-data-seed", "2",
                                               "--backbone-weights", str(weights)])
    with pytest.raises(SystemExit, match="was pretrained on"):
        repeated.pretrained_backbone(args, tmp_path / "runs")


def test_the_table_has_one_row_per_group_in_percent():
    detr = [_run("detr", s, [0.1] * 9 + [0.1 + 0.01 * s], ap_s=0.01) for s in range(3)]
    fast = [_run("deformable", s, [0.05, 0.12], ap_s=0.08) for s in range(3)]
    summary = protocol.summarize(detr + fast)
    rows = {r["group"]: r for r in protocol.table(summary)}
    assert rows["detr"]["AP"] == pytest.approx((11.0, 1.0)) and rows["deformable"]["AP_S"] == pytest.approx((8.0, 0.0))
    assert rows["deformable"]["epochs_to_detr_final"] == (2, 3) and rows["detr"]["epochs"] == 10
    assert rows["deformable"]["epochs_to"]["DETR final AP"] == (2, 0.0, 3)
    assert rows["detr"]["epochs_to"]["AP 10"] == (1, 0.0, 3) and set(rows["detr"]["epochs_to"]) == {
        "AP 5", "AP 10", "DETR final AP"}
    text = protocol.format_table(summary)
    assert len(text.splitlines()) == 3 and "11.0 ± 1.0" in text and "2.0 (3/3)" in text


def test_the_experiments_command_runs_seeds_and_nothing_else(tmp_path, capsys):
    from ddetr_minimal.__main__ import main

    summary = protocol.summarize([_run("detr", 0, [0.1, 0.2]), _run("deformable", 0, [0.15, 0.3])])
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"summary": summary}))
    assert main(["experiments", "seeds", "--table", "--out", str(record)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split()[0] for x in lines] == ["group", "detr", "deformable"] and "30.0 ± 0.0" in lines[2]
    for wrong in (["experiments"], ["experiments", "convergence"]):
        with pytest.raises(SystemExit, match="experiments seeds"):
            main(wrong)


def test_pretraining_on_the_evaluation_data_and_a_changed_dataset_are_refused(tmp_path):
    from ddetr_minimal.training.runs import ensure_dataset

    base = ["--data", str(tmp_path / "toy"), "--pretrain-data", str(tmp_path / "pre")]
    args = repeated.build_parser().parse_args([*base, "--pretrain-data-seed", "0"])  # --data-seed is 0 too
    with pytest.raises(SystemExit, match="another seed"):
        repeated.pretrained_backbone(args, tmp_path / "runs")
    info = ensure_dataset(tmp_path / "toy", num_train=2, num_val=1, image_size=160, seed=0)
    assert (info["num_train"], info["num_val"]) == (2, 1)
    assert ensure_dataset(tmp_path / "toy", 2, 1, 160, 0) == info  # the same parameters: reused as it is
    with pytest.raises(SystemExit, match="other parameters"):
        ensure_dataset(tmp_path / "toy", num_train=3, num_val=1, image_size=160, seed=0)


def test_an_installed_package_fetches_the_checkpoints_once_online(tmp_path, monkeypatch):
    """Without the repository's data/ (an installed package, as in Colab), the manifest and a
    checkpoint come from the published repository, once, into the cache; offline nothing is
    fetched and nothing is found."""
    import io
    import urllib.request
    from pathlib import Path

    from ddetr_minimal.training import checkpoints

    published = Path(checkpoints.__file__).resolve().parents[2] / "data" / "checkpoints"
    name = checkpoints.list_trained(published)[-1]
    fetched = []

    def fake_urlopen(url, timeout):
        assert url.startswith(checkpoints.CHECKPOINTS_URL)
        fetched.append(url[len(checkpoints.CHECKPOINTS_URL):])
        path = published / fetched[-1]
        if not path.is_file():
            raise OSError(f"404 {url}")
        return io.BytesIO(path.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(checkpoints, "DEFAULT_DIR", tmp_path / "installed" / "data" / "checkpoints")
    monkeypatch.setenv("DDETR_MINIMAL_CACHE", str(tmp_path / "cache"))
    assert checkpoints.read_manifest(checkpoints.DEFAULT_DIR, online=False) == {} and fetched == []
    model, _, info = checkpoints.load_trained(name, checkpoints.DEFAULT_DIR, online=True)
    assert info["name"] == name and fetched == ["manifest.json", info["file"]]
    assert (tmp_path / "cache" / "checkpoints" / info["file"]).is_file()
    checkpoints.load_trained(name, checkpoints.DEFAULT_DIR, online=True)
    assert len(fetched) == 2  # the second time from the cache
    with pytest.raises(FileNotFoundError):  # a file the repository does not have
        checkpoints.load_file(checkpoints._local(checkpoints.DEFAULT_DIR, "nope.pth", True))
    assert not list((tmp_path / "cache" / "checkpoints").glob("*.tmp"))

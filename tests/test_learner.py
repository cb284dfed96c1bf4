"""The end-to-end learners (stage1.method=freematch | fixmatch): stages 1-3 through the CLI on digits and on a tiny
CIFAR-10 fixture with the `cifar10` preset, exact resume after a kill, non-finite losses, fingerprints."""
import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dpt_fast.stage as cli
from dpt_fast.config import load_config
from dpt_fast.data import load_dataset
from dpt_fast.ssl.train import LearnerData, Norm, load_learner, predict, train_learner
from dpt_fast.stages import fingerprint
from dpt_fast.utils import UserError, load_npz

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest (conftest.py)


@pytest.fixture(autouse=True)
def quiet_cli(monkeypatch):
    """The CLI installs a log handler on the current stderr, which pytest swaps per test: keep it out."""
    monkeypatch.setattr(cli, "setup_logging", lambda quiet=False: None)


def _cli(*args) -> int:
    return cli.main([*args, "--quiet"])


@pytest.mark.parametrize("method", ["freematch", "fixmatch"])
def test_learner_runs_stages_1_to_3_on_digits_through_the_cli(method, tmp_path):
    run = tmp_path / "run"
    assert _cli("--stage", "all", "--config", "digits", "--run-dir", str(run), f"stage1.method={method}") == 0
    m = {n: json.loads((run / f"stage{n}" / "metrics.json").read_text()) for n in (1, 2, 3)}
    assert m[1]["method"] == m[3]["method"] == method
    ds = load_dataset(load_config("digits").data)
    z = load_npz(run / "stage1" / "pseudo_labels.npz", ("index", "label", "prob"))
    lab = np.asarray(json.loads((run / "split.json").read_text())["labelled"])
    assert np.array_equal(z["index"], np.arange(len(ds.y_train))) and z["label"].dtype == np.int64
    assert np.array_equal(z["label"][lab], ds.y_train[lab]) and np.all(z["prob"][lab] == 1.0)
    assert z["prob"].dtype == np.float32 and np.all((z["prob"] > 0) & (z["prob"] <= 1))
    assert m[1]["pseudo_label_accuracy"] == pytest.approx(float((z["label"] == ds.y_train).mean()))
    assert m[1]["test_top1"] > 0.3  # 60 tiny iterations from 10 labels: far above chance (0.1)
    # the stage-1 EMA model predicts what stage 1 reported, and stage 3 reports it next to its own
    model, meta, norm = load_learner(run / "stage1" / "learner.safetensors")
    assert meta["method"] == method and meta["net"] == "cnn"
    top1 = float((predict(model, ds.x_test, norm).argmax(1) == ds.y_test).mean())
    assert top1 == pytest.approx(m[1]["test_top1"]) == pytest.approx(m[3]["stage1_top1"])
    assert m[3]["generated"] == m[3]["generated_used"] == 40 and 0 <= m[3]["top1"] <= 1
    assert m[3]["gain"] == pytest.approx(m[3]["top1"] - m[3]["stage1_top1"])
    assert (run / "stage3" / "learner.safetensors").is_file()
    assert not (run / "stage1" / "checkpoints").exists() and not (run / "stage3" / "checkpoints").exists()
    assert json.loads((run / "report.json").read_text())["stages_finished"] == [1, 2, 3]


def _digits_data(labels_per_class=1):
    ds = load_dataset(load_config("digits").data)
    lab = np.concatenate([np.flatnonzero(ds.y_train == c)[:labels_per_class] for c in range(10)])
    x = torch.from_numpy(ds.x_train)
    return LearnerData(x[lab], torch.from_numpy(ds.y_train[lab]), x), Norm.of("digits", ds.x_train)


@pytest.mark.parametrize("method", ["freematch", "fixmatch"])
def test_a_killed_run_resumes_to_bit_identical_final_weights(method, tmp_path):
    lcfg = load_config("digits", ["learner.iterations=12", "learner.ckpt_every=4"]).learner
    data, norm = _digits_data()
    kw = dict(num_classes=10, norm=norm, seed=3, fingerprint="fp", progress=False)
    whole, _ = train_learner(data, lcfg, method, ckpt_dir=tmp_path / "whole", **kw)

    class Killed(Exception):
        pass

    def kill_at_6(k, ema):
        if k == 6:
            raise Killed  # after iteration 6: the checkpoint of iteration 4 is the newest

    with pytest.raises(Killed):
        train_learner(data, lcfg, method, ckpt_dir=tmp_path / "killed", on_iter=kill_at_6, **kw)
    assert sorted(p.name for p in (tmp_path / "killed").glob("*.json")) == ["step-00000004.json"]
    resumed, summary = train_learner(data, lcfg, method, ckpt_dir=tmp_path / "killed", **kw)
    assert summary["resumed_at"] == 4
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the optimizer state and FreeMatch's statistics travelled too: the final checkpoints agree bit for bit
    ta, tb = load_file(str(tmp_path / "whole" / "step-00000012.safetensors")), load_file(
        str(tmp_path / "killed" / "step-00000012.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ja, jb = (json.loads((d / "step-00000012.json").read_text()) for d in (tmp_path / "whole", tmp_path / "killed"))
    assert ja["thresholds"] == jb["thresholds"]


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    lcfg = load_config("digits", ["learner.iterations=4", "learner.ckpt_every=2"]).learner
    data, norm = _digits_data()
    train_learner(data, lcfg, "fixmatch", num_classes=10, norm=norm, seed=0, ckpt_dir=tmp_path, fingerprint="a",
                  progress=False)
    with pytest.raises(UserError, match="--fresh"):
        train_learner(data, lcfg, "fixmatch", num_classes=10, norm=norm, seed=0, ckpt_dir=tmp_path, fingerprint="b",
                      progress=False)


def test_a_non_finite_loss_stops_with_one_line_naming_the_iteration_and_the_key(tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli("--stage", "1", "--config", "digits", "--run-dir", str(run), "stage1.method=freematch",
                "learner.lr=1e30", "learner.ckpt_every=1") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "learner.lr" in err and "at iteration" in err and "nan" in err.lower()
    assert not (run / "stage1" / "learner.safetensors").exists() and not (run / "stage1" / "metrics.json").exists()
    for f in (run / "stage1" / "checkpoints").glob("*.safetensors"):  # what was saved before it broke is finite
        assert all(torch.isfinite(v).all() for v in load_file(str(f)).values() if v.is_floating_point())


def test_stage1_fingerprint_of_a_learner_reads_the_learner_keys_only():
    base = load_config("digits", ["stage1.method=freematch"])
    assert fingerprint(load_config("digits", ["stage1.method=freematch", "stage1.umap_epochs=7"]), 1) == fingerprint(base, 1)
    assert fingerprint(load_config("digits", ["stage1.method=freematch", "learner.lr=0.1"]), 1) != fingerprint(base, 1)
    assert fingerprint(load_config("digits", ["stage1.method=fixmatch"]), 1) != fingerprint(base, 1)
    # starting from SimCLR, the SimCLR keys count too, and the UMAP keys when the head comes from SimCLR-UMAP
    for init, umap_counts in (("simclr", False), ("simclr_umap", True)):
        sim = ["stage1.method=freematch", f"learner.init={init}"]
        fp = fingerprint(load_config("digits", sim), 1)
        assert fingerprint(load_config("digits", [*sim, "stage1.ssl_epochs=5"]), 1) != fp
        assert (fingerprint(load_config("digits", [*sim, "stage1.umap_dim=3"]), 1) != fp) == umap_counts
        assert fingerprint(load_config("digits", [*sim, "stage1.pca_dim=3"]), 1) == fp
    # the other methods keep the whole stage1 section and ignore the learner section
    other = load_config("digits")
    assert fingerprint(load_config("digits", ["learner.lr=0.1"]), 1) == fingerprint(other, 1)
    assert fingerprint(load_config("digits", ["stage1.umap_epochs=7"]), 1) != fingerprint(other, 1)


def _write_cifar(folder, n: int) -> None:
    """CIFAR-10 python batches as tests/test_data_formats.py fakes them: n images per batch, 10 classes told
    apart by brightness."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = (np.arange(n) % 10).tolist()
        data = np.clip(np.array(labels)[:, None] * 25 + rng.normal(10, 10, (n, 3072)), 0, 255).astype(np.uint8)
        d = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def test_cifar10_preset_runs_the_paper_protocol_on_a_tiny_cifar_fixture(tmp_path):
    cfg = load_config("cifar10")
    assert (cfg.stage1.method, cfg.learner.net, cfg.split.labels_per_class) == ("freematch", "wrn28_2", 4)
    assert (cfg.learner.iterations, cfg.learner.lr, cfg.learner.uratio) == (2**20, 0.03, 7)
    assert cfg.model.preset == "uvit_s2_pixel32"
    _write_cifar(tmp_path / "cifar-10-batches-py", 12)
    run = tmp_path / "run"
    tiny = ["learner.iterations=3", "learner.batch_size=4", "learner.uratio=1", "learner.ckpt_every=2",
            "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "train.steps=2", "train.batch_size=8",
            "sample.steps=2", "gen.k_per_class=2", "gen.batch_size=10"]
    assert _cli("--stage", "all", "--config", "cifar10", "--run-dir", str(run), f"data.root={tmp_path}", *tiny) == 0
    m = {n: json.loads((run / f"stage{n}" / "metrics.json").read_text()) for n in (1, 3)}
    assert m[1]["method"] == m[3]["method"] == "freematch" and m[1]["net"] == "wrn28_2"
    assert m[1]["labelled"] == 40 and m[1]["labelled"] + m[1]["unlabelled"] == 60 and m[1]["num_test"] == 12
    assert m[3]["generated"] == 20 and m[3]["stage1_top1"] == pytest.approx(m[1]["test_top1"])
    _, meta, norm = load_learner(run / "stage3" / "learner.safetensors")
    assert meta["in_chans"] == 3 and norm.mean == (125.3, 123.0, 113.9)  # TorchSSL's CIFAR-10 normalisation


@pytest.mark.slow
def test_simclr_init_starts_the_cnn_from_stage1s_simclr_encoder_in_both_stages(tmp_path):
    run = tmp_path / "run"
    over = ["stage1.method=freematch", "learner.init=simclr", "learner.lr=1e-9", "learner.iterations=2"]
    assert _cli("--stage", "all", "--config", "digits", "--run-dir", str(run), *over) == 0
    enc = load_file(str(run / "stage1" / "encoder.safetensors"))
    for stage in (1, 3):
        learned = load_file(str(run / f"stage{stage}" / "learner.safetensors"))
        convs = [k for k in learned if k.startswith("backbone.") and k.endswith(".weight") and learned[k].ndim == 4]
        assert convs and all(torch.allclose(learned[k], enc[k], atol=1e-6) for k in convs)  # lr ~ 0: still the encoder
    _, meta, norm = load_learner(run / "stage1" / "learner.safetensors")
    assert norm.mean == (127.5,) and norm.std == (127.5,)  # the encoder's [-1, 1] input
    assert _cli("--stage", "1", "--config", "digits", "--run-dir", str(tmp_path / "bad"), "stage1.method=freematch",
                "learner.init=simclr", "learner.width=16") == 2  # the encoder's width is stage1.width


@pytest.mark.slow
def test_simclr_umap_init_starts_the_head_at_the_simclr_umap_classifier(tmp_path):
    from dpt_fast.models.classifier import fit_logreg, load_space

    run = tmp_path / "run"
    over = ["stage1.method=freematch", "learner.init=simclr_umap", "learner.lr=1e-9", "learner.iterations=2"]
    assert _cli("--stage", "all", "--config", "digits", "--run-dir", str(run), *over) == 0
    space = load_space(run / "stage1")
    lab = np.asarray(json.loads((run / "split.json").read_text())["labelled"])
    ds = load_dataset(load_config("digits").data)
    teacher = fit_logreg(space.train_coords[lab], ds.y_train[lab], 1.0, 10).predict(space.train_coords)
    z = load_npz(run / "stage1" / "pseudo_labels.npz")
    unl = np.setdiff1d(np.arange(len(ds.y_train)), lab)
    assert (z["label"][unl] == teacher[unl]).mean() > 0.8  # lr ~ 0: the learner still gives the teacher's labels
    m3 = json.loads((run / "stage3" / "metrics.json").read_text())
    assert m3["method"] == "freematch" and m3["generated"] == 40


def test_mnist5k_preset_trains_freematch_from_the_simclr_umap_classifier():
    cfg = load_config("mnist5k")
    assert (cfg.stage1.method, cfg.learner.net, cfg.learner.init) == ("freematch", "cnn", "simclr_umap")
    assert cfg.learner.width == cfg.stage1.width  # the SimCLR encoder's conv layers fit the learner's
    assert load_config("digits").stage1.method == "simclr_umap"  # the other learners stay one key away


@pytest.mark.slow
def test_learner_probe_script_appends_one_result_line_per_split_seed(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from dpt_fast.utils import save_npz, write_json

    ds = load_dataset(load_config("digits").data)
    gen = tmp_path / "generated"
    idx = np.concatenate([np.flatnonzero(ds.y_train == c)[:3] for c in range(10)])
    save_npz(gen / "shard-00000.npz", images=ds.x_train[idx], labels=ds.y_train[idx], index=np.arange(30))
    write_json(gen / "manifest.json", {"num_images": 30, "num_shards": 1, "complete": True})
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "learner_probe.py"), "smoke", "--config", "digits",
                        "--generated", str(gen), "--seeds", "0", "1", "--out", str(tmp_path / "probe"), "--quiet",
                        "stage1.method=fixmatch", "num_threads=1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "probe" / "results.jsonl").read_text().splitlines()]
    assert [row["split_seed"] for row in rows] == [0, 1]
    for row in rows:
        assert 0 <= row["stage1_top1"] <= 1 and 0 <= row["stage3_top1"] <= 1 and row["stage1_cpu_seconds"] > 0


def test_a_damaged_learner_file_is_a_one_line_error_naming_it(tmp_path):
    from dpt_fast.ssl.train import net_meta, save_learner

    lcfg = load_config("digits").learner
    data, norm = _digits_data()
    model = train_learner(data, lcfg, "fixmatch", num_classes=10, norm=norm, seed=0, ckpt_dir=tmp_path / "ck",
                          fingerprint="a", progress=False)[0]
    path = tmp_path / "learner.safetensors"
    save_learner(path, model, net_meta(lcfg, 1, 10, norm))
    assert load_learner(path)[0] is not None
    nan = {k: v.clone() for k, v in model.state_dict().items()}
    next(v for v in nan.values() if v.is_floating_point()).fill_(float("nan"))
    model.load_state_dict(nan)
    save_learner(path, model, net_meta(lcfg, 1, 10, norm))
    with pytest.raises(UserError, match="NaN or inf.*re-run the stage"):
        load_learner(path)
    path.write_bytes(b"\x00\xff" * 100)
    with pytest.raises(UserError, match="learner.safetensors"):
        load_learner(path)


def test_learner_trajectory_script_follows_the_ema_model_from_its_start(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from dpt_fast.stages import run_stages

    run_stages(load_config("digits", ["num_threads=1"]), tmp_path / "run", [1], progress=False)  # SimCLR + UMAP
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "learner_trajectory.py"), "smoke", "--config", "digits",
                        "--stage1-from", str(tmp_path / "run" / "stage1"), "--seeds", "0", "--every", "2",
                        "--out", str(tmp_path / "traj"), "--quiet", "stage1.method=freematch",
                        "learner.init=simclr_umap", "learner.iterations=4", "num_threads=1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = [json.loads(line) for line in (tmp_path / "traj" / "results.jsonl").read_text().splitlines()]
    assert [k for k, _ in row["trajectory"]] == [2, 4]
    assert row["trajectory"][-1][1] == row["final_test_top1"]  # the returned model is the EMA model
    assert 0.3 < row["start_test_top1"] <= 1  # the SimCLR-UMAP start is far above chance (0.1)
    r = subprocess.run([sys.executable, str(root / "scripts" / "learner_trajectory.py"), "x", "--config", "digits",
                        "--stage1-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "traj")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nowhere" in r.stderr  # one line, no SimCLR run

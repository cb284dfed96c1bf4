"""Stage 3 on digits with fake generated shards in stage 2's format (shard-*.npz + manifest.json)."""
import numpy as np
import pytest

from dpt_fast.config import load_config
from dpt_fast.data import load_dataset
from dpt_fast.stages import stage1, stage3
from dpt_fast.stages.rundir import RunDir
from dpt_fast.utils import UserError, save_npz, write_json


@pytest.fixture(scope="module")
def pca_run(tmp_path_factory):
    """A finished stage 1 (the fast PCA baseline, 1 label per class) on digits."""
    cfg = load_config("digits", ["stage1.method=pca_logreg"])
    rd = RunDir(tmp_path_factory.mktemp("s3") / "run")
    m1 = stage1.run(cfg, rd, progress=False)
    write_json(rd.metrics(1), m1)
    return cfg, rd, m1


def write_fake_generation(out_dir, images, labels, shard_size=16):
    """Shards + manifest as dpt_fast.sampling.generate writes them."""
    n = len(labels)
    shards = (n + shard_size - 1) // shard_size
    for s in range(shards):
        sl = slice(s * shard_size, min(n, (s + 1) * shard_size))
        save_npz(out_dir / f"shard-{s:05d}.npz", images=images[sl], labels=labels[sl],
                 index=np.arange(n, dtype=np.int64)[sl])
    write_json(out_dir / "manifest.json", {"num_images": n, "num_shards": shards, "complete": True})


def _oracle_generation(cfg, k_per_class, seed=0):
    """'Generated' images that are real training images of each class: a perfectly faithful generator."""
    ds = load_dataset(cfg.data)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(ds.y_train == c), k_per_class, replace=False) for c in range(10)])
    return ds.x_train[idx], ds.y_train[idx]


def test_stage3_with_faithful_generated_images_beats_stage1_and_reports_both(pca_run):
    cfg, rd, m1 = pca_run
    x, y = _oracle_generation(cfg, 30)
    write_fake_generation(rd.generated, x, y)
    m = stage3.run(cfg, rd, progress=False)
    for key in ("top1", "stage1_top1", "seconds", "gain", "generated", "generated_used"):
        assert key in m
    assert m["stage1_top1"] == pytest.approx(m1["test_top1"])  # same classifier, same test images
    assert m["generated"] == m["generated_used"] == 300
    assert m["gain"] == pytest.approx(m["top1"] - m["stage1_top1"])
    assert m["top1"] > m["stage1_top1"] + 0.05  # 30 true images per class vs 1 label per class
    assert (rd.stage(3) / "head.safetensors").is_file()


def test_stage3_min_confidence_drops_generated_images_the_stage1_classifier_doubts(pca_run):
    cfg, rd, _ = pca_run
    x, y = _oracle_generation(cfg, 30, seed=1)
    y = y.copy()
    y[:60] = (y[:60] + 5) % 10  # 20 % wrong labels: a weak generator
    write_fake_generation(rd.generated, x, y)
    m_all = stage3.run(cfg, rd, progress=False)
    m_conf = stage3.run(load_config("digits", ["stage1.method=pca_logreg", "stage3.min_confidence=0.3"]), rd, progress=False)
    assert m_all["generated_used"] == 300
    assert 0 < m_conf["generated_used"] < 300
    assert m_all["generated_stage1_agreement"] == m_conf["generated_stage1_agreement"] < 0.8


def test_stage3_without_stage2_output_names_stage2(pca_run, tmp_path):
    cfg, rd, _ = pca_run
    import shutil

    root = tmp_path / "no_gen"
    shutil.copytree(rd.root, root)
    shutil.rmtree(root / "stage2", ignore_errors=True)
    with pytest.raises(UserError, match="--stage 2") as e:
        stage3.run(cfg, RunDir(root), progress=False)
    assert "\n" not in str(e.value)


def test_stage3_without_stage1_names_stage1(run_dir):
    with pytest.raises(UserError, match="--stage 1"):
        stage3.run(load_config("digits"), RunDir(run_dir), progress=False)


def test_stage3_rejects_generated_images_of_another_shape(pca_run, tmp_path):
    cfg, rd, _ = pca_run
    import shutil

    root = tmp_path / "bad_shape"
    shutil.copytree(rd.root, root)
    write_fake_generation(RunDir(root).generated, np.zeros((20, 1, 28, 28), np.uint8), np.arange(20, dtype=np.int64) % 10)
    with pytest.raises(UserError, match="re-run stage 2"):
        stage3.run(cfg, RunDir(root), progress=False)


def test_stage3_on_the_default_simclr_umap_space_embeds_generated_images_by_knn(run_dir):
    cfg = load_config("digits")
    rd = RunDir(run_dir)
    write_json(rd.metrics(1), stage1.run(cfg, rd, progress=False))
    x, y = _oracle_generation(cfg, 30)
    write_fake_generation(rd.generated, x, y)
    m = stage3.run(cfg, rd, progress=False)
    assert m["generated_used"] == 300 and 0.0 <= m["top1"] <= 1.0
    assert m["top1"] > m["stage1_top1"]  # true images of every class can only sharpen the boundaries


@pytest.mark.parametrize("labelled", [[0, 1, 2], [-1, 5, 9]])
def test_a_split_json_with_other_indices_is_refused_not_used(pca_run, tmp_path, labelled):
    import shutil

    cfg, rd, _ = pca_run
    root = tmp_path / "run"
    shutil.copytree(rd.root, root)
    x, y = _oracle_generation(cfg, 2)
    write_fake_generation(RunDir(root).generated, x, y)
    write_json(RunDir(root).split, {"labelled": labelled, "num_train": 1497})
    with pytest.raises(UserError, match="split.json") as e:
        stage3.run(cfg, RunDir(root), progress=False)
    assert "--stage 1" in str(e.value)

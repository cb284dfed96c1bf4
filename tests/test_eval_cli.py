"""`python -m dpt_fast.eval`: ADM's metrics through torch-fidelity, on tiny inputs of every kind, and its errors.

The network is torch-fidelity's InceptionV3 architecture with random (He-initialised) weights, saved as a plain
state dict like torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`. The metric formulas are checked
against copies of ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py) in numpy / scipy.
"""
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_fast.eval import adm
from dpt_fast.eval.__main__ import main

pytestmark = pytest.mark.usefixtures("one_thread")
SIDE = 16


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch_fidelity.feature_extractor_inceptionv3 as m

    with mock.patch.object(m.torch, "load", lambda *a, **k: {}), \
            mock.patch.object(m.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = m.FeatureExtractorInceptionV3("random", ["2048"], feature_extractor_weights_path="none")
    torch.manual_seed(0)
    for mod in net.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=0.05)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def images(n, seed, side=SIDE):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)  # NHWC, as ADM


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "samples").mkdir()
    for i, im in enumerate(images(6, 0)):
        Image.fromarray(im).save(d / "samples" / f"{i:03d}.png")
    np.savez(d / "ref.npz", arr_0=images(8, 1))  # ADM's reference batch layout
    return d


def run(*args, tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main([*map(str, args), "--json", str(out), "--quiet", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    return rc, (json.loads(out.read_text()) if rc == 0 else None), err


# -- copies of ADM's evaluator formulas ------------------------------------------------------------------------
def adm_fid(mu1, sigma1, mu2, sigma2):
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2)).real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def adm_inception_score(logits, split_size=5000):
    preds = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def adm_prec_recall(ref, sample, k=3):
    """ManifoldEstimator(nhood_sizes=(3,)) with float32 squared distances."""
    def d2(u, v):
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None], 0)

    r_ref = np.partition(d2(ref, ref), k, axis=1)[:, k]
    r_smp = np.partition(d2(sample, sample), k, axis=1)[:, k]
    d = d2(ref, sample)
    precision = (d <= r_ref[:, None]).any(0).mean()  # samples inside some reference ball
    recall = (d <= r_smp[None, :]).any(1).mean()  # references inside some sample ball
    return float(precision), float(recall)


def test_frechet_distance_is_adms():
    rng = np.random.default_rng(0)
    a, b = adm.statistics(rng.normal(size=(200, 64))), adm.statistics(rng.normal(0.3, 1.2, size=(150, 64)))
    assert adm.frechet_distance(a, b) == pytest.approx(adm_fid(a["mu"], a["sigma"], b["mu"], b["sigma"]), rel=1e-9)


@pytest.mark.slow
def test_folder_against_adm_reference_batch_matches_adms_formulas(weights, inputs, tmp_path, capsys):
    rc, m, err = run("--samples", inputs / "samples", "--reference", inputs / "ref.npz", "--inception-weights",
                     weights, "--metrics", "fid,sfid,is,prc,kid", tmp_path=tmp_path, capsys=capsys)
    assert rc == 0, err
    assert (m["num_samples"], m["num_reference"], m["reference_statistics"]) == (6, 8, "computed")
    net = adm.ADMInceptionV3(adm.EXTRACTOR, [adm.POOL, adm.SPATIAL, adm.LOGITS], feature_extractor_weights_path=str(weights))
    fs = adm.inception_features(adm.open_images(inputs / "samples", "--samples"), net, torch.device("cpu"))
    fr = adm.inception_features(adm.open_images(inputs / "ref.npz", "--reference"), net, torch.device("cpu"))
    assert fs[adm.SPATIAL].shape == (6, 17 * 17 * 7) and fs[adm.POOL].shape == (6, 2048)
    for key, name in (("fid", adm.POOL), ("sfid", adm.SPATIAL)):  # the formula itself: test_frechet_distance_is_adms
        assert m[key] == pytest.approx(adm.frechet_distance(adm.statistics(fs[name]), adm.statistics(fr[name])))
    assert m["is"] == pytest.approx(adm_inception_score(fs[adm.LOGITS]), rel=1e-6)
    assert (m["precision"], m["recall"]) == pytest.approx(adm_prec_recall(fr[adm.POOL], fs[adm.POOL]))
    assert np.isfinite(m["kid"])


@pytest.mark.slow
def test_reference_statistics_are_cached_and_precomputed_ones_are_used(weights, inputs, tmp_path, capsys):
    args = ("--samples", inputs / "samples", "--inception-weights", weights, "--metrics", "fid,sfid")
    _, first, _ = run(*args, "--reference", inputs / "ref.npz", tmp_path=tmp_path, capsys=capsys)
    _, again, _ = run(*args[:-1], "fid", "--reference", inputs / "ref.npz", tmp_path=tmp_path, capsys=capsys)
    assert again["reference_statistics"] == "cached" and again["fid"] == first["fid"]
    cached = next((tmp_path / "cache").glob("ref-*.npz"))
    z = np.load(cached)
    stats = tmp_path / "VIRTUAL_stats.npz"  # ADM-style precomputed statistics, no images
    np.savez(stats, mu=z["mu"], sigma=z["sigma"], mu_s=z["mu_s"], sigma_s=z["sigma_s"])
    rc, pre, err = run(*args, "--reference", stats, tmp_path=tmp_path, capsys=capsys)
    assert rc == 0, err
    assert pre["reference_statistics"] == "precomputed" and pre["fid"] == pytest.approx(first["fid"])
    assert pre["sfid"] == pytest.approx(first["sfid"])
    rc, _, err = run(*args[:-1], "fid,prc", "--reference", stats, tmp_path=tmp_path, capsys=capsys)
    assert rc == 2 and "statistics only" in err and err.count("\n") == 1


@pytest.mark.slow
def test_generated_shards_run_dir_and_npz_inputs_read_the_same_images(weights, inputs, tmp_path, capsys):
    x = images(6, 0).transpose(0, 3, 1, 2)
    gen = tmp_path / "run" / "stage2" / "generated"
    gen.mkdir(parents=True)
    for s, part in enumerate((x[:4], x[4:])):
        np.savez(gen / f"shard-{s:05d}.npz", images=part, labels=np.zeros(len(part), np.int64),
                 index=np.arange(len(part)))
    (gen / "manifest.json").write_text(json.dumps({"complete": True, "num_shards": 2, "num_images": 6}))
    np.savez(tmp_path / "ours.npz", images=x)
    common = ("--reference", inputs / "ref.npz", "--inception-weights", weights, "--metrics", "is")
    results = [run("--samples", s, *common, tmp_path=tmp_path, capsys=capsys)[1]
               for s in (inputs / "samples", gen, tmp_path / "run", tmp_path / "ours.npz")]
    assert all(r["num_samples"] == 6 for r in results)
    # IS of the logits: the same images in the same order (batches of another size: float rounding only)
    assert all(r["is"] == pytest.approx(results[0]["is"], rel=1e-7, abs=0) for r in results)


def test_errors_are_one_line_and_exit_2(weights, inputs, tmp_path, capsys):
    base = ("--samples", inputs / "samples", "--reference", inputs / "ref.npz")
    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed").mkdir()
    Image.fromarray(images(1, 2)[0]).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(images(1, 3, side=20)[0]).save(tmp_path / "mixed" / "b.png")
    np.savez(tmp_path / "big.npz", arr_0=images(3, 4, side=32))

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "x": Payload()}, evil)
    cases = [
        (base, "--inception-weights"),
        ((*base, "--inception-weights", tmp_path / "none.pth"), "--inception-weights .* no such file"),
        ((*base, "--inception-weights", evil), "refused, it holds pickled objects"),
        (("--samples", tmp_path / "empty", "--reference", inputs / "ref.npz", "--inception-weights", weights),
         "no PNG or JPEG images"),
        (("--samples", tmp_path / "mixed", "--reference", inputs / "ref.npz", "--inception-weights", weights),
         "images of different sizes"),
        (("--samples", inputs / "samples", "--reference", tmp_path / "big.npz", "--inception-weights", weights),
         "generate at the reference's resolution"),
        ((*base, "--inception-weights", weights, "--metrics", "fid,lpips"), "--metrics"),
    ]
    import re

    for args, msg in cases:
        rc, _, err = run(*args, tmp_path=tmp_path, capsys=capsys)
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)
        assert re.search(msg, err), (msg, err)


@pytest.mark.slow
def test_spatial_features_registered_with_torch_fidelity(weights, inputs):
    """sFID through torch-fidelity's own calculate_metrics: the registered extractor and its 'spatial' layer."""
    import torch_fidelity

    from dpt_fast.eval.fidelity import ImagesUint8

    x = torch.from_numpy(images(6, 0).transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(images(8, 1).transpose(0, 3, 1, 2).copy())
    m = torch_fidelity.calculate_metrics(input1=ImagesUint8(x), input2=ImagesUint8(y), fid=True, cuda=False,
                                         feature_extractor=adm.EXTRACTOR, feature_layer_fid=adm.SPATIAL,
                                         feature_extractor_weights_path=str(weights), cache=False, verbose=False,
                                         save_cpu_ram=True)
    net = adm.ADMInceptionV3(adm.EXTRACTOR, [adm.SPATIAL], feature_extractor_weights_path=str(weights))
    a = adm.statistics(net(x)[0].numpy())
    b = adm.statistics(net(y)[0].numpy())
    assert m[torch_fidelity.KEY_METRIC_FID] == pytest.approx(adm.frechet_distance(a, b), rel=1e-4)

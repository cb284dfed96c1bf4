import numpy as np
import pytest
import torch

from dpt_fast.config import DataConfig
from dpt_fast.data import load_dataset
from dpt_fast.eval import classifier_accuracy, generation_metrics
from dpt_fast.eval.fidelity import EXTRACTOR, FeatureNetExtractor
from dpt_fast.eval.feature_nets import shipped_feature_net
from dpt_fast.utils import UserError


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"))


@pytest.fixture(scope="module")
def real_vs_real(digits):
    return generation_metrics(digits.x_test, digits.y_test, digits.x_train, "digits")


def test_fid_is_small_between_real_splits_and_large_for_noise(digits, real_vs_real):
    noise = np.random.default_rng(0).integers(0, 256, size=digits.x_test.shape, dtype=np.uint8)
    m_noise = generation_metrics(noise, digits.y_test, digits.x_test, "digits")
    assert real_vs_real["fid"] < 2.0
    assert m_noise["fid"] > 30.0
    assert real_vs_real["is"] > 8.0 > 4.0 > m_noise["is"]  # 10 confident, balanced classes -> IS near 10
    assert m_noise["cas"] < 0.3


def test_precision_recall_are_fractions_and_high_for_real_images(real_vs_real):
    for k in ("precision", "recall", "f_score"):
        assert 0.0 <= real_vs_real[k] <= 1.0
    assert real_vs_real["precision"] > 0.8 and real_vs_real["recall"] > 0.8
    assert real_vs_real["num_generated"] == 300 and real_vs_real["num_real"] == 1497


def test_cas_matches_judge_accuracy_with_true_labels_and_chance_with_shuffled(digits, real_vs_real):
    acc = classifier_accuracy(digits.x_test, digits.y_test, "digits")
    assert real_vs_real["cas"] == pytest.approx(acc) and acc > 0.95
    per = real_vs_real["cas_per_class"]
    assert len(per) == 10 and all(0.0 <= v <= 1.0 for v in per)
    assert np.mean(per) == pytest.approx(acc, abs=0.01)  # balanced test split: mean of classes ~ overall
    shuffled = np.random.default_rng(1).permutation(digits.y_test)
    m = generation_metrics(digits.x_test[:100], shuffled[:100], digits.x_train, "digits")
    from dpt_fast.eval.accuracy import top1
    assert m["cas"] == pytest.approx(top1(digits.y_test[:100], shuffled[:100]), abs=0.03)  # judge ~ true labels
    assert m["cas"] < 0.3


def test_metrics_never_download(digits, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    import urllib.request
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    m = generation_metrics(digits.x_test[:40], digits.y_test[:40], digits.x_test[40:120], "digits")
    assert np.isfinite(m["fid"]) and m["feature_net"] == "shipped:digits"


def test_extractor_is_registered_and_returns_requested_features_in_order():
    import torch_fidelity.registry as reg

    assert reg.FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR] is FeatureNetExtractor
    fe = FeatureNetExtractor(EXTRACTOR, ["logits_unbiased", "features"], feature_extractor_weights_path=str(shipped_feature_net("digits")))
    logits, feats = fe(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    assert logits.shape == (2, 10) and feats.shape == (2, 128)


def test_bad_inputs_are_one_line_user_errors(digits, tmp_path):
    x, y = digits.x_test[:20], digits.y_test[:20]
    with pytest.raises(UserError, match="missing.pth"):
        generation_metrics(x, y, x, "digits", feature_net=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="judges 1x8x8"):
        generation_metrics(np.zeros((8, 1, 28, 28), np.uint8), np.zeros(8, np.int64), np.zeros((8, 1, 28, 28), np.uint8), "digits")
    with pytest.raises(UserError, match="uint8"):
        generation_metrics(x.astype(np.float32), y, x, "digits")
    with pytest.raises(UserError, match="labels"):
        generation_metrics(x, y[:5], x, "digits")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    with pytest.raises(UserError, match="bad.pth"):
        generation_metrics(x, y, x, "digits", feature_net=str(bad))


def test_data_without_a_shipped_feature_net_skips_the_metrics_with_a_note(digits):
    m = generation_metrics(digits.x_test[:20], digits.y_test[:20], digits.x_test[20:40], "imagefolder")
    assert m["fid"] is None and m["is"] is None and m["cas"] is None and m["precision"] is None
    assert "eval.feature_net" in m["metrics_skipped"] and m["num_generated"] == 20 and m["num_real"] == 20


@pytest.mark.slow
def test_inception_weights_file_is_used_without_download(digits, tmp_path, monkeypatch):
    """The ImageNet path: a local torch-fidelity Inception .pth (here: random weights of the right shapes)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    monkeypatch.setattr(inc, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    state = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    path = tmp_path / "inception.pth"
    torch.save(state, path)

    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(inc, "load_state_dict_from_url", refuse)
    # Inception FID's 2048x2048 eigen-decomposition alone costs ~30 CPU-s; the extractor path is under test here,
    # so IS and precision/recall run through the real Inception and FID is left out.
    import torch_fidelity

    real_calculate = torch_fidelity.calculate_metrics

    def without_fid(**kw):
        assert kw["feature_extractor"] == "inception-v3-compat" and kw["feature_extractor_weights_path"] == str(path)
        return {**real_calculate(**{**kw, "fid": False}), torch_fidelity.KEY_METRIC_FID: 0.0}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", without_fid)
    m = generation_metrics(digits.x_test[:5], digits.y_test[:5], digits.x_test[5:10], "imagefolder", feature_net=str(path))
    assert 0 <= m["precision"] <= 1 and m["is"] >= 0.99 and m["cas"] is None

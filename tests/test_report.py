import json

import numpy as np
import torch
from PIL import Image

from dpt_fast.config import load_config
from dpt_fast.eval import save_grid
from dpt_fast.eval.report import write_report
from dpt_fast.stages.rundir import RunDir
from dpt_fast.utils import write_json


def _stage1(rd):
    write_json(rd.metrics(1), {"pseudo_label_accuracy": 0.8, "labelled": 10, "unlabelled": 1487, "seconds": 12.5,
                               "test_top1": 0.75, "fingerprint": "x"})


def _pngs_ok(rd, names):
    for n in names:
        with Image.open(rd.root / n) as img:
            assert img.format == "PNG" and img.size[0] > 100


def test_partial_report_after_stage_1_only(run_dir):
    rd = RunDir(run_dir)
    _stage1(rd)
    rep = write_report(load_config("digits"), rd)
    assert rep["stages_finished"] == [1]
    assert rep["summary"]["pseudo_label_accuracy"] == 0.8 and rep["summary"]["stage1_top1"] == 0.75
    assert rep["summary"]["fid"] is None and rep["summary"]["top1_gain"] is None
    assert rep["plots"] == ["top1.png"]
    _pngs_ok(rd, ["top1.png"])
    md = rd.report_md.read_text()
    assert "Partial report" in md and "--stage 2" in md and "| stage-1 pseudo-label accuracy (train) | 0.8000 |" in md
    assert json.loads(rd.report_json.read_text())["timings_seconds"] == {"stage1": 12.5, "total": 12.5}


def test_full_report_has_all_metrics_timings_and_embedded_plots(run_dir):
    rd = RunDir(run_dir)
    _stage1(rd)
    write_json(rd.metrics(2), {"fid": 3.5, "is": 9.1, "precision": 0.7, "recall": 0.6, "cas": 0.93,
                               "cas_per_class": [0.9] * 9 + [None], "images_per_second": 150.0, "seconds": 100.0,
                               "sampler_backend": "cpp"})
    write_json(rd.stage(2) / "train_history.json", {"step": list(range(1, 101)), "loss": list(np.linspace(1, 0.1, 100)),
                                                     "lr": [2e-4] * 100})
    write_json(rd.metrics(3), {"top1": 0.8, "stage1_top1": 0.75, "seconds": 7.5})
    save_grid(np.zeros((20, 1, 8, 8), np.uint8), np.arange(20) % 10, rd.samples_png)
    rep = write_report(load_config("digits"), rd)
    s = rep["summary"]
    assert rep["stages_finished"] == [1, 2, 3]
    assert abs(s["top1_gain"] - 0.05) < 1e-9 and s["cas"] == 0.93 and s["images_per_second"] == 150.0
    assert rep["timings_seconds"]["total"] == 120.0
    assert rep["environment"]["torch"] == torch.__version__
    assert rep["environment"]["backends"] == {"stage2.sampler_backend": "cpp"}
    assert rep["config"]["k_per_class"] == 4 and rep["config"]["feature_net"] == "shipped:digits"
    assert set(rep["plots"]) == {"samples.png", "train_loss.png", "top1.png", "cas_per_class.png"}
    _pngs_ok(rd, ["train_loss.png", "top1.png", "cas_per_class.png"])
    md = rd.report_md.read_text()
    for name in rep["plots"]:
        assert f"]({name})" in md
    assert "Partial" not in md and "+0.0500" in md and "| FID (feature net) | 3.500 |" in md


def test_missing_or_malformed_optional_inputs_do_not_stop_the_report(run_dir):
    rd = RunDir(run_dir)
    rep = write_report(load_config("digits"), rd)  # nothing finished yet
    assert rep["stages_finished"] == [] and rd.report_md.is_file()
    _stage1(rd)
    rd.stage(2).mkdir(parents=True)
    rd.metrics(2).write_text("{not json")
    write_json(rd.stage(2) / "train_history.json", {"loss": "oops"})
    write_json(rd.metrics(3), {"top1": "n/a", "seconds": None})
    rep = write_report(load_config("digits"), rd)
    assert rep["stages_finished"] == [1, 3]
    assert rep["summary"]["stage3_top1"] is None and "train_loss.png" not in rep["plots"]

"""Every config key is classified by what it invalidates, and flipping it invalidates exactly that.

A cache that keys on too little reuses stale work (a changed stage1.ssl_noise used to reuse the old SimCLR
encoder); one that keys on too much redoes hours of work for nothing. For each config key in turn, this flips
its value on the digits preset and compares the set of changed keys with the table below:

    stage1, stage2, stage3   the stage fingerprints (dpt_fast.stages.fingerprint): the stage runs again
    simclr                   the trained SimCLR encoder (stage1.ssl_fingerprint)
    umap                     the UMAP coordinates (stage1.umap_fingerprint)
    train                    the stage-2 weights / checkpoints (stage2.train_fingerprint)
    generation               the generated images (the identity `generate` writes into its manifest)

A NEW CONFIG KEY MUST BE ADDED TO `AFFECTS` below, with the caches whose outputs it changes; the test fails
until it is.
"""
import json
import typing
from dataclasses import fields, is_dataclass

import pytest
import torch

from dpt_fast.config import CHOICES, Config, LearnerConfig, load_config
from dpt_fast.diffusion import make_schedule
from dpt_fast.sampling import generate
from dpt_fast.stages import fingerprint
from dpt_fast.stages.stage1 import ssl_fingerprint, umap_fingerprint
from dpt_fast.stages.stage2 import generation_settings, train_fingerprint

S1 = {"stage1", "stage2", "stage3"}  # stage fingerprints are cumulative: a stage depends on those before it
S2 = {"stage2", "stage3"}
S3 = {"stage3"}
SSL = {"simclr", "umap"}  # the UMAP coordinates are made from the encoder's features
WEIGHTS = {"train", "generation"}  # the generated images are made by the weights
GEN = {"generation"}

LEARNER_KEYS = [f.name for f in fields(LearnerConfig)]

# key -> the caches it invalidates. Add every new config key here.
AFFECTS: dict[str, set[str]] = {
    "name": set(),
    "seed": S1 | SSL | WEIGHTS,
    "device": set(),  # runtime keys (config.RUNTIME_KEYS): how to run, not what
    "num_threads": set(),
    "data.name": S1 | SSL | WEIGHTS,
    "data.root": S1 | SSL | WEIGHTS,
    "data.image_size": S1 | SSL | WEIGHTS,
    "data.on_bad_image": S1 | SSL | WEIGHTS,
    "data.test_root": S1 | SSL,  # stage 2 trains on the training images only (a new split shows in the labels)
    "data.image_root": S1 | SSL,
    "data.stream": S1,  # decode the images while stage 2 trains or hold them: the same batches
    "split.labels_per_class": S1,  # the encoder and UMAP never see labels; stage 2 keys on the labels themselves
    "split.fraction": S1,
    "split.seed": S1,
    "split.subset_file": S1,
    "stage1.method": S1,
    "stage1.ssl_epochs": S1 | SSL,
    "stage1.ssl_batch_size": S1 | SSL,
    "stage1.ssl_lr": S1 | SSL,
    "stage1.ssl_temperature": S1 | SSL,
    "stage1.ssl_noise": S1 | SSL,
    "stage1.feature_dim": S1 | SSL,
    "stage1.width": S1 | SSL,
    "stage1.umap_dim": S1 | {"umap"},
    "stage1.umap_neighbors": S1 | {"umap"},
    "stage1.umap_min_dist": S1 | {"umap"},
    "stage1.umap_epochs": S1 | {"umap"},
    "stage1.knn_transform": S1,
    "stage1.logreg_c": S1,
    "stage1.pca_dim": S1,
    "stage1.backbone": S1,  # the backbone feature caches key on the loaded model itself (BackboneSpace.identity)
    "stage1.backbone_weights": S1,
    "stage1.backbone_image_size": S1,
    "stage1.backbone_crop": S1,
    "stage1.backbone_batch_size": S1,
    "stage1.backbone_precision": S1,
    **{f"model.{k}": S2 | WEIGHTS for k in ("preset", "img_size", "patch_size", "in_chans", "embed_dim", "depth",
                                             "num_heads", "mlp_ratio", "qkv_bias", "mlp_time_embed", "conv", "skip",
                                             "conditioning", "pos_embed_init")},
    "model.use_checkpoint": S2,  # recomputes the same activations: memory, not weights
    **{f"diffusion.{k}": S2 | WEIGHTS for k in ("schedule", "beta_0", "beta_1", "discrete_beta_start",
                                                 "discrete_beta_end", "num_timesteps", "prediction")},
    "train.steps": S2 | GEN,  # more steps continue the same run; the images come from the last step's weights
    "train.ckpt_every": S2,
    "train.keep_checkpoints": S2,
    "train.log_every": S2,
    "train.compile": S2,  # torch.compile: the same weights up to rounding
    **{f"train.{k}": S2 | WEIGHTS for k in ("batch_size", "lr", "weight_decay", "weight_decay_on", "betas",
                                             "warmup_steps", "warmup_from_zero", "lr_decay", "ema_decay", "ema_warmup",
                                             "p_uncond", "grad_clip", "t_min", "precision")},
    **{f"sample.{k}": S2 | GEN for k in ("steps", "order", "method", "algorithm", "skip_type", "cfg_scale", "t_end")},
    "sample.precision": S2 | GEN,  # (flipped fp32 -> bf16: 'auto' resolves per device)
    "sample.backend": S2,  # the C++ and Python updates are the same formula (tests/test_dpm_solver.py parity)
    "sample.cuda_graph": S2,
    "gen.k_per_class": S2,  # image j does not depend on K: a larger K keeps the finished shards
    "gen.batch_size": S2,  # each image's noise is its own: batching does not change it
    "gen.shard_size": S2 | GEN,
    "eval.feature_net": S2,
    "eval.num_real": S2,
    "eval.num_gen_per_class": S2,
    "eval.fid": S2,
    "eval.cas_steps": S2,
    "stage3.logreg_c": S3,
    "stage3.generated_weight": S3,
    "stage3.min_confidence": S3,
    **{f"learner.{k}": set() for k in LEARNER_KEYS},  # read by the learner methods only (LEARNER_AFFECTS)
}

# Under stage1.method=freematch learner.init=simclr_umap (the embedded default's route) the learner reads the
# `learner` section and, to start from, the SimCLR and UMAP keys, not the other stage1 keys; the rest as above.
LEARNER_AFFECTS: dict[str, set[str]] = {
    **{f"learner.{k}": S1 for k in LEARNER_KEYS},
    "stage1.pca_dim": set(),
    **{f"stage1.backbone{k}": set() for k in ("", "_weights", "_image_size", "_crop", "_batch_size", "_precision")},
}


def _keys(obj=None, prefix=""):
    """(dotted key, annotated type) of every config key."""
    obj = Config() if obj is None else obj
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


# Keys whose default resolves differently per device: compared between these two values instead.
BASE = {"sample.precision": "fp32"}
FLIP = {"sample.precision": "bf16"}


def _flipped(key, typ, value):
    """Another value of the key's type (not validated: fingerprints do not need valid configs)."""
    if key in FLIP:
        return FLIP[key]
    if key in CHOICES:
        return next(c for c in CHOICES[key] if c != value)
    if typ is bool or typing.get_origin(typ) is typing.Union:  # bool or Optional[bool]
        return not value
    if typ is int:
        return value + 1
    if typ is float:
        return value * 2 if value else 0.5
    if typ is str:
        return value + "x"
    if typing.get_origin(typ) is tuple:
        return tuple(v / 2 for v in value)
    raise AssertionError(f"{key}: no flip for type {typ}")


def _set(cfg, key, value):
    *path, last = key.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, last, value)


_LABELS = torch.arange(40) % 10  # stage 2 keys on the pseudo-labels themselves; held fixed here


def _generation_identity(cfg, tmp_path, cache={}):
    """The identity generate() records for stage 2's call with this config (a do-nothing model, 1 image a class)."""
    settings = {**generation_settings(cfg), "k_per_class": 1, "batch_size": 10}  # neither is in the identity
    model_id = f"{train_fingerprint(cfg, _LABELS)}@{cfg.train.steps}"
    key = json.dumps([settings, model_id, cfg.to_dict()["diffusion"]], sort_keys=True)
    if key not in cache:
        out = tmp_path / f"gen{len(cache)}"
        generate(lambda x, t, y: torch.zeros_like(x), make_schedule(cfg.diffusion), range(10), shape=(1, 8, 8),
                 out_dir=out, null_class=10, device="cpu", progress=False, model_id=model_id, **settings)
        cache[key] = json.loads((out / "manifest.json").read_text())["identity"]
    return cache[key]


def _caches(cfg, tmp_path) -> dict:
    return {"stage1": fingerprint(cfg, 1), "stage2": fingerprint(cfg, 2), "stage3": fingerprint(cfg, 3),
            "simclr": ssl_fingerprint(cfg), "umap": umap_fingerprint(cfg), "train": train_fingerprint(cfg, _LABELS),
            "generation": _generation_identity(cfg, tmp_path)}


def test_every_config_key_is_classified():
    keys = {k for k, _ in _keys()}
    missing = sorted(keys - set(AFFECTS))
    assert not missing, (f"config keys {missing} are not classified: add each to AFFECTS in {__file__} with the "
                         "caches whose outputs it changes (see the module docstring)")
    assert not sorted(set(AFFECTS) - keys), f"AFFECTS in {__file__} lists keys that no longer exist"


LEARNER_ROUTE = ("stage1.method=freematch", "learner.net=cnn", "learner.init=simclr_umap")


@pytest.mark.parametrize("route", ["simclr_umap", "freematch"])
@pytest.mark.parametrize("key, typ", list(_keys()), ids=lambda v: v if isinstance(v, str) else "")
def test_flipping_a_key_invalidates_exactly_the_caches_that_read_it(key, typ, route, tmp_path):
    if key not in AFFECTS:
        pytest.fail(f"config key {key!r} is not classified: add it to AFFECTS in {__file__}")
    overrides = LEARNER_ROUTE if route == "freematch" else ()
    expected = {**AFFECTS, **LEARNER_AFFECTS}[key] if route == "freematch" else AFFECTS[key]
    base, cfg = load_config("digits", overrides), load_config("digits", overrides)
    for c in (base, cfg):
        for k, v in BASE.items():
            _set(c, k, v)
    *path, last = key.split(".")
    section = cfg
    for p in path:
        section = getattr(section, p)
    _set(cfg, key, _flipped(key, typ, getattr(section, last)))
    before, after = _caches(base, tmp_path), _caches(cfg, tmp_path)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == expected, f"flipping {key} invalidates {sorted(changed)}, the table says {sorted(expected)}"


def test_under_a_cosine_lr_decay_train_steps_changes_the_weights(tmp_path):
    """The cosine ends at train.steps, so every step's weights depend on it: more steps train again instead of
    continuing (with the constant LR they continue the same run, as the table says)."""
    base = load_config("digits", ["train.lr_decay=cosine"])
    longer = load_config("digits", ["train.lr_decay=cosine", f"train.steps={base.train.steps + 1}"])
    before, after = _caches(base, tmp_path), _caches(longer, tmp_path)
    assert {name for name in before if before[name] != after[name]} == S2 | WEIGHTS

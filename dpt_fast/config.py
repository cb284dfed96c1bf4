"""Configuration: nested dataclasses, named presets, YAML files and `key=value` overrides.

    cfg = load_config("mnist5k", ["seed=1", "train.steps=200"])

A preset is a dict of overrides applied to the defaults below; a YAML file is the same dict, optionally
naming the preset it starts from (`preset: digits`). Unknown keys and values of the wrong type are
`UserError`s that name the key and list what is allowed.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .utils import UserError, read_yaml


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    name: str = "mnist5k"  # mnist5k | digits | imagefolder | cifar10 | mnist_idx | latents
    root: str = ""  # directory of a user data set (imagefolder, cifar10, mnist_idx, latents)
    image_size: int = 0  # 0: the data set's own size; for imagefolder the crop size
    on_bad_image: str = "skip"  # skip | error
    # Held-out ImageFolder (same class folders as the training one) for the stage-1/3 top-1 of imagefolder and
    # latents; "" = `val/` (else `test/`) beside a `train/` folder (ImageNet layout), else (imagefolder) 10 %
    # of each class held out.
    test_root: str = ""
    # latents: the ImageFolder the latents were prepared from, when it is no longer at the manifest's `root`.
    image_root: str = ""
    # imagefolder, stage 2: true decodes the training images batch by batch while training (DALI, on the GPU with
    # CUDA) instead of holding them in memory; None (unset) streams when they would take more than 16 GiB as uint8.
    stream: Optional[bool] = None


@dataclass
class SplitConfig:
    labels_per_class: int = 1  # k labelled images per class (used when fraction == 0)
    fraction: float = 0.0  # if > 0: this fraction of the training set is labelled, stratified
    seed: int = 0
    subset_file: str = ""  # a DPT/MSN-style list of labelled file names, overrides the above


@dataclass
class Stage1Config:
    # simclr_umap | pca_logreg | features (a frozen backbone: MSN or timm, + the paper's logistic regression,
    # the paper's ImageNet recipe) | freematch | fixmatch (a classifier trained end to end, the paper's CIFAR-10
    # recipe: the `learner` section)
    method: str = "simclr_umap"
    ssl_epochs: int = 20  # SimCLR epochs over the training images
    ssl_batch_size: int = 256
    ssl_lr: float = 1e-3
    ssl_temperature: float = 0.2
    ssl_noise: float = 0.2  # max std of the Gaussian pixel noise half of the SimCLR views get ([0, 1] pixels)
    feature_dim: int = 128  # SimCLR projection-head output (the backbone's features are 4 * width wide)
    width: int = 24  # encoder CNN base width
    umap_dim: int = 10
    umap_neighbors: int = 15
    umap_min_dist: float = 0.1
    umap_epochs: int = 200  # UMAP layout epochs
    knn_transform: int = 5  # neighbours used to embed unseen images into the UMAP space
    # Inverse L2 strength of the multinomial logistic regression (scikit-learn's C); 0 = the method's default:
    # 1 for simclr_umap and pca_logreg, 400 for features (= the paper's lambda = 0.0025 / N).
    logreg_c: float = 0.0
    pca_dim: int = 50  # pca_logreg only
    # features only: "msn" (an official MSN checkpoint, DPT's stage-1 feature) or a timm model name
    backbone: str = ""
    backbone_weights: str = ""  # features only: local weights file (safetensors or .pth/.pth.tar); nothing is downloaded
    backbone_image_size: int = 0  # features only: input side in pixels; 0 = the model's (224 for MSN)
    # features only: Resize(round(side / crop)) + CenterCrop(side) before the backbone; 0 = the backbone's own:
    # 0.875 for msn (Resize 256 + CenterCrop 224, MSN's / DPT's evaluation transform), 1.0 for timm models.
    backbone_crop: float = 0.0
    # features only: auto (bf16 autocast + TF32 on CUDA, fp32 on CPU) | fp32 | tf32 | bf16 | fp16 (the official
    # accelerate --mixed_precision fp16)
    backbone_precision: str = "auto"
    backbone_batch_size: int = 128  # features only: images per backbone forward pass


@dataclass
class LearnerConfig:
    """stage1.method=freematch | fixmatch and their stage-3 retraining. Defaults: TorchSSL's CIFAR-10 run (DPT's
    cifar10_experiment/TorchSSL config), except fairness_weight (FreeMatch's paper; DPT's config has 0)."""

    net: str = "wrn28_2"  # wrn28_2 (TorchSSL's WRN-28-2, the paper's) | cnn (small CNN for the embedded data)
    width: int = 16  # cnn only: base width (widths w, 2w, 4w)
    # "" = random (TorchSSL's) | simclr | simclr_umap: the cnn's conv layers start from a SimCLR encoder trained
    # first on the training images without labels (the stage1.ssl_* keys; stage1.width must equal learner.width),
    # its linear head from a logistic regression (C: stage1.logreg_c) on the labelled set's features (simclr) or
    # on the labels stage1.method=simclr_umap's classifier gives the training images (simclr_umap); in stage 3
    # the labelled set includes the generated images
    init: str = ""
    iterations: int = 1048576  # training iterations (2^20); stage 3 trains as many again
    batch_size: int = 64  # labelled images per iteration
    uratio: int = 7  # unlabelled images per labelled one (mu): 7 x 64 weak + 7 x 64 strong views
    lr: float = 0.03  # SGD with Nesterov momentum, lr * cos(pi * cosine_cycles * k / iterations) at iteration k
    momentum: float = 0.9
    weight_decay: float = 5e-4  # not on biases and BatchNorm
    cosine_cycles: float = 0.4375  # 7/16
    ema: float = 0.999  # EMA of the weights; the EMA model gives the pseudo-labels and the top-1
    bn_momentum: float = 0.001  # BatchNorm running-statistics momentum (torch convention; TorchSSL's 0.001)
    threshold_momentum: float = 0.999  # FreeMatch: EMA momentum of time_p, p_model and label_hist
    p_cutoff: float = 0.95  # FixMatch: the fixed confidence threshold
    unsup_weight: float = 1.0  # lambda_u
    fairness_weight: float = 0.01  # FreeMatch: lambda_f of the self-adaptive fairness term (0 = off)
    randaug_ops: int = 3  # strong view: RandAugment ops per image (then Cutout)
    flip: bool = True  # weak and strong views: random horizontal flip (off for digits)
    crop_pad: int = 4  # weak and strong views: random crop after reflect-padding this many pixels
    ckpt_every: int = 5000  # iterations between resumable checkpoints
    eval_batch_size: int = 1024  # images per forward pass when predicting


@dataclass
class ModelConfig:
    """U-ViT hyper-parameters, named as the official constructor's keywords."""

    preset: str = "uvit_mnist"  # a key of dpt_fast.models.uvit presets; the fields below override it when set
    img_size: int = 0
    patch_size: int = 0
    in_chans: int = 0
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    mlp_ratio: float = 0.0
    qkv_bias: Optional[bool] = None  # None: the preset's value
    mlp_time_embed: Optional[bool] = None
    conv: Optional[bool] = None
    skip: Optional[bool] = None
    conditioning: str = "token"  # token (the paper's) | adaln (DiT-style adaLN-Zero)
    pos_embed_init: str = ""  # "" = the preset's | trunc_normal (official, std .02) | sincos (2-D sin-cos start)
    use_checkpoint: bool = False


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear (continuous VP, beta 0.1 -> 20) | discrete (SD scaled-linear betas)
    beta_0: float = 0.1
    beta_1: float = 20.0
    discrete_beta_start: float = 0.00085
    discrete_beta_end: float = 0.012
    num_timesteps: int = 1000
    prediction: str = "eps"  # eps (the paper's) | v: what the network predicts (v = alpha eps - sigma x0)


@dataclass
class TrainConfig:
    """Stage-2 training. The optimiser values (AdamW 2e-4, weight decay 0.03, betas (0.99, 0.99), p_uncond 0.15)
    are U-ViT's; steps, warm-up, EMA and clipping are sized for short runs. The paper's full recipe is the
    imagenet256_uvit_l / imagenet256_uvit_h presets (docs/PAPER.md)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.03
    # all: every parameter decays (official U-ViT/DPT: one AdamW group) | matrices: not biases, norms, pos_embed
    weight_decay_on: str = "matrices"
    betas: tuple[float, float] = (0.99, 0.99)
    warmup_steps: int = 100  # linear LR warm-up, then constant
    # True: step s (from 0) has LR lr * min(1, s / warmup_steps), so the first step's is 0 (official U-ViT/DPT
    # LambdaLR); False: lr * min(1, (s + 1) / warmup_steps).
    warmup_from_zero: bool = False
    # After the warm-up: none = constant LR (U-ViT's) | cosine = a cosine down to 0 at train.steps (then the
    # weights depend on train.steps: changing it starts stage 2 again instead of continuing)
    lr_decay: str = "none"
    ema_decay: float = 0.999
    # True: decay min(ema_decay, (1 + n) / (10 + n)) after n updates (short runs); False: ema_decay from the
    # first step (official U-ViT/DPT, EMA started as a copy of the weights).
    ema_warmup: bool = True
    p_uncond: float = 0.15
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (official U-ViT/DPT)
    # Continuous ('linear') schedule: training times t ~ U(t_min, 1); official U-ViT sde.py draws U(0, 1) (0).
    # The discrete schedule always draws n ~ U{1..N} (official train_ldm_discrete).
    t_min: float = 0.001
    ckpt_every: int = 200  # steps between resumable checkpoints
    keep_checkpoints: int = 2
    log_every: int = 50
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model (first steps compile; the weights match eager up to rounding)


@dataclass
class SampleConfig:
    steps: int = 20  # DPM-Solver model evaluations (NFE)
    order: int = 2
    # multistep | singlestep (DPM-Solver-fast: orders mixed to spend exactly `steps` NFE, the official DPT
    # sampler with order 3) | singlestep_fixed
    method: str = "multistep"
    algorithm: str = "dpmsolver++"  # dpmsolver | dpmsolver++
    skip_type: str = "time_uniform"  # time_uniform | logSNR | time_quadratic
    t_end: float = 0.0  # where sampling ends; 0 = the schedule's default: 1e-4 for linear, 1/N for discrete
    cfg_scale: float = 0.4  # U-ViT/DPT convention: eps = eps_c + s * (eps_c - eps_u)
    backend: str = "auto"  # auto | cpp | python: the per-step update
    cuda_graph: bool = True
    precision: str = "auto"  # the network's: auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16; solver state fp32


@dataclass
class GenConfig:
    k_per_class: int = 50  # pseudo images per class (paper: 128)
    batch_size: int = 250
    shard_size: int = 1000


@dataclass
class EvalConfig:
    feature_net: str = ""  # safetensors of the FID/CAS feature network; "" = the one shipped for the data set
    num_real: int = 0  # real images for FID; 0 = the whole test split
    num_gen_per_class: int = 0  # generated images per class that stage 2 evaluates; 0 = all of them
    fid: bool = True
    # The literature's CAS (Ravuri & Vinyals 2019): training steps (of 64) of the small classifier trained only on
    # the generated images and tested on the real test split; 0 = skip. Our `cas` is another metric: the share of
    # generated images the judge (feature_net) puts in their class.
    cas_steps: int = 150


@dataclass
class Stage3Config:
    logreg_c: float = 0.0  # 0 = the C stage 1 used
    generated_weight: float = 1.0  # sample weight of a generated image relative to a real labelled one
    # Not the paper's (which uses all K images): > 0 drops generated images to which the stage-1 classifier
    # gives less than this probability of the class they were generated for.
    min_confidence: float = 0.0


@dataclass
class Config:
    name: str = "mnist5k"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = 0  # torch CPU threads, 0 = torch's default
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stage3: Stage3Config = field(default_factory=Stage3Config)

    def to_dict(self) -> dict:
        return _plain(asdict(self))

    def identity(self) -> dict:
        """The config without its RUNTIME_KEYS: what a run directory's config.yaml must agree on."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}

    def fingerprint(self, *sections: str) -> str:
        """A short hash of the named sections (plus `seed`), to tell whether stage outputs are stale."""
        d = self.to_dict()
        sub = {"seed": d["seed"], **{s: d[s] for s in sections}}
        return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


# Keys that say how this invocation runs, not what it computes: they never change a stage's outputs, so no
# fingerprint reads them, and changing them alone does not rewrite a run directory's config.yaml.
RUNTIME_KEYS = ("device", "num_threads")

# Allowed values of string keys (checked on load).
CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("mnist5k", "digits", "imagefolder", "cifar10", "mnist_idx", "latents"),
    "data.on_bad_image": ("skip", "error"),
    "stage1.method": ("simclr_umap", "pca_logreg", "features", "freematch", "fixmatch"),
    "stage1.backbone_precision": ("auto", "fp32", "tf32", "bf16", "fp16"),
    "learner.net": ("wrn28_2", "cnn"),
    "learner.init": ("", "simclr", "simclr_umap"),
    "model.conditioning": ("token", "adaln"),
    "model.pos_embed_init": ("", "trunc_normal", "sincos"),
    "diffusion.schedule": ("linear", "discrete"),
    "diffusion.prediction": ("eps", "v"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.weight_decay_on": ("matrices", "all"),
    "train.lr_decay": ("none", "cosine"),
    "sample.precision": ("auto", "fp32", "bf16"),
    "sample.method": ("multistep", "singlestep", "singlestep_fixed"),
    "sample.algorithm": ("dpmsolver", "dpmsolver++"),
    "sample.skip_type": ("time_uniform", "logSNR", "time_quadratic"),
    "sample.backend": ("auto", "cpp", "python"),
}

# ----------------------------------------------------------------------------------------------
# Presets: overrides on top of the defaults above.
# ----------------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: MNIST-5k (4,000 train / 1,000 test), all three stages in minutes on CPU.
    # Stage 2 is tuned for a CPU budget of ~2,000 steps (README, "Stage-2 tuning"): U-ViT's optimiser and
    # eps-prediction with CFG scale 0.4 (the dataclass defaults) learn the class conditioning only after far
    # more steps than a CPU run has.
    "mnist5k": {
        # Stage 1 (docs/LEARNER.md): FreeMatch fine-tuning of the SimCLR encoder, its head started at the
        # SimCLR-UMAP classifier; short-run values for the EMA (0.9), BatchNorm statistics (momentum 0.1) and
        # FreeMatch's threshold EMA (0.99): TorchSSL's 0.999s are sized for 2^20 iterations, not 150; lr 0.01, a
        # fine-tuning rate: TorchSSL's 0.03 from scratch knocks the started network down (split seed 2: test top-1
        # 0.953 at the start, 0.64 after 25 iterations, 0.74 at the end; with 0.01: 0.969).
        "stage1": {"method": "freematch"},
        "learner": {"net": "cnn", "width": 24, "init": "simclr_umap", "iterations": 150, "batch_size": 32,
                    "lr": 0.01, "ema": 0.9, "bn_momentum": 0.1, "threshold_momentum": 0.99, "flip": False, "crop_pad": 2,
                    "ckpt_every": 50},
        "diffusion": {"prediction": "v"},
        # lr 2e-3: the model is still under-trained at 2,000 steps (README, "Stage-2 tuning": FID 3.29 / 3.44 on
        # split seeds 0 / 1 against 4.22 / 4.23 at 1e-3; 3e-3 and a cosine decay are worse).
        "train": {"steps": 2000, "batch_size": 64, "lr": 2e-3, "betas": [0.9, 0.99], "warmup_steps": 100},
        # First-order DPM-Solver++ (= DDIM): the second-order multistep update extrapolates the difference of
        # successive x0 predictions, which for this briefly trained model is mostly noise -- on the last
        # time-uniform step (lambda 1.75 -> 5.75) by 2.9x: the speckle of README "Stage-2 tuning".
        "sample": {"cfg_scale": 3.0, "order": 1},
    },
    # The dataclass defaults (U-ViT's optimiser and eps-prediction, CFG 0.4, with a short run's warm-up, EMA,
    # clipping, K and sampler), for other data at a scale you set (docs/REAL_DATA.md): data.*, model.preset,
    # train.steps / batch_size. Not the paper's recipe: that is the imagenet256_uvit_* presets below.
    "base": {"name": "base"},
    # The paper's CIFAR-10 protocol (DPT's cifar10_experiment, docs/PAPER.md): FreeMatch on WRN-28-2 with 4
    # labels per class, TorchSSL's iterations (2^20) and optimiser (the learner defaults) and DPT's config
    # (no fairness term: its FreeMatch has ent_loss_ratio 0); stage 3 retrains it with 1001 generated images per
    # class (DPT's `generate.sh 1000`: indices 0..1000). The paper's CIFAR-10 generator was EDM; stage 2 here is
    # U-ViT's official CIFAR-10 config (configs/cifar10_uvit_small.py: U-ViT-S/2, 500k steps of 128, AdamW 2e-4,
    # betas (0.99, 0.999), weight decay 0.03 on every parameter, warm-up 2,500 steps from 0; train.py: EMA
    # 0.9999 from the first step, no clipping, continuous VP with t ~ U(0, 1)), made class-conditional, and
    # DPT's U-ViT sampler (DPM-Solver-fast, order 3, 50 NFE, CFG 0.4).
    "cifar10": {
        "name": "cifar10",
        "data": {"name": "cifar10"},
        "split": {"labels_per_class": 4},
        "stage1": {"method": "freematch"},
        "learner": {"fairness_weight": 0.0},
        "model": {"preset": "uvit_s2_pixel32"},
        "diffusion": {"schedule": "linear", "beta_0": 0.1, "beta_1": 20.0, "prediction": "eps"},
        "train": {"steps": 500000, "batch_size": 128, "lr": 2e-4, "weight_decay": 0.03, "weight_decay_on": "all",
                  "betas": [0.99, 0.999], "warmup_steps": 2500, "warmup_from_zero": True, "ema_decay": 0.9999,
                  "ema_warmup": False, "grad_clip": 0.0, "t_min": 0.0, "ckpt_every": 10000, "log_every": 100},
        "sample": {"steps": 50, "order": 3, "method": "singlestep", "algorithm": "dpmsolver", "skip_type": "logSNR",
                   "t_end": 1e-4, "cfg_scale": 0.4},
        "gen": {"k_per_class": 1001},
    },
    # scikit-learn digits (8x8): seconds per stage, for tests.
    "digits": {
        "name": "digits",
        "data": {"name": "digits"},
        "stage1": {"ssl_epochs": 3, "ssl_batch_size": 128, "width": 8, "feature_dim": 32, "umap_neighbors": 10,
                   "umap_epochs": 50},
        "learner": {"net": "cnn", "width": 8, "iterations": 60, "batch_size": 16, "uratio": 2, "lr": 0.03,
                    "ema": 0.9, "bn_momentum": 0.1, "threshold_momentum": 0.9, "flip": False, "crop_pad": 1,
                    "ckpt_every": 10},
        "model": {"preset": "uvit_digits"},
        "train": {"steps": 30, "batch_size": 64, "ckpt_every": 10, "warmup_steps": 5, "log_every": 10},
        "sample": {"steps": 5},
        "gen": {"k_per_class": 4, "batch_size": 40, "shard_size": 16},
        "eval": {"cas_steps": 100},
    },
}


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with the nested overrides `over` applied (new dicts; the inputs are not changed)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# The paper's ImageNet 256x256 recipe, value for value from the official DPT configs
# (configs/accelerate_b4_subset1_2img_k_128_{large,huge}.py), training scripts (train_ldm.py,
# train_ldm_discrete.py, U-ViT's sde.py / utils.py) and sampling scripts (sample_ldm_all.py,
# sample_ldm_discrete_all.py); docs/PAPER.md lists every value with its source. The user sets data.root (a
# folder made by `python -m dpt_fast.data.prepare --vae`), stage1.backbone_weights (the MSN checkpoint) and
# data.test_root / split.subset_file as in docs/PAPER.md.
_IMAGENET256_UVIT: dict[str, Any] = {
    "data": {"name": "latents"},
    "split": {"labels_per_class": 2},  # the configs' imagenet_subsets1/2imgs_class.txt
    "stage1": {"method": "features", "backbone": "msn"},
    "diffusion": {"prediction": "eps"},
    "train": {"batch_size": 1024, "lr": 2e-4, "weight_decay": 0.03, "weight_decay_on": "all", "betas": [0.99, 0.99],
              "warmup_steps": 5000, "warmup_from_zero": True, "ema_decay": 0.9999, "ema_warmup": False,
              "grad_clip": 0.0, "ckpt_every": 5000, "log_every": 100},
    "sample": {"steps": 50, "order": 3, "method": "singlestep", "cfg_scale": 0.4},
    "gen": {"k_per_class": 128},
}
# U-ViT-L/2, continuous VP schedule (beta 0.1 -> 20), t ~ U(0, 1); DPM-Solver-fast (noise prediction) order 3
# with uniform logSNR steps down to t = 1e-4 (sample_ldm_all.py).
PRESETS["imagenet256_uvit_l"] = _merged(_IMAGENET256_UVIT, {
    "name": "imagenet256_uvit_l",
    "model": {"preset": "uvit_l2_latent256", "use_checkpoint": True},
    "diffusion": {"schedule": "linear", "beta_0": 0.1, "beta_1": 20.0},
    "train": {"steps": 300000, "p_uncond": 0.15, "t_min": 0.0},
    "sample": {"algorithm": "dpmsolver", "skip_type": "logSNR", "t_end": 1e-4},
})
# U-ViT-H/2 (no final conv), Stable Diffusion's scaled-linear betas (0.00085 -> 0.012, N = 1000), n ~ U{1..N};
# DPM-Solver++-fast order 3 with uniform time steps down to t = 1/N (sample_ldm_discrete_all.py).
PRESETS["imagenet256_uvit_h"] = _merged(_IMAGENET256_UVIT, {
    "name": "imagenet256_uvit_h",
    "model": {"preset": "uvit_h2_latent256", "use_checkpoint": True},
    "diffusion": {"schedule": "discrete", "discrete_beta_start": 0.00085, "discrete_beta_end": 0.012,
                  "num_timesteps": 1000},
    "train": {"steps": 500000, "p_uncond": 0.1},
    "sample": {"algorithm": "dpmsolver++", "skip_type": "time_uniform", "t_end": 0.001},
})
# A single-GPU smoke run of the U-ViT-L/2 recipe: the same model, schedule, optimiser and sampler, but 500
# steps of 64 latents and 4 images per class. It checks that the pipeline runs end to end; its images are
# not meant to be good (the constant 0.9999 EMA has barely moved from the initial weights after 500 steps).
PRESETS["imagenet256_uvit_l_smoke"] = _merged(PRESETS["imagenet256_uvit_l"], {
    "name": "imagenet256_uvit_l_smoke",
    "train": {"steps": 500, "batch_size": 64, "warmup_steps": 50, "ckpt_every": 100, "log_every": 10},
    "gen": {"k_per_class": 4},
})


def _plain(obj: Any) -> Any:
    """Dataclass dict -> YAML/JSON-friendly (tuples become lists)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check/convert `value` to the annotated type `typ`; raise UserError naming `key` otherwise."""
    origin = typing.get_origin(typ)
    bad = UserError(f"config key '{key}': expected {getattr(typ, '__name__', typ)}, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise UserError(f"config key '{key}': must be a finite number, got {value!r}")
        return float(value)
    if typ is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise bad
        allowed = CHOICES.get(key)
        if allowed is not None and value not in allowed:
            shown = ", ".join(a or '"" (the preset\'s)' for a in allowed)
            raise UserError(f"config key '{key}': {value!r} is not one of {shown}")
        return value
    if origin is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"config key '{key}': expected a list of {len(args)} numbers like [0.9, 0.999], got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(typ) if a is not type(None)]
        return _coerce(key, value, inner)
    return value


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(obj: Any, overrides: dict[str, Any], prefix: str = "") -> None:
    """Apply a nested dict of overrides onto a dataclass instance, in place, with checking."""
    hints = _section_types(type(obj))
    names = [f.name for f in fields(obj)]
    for k, v in overrides.items():
        key = f"{prefix}{k}"
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(prefix + n for n in names)}"
            raise UserError(f"unknown config key '{key}'{hint}")
        cur = getattr(obj, k)
        if is_dataclass(cur):
            if not isinstance(v, dict):
                raise UserError(f"config key '{key}' is a section; set its keys, e.g. {key}.{fields(cur)[0].name}=...")
            _apply(cur, v, prefix=f"{key}.")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def _dotted_to_nested(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def parse_override(item: str) -> dict[str, Any]:
    """'train.steps=200' -> {'train': {'steps': 200}} (the value is parsed as YAML)."""
    if "=" not in item:
        raise UserError(f"cannot read '{item}': overrides are key=value, e.g. train.steps=200")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"cannot read '{item}': the key is empty; overrides are key=value, e.g. train.steps=200")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return _dotted_to_nested(key, value)


def load_config(preset_or_file: Optional[str] = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a preset name or YAML file plus `key=value` overrides into a Config."""
    cfg = Config()
    spec = preset_or_file or "mnist5k"
    if spec in PRESETS:
        _apply(cfg, PRESETS[spec])
        cfg.name = PRESETS[spec].get("name", spec)
    elif spec.endswith((".yaml", ".yml")) or Path(spec).exists():
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; pass a preset ({', '.join(PRESETS)}) or an existing YAML file")
        data = read_yaml(path, fix="fix the file or pass another --config")
        if data is None:
            raise UserError(f"{path} is empty; write config keys into it (e.g. `preset: digits`) or pass a preset")
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of config keys at the top level")
        base = data.pop("preset", "mnist5k")
        if base not in PRESETS:
            raise UserError(f"{path}: preset '{base}' is unknown; use one of {', '.join(PRESETS)}")
        _apply(cfg, PRESETS[base])
        cfg.name = PRESETS[base].get("name", base)
        if "name" not in data:
            data["name"] = path.stem
        _apply(cfg, data)
    else:
        close = difflib.get_close_matches(spec, list(PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown preset '{spec}'{hint}; use one of {', '.join(PRESETS)} or a YAML file")
    for item in overrides:
        _apply(cfg, parse_override(item))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express (every float is already finite: `_coerce`)."""
    s1, m, d, t, sm = cfg.stage1, cfg.model, cfg.diffusion, cfg.train, cfg.sample
    checks = [
        ("seed", cfg.seed >= 0, "must be >= 0"),
        ("num_threads", cfg.num_threads >= 0, "must be >= 0 (0 = torch's default)"),
        ("data.image_size", cfg.data.image_size >= 0, "must be >= 0 (0 = the data set's own size)"),
        ("split.labels_per_class", cfg.split.labels_per_class >= 1 or cfg.split.fraction > 0, "must be >= 1"),
        ("split.fraction", 0.0 <= cfg.split.fraction < 1.0, "must be in [0, 1)"),
        ("split.seed", cfg.split.seed >= 0, "must be >= 0"),
        ("stage1.ssl_epochs", s1.ssl_epochs >= 1, "must be >= 1"),
        ("stage1.ssl_batch_size", s1.ssl_batch_size >= 2, "must be >= 2"),
        ("stage1.ssl_lr", s1.ssl_lr > 0, "must be > 0"),
        ("stage1.ssl_temperature", s1.ssl_temperature > 0, "must be > 0"),
        ("stage1.ssl_noise", 0.0 <= s1.ssl_noise <= 1.0, "must be in [0, 1] (a pixel-noise std on [0, 1] images)"),
        ("stage1.feature_dim", s1.feature_dim >= 1, "must be >= 1"),
        ("stage1.width", s1.width >= 1, "must be >= 1"),
        ("stage1.umap_dim", s1.umap_dim >= 2, "must be >= 2"),
        ("stage1.umap_neighbors", s1.umap_neighbors >= 2, "must be >= 2"),
        ("stage1.umap_min_dist", 0.0 <= s1.umap_min_dist <= 1.0, "must be in [0, 1] (UMAP's spread is 1)"),
        ("stage1.umap_epochs", s1.umap_epochs >= 1, "must be >= 1"),
        ("stage1.knn_transform", s1.knn_transform >= 1, "must be >= 1"),
        ("stage1.logreg_c", s1.logreg_c >= 0, "must be >= 0 (0 = the method's default)"),
        ("stage1.pca_dim", s1.pca_dim >= 1, "must be >= 1"),
        ("stage1.backbone_image_size", s1.backbone_image_size >= 0, "must be >= 0 (0 = the model's)"),
        ("stage1.backbone_crop", 0.0 <= s1.backbone_crop <= 1.0, "must be in [0, 1] (0 = the backbone's)"),
        ("stage1.backbone_batch_size", s1.backbone_batch_size >= 1, "must be >= 1"),
        *[(f"model.{k}", getattr(m, k) >= 0, "must be >= 0 (0 = the preset's)")
          for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")],
        ("diffusion.beta_0", d.beta_0 > 0, "must be > 0"),
        ("diffusion.beta_1", d.beta_1 > d.beta_0, "must be > diffusion.beta_0"),
        ("diffusion.discrete_beta_start", 0.0 < d.discrete_beta_start < 1.0, "must be in (0, 1)"),
        ("diffusion.discrete_beta_end", d.discrete_beta_start < d.discrete_beta_end < 1.0,
         "must be in (diffusion.discrete_beta_start, 1)"),
        ("diffusion.num_timesteps", d.num_timesteps >= 1, "must be >= 1"),
        ("train.steps", t.steps >= 0, "must be >= 0"),
        ("train.batch_size", t.batch_size >= 1, "must be >= 1"),
        ("train.lr", t.lr > 0, "must be > 0"),
        ("train.weight_decay", t.weight_decay >= 0, "must be >= 0"),
        ("train.betas", all(0.0 <= b < 1.0 for b in t.betas), "must both be in [0, 1)"),
        ("train.warmup_steps", t.warmup_steps >= 0, "must be >= 0"),
        ("train.t_min", 0.0 <= t.t_min < 1.0, "must be in [0, 1)"),
        ("train.ema_decay", 0.0 <= t.ema_decay < 1.0, "must be in [0, 1)"),
        ("train.p_uncond", 0.0 <= t.p_uncond < 1.0, "must be in [0, 1)"),
        ("train.grad_clip", t.grad_clip >= 0, "must be >= 0 (0 = no clipping)"),
        ("train.ckpt_every", t.ckpt_every >= 1, "must be >= 1"),
        ("train.keep_checkpoints", t.keep_checkpoints >= 0, "must be >= 0"),
        ("train.log_every", t.log_every >= 1, "must be >= 1"),
        ("sample.steps", sm.steps >= 1, "must be >= 1"),
        ("sample.order", sm.order in (1, 2, 3), "must be 1, 2 or 3"),
        ("sample.cfg_scale", sm.cfg_scale >= 0, "must be >= 0 (0 = no guidance)"),
        ("sample.t_end", 0.0 <= sm.t_end < 1.0, "must be in [0, 1) (0 = the schedule's default)"),
        ("gen.k_per_class", cfg.gen.k_per_class >= 1, "must be >= 1"),
        ("gen.batch_size", cfg.gen.batch_size >= 1, "must be >= 1"),
        ("gen.shard_size", cfg.gen.shard_size >= 1, "must be >= 1"),
        ("eval.num_real", cfg.eval.num_real >= 0, "must be >= 0 (0 = the whole test split)"),
        ("eval.cas_steps", cfg.eval.cas_steps >= 0, "must be >= 0 (0 = skip the classification accuracy score)"),
        ("eval.num_gen_per_class", cfg.eval.num_gen_per_class >= 0, "must be >= 0 (0 = all generated images)"),
        ("learner.width", cfg.learner.width >= 1, "must be >= 1"),
        ("learner.init", not cfg.learner.init or (cfg.learner.net == "cnn" and cfg.learner.width == cfg.stage1.width),
         f"={cfg.learner.init} needs learner.net=cnn and learner.width equal to stage1.width (the SimCLR encoder's)"),
        ("learner.iterations", cfg.learner.iterations >= 1, "must be >= 1"),
        ("learner.batch_size", cfg.learner.batch_size >= 1, "must be >= 1"),
        ("learner.uratio", cfg.learner.uratio >= 1, "must be >= 1"),
        ("learner.lr", cfg.learner.lr > 0, "must be > 0"),
        ("learner.momentum", 0.0 <= cfg.learner.momentum < 1.0, "must be in [0, 1)"),
        ("learner.weight_decay", cfg.learner.weight_decay >= 0, "must be >= 0"),
        ("learner.cosine_cycles", 0.0 <= cfg.learner.cosine_cycles <= 0.5, "must be in [0, 0.5] (the lr stays >= 0)"),
        ("learner.ema", 0.0 <= cfg.learner.ema < 1.0, "must be in [0, 1)"),
        ("learner.bn_momentum", 0.0 < cfg.learner.bn_momentum <= 1.0, "must be in (0, 1]"),
        ("learner.threshold_momentum", 0.0 <= cfg.learner.threshold_momentum < 1.0, "must be in [0, 1)"),
        ("learner.p_cutoff", 0.0 < cfg.learner.p_cutoff <= 1.0, "must be in (0, 1]"),
        ("learner.unsup_weight", cfg.learner.unsup_weight >= 0, "must be >= 0"),
        ("learner.randaug_ops", cfg.learner.randaug_ops >= 0, "must be >= 0"),
        ("learner.crop_pad", cfg.learner.crop_pad >= 0, "must be >= 0"),
        ("learner.ckpt_every", cfg.learner.ckpt_every >= 1, "must be >= 1"),
        ("learner.eval_batch_size", cfg.learner.eval_batch_size >= 1, "must be >= 1"),
        ("stage3.logreg_c", cfg.stage3.logreg_c >= 0, "must be >= 0 (0 = stage 1's)"),
        ("stage3.generated_weight", cfg.stage3.generated_weight >= 0, "must be >= 0"),
        ("stage3.min_confidence", 0.0 <= cfg.stage3.min_confidence < 1.0, "must be in [0, 1)"),
    ]
    for key, ok, what in checks:
        if not ok:
            raise UserError(f"config key '{key}' {what}")


# The last line of a run directory's config.yaml: a file without it was cut short (see dpt_fast.stage.resolve).
END_OF_CONFIG = "# end of config\n"


def missing_keys(data: dict, obj: Any = None, prefix: str = "") -> list[str]:
    """The config keys a nested dict (e.g. a parsed config.yaml) does not set, dotted: what `dump_yaml` always writes."""
    obj = Config() if obj is None else obj
    out = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not isinstance(data, dict) or f.name not in data:
            out.append(f"{prefix}{f.name}")
        elif is_dataclass(value):
            out += missing_keys(data[f.name], value, f"{prefix}{f.name}.")
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

import pytest

from dpt_fast.config import PRESETS, load_config, parse_override
from dpt_fast.utils import UserError


def test_default_preset_is_mnist5k():
    cfg = load_config()
    assert cfg.name == "mnist5k" and cfg.data.name == "mnist5k"


def test_digits_preset_and_issue_key_names():
    cfg = load_config(
        "digits",
        ["seed=3", "split.labels_per_class=2", "split.seed=1", "train.steps=7", "train.batch_size=16",
         "sample.steps=4", "gen.k_per_class=3"],
    )
    assert (cfg.seed, cfg.split.labels_per_class, cfg.split.seed) == (3, 2, 1)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.sample.steps, cfg.gen.k_per_class) == (7, 16, 4, 3)
    assert cfg.data.name == "digits"


def test_override_values_are_typed():
    cfg = load_config("digits", ["train.lr=1e-3", "train.betas=[0.9, 0.999]", "model.conv=false"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.betas == (0.9, 0.999)
    assert cfg.model.conv is False


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("train.stepz=3", "did you mean 'train.steps'"),
        ("nosuch=1", "unknown config key 'nosuch'"),
        ("train.steps=abc", "config key 'train.steps': expected int"),
        ("train.steps=-1", "'train.steps' must be >= 0"),
        ("sample.method=euler", "'sample.method': 'euler' is not one of"),
        ("train=3", "is a section"),
        ("split.labels_per_class", "overrides are key=value"),
        ("train.betas=[0.9]", "expected a list of 2"),
    ],
)
def test_bad_overrides_are_one_line_errors(item, fragment):
    with pytest.raises(UserError) as e:
        load_config("digits", [item])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_file_starts_from_its_preset(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("preset: digits\ntrain:\n  steps: 11\n")
    cfg = load_config(str(f), ["seed=5"])
    assert cfg.name == "mine" and cfg.data.name == "digits" and cfg.train.steps == 11 and cfg.seed == 5


def test_bad_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        load_config(str(f))


def test_unknown_preset_suggests_one():
    with pytest.raises(UserError, match="did you mean 'digits'"):
        load_config("digit")


def test_fingerprint_tracks_only_named_sections():
    a = load_config("digits")
    b = load_config("digits", ["train.steps=99"])
    assert a.fingerprint("data", "split") == b.fingerprint("data", "split")
    assert a.fingerprint("train") != b.fingerprint("train")


def test_parse_override_nests_dotted_keys():
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}
    assert set(PRESETS) >= {"mnist5k", "digits"}


# ----------------------------------------------------------------------------------------------
# The paper's presets against the official DPT code (github.com/ML-GSAI/DPT): the values below are copied from
# the official files named beside them, in their own terms, not from dpt_fast/config.py.
# ----------------------------------------------------------------------------------------------
_BOTH = {
    # configs/accelerate_b4_subset1_2img_k_128_{large,huge}.py
    "subset_path": "imagenet_subsets1/2imgs_class.txt",
    "pred": "noise_pred",
    "ema_rate": 0.9999,
    "z_shape": (4, 32, 32),
    "augmentation_K": 128,
    "train.batch_size": 1024,
    "optimizer.lr": 0.0002,
    "optimizer.weight_decay": 0.03,
    "optimizer.betas": (0.99, 0.99),
    "lr_scheduler.warmup_steps": 5000,
    "nnet.img_size": 32,
    "nnet.patch_size": 2,
    "nnet.in_chans": 4,
    "nnet.num_heads": 16,
    "nnet.mlp_ratio": 4,
    "nnet.qkv_bias": False,
    "nnet.mlp_time_embed": False,
    "nnet.use_checkpoint": True,
    "sample.sample_steps": 50,
    "sample.scale": 0.4,
    # utils.py: get_optimizer(nnet.parameters(), ...) -> one AdamW group; customized_lr_scheduler: LambdaLR
    # min(step / warmup_steps, 1) (the first step has LR 0); ema(): constant rate from a copy of the weights.
    "optimizer.all_parameters_decay": True,
    "lr_scheduler.first_step_lr_zero": True,
    "ema.warmup": False,
    # train_ldm*.py train_step: no gradient clipping.
    "grad_clip": None,
    # libs/uvit.py defaults: skip=True, pos_embed trunc_normal_(std=.02)
    "nnet.skip": True,
    "nnet.pos_embed_init": "trunc_normal",
}
OFFICIAL = {
    "imagenet256_uvit_l": {
        **_BOTH,
        "train.n_steps": 300000,
        "nnet.embed_dim": 1024,
        "nnet.depth": 20,
        "nnet.conv": True,  # not set in the config: libs/uvit.py default
        "dataset.p_uncond": 0.15,
        "sde": ("VPSDE", 0.1, 20),  # train_ldm.py: sde.VPSDE() (beta_min=0.1, beta_max=20)
        "t_draw": "U(0, 1)",  # sde.py LSimple -> SDE.sample(x0, t_init=0)
        "nnet_time_input": "999 t",  # sde.py ScoreModel.predict: nnet(xt, t * 999)
        # sample_ldm_all.py: dpm_solver_pytorch.DPM_Solver(model_fn, NoiseScheduleVP('linear')).sample(
        #   steps=50, eps=1e-4, adaptive_step_size=False, fast_version=True): noise prediction, DPM-Solver-fast,
        #   order 3, logSNR steps
        "solver": ("dpm_solver", "fast", 3, "logSNR", 1e-4),
    },
    "imagenet256_uvit_h": {
        **_BOTH,
        "train.n_steps": 500000,
        "nnet.embed_dim": 1152,
        "nnet.depth": 28,
        "nnet.conv": False,
        "dataset.p_uncond": 0.1,
        # train_ldm_discrete.py: stable_diffusion_beta_schedule(0.00085, 0.0120, 1000), n ~ U{1..N}, nnet(xn, n)
        "sde": ("stable_diffusion_betas", 0.00085, 0.0120, 1000),
        "t_draw": "n ~ U{1..N}",
        "nnet_time_input": "N t",  # sample_ldm_discrete_all.py: t = t_continuous * N
        # sample_ldm_discrete_all.py: dpm_solver_pp.DPM_Solver(model_fn, ns, predict_x0=True).sample(steps=50,
        #   eps=1. / N, T=1.) with the defaults order=3, skip_type='time_uniform', method='fast'
        "solver": ("dpm_solver++", "fast", 3, "time_uniform", 1.0 / 1000),
    },
}


def _in_official_terms(cfg):
    """Our resolved config, named as the official files name things."""
    from dpt_fast.diffusion import make_schedule, model_time
    from dpt_fast.models.uvit import uvit_kwargs

    import torch

    kw = uvit_kwargs(cfg.model, 1001)
    t, d = cfg.train, cfg.diffusion
    sch = make_schedule(d)
    time_scale = float(model_time(sch, torch.ones(())))
    out = {
        "subset_path": f"imagenet_subsets1/{cfg.split.labels_per_class}imgs_class.txt",
        "pred": {"eps": "noise_pred"}.get(d.prediction, d.prediction),
        "ema_rate": t.ema_decay,
        "z_shape": (kw["in_chans"], kw["img_size"], kw["img_size"]),
        "augmentation_K": cfg.gen.k_per_class,
        "train.batch_size": t.batch_size,
        "train.n_steps": t.steps,
        "optimizer.lr": t.lr,
        "optimizer.weight_decay": t.weight_decay,
        "optimizer.betas": tuple(t.betas),
        "optimizer.all_parameters_decay": t.weight_decay_on == "all",
        "lr_scheduler.warmup_steps": t.warmup_steps,
        "lr_scheduler.first_step_lr_zero": t.warmup_from_zero,
        "ema.warmup": t.ema_warmup,
        "grad_clip": t.grad_clip or None,
        "dataset.p_uncond": t.p_uncond,
        "nnet.use_checkpoint": cfg.model.use_checkpoint,
        **{f"nnet.{k}": kw[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                        "mlp_ratio", "qkv_bias", "mlp_time_embed", "conv", "skip", "pos_embed_init")},
        "sde": ("VPSDE", d.beta_0, d.beta_1) if d.schedule == "linear" else
               ("stable_diffusion_betas", d.discrete_beta_start, d.discrete_beta_end, d.num_timesteps),
        "t_draw": f"U({t.t_min:g}, 1)" if d.schedule == "linear" else "n ~ U{1..N}",
        "nnet_time_input": "999 t" if time_scale == 999.0 else ("N t" if time_scale == sch.total_N else str(time_scale)),
        "sample.sample_steps": cfg.sample.steps,
        "sample.scale": cfg.sample.cfg_scale,
        "solver": ({"dpmsolver": "dpm_solver", "dpmsolver++": "dpm_solver++"}[cfg.sample.algorithm],
                   {"singlestep": "fast"}.get(cfg.sample.method, cfg.sample.method), cfg.sample.order,
                   cfg.sample.skip_type, cfg.sample.t_end),
    }
    return out


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_imagenet_presets_equal_the_official_dpt_configs_value_for_value(preset):
    cfg = load_config(preset)
    ours = _in_official_terms(cfg)
    official = OFFICIAL[preset]
    assert set(ours) == set(official)
    diff = {k: (ours[k], official[k]) for k in official if ours[k] != official[k]}
    assert not diff, diff
    assert cfg.data.name == "latents" and cfg.stage1.method == "features" and cfg.stage1.backbone == "msn"


def test_smoke_preset_is_the_l_recipe_made_short():
    full, smoke = load_config("imagenet256_uvit_l").to_dict(), load_config("imagenet256_uvit_l_smoke").to_dict()
    changed = {f"{s}.{k}" for s in full if isinstance(full[s], dict) for k in full[s] if full[s][k] != smoke[s][k]}
    assert changed == {"train.steps", "train.batch_size", "train.warmup_steps", "train.ckpt_every", "train.log_every",
                       "gen.k_per_class"}


def test_no_preset_is_called_paper():
    assert not [name for name in PRESETS if "paper" in name]
    with pytest.raises(UserError, match="unknown preset 'paper'"):
        load_config("paper")

"""The stage-2 training loop: EMA math, schedules of LR/EMA, data order, label dropout, loss, exact resume."""
import math

import pytest
import torch
from torch import nn

from dpt_fast.config import load_config
from dpt_fast.diffusion import make_schedule, model_time
from dpt_fast.diffusion.checkpoint import list_checkpoints
from dpt_fast.diffusion.train import (
    EpsFromV,
    batch_indices,
    diffusion_loss,
    draw_step,
    ema_decay_at,
    lr_at,
    param_groups,
    sample_time,
    train_diffusion,
    update_ema,
)
from dpt_fast.models import build_uvit
from dpt_fast.utils import UserError


def _digits_cfg(*overrides):
    return load_config("digits", ["model.embed_dim=32", "model.depth=2", "train.steps=8", "train.batch_size=16",
                                  "train.ckpt_every=3", "train.log_every=2", "train.warmup_steps=3", "train.lr=1e-3",
                                  *overrides])


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def _model(cfg):
    torch.manual_seed(0)
    return build_uvit(cfg.model, 11)


def _train(cfg, tmp_path, **kw):
    x, y = _data()
    return train_diffusion(_model(cfg), x, y, make_schedule(cfg.diffusion), cfg.train, num_classes=10, seed=cfg.seed,
                           ckpt_dir=tmp_path / "ckpt", fingerprint=kw.pop("fingerprint", "fp"),
                           device=torch.device("cpu"), log_dir=tmp_path, progress=False, **kw)


# ----------------------------------------------------------------------------------------------
def test_ema_update_is_an_exponential_moving_average_and_copies_buffers():
    model, ema = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        ema.weight.fill_(1.0)
        model.running_mean.fill_(5.0)
    update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    assert torch.equal(ema.running_mean, model.running_mean)
    update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, torch.full((3,), 2.0 - 0.81))


def test_ema_decay_warms_up_towards_the_configured_decay():
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.9999) == pytest.approx(91 / 100)
    assert ema_decay_at(10**7, 0.999) == 0.999
    assert all(ema_decay_at(s, 0.99) <= ema_decay_at(s + 1, 0.99) for s in range(300))


def test_lr_warms_up_linearly_then_stays_constant():
    lrs = [lr_at(s, 1e-3, 4) for s in range(8)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:] == pytest.approx([1e-3] * 4)


def test_cosine_lr_decay_follows_the_formula_after_the_warm_up():
    lrs = [lr_at(s, 1e-3, 4, decay="cosine", total_steps=12) for s in range(13)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # the warm-up is unchanged
    assert lrs[4:] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(9)])
    assert lrs[8] == pytest.approx(5e-4) and lrs[12] == pytest.approx(0.0, abs=1e-18)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert [lr_at(s, 1e-3, 4, decay="none", total_steps=12) for s in range(13)] == [lr_at(s, 1e-3, 4) for s in range(13)]


def test_no_weight_decay_on_pos_embed_biases_and_norms():
    cfg = _digits_cfg()
    model = _model(cfg)
    decay, no_decay = param_groups(model, 0.03)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "pos_embed" in nd and any(n.endswith("norm1.weight") for n in nd) and any(n.endswith(".bias") for n in nd)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_batches_walk_through_seeded_epoch_permutations():
    n, bs = 10, 4
    stream = torch.cat([batch_indices(s, bs, n, seed=3) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(2, bs, n, seed=3), stream[8:12])  # a pure function of (seed, step)
    cache = {}
    assert torch.equal(torch.cat([batch_indices(s, bs, n, 3, cache) for s in range(5)]), stream)
    assert sorted(cache) == [1]  # only the current epoch's permutation is kept
    assert not torch.equal(batch_indices(0, 10, n, seed=4), stream[:10])
    assert sorted(batch_indices(0, 25, n, seed=0).tolist()) != list(range(25))  # batches larger than an epoch work
    assert batch_indices(0, 25, n, seed=0).max() < n


@pytest.mark.parametrize("schedule", ["linear", "discrete"])
def test_training_times_follow_the_schedule(schedule):
    sch = make_schedule(load_config("digits", [f"diffusion.schedule={schedule}"]).diffusion)
    t = sample_time(sch, 20000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert t.min() >= 1e-3 - 1e-7 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.5) < 0.01
    if schedule == "discrete":
        n = t * 1000
        assert torch.allclose(n, n.round(), atol=1e-3) and n.round().min() >= 1


def test_label_dropout_rate_matches_p_uncond():
    sch = make_schedule(load_config("digits").diffusion)
    drops = torch.cat([draw_step(s, 0, 256, (1, 8, 8), sch, 0.15, torch.device("cpu")).drop for s in range(20)])
    sd = math.sqrt(0.15 * 0.85 / drops.numel())
    assert abs(drops.float().mean().item() - 0.15) < 4 * sd


class _Spy(nn.Module):
    """Records the labels the loop feeds in; predicts a learnable scaling of x_t."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, x, t, y):
        self.seen.append(y.clone())
        return x * self.w


def test_training_loop_feeds_the_null_class_at_rate_p_uncond(tmp_path):
    cfg = _digits_cfg("train.steps=20", "train.batch_size=64", "train.p_uncond=0.2", "train.ckpt_every=100")
    x, y = _data(200)
    spy = _Spy()
    train_diffusion(spy, x, y, make_schedule(cfg.diffusion), cfg.train, num_classes=10, seed=0, ckpt_dir=tmp_path,
                    fingerprint="fp", device=torch.device("cpu"), progress=False)
    seen = torch.cat(spy.seen)
    assert seen.numel() == 20 * 64 and seen.max() == 10
    sd = math.sqrt(0.2 * 0.8 / seen.numel())
    assert abs((seen == 10).float().mean().item() - 0.2) < 4 * sd


@pytest.mark.parametrize("schedule", ["linear", "discrete"])
def test_loss_is_zero_for_the_exact_noise_predictor(schedule):
    """With x0 = 0, x_t = sigma_t eps, so eps = x_t / sigma(t) recovered from the model's time input."""
    sch = make_schedule(load_config("digits", [f"diffusion.schedule={schedule}"]).diffusion)
    scale = 999.0 if schedule == "linear" else 1000.0
    assert torch.allclose(model_time(sch, torch.tensor([0.5])), torch.tensor([0.5 * scale]))

    def oracle(x_t, time, y):
        return x_t / sch.marginal_std(time / scale).view(-1, 1, 1, 1)

    g = torch.Generator().manual_seed(0)
    t = sample_time(sch, 64, g, torch.device("cpu"))
    noise = torch.randn(64, 1, 8, 8, generator=g)
    zero = torch.zeros(64, 1, 8, 8)
    assert diffusion_loss(oracle, zero, None, t, noise, sch).item() < 1e-8
    assert diffusion_loss(lambda x_t, time, y: torch.zeros_like(x_t), zero, None, t, noise, sch).item() == pytest.approx(1.0, abs=0.05)


# ----------------------------------------------------------------------------------------------
def test_loss_decreases_and_history_is_written(tmp_path):
    cfg = _digits_cfg("train.steps=20", "train.log_every=5", "train.ckpt_every=4")
    res = _train(cfg, tmp_path)
    h = res.history
    assert h["step"] == [5, 10, 15, 20] and len(h["loss"]) == len(h["lr"]) == 4
    assert h["loss"][-1] < h["loss"][0]
    assert (tmp_path / "train_history.json").exists() and any((tmp_path / "tb").iterdir())
    assert list_checkpoints(tmp_path / "ckpt") == [12, 16, 20]  # the latest (the final step) + keep_checkpoints=2


class _Stop(Exception):
    pass


def _stop_at(n):
    def hook(step):
        if step == n:
            raise _Stop

    return hook


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_interrupted_run_resumes_from_its_checkpoint_exactly(tmp_path):
    cfg = _digits_cfg()
    ref = _train(cfg, tmp_path / "ref")

    with pytest.raises(_Stop):
        _train(cfg, tmp_path / "cut", on_step=_stop_at(5))  # killed between the checkpoints of steps 3 and 6
    assert list_checkpoints(tmp_path / "cut" / "ckpt") == [3]
    res = _train(cfg, tmp_path / "cut")
    assert res.start_step == 3 and res.step == 8
    for a, b in ((res.model, ref.model), (res.ema, ref.ema)):
        wa, wb = _weights(a), _weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert res.history == ref.history


def test_a_larger_step_count_continues_training(tmp_path):
    cfg = _digits_cfg()
    ref = _train(cfg, tmp_path / "ref")
    _train(_digits_cfg("train.steps=5"), tmp_path / "more")
    res = _train(cfg, tmp_path / "more")
    assert res.start_step == 5
    assert all(torch.equal(a, b) for a, b in zip(res.ema.state_dict().values(), ref.ema.state_dict().values()))


def test_checkpoint_of_another_config_is_refused(tmp_path):
    cfg = _digits_cfg("train.steps=2")
    _train(cfg, tmp_path)
    with pytest.raises(UserError, match="--fresh"):
        _train(cfg, tmp_path, fingerprint="other")


@pytest.mark.parametrize("schedule", ["linear", "discrete"])
def test_v_prediction_loss_and_its_eps_view(schedule):
    """With x0 = 0: v = alpha eps, and the eps view of the exact v-predictor is the exact eps-predictor."""
    sch = make_schedule(load_config("digits", [f"diffusion.schedule={schedule}"]).diffusion)
    scale = 999.0 if schedule == "linear" else 1000.0

    def v_oracle(x_t, time, y):
        t = (time / scale).view(-1, 1, 1, 1)
        return sch.marginal_alpha(t) * x_t / sch.marginal_std(t)

    g = torch.Generator().manual_seed(0)
    t = sample_time(sch, 64, g, torch.device("cpu"))
    noise = torch.randn(64, 1, 8, 8, generator=g)
    zero = torch.zeros(64, 1, 8, 8)
    assert diffusion_loss(v_oracle, zero, None, t, noise, sch, prediction="v").item() < 1e-8
    assert diffusion_loss(v_oracle, zero, None, t, noise, sch, prediction="eps").item() > 0.1
    x_t = sch.marginal_std(t).view(-1, 1, 1, 1) * noise
    eps = EpsFromV(_Lambda(v_oracle), sch)(x_t, model_time(sch, t), None)
    torch.testing.assert_close(eps, noise, rtol=1e-4, atol=1e-4)


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


# ----------------------------------------------------------------------------------------------
class _Rows:
    """A BatchSource over an in-memory tensor: read (in the loop's background thread) gathers, finish is identity."""

    def __init__(self, x):
        self.x, self.sample_shape = x, tuple(x.shape[1:])
        self.reads = []

    def __len__(self):
        return len(self.x)

    def read(self, index, rows, seed):
        self.reads.append(index[rows].clone())
        return (self.x[index[rows]],)

    def finish(self, raw, batch_size, rows, seed):
        return raw[0]


def test_a_batch_source_read_ahead_trains_exactly_like_the_in_memory_tensor(tmp_path):
    cfg = _digits_cfg()
    ref = _train(cfg, tmp_path / "tensor")
    x, y = _data()
    src = _Rows(x)
    res = train_diffusion(_model(cfg), src, y, make_schedule(cfg.diffusion), cfg.train, num_classes=10, seed=cfg.seed,
                          ckpt_dir=tmp_path / "src", fingerprint="fp", device=torch.device("cpu"), progress=False)
    assert len(src.reads) == cfg.train.steps  # one read per step, none beyond the last
    assert all(torch.equal(a, b) for a, b in zip(res.ema.state_dict().values(), ref.ema.state_dict().values()))


class _NanAt(nn.Module):
    """A linear eps model whose output turns NaN from forward call `at` on (a diverging run, deterministically)."""

    def __init__(self, at):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.spare = nn.Parameter(torch.zeros(1))  # not used by forward
        self.at, self.calls = at, 0

    def forward(self, x, t, y):
        self.calls += 1
        out = x * self.w
        return out * float("nan") if self.calls >= self.at else out


def _all_finite_on_disk(ckpt_dir):
    from safetensors.torch import load_file

    files = sorted(ckpt_dir.glob("*.safetensors"))
    return all(torch.isfinite(v).all() for f in files for v in load_file(f).values() if v.is_floating_point())


def test_a_non_finite_loss_stops_training_naming_the_step_and_no_nan_reaches_disk(tmp_path):
    cfg = _digits_cfg("train.steps=10", "train.ckpt_every=3", "train.log_every=100")
    x, y = _data()
    with pytest.raises(UserError, match=r"loss is not finite at step 5 .*train\.lr") as e:
        train_diffusion(_NanAt(5), x, y, make_schedule(cfg.diffusion), cfg.train, num_classes=10, seed=0,
                        ckpt_dir=tmp_path / "ckpt", fingerprint="fp", device=torch.device("cpu"), progress=False)
    assert "\n" not in str(e.value)
    assert list_checkpoints(tmp_path / "ckpt") == [3]  # the check before the step-6 checkpoint stopped it
    assert _all_finite_on_disk(tmp_path / "ckpt")
    # A NaN only in the weights (loss finite so far) is caught before the checkpoint too.
    model = _NanAt(10**9)
    with pytest.raises(UserError, match=r"weights' norm is not finite at step 3"):
        train_diffusion(model, x, y, make_schedule(cfg.diffusion), cfg.train, num_classes=10, seed=0,
                        ckpt_dir=tmp_path / "w", fingerprint="fp", device=torch.device("cpu"), progress=False,
                        on_step=lambda s: model.spare.data.fill_(float("inf")) if s == 2 else None)
    assert list_checkpoints(tmp_path / "w") == []


def test_a_huge_learning_rate_is_a_one_line_error_and_leaves_finite_checkpoints(tmp_path):
    cfg = _digits_cfg("train.steps=30", "train.ckpt_every=2", "train.log_every=30", "train.lr=1e6", "train.warmup_steps=1")
    with pytest.raises(UserError, match=r"not finite at step \d+ \(train\.lr=1e\+06\); lower train\.lr"):
        _train(cfg, tmp_path)
    assert _all_finite_on_disk(tmp_path / "ckpt")


class _TinyEps(nn.Module):
    """A small conditional eps model (3x3 conv + label and time terms): cheap to compile."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.emb = nn.Conv2d(1, 1, 3, padding=1), nn.Embedding(11, 1)

    def forward(self, x, t, y):
        return self.conv(x) * torch.sigmoid(t / 1000).view(-1, 1, 1, 1) + self.emb(y).view(-1, 1, 1, 1)


@pytest.mark.slow
def test_train_compile_trains_like_eager_on_cpu(tmp_path):
    cfg = _digits_cfg("train.steps=3", "train.ckpt_every=3")
    x, y = _data()
    from torch._dynamo.utils import counters

    counters.clear()
    runs = []
    for compile_ in (False, True):
        cfg.train.compile = compile_
        runs.append(train_diffusion(_TinyEps(), x, y, make_schedule(cfg.diffusion), cfg.train, num_classes=10, seed=0,
                                    ckpt_dir=tmp_path / str(compile_), fingerprint="fp", device=torch.device("cpu"),
                                    progress=False))
    for a, b in zip(runs[1].ema.state_dict().values(), runs[0].ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert runs[1].history["loss"] == pytest.approx(runs[0].history["loss"], rel=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled run really went through Dynamo


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("source", ["tensor", "latents"])
def test_training_steps_do_not_synchronise_with_the_host_between_logs(tmp_path, source):
    """torch's sync debug mode warns on every synchronising CUDA call: steps that neither log nor checkpoint
    must make none (the first step is allowed its one-time set-up)."""
    import warnings

    cfg = _digits_cfg("train.steps=12", "train.log_every=6", "train.ckpt_every=12", "diffusion.schedule=discrete")
    x, y = _data()
    if source == "latents":
        from dpt_fast.data.latents import LatentDataset
        from dpt_fast.stages.stage2 import _Latents
        from tests.test_distributed import write_latents

        ds = LatentDataset(write_latents(tmp_path / "lat"))
        x, y = _Latents(ds), torch.from_numpy(ds.labels)
    else:
        x = x.cuda()
    counts = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_diffusion(_model(cfg), x, y, make_schedule(cfg.diffusion), cfg.train, num_classes=10, seed=0,
                            ckpt_dir=tmp_path / "ckpt", fingerprint="fp", device=torch.device("cuda"), progress=False,
                            on_step=lambda s: counts.append(sum("synchroniz" in str(w.message) for w in caught)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    per_step = [b - a for a, b in zip(counts, counts[1:])]  # syncs of steps 2..12
    quiet = [n for step, n in zip(range(2, 13), per_step) if step % 6]
    assert quiet and all(n == 0 for n in quiet), per_step


# ----------------------------------------------------------------------------------------------
# The official U-ViT / DPT conventions the imagenet256_uvit_* presets switch on (faithful copies of
# U-ViT's sde.py, utils.py and train_ldm*.py below).
# ----------------------------------------------------------------------------------------------
def test_continuous_training_times_can_be_drawn_as_uvit_sde_sample_does():
    sch = make_schedule(load_config("digits").diffusion)
    t_init = 0  # official `SDE.sample(x0, t_init=0)`, as LSimple calls it
    official = torch.rand(4096, generator=torch.Generator().manual_seed(5)) * (1. - t_init) + t_init
    ours = sample_time(sch, 4096, torch.Generator().manual_seed(5), torch.device("cpu"), t_min=0.0)
    assert torch.equal(ours, official) and ours.min() < 1e-3  # below today's default t_min
    default = sample_time(sch, 4096, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert default.min() >= 1e-3 and torch.equal(default, 1e-3 + (1 - 1e-3) * official)
    d = draw_step(0, 0, 4096, (1,), sch, 0.1, torch.device("cpu"), t_min=0.0)
    assert d.t.min() < 1e-3


def test_lr_warm_up_from_zero_is_the_official_lambdalr():
    def customized_lr_scheduler(optimizer, warmup_steps=-1):  # official U-ViT / DPT utils.py
        from torch.optim.lr_scheduler import LambdaLR

        def fn(step):
            if warmup_steps > 0:
                return min(step / warmup_steps, 1)
            else:
                return 1
        return LambdaLR(optimizer, fn)

    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = customized_lr_scheduler(opt, warmup_steps=5)
    used = []
    for _ in range(9):  # the training loop: optimizer.step() with the current LR, then lr_scheduler.step()
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [lr_at(s, 2e-4, 5, from_zero=True) for s in range(9)] == pytest.approx(used, rel=0, abs=1e-15)
    assert used[0] == 0.0 and lr_at(0, 2e-4, 5) == pytest.approx(2e-4 / 5)  # the default starts one step later


def test_official_ema_and_weight_decay_drive_the_training_loop(tmp_path):
    """ema_warmup=False: the official `ema(nnet_ema, nnet, rate)` after every step from a copy of the initial
    weights; weight_decay_on=all: one AdamW group decaying every parameter (official `get_optimizer`)."""
    cfg = _digits_cfg("train.steps=4", "train.ema_decay=0.9", "train.ema_warmup=false", "train.weight_decay_on=all",
                      "train.grad_clip=0", "train.warmup_from_zero=true", "train.t_min=0")
    model = _model(cfg)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}  # `train_state.ema_update(0)`
    seen = []

    def track(step):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})

    x, y = _data()
    res = train_diffusion(model, x, y, make_schedule(cfg.diffusion), cfg.train, num_classes=10, seed=0,
                          ckpt_dir=tmp_path, fingerprint="fp", device=torch.device("cpu"), progress=False, on_step=track)
    for params in seen:  # official utils.ema: p_dest.mul_(rate).add_((1 - rate) * p_src)
        for n in ema:
            ema[n].mul_(0.9).add_((1 - 0.9) * params[n])
    for n, p in res.ema.named_parameters():
        torch.testing.assert_close(p, ema[n], rtol=1e-6, atol=1e-7)
    assert not torch.equal(seen[0]["pos_embed"], seen[-1]["pos_embed"])

    (group,) = param_groups(model, 0.03, on="all")
    assert group["weight_decay"] == 0.03 and len(group["params"]) == len(list(model.parameters()))


def test_no_gradient_clipping_when_grad_clip_is_zero(tmp_path, monkeypatch):
    def no_clip(*a, **k):
        raise AssertionError("clip_grad_norm_ called with train.grad_clip=0")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", no_clip)
    res = _train(_digits_cfg("train.steps=2", "train.grad_clip=0"), tmp_path)
    assert res.step == 2

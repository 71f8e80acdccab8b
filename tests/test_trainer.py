"""The shared training loop, driven by toy algorithms small enough to check by hand."""

from __future__ import annotations

import csv
import json
import math
import shutil
import os
import random
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from zimagekit.errors import ZImageKitError
from zimagekit.runconfig import load_config
from zimagekit.trainer import (
    Algorithm,
    IndexDataSource,
    OptimConfig,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    lr_at,
    seed_everything,
)

# ----------------------------------------------------------------------------------------
# Toy algorithms and helpers
# ----------------------------------------------------------------------------------------

DIRECTION = torch.tensor([1.0, -2.0, 0.5, 1.5])


def regression_data(batch_size: int, size: int = 64) -> IndexDataSource:
    """y = tanh(x . DIRECTION / 2): a small learnable problem with a fixed dataset."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(size, 4, generator=g)
    y = torch.tanh(0.5 * x @ DIRECTION).unsqueeze(1)
    return IndexDataSource(lambda idx: (x[idx], y[idx]), size, batch_size, seed=7)


class Regression(Algorithm):
    """An MLP regression. With ``noisy`` it draws from every random source a checkpoint must
    restore: torch's global RNG (noise, dropout), python's and numpy's, and its own
    torch.Generator."""

    def __init__(self, noisy: bool = True, bad_loss_at: int | None = None, bad_value: float = math.nan):
        self.noisy, self.bad_loss_at, self.bad_value = noisy, bad_loss_at, bad_value
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.1 if noisy else 0.0), nn.Linear(16, 1))
        self.gen = torch.Generator().manual_seed(1)
        self.sampled_with: list[torch.Tensor] = []
        self.forward_dtype = None

    def modules(self):
        return {"net": self.net}

    def training_step(self, batch, step):
        x, y = batch
        scale = 1.0
        if self.noisy:
            x = x + 0.01 * torch.randn(x.shape) + 0.01 * torch.randn(x.shape, generator=self.gen)
            scale += 0.01 * (random.random() + np.random.rand())
        out = self.net(x)
        self.forward_dtype = out.dtype
        loss = F.mse_loss(out.float() * scale, y)
        if step == self.bad_loss_at:
            loss = loss * self.bad_value
        return {"net": loss}

    def flops_per_sample(self):
        return 6.0 * sum(p.numel() for p in self.net.parameters())

    def sample(self, prompts, seeds):
        torch.randn(100)  # sampling draws from the global RNG; training must not notice
        self.sampled_with.append(self.net[0].weight.detach().clone())
        assert not self.net.training
        # A solid cell per (prompt, seed) whose colour says which pair it is.
        return [Image.new("RGB", (8, 6), (40 * int(p[1:]), 30 * s, 200)) for p, s in zip(prompts, seeds)]

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


class TwoGroup(Algorithm):
    """The shape of Decoupled-DMD's updates: a fake score updated every step, a student every
    second step (TTUR), an EMA for the student only, and a student loss that reads the
    fake score, whose gradient must stay out of the fake score."""

    ema_groups = ("student",)

    def __init__(self, student_reads_fake: bool = True):
        self.student, self.fake = nn.Linear(4, 1), nn.Linear(4, 1)
        self.student_reads_fake = student_reads_fake

    def modules(self):
        return {"student": self.student, "fake_score": self.fake}

    def training_step(self, batch, step):
        x, y = batch
        out = self.student(x)
        losses = {"fake_score": F.mse_loss(self.fake(x + 0.1 * torch.randn_like(x)).float(), out.detach().float())}
        if step % 2 == 0:
            student = F.mse_loss(out.float(), y)
            if self.student_reads_fake:
                student = student + 0.1 * self.fake(x).float().mean()
            losses["student"] = student
        return losses


class Constant(Algorithm):
    """loss = c . w: the gradient is c on every step, so each Adam update moves w by
    lr * c / (|c| + eps) exactly (bias correction makes m_hat = c, v_hat = c^2)."""

    def __init__(self, w0, c):
        self.layer = nn.Linear(len(w0), 1, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([w0]))
        self.c = torch.tensor([c])

    def modules(self):
        return {"layer": self.layer}

    def training_step(self, batch, step):
        return {"layer": (self.layer.weight * self.c).sum()}


def no_data() -> IndexDataSource:
    return IndexDataSource(lambda idx: None, size=1, batch_size=1)


def config(tmp_path, *overrides, name="run") -> TrainConfig:
    base = [f"run.dir={tmp_path}", f"run.name={name}", "train.progress=false", "train.log_every=1",
            "train.ckpt_every=0", "ema.decay=0.9"]
    return load_config(TrainConfig, None, base + list(overrides))


def metrics(trainer: Trainer) -> list[dict]:
    with (trainer.run_dir / "metrics.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def checkpoint_steps(trainer: Trainer) -> list[str]:
    return sorted(p.name for p in trainer.ckpt_dir.iterdir() if p.name != "latest")


# ----------------------------------------------------------------------------------------
# Learning and the update rule
# ----------------------------------------------------------------------------------------


def test_loss_goes_down_on_a_learnable_problem(tmp_path):
    seed_everything(0)
    trainer = Trainer(config(tmp_path, "train.steps=60", "train.batch_size=16", "optim.lr=1e-2"),
                      Regression(noisy=False), regression_data(16))
    trainer.fit()
    losses = [float(r["loss/net"]) for r in metrics(trainer)]
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5])


def test_bf16_runs_the_forward_in_bf16_on_fp32_weights(tmp_path):
    seed_everything(0)
    algo = Regression(noisy=False)
    trainer = Trainer(config(tmp_path, "train.steps=40", "train.batch_size=16", "optim.lr=1e-2",
                             "train.precision=bf16"), algo, regression_data(16))
    trainer.fit()
    assert algo.forward_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in algo.net.parameters())
    losses = [float(r["loss/net"]) for r in metrics(trainer)]
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])


def test_warmup_lr_rises_linearly_then_holds(tmp_path):
    seed_everything(0)
    trainer = Trainer(config(tmp_path, "train.steps=6", "optim.lr=0.01", "optim.warmup_steps=4"),
                      Regression(), regression_data(8))
    trainer.fit()
    assert [float(r["lr/net"]) for r in metrics(trainer)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_cosine_lr_matches_the_closed_form():
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=2, schedule="cosine")
    # after warm-up: 0.1 + 0.45 * (1 + cos(pi * (step - 2) / 8))
    expected = {1: 0.5, 2: 1.0, 4: 0.1 + 0.45 * (1 + math.sqrt(0.5)), 6: 0.55, 10: 0.1}
    assert {s: lr_at(s, optim, total_steps=10) for s in expected} == pytest.approx(expected)


@pytest.mark.parametrize("clip, moved", [
    # g = (3, 4), |g| = 5; clipped to norm 1: (0.6, 0.8). Adam's first step with eps = 1 moves
    # each weight by lr * g / (|g| + 1).
    ("1.0", [0.1 * 0.6 / 1.6, 0.1 * 0.8 / 1.8]),
    ("null", [0.1 * 3 / 4, 0.1 * 4 / 5]),
])
def test_grad_clipping_caps_the_global_norm(tmp_path, clip, moved):
    algo = Constant([0.0, 0.0], [3.0, 4.0])
    trainer = Trainer(config(tmp_path, "train.steps=1", "optim.lr=0.1", "optim.eps=1.0", f"optim.grad_clip={clip}"),
                      algo, no_data())
    trainer.fit()
    assert algo.layer.weight[0].tolist() == pytest.approx([-m for m in moved], rel=1e-5)
    assert float(metrics(trainer)[0]["grad_norm/layer"]) == pytest.approx(5.0)


@pytest.mark.parametrize("start", [0, 2])
def test_ema_follows_the_closed_form(tmp_path, start):
    lr, decay, steps, w0, c = 0.1, 0.75, 6, [1.0, -1.0], [1.0, -2.0]
    algo = Constant(w0, c)
    trainer = Trainer(config(tmp_path, f"train.steps={steps}", f"optim.lr={lr}", "optim.grad_clip=null",
                             f"ema.decay={decay}", f"ema.start_step={start}"), algo, no_data())
    trainer.fit()
    # Weights after update k: w_k = w0 - k * lr * sign(c). The EMA copies them through
    # update `start` (w_0 being the initial weights), then
    # ema_k = d^(k-s) w_s + (1 - d) * sum_{j=s+1..k} d^(k-j) w_j.
    w = [[w0[i] - k * lr * math.copysign(1, c[i]) for i in range(2)] for k in range(steps + 1)]
    expected = [decay ** (steps - start) * w[start][i]
                + (1 - decay) * sum(decay ** (steps - j) * w[j][i] for j in range(start + 1, steps + 1))
                for i in range(2)]
    assert algo.layer.weight[0].tolist() == pytest.approx(w[steps], abs=1e-5)
    ema = load_file(str(trainer.last_checkpoint / "layer_ema.safetensors"))["weight"]
    assert ema[0].tolist() == pytest.approx(expected, abs=1e-5)


def test_grad_accumulation_equals_one_batch_twice_as_large(tmp_path):
    runs = {}
    for accum, batch in ((2, 4), (1, 8)):
        seed_everything(0)
        algo = Regression(noisy=False)
        trainer = Trainer(config(tmp_path, "train.steps=5", f"train.batch_size={batch}",
                                 f"train.grad_accum_steps={accum}", "optim.lr=1e-2", name=f"a{accum}"),
                          algo, regression_data(batch))
        trainer.fit()
        runs[accum] = (algo.net, [float(r["loss/net"]) for r in metrics(trainer)])
    for p2, p1 in zip(runs[2][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-6)
    assert runs[2][1] == pytest.approx(runs[1][1], rel=1e-6)


def test_each_loss_updates_only_its_own_group_at_its_own_rate(tmp_path):
    fakes = []
    for reads in (True, False):
        seed_everything(0)
        algo = TwoGroup(student_reads_fake=reads)
        trainer = Trainer(config(tmp_path, "train.steps=4", name=f"r{reads}"), algo, regression_data(8))
        trainer.fit()
        fakes.append([p.detach().clone() for p in algo.fake.parameters()])
        updates = {g: {int(s["step"]) for s in opt.state.values()} for g, opt in trainer.optimizers.items()}
        assert updates == {"fake_score": {4}, "student": {2}}
        assert list(trainer.emas) == ["student"]
        rows = metrics(trainer)
        assert [r["loss/student"] != "" for r in rows] == [False, True, False, True]
        assert all(r["loss/fake_score"] != "" for r in rows)
    # The student loss reads the fake score, yet the fake score ends up the same.
    assert all(torch.equal(a, b) for a, b in zip(*fakes))


# ----------------------------------------------------------------------------------------
# Checkpoints and resume
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm, overrides", [
    (Regression, ["optim.schedule=cosine", "optim.warmup_steps=2", "train.grad_accum_steps=2"]),
    (TwoGroup, ["train.precision=bf16"]),
])
def test_resume_is_bit_exact(tmp_path, algorithm, overrides):
    common = ["train.steps=8", "train.ckpt_every=3", "optim.lr=1e-2", *overrides]

    seed_everything(0)
    straight = Trainer(config(tmp_path, *common, name="straight"), algorithm(), regression_data(8))
    straight.fit()
    rng_after_straight = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1])

    seed_everything(0)
    Trainer(config(tmp_path, *common, name="split"), algorithm(), regression_data(8)).fit(stop_at=4)
    seed_everything(99)  # the resumed weights and RNGs must all come from the checkpoint
    resumed = Trainer(config(tmp_path, *common, "run.resume=true", name="split"), algorithm(), regression_data(8))
    assert resumed.step == 4
    resumed.fit()

    assert torch.equal(torch.get_rng_state(), rng_after_straight[0])
    assert random.getstate() == rng_after_straight[1]
    assert np.array_equal(np.random.get_state()[1], rng_after_straight[2])
    for group, module in straight.modules.items():
        for a, b in zip(module.state_dict().values(), resumed.modules[group].state_dict().values()):
            assert torch.equal(a, b)
        state_a, state_b = straight.optimizers[group].state_dict(), resumed.optimizers[group].state_dict()
        for i, per_param in state_a["state"].items():
            for key, value in per_param.items():
                assert torch.equal(value, state_b["state"][i][key])
    for group, ema in straight.emas.items():
        assert all(torch.equal(v, resumed.emas[group].shadow[k]) for k, v in ema.shadow.items())
    assert straight.data.state_dict() == resumed.data.state_dict()
    assert straight.algorithm.state_dict().keys() == resumed.algorithm.state_dict().keys()
    for key, value in straight.algorithm.state_dict().items():
        assert torch.equal(value, resumed.algorithm.state_dict()[key])
    drop_speed = lambda rows: [{k: v for k, v in r.items() if k not in ("samples_per_s", "mfu")} for r in rows]
    assert drop_speed(metrics(resumed)) == drop_speed(metrics(straight))
    assert len(metrics(resumed)) == 8


class SignalAt(Regression):
    """Regression that sends its own process ``sig`` during update ``at``, as Ctrl-C or a
    job scheduler's SIGTERM would arrive mid-step."""

    def __init__(self, sig=None, at=None):
        super().__init__()
        self.sig, self.at = sig, at

    def training_step(self, batch, step):
        if step == self.at:
            os.kill(os.getpid(), self.sig)
        return super().training_step(batch, step)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_the_step_in_flight_and_resume_is_bit_exact(tmp_path, capsys, sig):
    common = ["train.steps=8", "train.ckpt_every=100", "optim.lr=1e-2"]
    seed_everything(0)
    straight = Trainer(config(tmp_path, *common, name="straight"), SignalAt(), regression_data(8))
    straight.fit()

    seed_everything(0)
    stopped = Trainer(config(tmp_path, *common, name="stopped"), SignalAt(sig, at=3), regression_data(8))
    handler = signal.getsignal(sig)
    stopped.fit()
    assert signal.getsignal(sig) == handler  # the process's own handler is back
    assert stopped.step == 3 and checkpoint_steps(stopped) == ["step_0000003"]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{signal.Signals(sig).name} at step 3: saved ") and line.endswith("run.resume=true")

    seed_everything(99)
    resumed = Trainer(config(tmp_path, *common, "run.resume=true", name="stopped"), SignalAt(), regression_data(8))
    assert resumed.step == 3
    resumed.fit()
    for a, b in zip(straight.modules["net"].state_dict().values(), resumed.modules["net"].state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_layout_is_safetensors_and_json(tmp_path):
    seed_everything(0)
    trainer = Trainer(config(tmp_path, "train.steps=6", "train.ckpt_every=2", "train.keep_last_ckpts=2"),
                      Regression(), regression_data(8))
    trainer.fit()
    assert checkpoint_steps(trainer) == ["step_0000004", "step_0000006"]
    assert (trainer.ckpt_dir / "latest").read_text().strip() == "step_0000006"
    ckpt = trainer.ckpt_dir / "step_0000006"
    assert sorted(p.name for p in ckpt.iterdir()) == ["net.safetensors", "net_ema.safetensors", "optimizer_state.safetensors",
                                                       "trainer_state.json", "trainer_state.safetensors"]
    # An older checkpoint keeps weights and EMA for evaluation, not the optimizer's moments.
    assert sorted(p.name for p in (trainer.ckpt_dir / "step_0000004").iterdir()) == [
        "net.safetensors", "net_ema.safetensors", "trainer_state.json", "trainer_state.safetensors"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data"]["epoch"] == 0 and state["data"]["offset"] == 48
    weights = load_file(str(ckpt / "net.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in trainer.modules["net"].state_dict().items())
    assert load_config(TrainConfig, trainer.run_dir / "config.yaml") == trainer.cfg


def test_only_the_newest_checkpoint_keeps_optimizer_state_and_the_log_says_the_sizes(tmp_path, capsys):
    seed_everything(0)
    trainer = Trainer(config(tmp_path, "train.steps=6", "train.ckpt_every=2", "train.keep_last_ckpts=3"),
                      Regression(), regression_data(8))
    trainer.fit()
    has_optimizer = {p.name: (p / "optimizer_state.safetensors").is_file() for p in trainer.ckpt_dir.glob("step_*")}
    assert has_optimizer == {"step_0000002": False, "step_0000004": False, "step_0000006": True}
    log = capsys.readouterr().out
    assert re.search(r"checkpoints: \d+ MB the newest, \d+ MB each older one \(no optimizer state\); "
                     r"train.keep_last_ckpts=3 keeps at most \d+ MB", log)
    # Pointing latest at an older checkpoint: it cannot be resumed, and says which one can.
    (trainer.ckpt_dir / "latest").write_text("step_0000004\n")
    (trainer.ckpt_dir / "step_0000006").rename(trainer.ckpt_dir / "old-6")
    with pytest.raises(ZImageKitError, match="keeps no optimizer state .* resume from the newest"):
        Trainer(config(tmp_path, "train.steps=8", "run.resume=true"), Regression(), regression_data(8))


class InParts(Regression):
    """The same regression, its loss given as two halves of the batch (each half's mean / 2),
    each computed only when the trainer asks for it."""

    def __init__(self):
        super().__init__(noisy=False)
        self.alive = []

    def training_step(self, batch, step):
        x, y = batch
        half = len(x) // 2

        def parts():
            for sl in (slice(0, half), slice(half, None)):
                self.alive.append(sl)
                yield F.mse_loss(self.net(x[sl]).float(), y[sl]) / 2

        return {"net": parts()}


def test_a_loss_in_parts_trains_exactly_like_the_whole_loss(tmp_path):
    """Parts are back-propagated one by one; the update is the whole loss's (to float rounding),
    the logged loss their sum, and a part that is not a scalar is refused."""
    seed_everything(0)
    whole = Trainer(config(tmp_path, "train.steps=3", name="whole"), Regression(noisy=False), regression_data(8))
    whole.fit()
    seed_everything(0)
    algo = InParts()
    parted = Trainer(config(tmp_path, "train.steps=3", name="parts"), algo, regression_data(8))
    parted.fit()
    assert len(algo.alive) == 6  # two parts a step, both asked for
    for a, b in zip(whole.modules["net"].parameters(), parted.modules["net"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for r, q in zip(metrics(whole), metrics(parted)):
        assert float(r["loss/net"]) == pytest.approx(float(q["loss/net"]), rel=1e-5)

    class BadPart(Regression):
        def training_step(self, batch, step):
            return {"net": iter([torch.ones(2, requires_grad=True)])}

    with pytest.raises(ValueError, match="every part must be a scalar tensor"):
        Trainer(config(tmp_path, "train.steps=1", name="bad"), BadPart(), regression_data(8)).fit()


def test_a_later_checkpoint_left_by_another_process_never_strips_the_newest(tmp_path):
    """A step_* directory with a later step appearing mid-run (another process writing into the
    same run directory) is not counted as newest: the checkpoint just written keeps its
    optimizer state, and the run resumes from it."""
    seed_everything(0)
    trainer = Trainer(config(tmp_path, "train.steps=4", "train.ckpt_every=2", "train.keep_last_ckpts=2"),
                      Regression(), regression_data(8))
    trainer.fit(stop_at=2)
    shutil.copytree(trainer.ckpt_dir / "step_0000002", trainer.ckpt_dir / "step_0000009")
    trainer.fit()
    assert (trainer.ckpt_dir / "step_0000004" / "optimizer_state.safetensors").is_file()
    assert (trainer.ckpt_dir / "latest").read_text().strip() == "step_0000004"


def test_the_host_reads_losses_and_norms_per_log_line_not_per_update(tmp_path, monkeypatch):
    """Every read of a tensor's value by the host waits for the device (a sync on a GPU).
    Counting zimagekit's reads (torch's AdamW reads its step counters, which live on the CPU):
    a run of 40 updates with one log line reads exactly as many values as a run of 1 update."""
    import sys

    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("zimagekit"):
                reads.append(1)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def count(steps: int) -> int:
        seed_everything(0)
        trainer = Trainer(config(tmp_path, f"train.steps={steps}", f"train.log_every={steps}", name=f"r{steps}"),
                          Regression(noisy=False), regression_data(8))
        reads.clear()
        trainer.fit()
        return len(reads)

    assert count(40) == count(1) > 0


def test_a_nan_between_log_lines_is_named_at_its_step_and_never_saved(tmp_path):
    """The host reads losses only per log line (here every 10 updates), but the checkpoint due
    after the bad update is refused: the error names step 5, step 4 stays the latest."""
    seed_everything(0)
    trainer = Trainer(config(tmp_path, "train.steps=10", "train.ckpt_every=2", "train.log_every=10"),
                      Regression(bad_loss_at=5), regression_data(8))
    with pytest.raises(TrainingDiverged, match="the net loss is nan at step 5"):
        trainer.fit()
    assert checkpoint_steps(trainer) == ["step_0000002", "step_0000004"]
    assert (trainer.ckpt_dir / "latest").read_text().strip() == "step_0000004"


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    seed_everything(0)
    trainer = Trainer(config(tmp_path, "train.steps=10", "train.ckpt_every=2"),
                      Regression(bad_loss_at=5, bad_value=bad), regression_data(8))
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    good = trainer.ckpt_dir / "step_0000004"
    assert "step 5" in str(info.value) and str(good) in str(info.value) and "\n" not in str(info.value)
    assert (trainer.ckpt_dir / "latest").read_text().strip() == "step_0000004"
    assert checkpoint_steps(trainer) == ["step_0000002", "step_0000004"]
    assert [int(r["step"]) for r in metrics(trainer)][-1] == 4
    saved = load_file(str(good / "net.safetensors"))
    resumed = Trainer(config(tmp_path, "train.steps=10", "run.resume=true"), Regression(), regression_data(8))
    assert resumed.step == 4
    assert all(torch.equal(saved[k], v) for k, v in resumed.modules["net"].state_dict().items())


def test_resume_ignores_checkpoints_that_were_never_published(tmp_path):
    seed_everything(0)
    cfg = ["train.steps=6", "train.ckpt_every=2"]
    Trainer(config(tmp_path, *cfg), Regression(), regression_data(8)).fit(stop_at=4)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    # A crash mid-write leaves a temporary directory; a crash between the rename and the
    # pointer update leaves a complete-looking step directory that `latest` never named.
    (ckpt_dir / ".tmp-step_0000006").mkdir()
    (ckpt_dir / ".tmp-step_0000006" / "net.safetensors").write_bytes(b"\x00\x01 truncated")
    (ckpt_dir / "step_0000006").mkdir()
    (ckpt_dir / "step_0000006" / "trainer_state.json").write_text("{")
    resumed = Trainer(config(tmp_path, *cfg, "run.resume=true"), Regression(), regression_data(8))
    assert resumed.step == 4
    assert checkpoint_steps(resumed) == ["step_0000002", "step_0000004"]
    resumed.fit()
    assert json.loads((ckpt_dir / "step_0000006" / "trainer_state.json").read_text())["step"] == 6


@pytest.mark.parametrize("pointer", ["missing", "behind"])
def test_resume_takes_a_published_checkpoint_the_pointer_lags_behind(tmp_path, capsys, pointer):
    """Killed after publishing step_4's directory but before moving ``latest`` (still at
    step 2, or, at a run's first checkpoint, not written yet): resume continues from step 4,
    says so, and ends where an uninterrupted run ends, bit for bit."""
    common = ["train.steps=6", "train.ckpt_every=2", "optim.lr=1e-2"]
    seed_everything(0)
    straight = Trainer(config(tmp_path, *common, name="straight"), Regression(), regression_data(8))
    straight.fit()
    seed_everything(0)
    first = ["train.ckpt_every=4"] if pointer == "missing" else []
    killed = Trainer(config(tmp_path, *common, *first, name="killed"), Regression(), regression_data(8))
    killed.fit(stop_at=4)
    if pointer == "missing":
        (killed.ckpt_dir / "latest").unlink()
    else:
        (killed.ckpt_dir / "latest").write_text("step_0000002\n")
    seed_everything(99)
    resumed = Trainer(config(tmp_path, *common, "run.resume=true", name="killed"), Regression(), regression_data(8))
    assert resumed.step == 4
    assert "from step 4 (step_0000004)" in capsys.readouterr().out
    resumed.fit()
    for a, b in zip(straight.modules["net"].state_dict().values(), resumed.modules["net"].state_dict().values()):
        assert torch.equal(a, b)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_how_to_resume(tmp_path, monkeypatch):
    import errno

    from zimagekit.trainer import loop

    seed_everything(0)
    cfg = ["train.steps=6", "train.ckpt_every=2"]
    trainer = Trainer(config(tmp_path, *cfg), Regression(), regression_data(8))
    real_save = loop.save_file

    def save_file(tensors, path, *args, **kwargs):
        if "step_0000004" in path and path.endswith("state.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(loop, "save_file", save_file)
    with pytest.raises(ZImageKitError) as info:
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message
    assert str(trainer.ckpt_dir / "step_0000002") in message and "run.resume=true" in message
    assert checkpoint_steps(trainer) == ["step_0000002"]  # no half-written step_0000004 or .tmp- left
    assert (trainer.ckpt_dir / "latest").read_text().strip() == "step_0000002"
    monkeypatch.undo()
    resumed = Trainer(config(tmp_path, *cfg, "run.resume=true"), Regression(), regression_data(8))
    assert resumed.step == 2
    resumed.fit()
    assert resumed.step == 6


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ZImageKitError, match=r"cannot write the run directory .*choose a run.dir you can write to"):
        Trainer(config(tmp_path / "file", "train.steps=1"), Regression(), regression_data(8))


def test_an_existing_run_is_never_overwritten(tmp_path):
    seed_everything(0)
    Trainer(config(tmp_path, "train.steps=1"), Regression(), regression_data(8)).fit()
    with pytest.raises(ZImageKitError, match="run.resume=true"):
        Trainer(config(tmp_path, "train.steps=1"), Regression(), regression_data(8))


def test_a_latest_pointer_to_nothing_is_reported(tmp_path):
    seed_everything(0)
    trainer = Trainer(config(tmp_path, "train.steps=1"), Regression(), regression_data(8))
    trainer.fit()
    (trainer.ckpt_dir / "latest").write_text("step_0000009\n")
    with pytest.raises(ZImageKitError, match="step_0000009, which does not exist"):
        Trainer(config(tmp_path, "train.steps=2", "run.resume=true"), Regression(), regression_data(8))


def test_a_checkpoint_of_another_model_is_reported(tmp_path):
    seed_everything(0)
    Trainer(config(tmp_path, "train.steps=1"), Regression(), regression_data(8)).fit()
    algo = Regression()
    algo.net[3] = nn.Linear(16, 2)
    with pytest.raises(ZImageKitError, match="does not fit the modules"):
        Trainer(config(tmp_path, "train.steps=2", "run.resume=true"), algo, regression_data(8))


def test_data_source_rejects_a_different_dataset_on_resume():
    source = regression_data(8)
    state = source.state_dict()
    with pytest.raises(ZImageKitError, match="batch_size=8"):
        regression_data(4).load_state_dict(state)


def test_data_source_position_replays_the_same_batches():
    source = regression_data(8, size=20)  # 2 batches per epoch, 4 items skipped
    for _ in range(3):
        source.next_batch()
    state = source.state_dict()
    ahead = [source.next_batch()[0] for _ in range(3)]
    replay = regression_data(8, size=20)
    replay.load_state_dict(state)
    assert all(torch.equal(a, batch[0]) for a, batch in zip(ahead, iter(replay)))
    assert state["epoch"] == 1 and state["offset"] == 8


# ----------------------------------------------------------------------------------------
# Samples, parallelize hook, logs
# ----------------------------------------------------------------------------------------


def test_sample_grid_is_written_every_k_steps_with_ema_weights(tmp_path):
    seed_everything(0)
    algo = Regression()
    trainer = Trainer(config(tmp_path, "train.steps=7", "train.sample_every=3", "train.ckpt_every=3",
                             "train.keep_last_ckpts=5", "sample.prompts=[p0, p1]", "sample.seeds=[0, 1, 2]"),
                      algo, regression_data(8))
    trainer.fit()
    assert sorted(p.name for p in (trainer.run_dir / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    grid = Image.open(trainer.run_dir / "samples" / "step_0000006.png")
    assert grid.size == (3 * 8, 2 * 6)  # a row per prompt, a column per seed
    for row in range(2):
        for col in range(3):
            assert grid.getpixel((col * 8 + 4, row * 6 + 3)) == (40 * row, 30 * col, 200)
    for step, weight in zip((3, 6), algo.sampled_with):
        ckpt = trainer.ckpt_dir / f"step_{step:07d}"
        assert torch.equal(weight, load_file(str(ckpt / "net_ema.safetensors"))["0.weight"])
        assert not torch.equal(weight, load_file(str(ckpt / "net.safetensors"))["0.weight"])
    assert algo.net.training


def test_sampling_does_not_change_training(tmp_path):
    finals = []
    for every in (2, 0):
        seed_everything(0)
        algo = Regression()
        Trainer(config(tmp_path, "train.steps=5", f"train.sample_every={every}", "sample.prompts=[p0]",
                       name=f"s{every}"), algo, regression_data(8)).fit()
        finals.append(algo.net.state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_sampling_needs_an_algorithm_that_samples_and_prompts(tmp_path):
    with pytest.raises(ZImageKitError, match="cannot sample"):
        Trainer(config(tmp_path, "train.sample_every=2", "sample.prompts=[a]"), TwoGroup(), regression_data(8))
    with pytest.raises(ZImageKitError, match="sample.prompts is empty"):
        Trainer(config(tmp_path, "train.sample_every=2"), Regression(), regression_data(8))


def test_parallelize_sees_every_trained_module_before_optimizers_exist(tmp_path):
    seen = []

    def parallelize(modules):
        seen.append(dict(modules))
        modules["student"].bias.requires_grad_(False)  # a change the optimizer must reflect

    algo = TwoGroup()
    trainer = Trainer(config(tmp_path), algo, regression_data(8), parallelize=parallelize)
    assert seen == [{"student": algo.student, "fake_score": algo.fake}]
    assert trainer.optimizers["student"].param_groups[0]["params"] == [algo.student.weight]


def test_metrics_log_throughput_and_mfu(tmp_path):
    seed_everything(0)
    trainer = Trainer(config(tmp_path, "train.steps=4", "train.log_every=2", "mfu_peak_flops=1e9"),
                      Regression(), regression_data(8))
    trainer.fit()
    rows = metrics(trainer)
    assert [int(r["step"]) for r in rows] == [2, 4]
    flops = Regression().flops_per_sample()
    for r in rows:
        assert float(r["samples_per_s"]) > 0
        assert float(r["mfu"]) == pytest.approx(flops * float(r["samples_per_s"]) / 1e9)
    assert any((trainer.run_dir / "tensorboard").iterdir())


def test_bucketed_batches_stay_in_one_bucket_and_resume_exactly():
    buckets = [i % 3 for i in range(30)] + [3, 3]  # buckets 0-2 of 10 items, bucket 3 too small for a batch
    source = IndexDataSource(lambda idx: idx, size=32, batch_size=4, seed=7, buckets=buckets)
    epoch = [source.next_batch() for _ in range(6)]  # 3 buckets x floor(10 / 4) = 6 full batches
    assert all(len({buckets[i] for i in b}) == 1 for b in epoch)
    flat = [i for b in epoch for i in b]
    assert len(flat) == len(set(flat)) == 24 and not {30, 31} & set(flat)
    state = source.state_dict()
    ahead = [source.next_batch() for _ in range(5)]
    again = IndexDataSource(lambda idx: idx, size=32, batch_size=4, seed=7, buckets=buckets)
    again.load_state_dict(state)
    assert [again.next_batch() for _ in range(5)] == ahead
    with pytest.raises(ZImageKitError, match="buckets="):
        IndexDataSource(lambda idx: idx, size=32, batch_size=4, seed=7, buckets=[0] * 32).load_state_dict(state)

"""The :class:`Trainer`: the one loop every algorithm runs on (see :mod:`zimagekit.trainer`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, NoReturn

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .. import parallel
from ..errors import ZImageKitError
from ..fileio import atomic_write
from ..runconfig import save_config
from .algorithm import Algorithm, TrainingDiverged
from .checkpoint import (CHECKPOINT_FORMAT, OPTIMIZER_TENSORS, STATE_JSON, STATE_TENSORS, fsync, host_copy,
                         is_complete, pack_state, step_of, unpack_state)
from .config import TrainConfig, lr_at
from .data import DataSource
from .ema import EMA
from .logs import MetricLog, image_grid
from .rng import rng_state, rng_untouched, seed_everything, set_rng_state

_GROUP_NAME = re.compile(r"[A-Za-z0-9_]+")


class _StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM while training: the first lets the update in flight finish,
    so the loop can save a checkpoint at that step and return; a second one interrupts at
    once. Handlers are installed only in the main thread, where Python runs them, and the old
    ones come back with :meth:`restore`."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.name is not None:
            self.restore()
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any process was asked to stop (all processes must save together)."""
        return parallel.mean_over_ranks([float(self.name is not None)])[0] > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Trainer:
    """Runs ``algorithm`` on batches from ``data`` as ``cfg`` says, in ``<run.dir>/<run.name>``.

    Construction prepares everything: it checks the config against the algorithm, applies
    ``parallelize`` to the trained modules, builds one AdamW (and EMA) per group, and either
    resumes from the run's latest checkpoint (``run.resume``) or seeds a fresh run. Public
    state: ``step`` (updates done), ``optimizers`` and ``emas`` by group, ``run_dir``,
    ``last_checkpoint``.
    """

    def __init__(self, cfg: TrainConfig, algorithm: Algorithm, data: DataSource,
                 parallelize: Callable[[dict[str, nn.Module]], None] | None = None):
        self.cfg, self.algorithm, self.data = cfg, algorithm, data
        self.run_dir = Path(cfg.run.dir) / cfg.run.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.last_checkpoint: Path | None = None
        self._sizes_logged = False  # the first checkpoint's sizes go into the log once

        self.modules = algorithm.modules()
        self._check_algorithm()
        if parallelize is not None:
            parallelize(self.modules)
        self.device = next(next(iter(self.modules.values())).parameters()).device
        self._trainable = {g: [p for p in m.parameters() if p.requires_grad] for g, m in self.modules.items()}
        self._optim_cfgs = {g: algorithm.optim_config(g, cfg.optim) for g in self.modules}
        # Fused: one kernel for the whole update, with its step counters on the device (no
        # host read per update); on this CPU 6x faster than the foreach update, equal to 3e-8.
        self.optimizers = {
            g: torch.optim.AdamW(self._trainable[g], lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                 **({"fused": True} if parallel.fused_optimizer_ok(self._trainable[g]) else {}))
            for g, o in self._optim_cfgs.items()
        }
        ema_groups = self.modules if algorithm.ema_groups is None else algorithm.ema_groups
        self.emas = {g: EMA(self.modules[g], cfg.ema.decay, cfg.ema.start_step)
                     for g in ema_groups} if cfg.ema.enabled else {}
        self._flops_per_sample = algorithm.flops_per_sample()
        self._open_run_dir()

    def _check_algorithm(self) -> None:
        name = type(self.algorithm).__name__
        if not self.modules:
            raise ValueError(f"{name}.modules() returned no modules to train")
        for group, module in self.modules.items():
            if not _GROUP_NAME.fullmatch(group):
                raise ValueError(f"{name}.modules() group {group!r} must be letters, digits and underscores")
            if not any(p.requires_grad for p in module.parameters()):
                raise ValueError(f"{name}.modules()[{group!r}] has no parameter that requires grad")
        unknown = set(self.algorithm.ema_groups or ()) - set(self.modules)
        if unknown:
            raise ValueError(f"{name}.ema_groups names {sorted(unknown)}, which modules() does not return")
        every = self.cfg.train.sample_every
        if every and type(self.algorithm).sample is Algorithm.sample:
            raise ZImageKitError(f"train.sample_every={every} but {name} cannot sample; set train.sample_every=0")
        # Checked here, not in the config, so that overrides may set the two in either order.
        if every and not self.cfg.sample.prompts:
            raise ZImageKitError(f"train.sample_every={every} but sample.prompts is empty; list prompts or set "
                                 f"train.sample_every=0")

    # -- run directory and checkpoints --------------------------------------------------

    def _open_run_dir(self) -> None:
        def find_latest() -> Path | None:
            exists = self.run_dir.is_dir() and any(self.run_dir.iterdir())
            if exists and not self.cfg.run.resume:
                raise ZImageKitError(f"run directory {self.run_dir} already exists; pass run.resume=true to "
                                     f"continue it or choose another run.name")
            return self._latest_checkpoint() if exists else None

        latest = parallel.on_main(find_latest)  # only rank 0 reads the run directory
        if latest is not None:
            self._load_checkpoint(latest)
            if parallel.is_main():
                tqdm.write(f"resuming {self.run_dir} from step {self.step} ({latest.name})")
        else:
            seed_everything(self.cfg.run.seed)
        if parallel.is_main():
            try:
                self._discard_unpublished()
                self.run_dir.mkdir(parents=True, exist_ok=True)
                save_config(self.cfg, self.run_dir / "config.yaml")
            except OSError as e:
                raise ZImageKitError(f"cannot write the run directory {self.run_dir} ({e.strerror or e}); "
                                     "choose a run.dir you can write to") from None

    def _latest_checkpoint(self) -> Path | None:
        """The checkpoint ``latest`` names, or a newer complete one: a process killed after
        publishing a checkpoint's directory but before moving the pointer (or, at the first
        checkpoint, before there was one) leaves a complete directory the pointer lags behind."""
        pointer = self.ckpt_dir / "latest"
        named = None
        if pointer.is_file():
            named = self.ckpt_dir / pointer.read_text().strip()
            if step_of(named) is None or not named.is_dir():
                raise ZImageKitError(f"{pointer} names {named.name}, which does not exist; point it at an existing "
                                     f"step_* directory or start a new run")
        newer = [p for p in self.ckpt_dir.glob("step_*")
                 if is_complete(p) and (named is None or step_of(p) > step_of(named))]
        return max(newer, key=step_of, default=named)

    def _discard_unpublished(self) -> None:
        """Remove temporary checkpoint directories and checkpoints newer than the one
        resumed from: both belong to a run that stopped before publishing them."""
        if not self.ckpt_dir.is_dir():
            return
        for path in self.ckpt_dir.iterdir():
            step = step_of(path)
            if path.name.startswith(".tmp-") or (step is not None and step > self.step):
                shutil.rmtree(path)

    def _save_checkpoint(self) -> None:
        """Write everything resume needs into a temporary directory, publish it with one
        rename, then move the ``latest`` pointer: a crash at any point leaves ``latest``
        naming a complete checkpoint."""
        name = f"step_{self.step:07d}"
        self.last_checkpoint = self.ckpt_dir / name
        # Every rank helps gather the full tensors; rank 0 alone writes them.
        modules = {g: parallel.gather_to_main(m.state_dict()) for g, m in self.modules.items()}
        emas = {g: parallel.gather_to_main(ema.state_dict()) for g, ema in self.emas.items()}
        optimizers = {g: parallel.gather_to_main(o.state_dict()) for g, o in self.optimizers.items()}
        if not parallel.is_main():
            return
        try:
            self._write_checkpoint(name, modules, emas, optimizers)
        except OSError as e:
            # A full disk or a lost mount: what was published before is untouched.
            shutil.rmtree(self.ckpt_dir / f".tmp-{name}", ignore_errors=True)
            previous = (self.ckpt_dir / "latest").read_text().strip() if (self.ckpt_dir / "latest").is_file() else None
            kept = (f"the previous checkpoint {self.ckpt_dir / previous} is intact: make room and resume with "
                    "run.resume=true" if previous else "there is no earlier checkpoint: make room and start again")
            raise ZImageKitError(f"cannot write checkpoint {name} in {self.ckpt_dir} ({e.strerror or e}); {kept}") from None

    def _write_checkpoint(self, name: str, modules: dict, emas: dict, optimizers: dict) -> None:
        tmp = self.ckpt_dir / f".tmp-{name}"
        tmp.mkdir(parents=True)
        for group, state in modules.items():
            save_file({k: host_copy(v) for k, v in state.items()}, str(tmp / f"{group}.safetensors"))
        for group, state in emas.items():
            save_file({k: host_copy(v) for k, v in state.items()}, str(tmp / f"{group}_ema.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        optimizer_tensors: dict[str, torch.Tensor] = {}
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "optimizers": {g: pack_state(o, optimizer_tensors, f"optimizers.{g}") for g, o in optimizers.items()},
            "data": pack_state(self.data.state_dict(), tensors, "data"),
            "algorithm": pack_state(self.algorithm.state_dict(), tensors, "algorithm"),
            "rng": pack_state(rng_state(), tensors, "rng"),
        }
        save_file(tensors, str(tmp / STATE_TENSORS))
        save_file(optimizer_tensors, str(tmp / OPTIMIZER_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1))
        for path in tmp.iterdir():
            fsync(path)
        os.replace(tmp, self.ckpt_dir / name)
        atomic_write(self.ckpt_dir / "latest", lambda p: p.write_text(name + "\n"))
        fsync(self.ckpt_dir)
        # The one just written is the newest, whatever else the folder holds: a directory with a
        # later step (left by another process writing into this run) is neither kept in the
        # count nor allowed to strip this one's optimizer state.
        steps = sorted((p for p in self.ckpt_dir.iterdir() if step_of(p) is not None and step_of(p) <= self.step),
                       key=step_of)
        for old in steps[: -self.cfg.train.keep_last_ckpts]:
            shutil.rmtree(old)
        # Only now that the new one is published may the older ones lose their optimizer state.
        for old in steps[-self.cfg.train.keep_last_ckpts:-1]:
            (old / OPTIMIZER_TENSORS).unlink(missing_ok=True)
        if not self._sizes_logged:
            self._sizes_logged = True
            full = sum(f.stat().st_size for f in self.last_checkpoint.iterdir())
            kept = full - (self.last_checkpoint / OPTIMIZER_TENSORS).stat().st_size
            tqdm.write(f"checkpoints: {full / 2**20:.0f} MB the newest, {kept / 2**20:.0f} MB each older one "
                       f"(no optimizer state); train.keep_last_ckpts={self.cfg.train.keep_last_ckpts} keeps at most "
                       f"{(full + kept * (self.cfg.train.keep_last_ckpts - 1)) / 2**20:.0f} MB")

    def _load_checkpoint(self, path: Path) -> None:
        """Rank 0 reads the files; each rank receives its shards (see :mod:`zimagekit.parallel`)."""
        main = parallel.is_main()
        state = None

        def read() -> None:
            nonlocal state
            files = [STATE_JSON, STATE_TENSORS, *(f"{g}.safetensors" for g in self.modules),
                     *(f"{g}_ema.safetensors" for g in self.emas)]
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise ZImageKitError(f"checkpoint {path} lacks {', '.join(missing)} (the modules or ema.enabled "
                                     f"changed?); resume with the config it was written with or start a new run")
            saved = json.loads((path / STATE_JSON).read_text())
            if saved["format"] != CHECKPOINT_FORMAT:
                raise ZImageKitError(f"checkpoint {path} has format {saved['format']}; this zimagekit reads "
                                     f"format {CHECKPOINT_FORMAT}")
            if not (path / OPTIMIZER_TENSORS).is_file():
                raise ZImageKitError(f"checkpoint {path} keeps no optimizer state (only the newest checkpoint of a "
                                     f"run does); resume from the newest, or load its weights with load_trained")
            state = unpack_state(saved, {**load_file(str(path / STATE_TENSORS)),
                                    **load_file(str(path / OPTIMIZER_TENSORS))})

        parallel.on_main(read)
        try:
            for group, module in self.modules.items():
                parallel.load_module_state(module, load_file(str(path / f"{group}.safetensors")) if main else None)
            for group, opt in self.optimizers.items():
                params = self._trainable[group]
                # Adam's moments have their parameter's shape, and take its shards.
                opt.load_state_dict(parallel.scatter_from_main(
                    state["optimizers"][group] if main else None,
                    lambda where: params[where[1]] if where[0] == "state" else None))
        except (RuntimeError, ValueError) as exc:  # torch's size/name mismatch messages
            first_line = str(exc).strip().splitlines()[0]
            raise ZImageKitError(f"checkpoint {path} does not fit the modules ({first_line}); resume with the "
                                 f"model config it was written with or start a new run") from None
        for group, ema in self.emas.items():
            ema.load_state_dict(parallel.scatter_from_main(
                load_file(str(path / f"{group}_ema.safetensors")) if main else None,
                lambda where: ema.shadow.get(where[0])))
        state = parallel.broadcast_object({k: state[k] for k in ("step", "data", "algorithm", "rng")} if main else None)
        self.data.load_state_dict(state["data"])
        self.algorithm.load_state_dict(state["algorithm"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.last_checkpoint = path

    # -- the loop -----------------------------------------------------------------------

    def fit(self, stop_at: int | None = None) -> None:
        """Train up to ``train.steps`` updates, or stop after update ``stop_at`` (with a
        checkpoint, as a job that runs out of time would), resumable later."""
        cfg = self.cfg.train
        last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        if self.step >= last:
            return
        groups = list(self.modules)
        columns = ["step", *(f"loss/{g}" for g in groups), *(f"lr/{g}" for g in groups),
                   *(f"grad_norm/{g}" for g in groups), "samples_per_s", "mfu", *self.algorithm.metric_names]
        main = parallel.is_main()
        log = MetricLog(self.run_dir, columns, self.step) if main else None
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and main), dynamic_ncols=True,
                   desc="train")
        world = parallel.world_size()
        samples_per_step = cfg.batch_size * cfg.grad_accum_steps * world  # the global batch
        for module in self.modules.values():
            module.train()
        # Losses and gradient norms stay on the device; the host reads them (one sync) only
        # to log, and checks them before anything is saved, so an update never waits for
        # the device. Speed is measured over a window of updates between two such syncs.
        self._first_bad = torch.full((2 * len(groups),), math.inf, dtype=torch.float64, device=self.device)
        self._bad_values = torch.zeros_like(self._first_bad)
        window = self._new_window()
        stop = _StopRequest()
        try:
            while self.step < last:
                if stop.agreed():
                    self._check_health()
                    self._save_checkpoint()
                    if main:
                        tqdm.write(f"{stop.name or 'a stop request'} at step {self.step}: saved {self.last_checkpoint}; continue with "
                                   f"the same command and run.resume=true")
                    return
                losses, norms, lrs = self._update(self.step + 1)
                window[1] += 1
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0:
                    self._check_health()
                    speed = window[1] * samples_per_step / (time.perf_counter() - window[0])
                    mfu = None
                    if self._flops_per_sample is not None and self.cfg.mfu_peak_flops is not None:
                        mfu = self._flops_per_sample * speed / (self.cfg.mfu_peak_flops * world)
                    losses = dict(zip(losses, parallel.mean_over_ranks([float(v) for v in losses.values()])))
                    row = {"step": self.step, **{f"loss/{g}": v for g, v in losses.items()},
                           **{f"lr/{g}": v for g, v in lrs.items()},
                           **{f"grad_norm/{g}": float(v) for g, v in norms.items()},
                           "samples_per_s": speed, "mfu": mfu, **self._algorithm_metrics()}
                    if main:
                        log.write(row)
                        bar.set_postfix({g: f"{v:.4g}" for g, v in losses.items()})
                        tqdm.write(self._log_line(row, groups))
                    window = self._new_window()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self._check_health()
                    self._write_sample_grid()
                    window = self._new_window()
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == last:
                    self._check_health()
                    self._save_checkpoint()
                    window = self._new_window()
        finally:
            stop.restore()
            bar.close()
            if log is not None:
                log.close()

    def _new_window(self) -> list:
        """[start time, updates since] of a speed window, started once the device is idle, so
        only the updates after it are timed (not a checkpoint or sample grid before it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return [time.perf_counter(), 0]

    def _note_health(self, step: int, values: list[torch.Tensor]) -> None:
        """Record ``step`` against each of ``values`` (losses, then gradient norms, by group)
        that is not finite, unless an earlier step already was: device work, no sync."""
        values = torch.stack([v.detach().to(torch.float64).reshape(()) for v in values])
        first = ~torch.isfinite(values) & torch.isinf(self._first_bad)
        self._first_bad = torch.where(first, step, self._first_bad)
        self._bad_values = torch.where(first, values, self._bad_values)

    def _check_health(self) -> None:
        """Stop without saving if any loss or gradient norm since the start was NaN or infinite
        on any process, naming the first such step."""
        first = parallel.min_over_ranks(self._first_bad).tolist()
        if min(first) == math.inf:
            return
        groups = list(self.modules)
        k = first.index(min(first))
        value = self._bad_values[k].item()  # this process's; another may have been the one
        what = "loss" if k < len(groups) else "gradient norm"
        self._diverged(f"the {groups[k % len(groups)]} {what} is {value if not math.isfinite(value) else 'not finite'}",
                       int(first[k]))

    def _update(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
        """One optimizer update: ``grad_accum_steps`` forward/backward passes, then clip,
        step and EMA for each group that returned a loss. Losses (means over micro-batches)
        and gradient norms are returned as device tensors."""
        accum = self.cfg.train.grad_accum_steps
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = self.data.next_batch()
            with self._autocast():
                losses = self.algorithm.training_step(batch, step)
            self._check_losses(losses, step, totals if micro else None)
            # Into each group's parameters only: a loss that reads another group's module
            # must not update it. Only needed when several groups step this update (a group
            # without a loss does not step, and its gradients are cleared first); a single
            # loss is left unrestricted because FSDP2's sharded parameters are not autograd
            # leaves that inputs= could name. Mean over micro-batches, hence the division.
            restrict = len(losses) > 1
            # A group given as parts: each part is computed, then back-propagated at once, so
            # only one part's graph is alive at a time; its value is their sum.
            streamed = {g: self._backward_parts(g, loss, accum, restrict)
                        for g, loss in losses.items() if not isinstance(loss, torch.Tensor)}
            whole = [g for g in losses if g not in streamed]
            for group, loss in losses.items():
                value = streamed[group] if group in streamed else loss.detach().float()
                totals[group] = totals[group] + value if group in totals else value
            for i, group in enumerate(whole):
                (losses[group] / accum).backward(inputs=self._trainable[group] if restrict else None,
                                                 retain_graph=i < len(whole) - 1)
        norms = {}
        for group in totals:
            clip = self._optim_cfgs[group].grad_clip
            norm = torch.nn.utils.clip_grad_norm_(self._trainable[group], math.inf if clip is None else clip)
            norms[group] = parallel.full_tensor(norm)
        groups = list(self.modules)
        values = [totals.get(g, torch.zeros((), device=self.device)) for g in groups]
        values += [norms.get(g, torch.zeros((), device=self.device)) for g in groups]
        self._note_health(step, values)
        lrs = {}
        for group in totals:
            lrs[group] = lr_at(step, self._optim_cfgs[group], self.cfg.train.steps)
            for param_group in self.optimizers[group].param_groups:
                param_group["lr"] = lrs[group]
            self.optimizers[group].step()
            if group in self.emas:
                self.emas[group].update(step)
        return {g: v / accum for g, v in totals.items()}, norms, lrs

    def _check_losses(self, losses, step: int, earlier: dict | None) -> None:
        name = type(self.algorithm).__name__
        if not isinstance(losses, dict) or not losses:
            raise ValueError(f"{name}.training_step must return a non-empty dict of group -> loss, got {losses!r}")
        for group, loss in losses.items():
            if group not in self.modules:
                raise ValueError(f"{name}.training_step returned a loss for {group!r}; its groups are {list(self.modules)}")
            if isinstance(loss, torch.Tensor) and loss.ndim == 0:
                continue
            if isinstance(loss, torch.Tensor) or not hasattr(loss, "__iter__"):
                raise ValueError(f"{name}.training_step loss {group!r} must be a scalar tensor or an iterable of them")
        if earlier is not None and set(losses) != set(earlier):
            raise ValueError(f"{name}.training_step returned groups {sorted(losses)} at step {step} after "
                             f"{sorted(earlier)} in an earlier micro-batch of the same step")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")

    def _backward_parts(self, group: str, parts, accum: int, restrict: bool) -> torch.Tensor:
        """Back-propagate each scalar part of ``group``'s loss as it is produced (each under
        autocast, like training_step); returns the sum of their values (on the device)."""
        name = type(self.algorithm).__name__
        total = torch.zeros((), device=self.device)
        parts = iter(parts)
        while True:
            with self._autocast():
                part = next(parts, None)
            if part is None:
                return total
            if not (isinstance(part, torch.Tensor) and part.ndim == 0):
                raise ValueError(f"{name}.training_step loss {group!r}: every part must be a scalar tensor")
            total = total + part.detach().float()
            (part / accum).backward(inputs=self._trainable[group] if restrict else None)

    def _diverged(self, what: str, step: int) -> NoReturn:
        saved = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
        raise TrainingDiverged(f"{what} at step {step}; stopped without saving, {saved}; resume from it with a "
                               f"lower optim.lr or a tighter optim.grad_clip")

    def _algorithm_metrics(self) -> dict[str, float]:
        values = {k: v for k, v in self.algorithm.metrics().items() if k in self.algorithm.metric_names}
        names = sorted(values)
        return dict(zip(names, parallel.mean_over_ranks([float(values[k]) for k in names]))) if names else {}

    def _log_line(self, row: dict, groups: list[str]) -> str:
        parts = [f"step {row['step']}"]
        for g in groups:
            if row.get(f"loss/{g}") is not None:
                parts.append(f"{g}: loss {row[f'loss/{g}']:.4g} lr {row[f'lr/{g}']:.3g} "
                             f"grad_norm {row[f'grad_norm/{g}']:.3g}")
        parts.append(f"{row['samples_per_s']:.1f} samples/s")
        if row["mfu"] is not None:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        parts += [f"{k} {row[k]:.4g}" for k in self.algorithm.metric_names if row.get(k) is not None]
        return " | ".join(parts)

    def _write_sample_grid(self) -> None:
        prompts = [p for p in self.cfg.sample.prompts for _ in self.cfg.sample.seeds]
        seeds = [s for _ in self.cfg.sample.prompts for s in self.cfg.sample.seeds]
        modes = {g: m.training for g, m in self.modules.items()}
        with rng_untouched(), torch.no_grad(), contextlib.ExitStack() as stack:
            if self.cfg.sample.use_ema:
                for ema in self.emas.values():
                    stack.enter_context(ema.swapped_in())
            for module in self.modules.values():
                module.eval()
            try:
                images = self.algorithm.sample(prompts, seeds)
            finally:
                for g, module in self.modules.items():
                    module.train(modes[g])
        if len(images) != len(prompts):
            raise ValueError(f"{type(self.algorithm).__name__}.sample returned {len(images)} images for "
                             f"{len(prompts)} (prompt, seed) pairs")
        if not parallel.is_main():  # every rank sampled: sharded modules run collectively
            return
        grid = image_grid(images, cols=len(self.cfg.sample.seeds))
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))

"""One fit(): the epoch loop, checkpoint and resume, evaluation at epoch ends, finishing.

The step is `forward_backward` + `optimizer_step`; everything else that happens between steps (stop requests,
agreement between ranks, log points, hooks, checkpoint deadlines) is one call, `at_step_boundary`.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from stride import placement, runstate
from stride.checkpoint import BackgroundWriter, Checkpointer, HostStaging
from stride.compare import higher_is_better
from stride.errors import RunError
from stride.logs import ProgressBar
from stride.rundir import RunDir, now_iso, write_json
from stride.training import recipe
from stride.training.control import Cadence, agree
from stride.training.data import make_loaders, resolve_worker_start, set_train_epoch
from stride.training.hooks import Callbacks, FitState, build_callbacks
from stride.training.prefetch import device_batches
from stride.training.rng import rng_state, set_rng_state
from stride.training.sinks import build_sinks

CHECKPOINT_FORMAT = 2
PROGRESS_EVERY_S = 2.0
"""status.json's step is refreshed at log points, at most this often (in the background, rank 0 only)."""


class Loop:
    """Optimizer, schedule, DDP wrapping, checkpoint/resume and the epoch loop of one fit(); not Trainer's API."""

    def __init__(self, trainer: Any, run_dir: RunDir, log: Any):
        self.t, self.run_dir, self.log = trainer, run_dir, log
        self.env = trainer.env
        self.tk = trainer.config["training_kwargs"]
        self.is_main = self.env.is_main
        self.task = trainer.task
        self.best_metric = self.tk["best_metric"] or self.task.best_metric
        mode = self.tk["best_mode"]
        by_task = self.task.higher_is_better(self.best_metric)
        self.maximize = mode == "max" or (mode == "auto" and (by_task if by_task is not None
                                                              else higher_is_better(self.best_metric)))
        self.checkpointer = Checkpointer(run_dir.checkpoints_dir, self.tk["keep_last_checkpoints"],
                                         background=self.tk["async_checkpoint"])
        self.best_staging = HostStaging()  # rank 0: the best weights since the last checkpoint, until it is written
        self.best_unsaved = False
        self.staging_in_flight = False  # rank 0: a checkpoint's host copy that the next optimizer step must wait for
        # status.json updates during training go through their own thread: each costs two fsyncs.
        self.status_writer = BackgroundWriter("stride-status")
        self.last_progress_time = -math.inf
        self.callbacks = Callbacks(build_callbacks(trainer.config, trainer.extra_callbacks) if self.is_main else [])
        self.sinks = build_sinks(trainer.config, trainer.extra_sinks) if self.is_main else None
        self.best: Optional[dict] = None
        self.epoch = self.epochs_done = 0  # the epoch being trained, and how many have been (partly) trained
        self.end_reason: Optional[str] = None  # a hook or early stopping ended the run (not a stop to resume)

    # -------------------------------------------------------------------------------------------------- building
    def _build(self) -> None:
        t, tk = self.t, self.tk
        workers = placement.data_workers(t.config["load_data_kwargs"]["num_workers"],
                                         placement.rank_cpus(self.env.cpus_per_task, self.env.local_world_size))
        launched = self.env.launcher in ("local", "slurm")
        start = resolve_worker_start(t.config["load_data_kwargs"]["worker_start"], launched)
        self.train_loader, self.val_loader, self.test_loader = make_loaders(t.data, t.config, self.env.rank,
                                                                             self.env.world_size, t.device, workers,
                                                                             start)
        if t.run_dir is not None:
            # What this rank got, read from the process: `stride status RUN` summarises it and flags contradictions.
            backend = dist.get_backend() if dist.is_initialized() else None
            t.run_dir.placement_dir.mkdir(exist_ok=True)
            write_json(t.run_dir.placement_file(self.env.rank),
                       dict(placement.record(self.env, t.device, workers, backend, t.config["slurm"]["gpu_binding"]),
                            worker_start=start if workers else None))
        self.accum = tk["grad_accum_steps"]
        self.steps_per_epoch = math.ceil(len(self.train_loader) / self.accum)
        self.total_steps = self.steps_per_epoch * tk["epochs"]
        self.raw_model = t.raw_model
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.optimizer = recipe.build_optimizer(params, tk)
        self.schedule = recipe.Schedule(self.optimizer, tk, self.total_steps, self.maximize)
        self.early_stopping = recipe.EarlyStopping(tk["early_stopping_patience"], tk["early_stopping_min_delta"],
                                                   self.maximize)
        self.scaler = torch.amp.GradScaler(t.device.type, enabled=tk["precision"] == "fp16")
        model = t.model
        if self.env.distributed:
            device_ids = [t.device.index] if t.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
            if tk["deterministic"]:
                model.register_comm_hook(None, _rank_ordered_mean_hook)
        if tk["compile"]:
            model = torch.compile(model)
        self.model = model
        # Losses stay on the device until a log point: one slot per micro-batch, read (and checked) there.
        self.losses = torch.zeros(tk["log_every_steps"] * self.accum + 1, device=t.device)
        self.loss_where: list[tuple[int, int]] = []  # (epoch, batch) of each slot, to name a non-finite loss

    # ------------------------------------------------------------------------------------------------ the step
    def forward_backward(self, batch: Any, boundary: bool) -> None:
        # Gradients are all-reduced only on the micro-batch that ends an accumulation window.
        sync = nullcontext() if boundary or not self.env.distributed else self.model.no_sync()
        with sync:
            with self.t.autocast():
                loss = self.task.loss(self.model, batch)
            if loss.dim() != 0:
                raise RunError(f"task {type(self.task).__name__}.loss returned a tensor of shape {tuple(loss.shape)}"
                               f" at epoch {self.epoch + 1} batch {self.batch_index}: it must be a scalar")
            # Dividing by 1 is exact but still one more autograd node per step: skip it.
            self.scaler.scale(loss / self.accum if self.accum > 1 else loss).backward()
        self.losses[len(self.loss_where)] = loss.detach()
        self.loss_where.append((self.epoch, self.batch_index))

    def optimizer_step(self) -> None:
        if self.tk["grad_clip_norm"]:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.tk["grad_clip_norm"])
        if self.staging_in_flight:  # the last checkpoint's host copy may still be reading the weights
            self.checkpointer.staging_ready()
            self.staging_in_flight = False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.after_step()

    # ----------------------------------------------------------------------------------------- the control plane
    def at_step_boundary(self, step: int) -> Optional[dict]:
        """Between optimizer steps: notice stop requests, agree with the other ranks when planned, log, run hooks,
        checkpoint when due. Returns the loop's result when it must stop here."""
        tk, epoch = self.tk, self.epoch
        self._notice_stop_request(step)
        at_log_point = step % tk["log_every_steps"] == 0
        due = bool(tk["checkpoint_every_steps"] and step % tk["checkpoint_every_steps"] == 0)
        # Ranks agree at steps they all planned alike (every few seconds, and at every log point), so no step
        # waits on the host.
        if step >= self.cadence.next_step or at_log_point:
            every_s = tk["checkpoint_every_minutes"] * 60
            time_due = bool(every_s and time.monotonic() - self.last_checkpoint_time >= every_s)
            stop, due_any, end, elapsed_s = agree(
                [float(self.t.stop_reason is not None), float(due or time_due), float(self.end_reason is not None),
                 self.cadence.elapsed_s()], self.env.distributed, self.t.device)
            self.cadence.agreed(step, elapsed_s)
            due = due or bool(due_any)
            if at_log_point:
                self.last_loss, self.last_loss_step = self._log_train(step), step
                if self.is_main and self.end_reason is None:
                    self.end_reason = self.callbacks.log(self._fit_state(step, {"train_loss": self.last_loss}))
            if stop:
                return self._stop(step)
            if end:
                return {"end": True}
        if due:
            self.save_checkpoint(epoch, step, self.batch_index)
        self.progress.update(epoch, tk["epochs"], math.ceil(self.batch_index / self.accum), self.steps_per_epoch,
                             self.last_loss)
        return None

    def _notice_stop_request(self, step: int, stopping_now: bool = False) -> None:
        """Log this rank's stop request once, when first seen (a signal can also land while the ranks agree)."""
        if self.stop_seen_at is None and self.t.stop_reason is not None:
            self.stop_seen_at = time.monotonic()
            if stopping_now or not self.env.distributed:
                self.cadence.next_step = step  # a lone process has no one to agree with: act at once
            self.log.info("stop requested (%s) at step %d; stopping at step %d", self.t.stop_reason, step,
                          max(step, self.cadence.next_step))

    def _stop(self, step: int) -> dict:
        self._notice_stop_request(step, stopping_now=True)
        self.save_checkpoint(self.epoch, step, self.batch_index, wait=True)
        reason = self.t.stop_reason or "another rank was asked to stop"
        after = f", {time.monotonic() - self.stop_seen_at:.2f}s after the request" if self.stop_seen_at else ""
        self.log.info("stopping at epoch %d step %d (%s%s): checkpoint written", self.epoch + 1, step, reason, after)
        if self.is_main:
            self._set_status("stopped", epoch=self.epoch + 1, step=step, stop_reason=reason)
        return {"stopped": True, "epoch": self.epoch + 1, "step": step, "reason": reason}

    # -------------------------------------------------------------------------------------------------- the loop
    def run(self) -> dict:
        t, tk = self.t, self.tk
        self._build()
        start_epoch, step, batches_done = self._resume()
        self.epoch = self.epochs_done = start_epoch
        self._announce(start_epoch, step)
        if not step:
            torch.manual_seed(tk["seed"] + self.env.rank)  # per-rank dropout/augmentation streams
        self.last_checkpoint_time = time.monotonic()
        self.progress = ProgressBar(self.is_main)
        self.cadence = Cadence(tk["stop_check_seconds"], tk["log_every_steps"], step)
        self.stop_seen_at: Optional[float] = None
        self.train_start = time.monotonic()
        self.last_loss: Optional[float] = None
        self.last_loss_step = -1
        self.model.train()
        if self.is_main:
            self.callbacks.fit_start(self._fit_state(step, {}))

        for epoch in range(start_epoch, tk["epochs"]):
            self.epoch = epoch
            set_train_epoch(self.train_loader, epoch, batches_done)
            num_batches = batches_done + len(self.train_loader)
            self.batch_index = batches_done
            self.cadence.restart(step)  # the evaluation just done is no training step's time
            # batch_index counts the batches the steps consumed: it is what a mid-epoch checkpoint resumes from.
            for batch in device_batches(self.train_loader, t.device):
                self.batch_index += 1
                boundary = self.batch_index % self.accum == 0 or self.batch_index == num_batches
                self.forward_backward(batch, boundary)
                if not boundary:
                    continue
                self.optimizer_step()
                step += 1
                outcome = self.at_step_boundary(step)
                if outcome is not None and outcome.get("stopped"):
                    return outcome
                if outcome is not None:  # a hook ended the run at a log point: keep its state and best weights
                    self.save_checkpoint(epoch, step, self.batch_index)
                    self.epochs_done = epoch + 1
                    break
            self.progress.close()
            batches_done = 0
            if self.end_reason is not None and self.batch_index < num_batches:
                break  # a hook ended the run at a log point: no evaluation of a partial epoch
            self.epochs_done = epoch + 1
            if self._end_epoch(epoch, step):
                break
        self.checkpointer.wait()
        return self._finish(step)

    def _announce(self, start_epoch: int, step: int) -> None:
        t = self.t
        if self.is_main:
            runstate.move(self.run_dir, "running", started_at=self.run_dir.read_status().get("started_at")
                          or now_iso(), host=self.env.hostname, world_size=self.env.world_size, epoch=start_epoch + 1,
                          step=step, total_steps=self.total_steps, launcher=self.env.launcher, job_id=self.env.job_id,
                          pid=os.getpid(), error=None, error_tail=None, failed_rank=None, failed_host=None,
                          stop_reason=None)
            self.sinks.open(self.run_dir, t.config, step)
        self.log.info("run %s: %d parameters, %d train / %d val / %d test samples, %d ranks on %s, %d steps per "
                      "epoch", self.run_dir.path, sum(p.numel() for p in self.raw_model.parameters()),
                      len(t.data.train), len(t.data.val), len(t.data.test), self.env.world_size, t.device,
                      self.steps_per_epoch)

    def close(self, quiet: bool = False) -> None:
        """Finish any checkpoint and status write and stop DataLoader workers now, not at interpreter exit.

        `quiet` while another error is on its way out: a failed background write must not hide it.
        """
        if self.sinks is not None:
            self.sinks.close()
        for writer in (self.checkpointer, self.status_writer):
            try:
                writer.close()
            except Exception:
                if not quiet:
                    raise
        for loader in (getattr(self, name, None) for name in ("train_loader", "val_loader", "test_loader")):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()

    # ---------------------------------------------------------------------------------------------- epoch ends
    def _end_epoch(self, epoch: int, step: int) -> bool:
        """Validate, keep the best weights, step the schedule, ask early stopping and the hooks; True: end here."""
        metrics = self.t.evaluate("val", self.val_loader)
        if self.loss_where:
            metrics["train_loss"] = self._log_train(step, write=False)
        elif self.last_loss is not None and self.last_loss_step == step:  # a log point fell on the epoch's last step
            metrics["train_loss"] = self.last_loss
        value = metrics.get(self.best_metric)
        if value is None:
            raise RunError(f"training_kwargs.best_metric '{self.best_metric}' is not a validation metric; "
                           f"available: {', '.join(sorted(metrics))}")
        improved = self._is_better(value)
        if improved:
            self.best = {"metric": self.best_metric, "value": value, "epoch": epoch + 1, "step": step}
            if self.is_main:
                self._keep_best()
        self.schedule.after_epoch(value)
        self._write_metrics({"epoch": epoch + 1, "step": step, "split": "val", **metrics})
        self.log.info("epoch %d/%d done: %s%s", epoch + 1, self.tk["epochs"],
                      " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), " (best)" if improved else "")
        reason = self.end_reason or self.early_stopping.update(value)
        if self.is_main and reason is None:
            reason = self.callbacks.epoch_end(self._fit_state(step, metrics))
        # Checkpoints keep their own cadence (minutes, steps) rather than one per epoch: a short epoch would spend
        # more on the file than on training. The last epoch always ends with one (best.pt, resume with more epochs).
        every_s = self.tk["checkpoint_every_minutes"] * 60
        due = bool(every_s and time.monotonic() - self.last_checkpoint_time >= every_s)
        # The ranks' clocks differ and a checkpoint is a collective; rank 0's hooks decide for everyone.
        _, due, end, _ = agree([0.0, float(due), float(reason is not None), 0.0], self.env.distributed,
                               self.t.device)
        if end and reason is None:
            reason = "stopped by a callback on rank 0"
        self.end_reason = reason if end else None
        last = epoch + 1 == self.tk["epochs"] or bool(end)
        if due or last:
            self.save_checkpoint(epoch + 1, step, 0)
        if self.is_main:
            self.last_progress_time = time.monotonic()
            self.status_writer.submit(self.run_dir.update_status, epoch=epoch + 1, step=step, metrics=metrics,
                                      best=self.best)
        if end:
            self.log.info("ending the run after epoch %d: %s", epoch + 1, self.end_reason)
        return bool(end)

    def _finish(self, step: int) -> dict:
        t = self.t
        train_time = time.monotonic() - self.train_start
        if self.is_main:
            t.save_weights(self.run_dir.final_weights, step=step)
        if self.env.distributed:
            dist.barrier()
        if self.run_dir.best_weights.is_file():
            t.load_weights(self.run_dir.best_weights)
        epochs_run = self.epochs_done
        results = {**t.evaluate("test", self.test_loader), **t.evaluate("val", self.val_loader),
                   "best": self.best, "epochs": epochs_run, "steps": step,
                   "train_time_s": round(train_time, 3), "world_size": self.env.world_size}
        if self.end_reason:
            results["ended_early"] = {"reason": self.end_reason, "epoch": epochs_run, "step": step}
        if self.is_main:
            write_json(self.run_dir.results_file, results)
            self._write_metrics({"epoch": epochs_run, "step": step, "split": "test",
                                 **{k: v for k, v in results.items() if k.startswith("test_")}})
            self._set_status("completed", step=step, ended_early=self.end_reason,
                             results={k: v for k, v in results.items() if k.startswith(("test_", "val_"))})
            self.callbacks.fit_end(self._fit_state(step, results), results)
        summary = " ".join(f"{k} {v:.4f}" for k, v in results.items() if k.startswith("test_"))
        best = self.best or {"metric": self.best_metric, "value": math.nan, "epoch": 0}
        self.log.info("finished: %s (best %s %.4f at epoch %d)", summary, best["metric"], best["value"],
                      best["epoch"])
        return results

    def _fit_state(self, step: int, metrics: dict) -> FitState:
        return FitState(run_dir=self.run_dir.path, config=self.t.config, epoch=self.epoch + 1, step=step,
                        total_steps=self.total_steps, metrics=dict(metrics), best=self.best, trainer=self.t)

    # ---------------------------------------------------------------------------------------------- checkpoints
    def _state(self, epoch: int, step: int, batches_done: int) -> dict:
        rng = rng_state()
        rng_by_rank = [rng]
        if self.env.distributed:
            rng_by_rank = [None] * self.env.world_size
            dist.all_gather_object(rng_by_rank, rng)
        return {"format": CHECKPOINT_FORMAT, "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "early_stopping": self.early_stopping.state_dict(),
                "epoch": epoch, "step": step, "batches_done": batches_done,
                "world_size": self.env.world_size, "rng": rng_by_rank, "best": self.best,
                "config_model": json.dumps(self.t.config["model_kwargs"], sort_keys=True),
                "saved_at": time.time()}

    def save_checkpoint(self, epoch: int, step: int, batches_done: int, wait: bool = False) -> None:
        """A checkpoint, and best.pt with it when the best weights changed since the last one (same background
        write, best.pt first: a checkpoint's record of the best never runs ahead of the file). Never of weights
        that a non-finite loss has touched: the last good checkpoint stays the latest."""
        self._check_finite()
        state = self._state(epoch, step, batches_done)  # collective: every rank takes part
        if self.is_main:
            weights = (self.run_dir.best_weights, {"best": self.best}, self.best_staging) if self.best_unsaved else None
            self.best_unsaved = False
            self.checkpointer.save(state, step, wait=wait, weights=weights, late=self._changed_only_by_steps())
            self.staging_in_flight = self.checkpointer.copy_pending
        self.last_checkpoint_time = time.monotonic()

    def _changed_only_by_steps(self) -> frozenset:
        """Data pointers of the tensors only an optimizer step changes (weights, optimizer state): their checkpoint
        copy may overlap the next forward and backward. Buffers (BatchNorm statistics) change in forward: not here."""
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return frozenset(t.data_ptr() for t in tensors if t.device.type == "cpu")

    def _keep_best(self) -> None:
        """New best weights: a host copy now (one memcpy into kept buffers); best.pt is written with the next
        checkpoint, so short epochs do not each pay for a file."""
        self.checkpointer.wait()  # a write still in flight may be reading the previous best copy
        self.best_staging.copy(self.raw_model.state_dict())
        self.best_unsaved = True

    def _resume(self) -> tuple[int, int, int]:
        """Restore the newest good checkpoint; (epoch, step, batches done in that epoch)."""
        if self.is_main:
            self.checkpointer.remove_partial_writes()
        found = self._load_checkpoint()
        if found is None:
            return 0, 0, 0
        state, path = found
        if state["batches_done"] and state["world_size"] != self.env.world_size:
            raise RunError(f"checkpoint {path.name} was taken mid-epoch by {state['world_size']} ranks; this job has "
                           f"{self.env.world_size}: resume with {state['world_size']} ranks (stride resume keeps the "
                           f"run's own size unless told otherwise)")
        if state.get("config_model") != json.dumps(self.t.config["model_kwargs"], sort_keys=True):
            raise RunError(f"checkpoint {path} was written for model_kwargs {state.get('config_model')}, not "
                           f"{json.dumps(self.t.config['model_kwargs'], sort_keys=True)}: resume with the run's own "
                           f"model settings")
        try:
            self.raw_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise RunError(f"checkpoint {path} does not fit this model and recipe: {str(exc).splitlines()[0]}"
                           ) from None
        self.scaler.load_state_dict(state["scaler"])
        self.early_stopping.load_state_dict(state.get("early_stopping", {}))
        rngs = state["rng"]
        if len(rngs) == self.env.world_size:
            set_rng_state(rngs[self.env.rank])
        else:
            self.log.warning("checkpoint was written by %d ranks, this job has %d: RNG streams restart from rank 0's",
                             len(rngs), self.env.world_size)
            set_rng_state(rngs[0])
        self.best = state.get("best")
        self.log.info("resumed from %s (after %d epochs and %d batches of epoch %d, step %d)", path.name,
                      state["epoch"], state["batches_done"], state["epoch"] + 1, state["step"])
        return state["epoch"], state["step"], state["batches_done"]

    def _load_checkpoint(self) -> Optional[tuple[dict, Path]]:
        """Rank 0 picks the newest good checkpoint (moving bad ones aside) and the other ranks load that very file,
        so a file only some ranks could read never starts the ranks from different steps."""
        if not self.env.distributed:
            return self.checkpointer.load_latest(self.t.device, move_aside=True)
        choice: list = [None, None]  # file name, error
        found, error = None, None
        if self.is_main:
            try:
                found = self.checkpointer.load_latest(self.t.device, move_aside=True)
                choice[0] = found[1].name if found else None
            except Exception as exc:  # tell the other ranks before raising, or they would wait in the broadcast
                error, choice[1] = exc, f"{type(exc).__name__}: {exc}"
        dist.broadcast_object_list(choice, src=0)
        if error is not None:
            raise error
        if choice[1] is not None:
            raise RunError(f"rank 0 could not load a checkpoint: {choice[1]}")
        if self.is_main or choice[0] is None:
            return found
        path = self.checkpointer.directory / choice[0]
        # Rank 0 checked its checksum: every rank reading the whole file once more would only double the I/O.
        return self.checkpointer.load(path, self.t.device, verify=False), path

    # ------------------------------------------------------------------------------------------------- metrics
    def _log_train(self, step: int, write: bool = True) -> float:
        """The one place the training loss leaves the device: every `log_every_steps` steps (and epoch ends)."""
        count = len(self.loss_where)
        losses = self.losses[:count]
        totals = torch.stack([losses.sum(), torch.tensor(float(count), device=losses.device)])
        if self.env.distributed:
            dist.all_reduce(totals)
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        if not math.isfinite(loss):
            self._raise_non_finite()
        self.loss_where.clear()
        if write:
            lr = self.optimizer.param_groups[0]["lr"]
            self._write_metrics({"epoch": self.epoch + 1, "step": step, "split": "train", "train_loss": loss,
                                 "lr": lr})
            self._report_progress(self.epoch, step)
            if not self.progress.enabled:
                self.log.info("epoch %d step %d/%d train_loss %.4f lr %.3g (%.1fs)", self.epoch + 1, step,
                              self.total_steps, loss, lr, time.monotonic() - self.train_start)
        return loss

    def _check_finite(self) -> None:
        count = len(self.loss_where)
        if count and not bool(torch.isfinite(self.losses[:count]).all()):
            self._raise_non_finite()

    def _raise_non_finite(self) -> None:
        count = len(self.loss_where)
        bad = (~torch.isfinite(self.losses[:count])).nonzero()
        if not len(bad):
            raise RunError("another rank's training loss is not finite: see its log; the last good checkpoint is "
                           "kept")
        index = int(bad[0])
        epoch, batch = self.loss_where[index]
        value = float(self.losses[index])
        step = epoch * self.steps_per_epoch + math.ceil(batch / self.accum)
        raise RunError(f"the training loss is {value} at epoch {epoch + 1}, batch {batch} (optimizer step {step}) on "
                       f"rank {self.env.rank}: training stopped, the last good checkpoint is kept (lower the lr, "
                       f"set grad_clip_norm, or check that batch's data)")

    def _write_metrics(self, record: dict) -> None:
        if self.is_main:
            self.sinks.write({"time": round(time.time(), 3), **record})

    def _is_better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best["value"] if self.maximize else value < self.best["value"]

    def _report_progress(self, epoch: int, step: int) -> None:
        """Live epoch and step in status.json between epoch ends: rank 0, in the background, at most every
        PROGRESS_EVERY_S, and never queued behind an update still being written."""
        now = time.monotonic()
        if not self.is_main or now - self.last_progress_time < PROGRESS_EVERY_S or self.status_writer.busy():
            return
        self.last_progress_time = now
        self.status_writer.submit(self.run_dir.update_status, epoch=epoch + 1, step=step)

    def _set_status(self, state: str, **fields: Any) -> None:
        """A state change that must land now (stop, finish): after the background updates still queued."""
        self.status_writer.wait()
        runstate.move(self.run_dir, state, **fields)


def _rank_ordered_mean_hook(process_group, bucket):  # DDP checks these parameters' annotations: leave them bare
    """DDP gradient averaging that sums the ranks' gradients in rank order, whatever the bucket layout.

    A ring all-reduce adds an element's contributions in an order that depends on where the element sits in its
    bucket, and DDP lays buckets out again after the first step, so a resumed run (whose first step uses the initial
    layout) would drift from an uninterrupted one by rounding. Gathering and adding in rank order makes deterministic
    runs bitwise reproducible across resumes, at world_size times the traffic.

    The gather is waited for here and the sum done on this thread, and the future handed back is already complete:
    a Python callback chained with `future.then` runs, and is freed, on the backend's own thread, which then enters
    the interpreter at moments the training thread does not control; one such entry during a fork leaves the
    forked child deadlocked in CPython 3.11's thread-state lock (why ranks start DataLoader workers from a
    forkserver: load_data_kwargs.worker_start).
    """
    tensor = bucket.buffer()
    group = process_group if process_group is not None else dist.group.WORLD
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    done: torch.futures.Future = torch.futures.Future()
    done.set_result(total.div_(len(parts)))
    return done

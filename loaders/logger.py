"""RunLogger: the in-loop half of trainaudit (run format v1, docs/run-format.md).

Cheap and crash-safe by construction:
- every per-step value stays a tensor on its own device; the global gradient norm is one
  fused `torch._foreach_norm` reduction (§2) and per-class Welford states are
  `index_add_` scatters (§1, §8), so a step adds a few kernel launches and no host-device
  sync; the per-tensor norms of that reduction are kept at checkpoint steps and every
  `grad_norms_every` steps (grad_norms.csv, for rho in §11) at no extra pass;
- values reach the host in bulk once every `flush_every` steps (one `torch.stack(...).tolist()`),
  are appended to the logs with one `os.write` per file and made durable with `fsync`;
- checkpoints are written to a temp file in the same folder, fsynced and `os.replace`d, so a
  kill at any moment leaves either the old or the new file under a final name.

Imports only the standard library, torch, safetensors and `analyze.kernels` (torch only): no
pandas, scipy or seaborn. The §2 norm and the per-class Welford kernels there are the very
ones the offline analysis uses, so both sides skip a non-finite example loss the same way.

One module (~600 lines) on purpose: it is the single class a training script imports, and its
buffering, flush, close and exit paths share state that the crash-safety argument reads as one.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import platform
import sys
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from analyze.kernels import class_welford, global_grad_norm, per_tensor_grad_norms, recentred_m2  # shared with the analysis
from loaders import runformat as fmt
from loaders.errors import TrainauditError
from loaders.safeio import atomic_path, is_temp_name, write_atomic


def _grads_of(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def class_welford_state(per_example_loss: torch.Tensor, class_ids: torch.Tensor,
                        n_classes: int) -> torch.Tensor:
    """Per-class (count, sum, M2) of one batch as a (3, C) float64 tensor (§1, §8).

    One vectorised scatter per statistic (`analyze.kernels.class_welford`); classes absent
    from the batch get count 0 (§8: skipped downstream), non-finite losses are left out.
    """
    if class_ids.numel() != per_example_loss.numel():
        raise ValueError(f"class_ids shape {tuple(class_ids.shape)} != per_example_loss shape "
                         f"{tuple(per_example_loss.shape)}")
    return _stacked_states(per_example_loss, class_ids, n_classes)[0, :3]


def _stacked_states(loss: torch.Tensor, class_ids: torch.Tensor, n_classes: int,
                    group: torch.Tensor | None = None, n_groups: int = 1) -> torch.Tensor:
    """(count, sum, M2, skipped) per (group, class) as one (G, 4, C) float64 tensor: one host copy."""
    return torch.stack([t.to(torch.float64) for t in class_welford(loss, class_ids, n_classes, group, n_groups)],
                       dim=1)


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _reduce_class_state(state: torch.Tensor) -> torch.Tensor:
    """Combine (..., 4, C) states (count, sum, M2, skipped) over ranks exactly (§1).

    M2 is re-centred on the global mean (`recentred_m2`), so the sum over ranks is exact.
    """
    n, s, m2, skipped = state.unbind(-2)
    sums = torch.stack([n, s, skipped], dim=-2).clone()
    torch.distributed.all_reduce(sums)
    n_all, s_all, skipped_all = sums.unbind(-2)
    local = recentred_m2(n, s, m2, n_all, s_all)
    torch.distributed.all_reduce(local)
    return torch.stack([n_all, s_all, local, skipped_all], dim=-2)


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("safetensors", "numpy"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
    return versions


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    return repr(float(x))  # repr round-trips float64 exactly; nan/inf stay readable tokens


class RunLogger:
    """Append a training run to a run directory (format v1).

    Example:
        with RunLogger("runs/x", config={...}, class_names=["regular", "irregular"]) as log:
            loss.backward()
            log.log_step(step, loss=loss, model=model, lr=lr)
            log.log_class_losses(step, per_example_loss, class_ids)
            if step % 50 == 0: log.log_eval(step, split="val", loss=val_loss, class_losses={...})
            if step % 100 == 0: log.save_checkpoint(step, model)

    Args:
        path: the run directory (created; an existing run is appended to: a resumed run).
        config: free-form hyperparameters (JSON-serialisable) stored in run.json.
        class_names: names of the example classes, in class-id order (§8).
        flush_every: steps between bulk host transfers + fsync (and at close). A kill -9
            loses at most this window.
        model: {"name": built-in model name, "config": {...}} so the offline analysis can
            rebuild the model; never a path to code.
        grad_norms_every: also record the per-tensor gradient norms (grad_norms.csv, §11)
            at every step divisible by this; None (default): at checkpoint steps only.
        rank/world_size: default from torch.distributed; only rank 0 writes (`write_all_ranks`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: Mapping[str, Any] | None = None,
        class_names: Sequence[str] = (),
        flush_every: int = 50,
        *,
        run_name: str | None = None,
        model: Mapping[str, Any] | None = None,
        seed: int | None = None,
        eval_settings: Mapping[str, Any] | None = None,
        fsync: bool = True,
        write_all_ranks: bool = False,
        grad_norms_every: int | None = None,
    ) -> None:
        if flush_every < 1:
            raise ValueError("flush_every must be >= 1")
        if grad_norms_every is not None and int(grad_norms_every) < 1:
            raise ValueError("grad_norms_every must be >= 1 (or None: checkpoint steps only)")
        self.grad_norms_every = None if grad_norms_every is None else int(grad_norms_every)
        self.path = Path(path)
        self.class_names = [str(c) for c in class_names]
        self.flush_every = int(flush_every)
        self._fsync = fsync
        self.rank, self.world_size = _dist_info()
        self.writes = write_all_ranks or self.rank == 0
        self._pending_steps: list[int] = []
        self._pending_values: list[torch.Tensor] = []   # loss, grad_norm, loss, grad_norm, ...
        self._params: tuple[int, list[torch.Tensor]] = (0, [])  # (id(model), its parameters)
        self._names: tuple[int, tuple[str, ...]] = (0, ())     # (id(model), its parameter names)
        # Per-tensor gradient norms (§11): pending (step, names, norms on device) until flush; the
        # last step's norms / global norm, for a checkpoint saved after its log_step; checkpoint
        # steps saved so far and the module they came from (for a log_step given no model).
        self._pending_norms: list[tuple[int, tuple[str, ...], torch.Tensor]] = []
        self._last_norms: tuple[int, tuple[str, ...], torch.Tensor] | None = None
        self._last_gn: tuple[int, torch.Tensor] | None = None
        self._norms_step: int | None = None      # step whose norms were queued last
        self._checkpoint_steps: set[int] = set()
        self._checkpoint_model: weakref.ref[torch.nn.Module] | None = None
        self._pending_lr: list[float | None] = []
        self._pending_wall: list[float] = []
        self._pending_class: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, losses, class ids)
        self._since_flush = 0
        self._closed = False
        self._fds: dict[str, int] = {}
        if not self.writes:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / fmt.CHECKPOINT_DIR).mkdir(exist_ok=True)
        self._clean_stale_temp_files()
        meta_path = self.path / fmt.META_FILE
        self.resumed = meta_path.exists()
        if not self.resumed:
            meta = {
                "format_version": fmt.FORMAT_VERSION,
                "run_name": run_name or self.path.resolve().name,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": dict(model) if model else None,
                "class_names": self.class_names,
                "eval_settings": dict(eval_settings or {}),
                "seed": seed,
                "world_size": self.world_size,
                "flush_every": self.flush_every,
                "grad_norms_every": self.grad_norms_every,
                "library_versions": _library_versions(),
                "config": dict(config or {}),
            }
            write_atomic(meta_path, json.dumps(meta, indent=2, default=str).encode())
        self._fds["train"] = self._open_append(fmt.TRAIN_FILE, ",".join(fmt.TRAIN_COLUMNS))
        self._fds["class"] = self._open_append(fmt.CLASS_FILE, ",".join(fmt.CLASS_COLUMNS))
        self._fds["eval"] = self._open_append(fmt.EVAL_FILE, None)
        self._fds["events"] = self._open_append(fmt.EVENTS_FILE, None)
        self._event("open", resumed=self.resumed, pid=os.getpid())
        ref = weakref.ref(self)
        atexit.register(lambda: (lambda log: log is not None and log._close_at_exit("at exit"))(ref()))

    # ------------------------------------------------------------------ files
    def _open_append(self, name: str, header: str | None) -> int:
        p = self.path / name
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        if size == 0 and header is not None:
            os.write(fd, (header + "\n").encode())
        elif size > 0:
            # A torn last line from a killed process must not glue onto our first record.
            with open(p, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(fd, b"\n")
        return fd

    def _append(self, key: str, text: str) -> None:
        fd = self._fds[key]
        data = memoryview(text.encode())
        while data:
            data = data[os.write(fd, data):]

    def _sync(self, *keys: str) -> None:
        if self._fsync:
            for k in keys:
                os.fsync(self._fds[k])

    def _event(self, kind: str, **fields: Any) -> None:
        if not self.writes:
            return
        rec = {"event": kind, "time": time.time(), **fields}
        self._append("events", json.dumps(rec, default=str) + "\n")
        self._sync("events")

    def _clean_stale_temp_files(self) -> None:
        for folder in (self.path, self.path / fmt.CHECKPOINT_DIR):
            for p in folder.iterdir():
                if is_temp_name(p.name):
                    p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ logging
    def log_step(
        self,
        step: int,
        loss: torch.Tensor | float,
        model: torch.nn.Module | Iterable[torch.Tensor] | None = None,
        lr: float | None = None,
        *,
        grad_norm: torch.Tensor | float | None = None,
    ) -> None:
        """Record one optimizer step: raw loss, global grad norm (from `model`'s grads), lr.

        Call after `loss.backward()` (and before `zero_grad`). No host sync happens here.
        `grad_norm` (e.g. what `clip_grad_norm_` returned) is used as the global norm instead
        of measuring it again. Per-tensor norms (§11) are kept at checkpoint steps and every
        `grad_norms_every` steps: from the norms the global norm is made of, or, when
        `grad_norm` is given, measured at those steps only and rescaled by grad_norm / their
        own global norm (which undoes a clip: clipping scales every gradient by one factor).
        They need parameter names: `model` a Module, or the Module last saved by save_checkpoint.
        """
        self._check_open()
        step = int(step)
        loss_t = loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        want = self._wants_norms(step)
        if grad_norm is None:
            names, grads = self._named_grads(model) if model is not None else (None, [])
            if grads:
                norms = per_tensor_grad_norms(grads)        # the §2 reduction's per-tensor half
                gn = torch.linalg.vector_norm(norms)
                if names is not None:
                    self._last_norms = (step, names, norms)
                    if want:
                        self._queue_norms(step, names, norms)
            else:
                gn = torch.tensor(float("nan"))  # NaN: no gradient to measure
        else:
            gn = grad_norm.detach().reshape(()) if isinstance(grad_norm, torch.Tensor) else torch.tensor(float(grad_norm))
            self._last_gn = (step, gn)
            if want:
                self._norms_from_grads(step, model if model is not None else self._saved_module(), gn)
        gn = gn.to(loss_t.device)
        self._pending_steps.append(step)
        self._pending_values += (loss_t, gn)
        self._pending_lr.append(None if lr is None else float(lr))
        self._pending_wall.append(time.time())
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()

    def _parameters(self, model: torch.nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
        # Walking a module tree costs ~100 us per call: cache the parameter list per model.
        if not isinstance(model, torch.nn.Module):
            return list(model)
        if self._params[0] != id(model):
            named = list(model.named_parameters())
            self._params = (id(model), [p for _, p in named])
            self._names = (id(model), tuple(n for n, _ in named))
        return self._params[1]

    def _named_grads(self, model: torch.nn.Module | Iterable[torch.Tensor]
                     ) -> tuple[tuple[str, ...] | None, list[torch.Tensor]]:
        """(names or None when `model` is no Module, the gradients present), in parameter order."""
        params = self._parameters(model)
        grads = _grads_of(params)
        if not isinstance(model, torch.nn.Module):
            return None, grads
        names = self._names[1]
        if len(grads) != len(params):  # some parameters got no gradient this step
            names = tuple(n for n, p in zip(names, params) if p.grad is not None)
        return names, grads

    # ------------------------------------------------------------------ per-tensor grad norms
    def _wants_norms(self, step: int) -> bool:
        every = self.grad_norms_every
        return (every is not None and step % every == 0) or step in self._checkpoint_steps

    def _saved_module(self) -> torch.nn.Module | None:
        return self._checkpoint_model() if self._checkpoint_model is not None else None

    def _queue_norms(self, step: int, names: tuple[str, ...], norms: torch.Tensor) -> None:
        if self._norms_step == step:
            return
        self._norms_step = step
        self._pending_norms.append((step, names, norms.detach()))

    def _norms_from_grads(self, step: int, model: torch.nn.Module | None, gn: torch.Tensor) -> None:
        """Measure the per-tensor norms of `model`'s gradients now (a step whose global norm came
        from the caller), rescaled so that they make up `gn` (undoes a uniform clip)."""
        if not isinstance(model, torch.nn.Module) or self._norms_step == step:
            return
        names, grads = self._named_grads(model)
        if not grads or names is None:
            return
        norms = per_tensor_grad_norms(grads)
        own = torch.linalg.vector_norm(norms)
        g = gn.to(device=norms.device, dtype=norms.dtype)
        scale = torch.where(own > 0, g / own, torch.ones_like(own))  # no gradient: nothing to undo
        self._queue_norms(step, names, norms * scale)

    def log_class_losses(self, step: int, per_example_loss: torch.Tensor, class_ids: torch.Tensor) -> None:
        """Record the per-class Welford state (count, sum, M2) of this step's batch (§8).

        Costs two list appends: the states of a whole flush window are computed in one
        vectorised pass at flush. Under torch.distributed every rank must call it (and
        log_step): states are all-reduced at flush, so sums and counts cover every rank.
        """
        self._check_open()
        if not self.class_names:
            raise ValueError("log_class_losses needs class_names given to RunLogger")
        loss, ids = per_example_loss.detach().reshape(-1), class_ids.detach().reshape(-1)
        if loss.shape != ids.shape:
            raise ValueError(f"class_ids shape {tuple(class_ids.shape)} != per_example_loss shape "
                             f"{tuple(per_example_loss.shape)}")
        # Reduced at flush time for the whole window at once (one scatter, one all-reduce).
        self._pending_class.append((int(step), loss, ids))

    def log_eval(
        self,
        step: int,
        split: str = "val",
        loss: torch.Tensor | float | None = None,
        class_losses: Mapping[str, Any] | None = None,
        *,
        per_example_loss: torch.Tensor | None = None,
        class_ids: torch.Tensor | None = None,
        n_tokens: int | None = None,
    ) -> None:
        """Record one evaluation: token-weighted loss (§7) and per-class losses with counts (§8).

        `class_losses` maps class name to a mean loss, a (mean, count) pair, or a tensor of
        per-example losses; alternatively pass `per_example_loss` and `class_ids`.
        Evaluations are rare, so the record is written and fsynced at once.
        """
        self._check_open()
        classes: dict[str, dict[str, float]] = {}
        n_skipped = 0
        if per_example_loss is not None and class_ids is not None:
            state = _stacked_states(per_example_loss, class_ids, len(self.class_names))
            if self.world_size > 1:
                state = _reduce_class_state(state)
            count, total, m2, skipped = state[0].cpu().tolist()
            for i, name in enumerate(self.class_names):
                if count[i] > 0:
                    classes[name] = {"count": int(count[i]), "loss_sum": total[i], "loss_m2": m2[i]}
            n_skipped = int(sum(skipped))
        for name, value in (class_losses or {}).items():
            classes[str(name)] = self._class_entry(value)
        if not self.writes:
            return
        rec = {"step": int(step), "split": str(split),
               "loss": None if loss is None else float(loss.detach() if isinstance(loss, torch.Tensor) else loss),
               "n_tokens": n_tokens, "classes": classes, "wall_time": time.time()}
        if n_skipped:  # examples with a non-finite loss, left out of the class states (§8)
            rec["n_nonfinite"] = n_skipped
        self._append("eval", json.dumps(rec) + "\n")
        self._sync("eval")

    @staticmethod
    def _class_entry(value: Any) -> dict[str, float]:
        if isinstance(value, torch.Tensor) and value.numel() > 1:
            v = value.detach().double().reshape(-1)
            mean = v.mean()
            return {"count": int(v.numel()), "loss_sum": float(v.sum()), "loss_m2": float(((v - mean) ** 2).sum())}
        if isinstance(value, (tuple, list)) and len(value) == 2:
            mean, count = float(value[0]), int(value[1])
            return {"count": count, "loss_sum": mean * count, "loss_m2": math.nan}
        return {"count": 1, "loss_sum": float(value), "loss_m2": math.nan}

    def mark_resume(self, step: int) -> None:
        """Say the run restarts from `step` (e.g. after loading checkpoint `step`)."""
        self._event("resume", step=int(step))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, model: torch.nn.Module | Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str] | None = None) -> Path | None:
        """Save the weights as checkpoints/step_XXXXXXXX.safetensors, atomically.

        Tied weights (one storage under several names) are stored once; the other names are
        listed in the header metadata ("tied"). Returns the path (None on non-writing ranks).
        The step becomes a per-tensor gradient norm step (§11): recorded now when its log_step
        came first, else by the log_step of that step.
        """
        self._check_open()
        step = int(step)
        self._checkpoint_steps.add(step)
        if isinstance(model, torch.nn.Module):
            self._checkpoint_model = weakref.ref(model)
        if self._last_norms is not None and self._last_norms[0] == step:
            self._queue_norms(*self._last_norms)
        elif self._last_gn is not None and self._last_gn[0] == step and isinstance(model, torch.nn.Module):
            self._norms_from_grads(step, model, self._last_gn[1])
        if not self.writes:
            return None
        from safetensors.torch import save_file

        state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
        tensors: dict[str, torch.Tensor] = {}
        seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
        tied: list[list[str]] = []
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if t.numel() > 0 and key in seen:
                tied.append([seen[key], name])
                continue
            seen[key] = name
            tensors[name] = t.detach().to("cpu").contiguous().clone()
        meta = {"step": str(int(step)), "format_version": str(fmt.FORMAT_VERSION),
                "tied": json.dumps(tied)}
        if metadata:
            meta.update({str(k): str(v) for k, v in metadata.items()})
        folder = self.path / fmt.CHECKPOINT_DIR
        final = folder / fmt.CHECKPOINT_PATTERN.format(step=int(step))
        with atomic_path(final, what="checkpoint") as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        self._event("checkpoint", step=int(step), file=final.name)
        return final

    def save_eval_set(self, **tensors: torch.Tensor) -> None:
        """Store the evaluation set (e.g. input_ids, target_mask, class_ids) for offline re-runs."""
        self._check_open()
        if not self.writes:
            return
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    metadata={"class_names": json.dumps(self.class_names)})
        write_atomic(self.path / fmt.EVAL_SET_FILE, data)

    # ------------------------------------------------------------------ flushing
    def flush(self) -> None:
        """Move pending values to the host in one transfer, append them and fsync."""
        self._since_flush = 0
        if not self._pending_steps and not self._pending_class and not self._pending_norms:
            return
        train_lines = norm_lines = ""
        if self._pending_steps or self._pending_norms:
            dev = self._pending_values[0].device if self._pending_values else self._pending_norms[0][2].device
            parts = [torch.stack([v.to(torch.float64) for v in self._pending_values])] if self._pending_values else []
            parts += [n.to(device=dev, dtype=torch.float64) for _, _, n in self._pending_norms]
            flat = torch.cat(parts).cpu().tolist()  # the one host sync per window
            n_values = len(self._pending_values)
            rows, at = [], n_values
            for s, names, n in self._pending_norms:
                rows.extend(f"{s},{_csv_name(name)},{_fmt(v)}\n" for name, v in zip(names, flat[at: at + len(names)]))
                at += len(names)
            norm_lines = "".join(rows)
            flat = flat[:n_values]
            values = list(zip(flat[0::2], flat[1::2]))
            train_lines = "".join(
                f"{s},{_fmt(v[0])},{_fmt(v[1])},{_fmt(lr)},{wall:.6f}\n"
                for s, v, lr, wall in zip(self._pending_steps, values, self._pending_lr, self._pending_wall)
            )
        class_lines = ""
        nonfinite: dict[int, int] = {}  # step -> examples whose loss was NaN/inf, left out (§8)
        if self._pending_class:
            sizes = [loss.numel() for _, loss, _ in self._pending_class]
            losses = torch.cat([loss for _, loss, _ in self._pending_class])
            ids = torch.cat([i.to(losses.device) for _, _, i in self._pending_class])
            group = torch.repeat_interleave(torch.arange(len(sizes), device=losses.device),
                                            torch.tensor(sizes, device=losses.device))
            states = _stacked_states(losses, ids, len(self.class_names), group, len(sizes))  # (K, 4, C)
            if self.world_size > 1:
                states = _reduce_class_state(states)
            states = states.cpu().tolist()
            rows = []
            for (step, _, _), (count, total, m2, skipped) in zip(self._pending_class, states):
                rows.extend(f"{step},{_csv_name(name)},{int(count[i])},{_fmt(total[i])},{_fmt(m2[i])}\n"
                            for i, name in enumerate(self.class_names) if count[i] > 0)
                if any(skipped):
                    nonfinite[step] = nonfinite.get(step, 0) + int(sum(skipped))
            class_lines = "".join(rows)
        self._pending_steps, self._pending_values, self._pending_lr, self._pending_wall = [], [], [], []
        self._pending_class, self._pending_norms = [], []
        if not self.writes:
            return
        if norm_lines:
            if "grad" not in self._fds:  # created with the first record: runs without norms have no file
                self._fds["grad"] = self._open_append(fmt.GRAD_NORMS_FILE, ",".join(fmt.GRAD_NORM_COLUMNS))
            self._append("grad", norm_lines)
            self._sync("grad")
        if class_lines:
            self._append("class", class_lines)
            self._sync("class")
        if nonfinite:
            self._event("nonfinite_class_losses", n=sum(nonfinite.values()),
                        steps={str(k): v for k, v in nonfinite.items()})
        if train_lines:
            self._append("train", train_lines)
            self._sync("train")

    def close(self) -> None:
        """Flush everything and close the files. Safe to call twice."""
        if self._closed:
            return
        self.flush()
        self._event("close")
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise TrainauditError(self.path, "RunLogger is closed")

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a logger dropped without close still flushes
        if sys.is_finalizing():  # torch may be half torn down: the atexit hook already flushed
            return
        self._close_at_exit("dropped without close()")

    def _close_at_exit(self, when: str) -> None:
        """Close from `__del__` or atexit, where nobody can catch an error: a failed flush is
        reported on stderr, one line naming the run directory and the records lost."""
        if getattr(self, "_closed", True) or not getattr(self, "_fds", None):
            return
        n_steps, n_class = len(self._pending_steps), len(self._pending_class)
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - reported, never raised out of __del__/atexit
            self._report_exit_failure(when, exc, f"{n_steps} step record(s) and {n_class} per-class "
                                                 "batch(es) not written")
            return
        try:
            self.close()
        except Exception as exc:  # noqa: BLE001
            self._report_exit_failure(when, exc, "the close event not written; no step records lost")

    def _report_exit_failure(self, when: str, exc: BaseException, lost: str) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}
        self._closed = True
        try:
            print(f"trainaudit: RunLogger {when}: could not flush {self.path} "
                  f"({type(exc).__name__}: {exc}); {lost}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - stderr itself is gone: nothing left to tell
            pass


def _csv_name(name: str) -> str:
    """Quote a class name for CSV when it needs it (commas, quotes, newlines)."""
    if any(c in name for c in ',"\n\r'):
        return '"' + name.replace('"', '""') + '"'
    return name

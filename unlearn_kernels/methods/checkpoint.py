"""Checkpoints that make an unlearning run resumable bit for bit, for both tracks: an LLM
method's ``fit`` writes one every ``every`` steps, a classifier method's every ``every``
epochs (its ``step`` is then the epoch).

What a checkpoint reads of a method: ``name``, ``config``, ``data``, ``model``, ``params``
(name -> updated weight), ``optimized`` (``params`` or their fp32 masters), ``optimizer``,
``history`` and ``extra_state()`` / ``load_extra_state(state)``. A checkpoint folder holds,
after step ``k``:

- ``tensors.safetensors``: the updated weights (``param.<name>``; their fp32 masters
  ``master.<name>`` with ``master_dtype``), every tensor of the optimizer state
  (``optim.<index>.<key>``), the tensors of the method's own state (``extra.<key>``: e.g. a
  classifier run's random generator and model buffers) and the torch RNG state
  (``rng.cpu``, and ``rng.cuda`` on a GPU);
- ``state.json``: the step, the optimizer's non-tensor state and param groups, the rest of
  the method's own state (``extra_state``: counters), the loss history, the fingerprints of
  the config and the data, which a resume must match, and the package's marker
  (``"unlearn_kernels"``, as in an output's ``report.json``): only a folder carrying it is
  taken for a checkpoint of ours, resumed, replaced or removed (:func:`is_checkpoint`);
  anything else at the path is refused.

No pickle is written or read. Everything else a run needs is a deterministic function of
the original model, the config and the data, and is rebuilt by ``setup`` exactly as in the
first run (frozen copies, control vector, importance map, neuron masks); the batch order is
replayed by drawing ``k + 1`` batches of each stream without running them (a classifier run
carries its batch generator's state instead). A checkpoint is written through a staging
folder and an atomic swap (``models.output_dir``), so a kill during the write leaves the
previous checkpoint intact.

Under ``torch.distributed`` a checkpoint is *gathered*: with DDP every rank holds the same
state and rank 0 writes it; with FSDP2 every rank takes part in gathering the sharded weights
and optimizer state (``DTensor.full_tensor``), rank 0 writes them, and a resume scatters them
back to each rank's shards (``distribute_tensor``). The folder is therefore the same for any
world size and parallel mode, and a run may resume under another one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
from pathlib import Path

import torch

from ..errors import MissingFileError, UserError

STATE = "state.json"
TENSORS = "tensors.safetensors"
FORMAT = 1


def is_checkpoint(path: Path | str) -> bool:
    """True for a folder whose ``state.json`` is an object carrying the package's marker."""
    from ..models.output_dir import MARKER

    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and isinstance(state.get(MARKER), dict)


STATE_KEYS = ("format", "method", "step", "optimizer", "extra_state", "history", "config_sha256", "data")


def read_state(path: Path | str) -> dict:
    """The ``state.json`` of the checkpoint at ``path`` once checked: a checkpoint of ours with
    every key, whose tensor file is whole (its header covers the file); a UserError naming the
    file otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not (path / STATE).is_file():
        raise MissingFileError(f"--resume: no checkpoint at {path}")
    if not is_checkpoint(path):
        raise NotACheckpointError(path)
    state = json.loads((path / STATE).read_text())
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise UserError(f"--resume: {path / STATE} lacks {', '.join(missing)}: the checkpoint is incomplete; "
                        "start over with --overwrite")
    try:
        with safe_open(str(path / TENSORS), "pt"):
            pass
    except (OSError, SafetensorError) as error:
        raise UserError(f"--resume: {path / TENSORS} cannot be read ({error}): the checkpoint is damaged; "
                        "start over with --overwrite") from None
    return state


class NotACheckpointError(UserError):
    """A path that holds something other than a checkpoint of ours."""

    def __init__(self, path: Path):
        super().__init__(f"{path} exists and is not an unlearn_kernels checkpoint (no state.json with the "
                         "'unlearn_kernels' marker): refusing to touch it")


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM during a checkpointed run: a checkpoint was written, the run stopped."""


def config_fingerprint(config) -> str:
    """SHA-256 of the config fields that change the computation (progress bars do not)."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _optimizer_structure(state_dict: dict) -> dict:
    """The optimizer state dict without its tensors (those go to the safetensors file)."""
    plain = {str(index): {k: v for k, v in entry.items() if not isinstance(v, torch.Tensor)}
             for index, entry in state_dict["state"].items()}
    return {"state": plain, "param_groups": state_dict["param_groups"]}


def _unflatten_optimizer(tensors: dict, structure: dict) -> dict:
    state: dict = {int(i): dict(entry) for i, entry in structure["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if isinstance(g.get("betas"), list) else g
              for g in structure["param_groups"]]
    return {"state": state, "param_groups": groups}


def _optimizer_params(optimizer) -> list:
    """The parameters in the order of the optimizer state dict's indices."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _gathered_tensors(method) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole and on the CPU (gathering FSDP2 shards: a collective)."""
    from .distributed import gather_like

    by_index = _optimizer_params(method.optimizer)
    tensors = {f"param.{n}": gather_like(p.detach(), p).cpu().contiguous() for n, p in method.params.items()}
    if method.optimized is not method.params:      # fp32 masters (master_dtype)
        tensors.update({f"master.{n}": gather_like(p.detach(), p).cpu().contiguous()
                        for n, p in method.optimized.items()})
    for index, entry in method.optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = gather_like(value.detach(), by_index[index]).cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    device = next(method.model.parameters()).device
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


class Checkpointer:
    """Writes a checkpoint every ``every`` steps (epochs for a classifier run; and on
    SIGINT/SIGTERM) to ``path``."""

    def __init__(self, path: Path | str, every: int = 0):
        if every < 0:
            raise UserError(f"checkpoint every must be >= 0 steps, got {every}")
        self.path = Path(path)
        self.every = every
        self.stop_requested = False
        self._previous = {}

    # --- signals -------------------------------------------------------------------------
    def __enter__(self) -> "Checkpointer":
        def request_stop(signum, frame):
            self.stop_requested = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, request_stop)
            except ValueError:      # not the main thread: no handlers, checkpoints still written
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def due(self, step: int) -> bool:
        """Write after this step? Under ``torch.distributed`` the ranks agree: a stop asked on
        any rank stops all of them after the same step."""
        from . import distributed

        if distributed.active():
            self.stop_requested = bool(distributed.total(torch.tensor([int(self.stop_requested)])) > 0)
        return self.stop_requested or (self.every > 0 and (step + 1) % self.every == 0)

    # --- writing and reading ---------------------------------------------------------------
    def save(self, method, step: int) -> Path:
        """Write the state after ``step``. Under ``torch.distributed`` rank 0 writes (after every
        rank has helped gather an FSDP2 model's shards) and the others wait for it, so the folder
        is complete when any rank goes on (the ranks must share the folder's filesystem to resume)."""
        from . import distributed

        sharded = distributed.is_sharded(method.model)
        if sharded or distributed.rank() == 0:
            tensors = _gathered_tensors(method)
        if distributed.rank() == 0:
            self._write(method, step, tensors)
        if distributed.active():
            import torch.distributed as dist

            dist.barrier()
        return self.path

    def _write(self, method, step: int, tensors: dict) -> None:
        from safetensors.torch import save_file

        from ..models.output_dir import MARKER, make_staging, marker, swap_into_place

        if (self.path.exists() or self.path.is_symlink()) and not is_checkpoint(self.path):
            raise NotACheckpointError(self.path)       # the swap below would remove it
        opt_plain = _optimizer_structure(method.optimizer.state_dict())
        extra = method.extra_state()
        tensors = {**tensors, **{f"extra.{k}": v.detach().cpu().contiguous() for k, v in extra.items()
                                 if isinstance(v, torch.Tensor)}}
        state = {MARKER: marker(), "format": FORMAT, "method": method.name, "step": step, "optimizer": opt_plain,
                 "extra_state": {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)},
                 "history": method.history,
                 "config_sha256": config_fingerprint(method.config), "data": method.data}
        staging = make_staging(self.path)
        save_file(tensors, str(staging / TENSORS))
        (staging / STATE).write_text(json.dumps(state, default=str))
        swap_into_place(staging, self.path)

    def remove(self) -> None:
        """Delete the checkpoint once the run it served is saved (only a checkpoint of ours)."""
        import shutil

        if is_checkpoint(self.path):
            shutil.rmtree(self.path)

    def load(self, method) -> int:
        """Restore a saved run into ``method`` (after its ``setup`` and optimizer); returns the
        last completed step."""
        from safetensors.torch import load_file

        state = read_state(self.path)
        if state.get("format") != FORMAT or state.get("method") != method.name:
            raise UserError(f"--resume: {self.path} is not a {method.name} checkpoint of this version")
        if state["config_sha256"] != config_fingerprint(method.config):
            raise UserError(f"--resume: {self.path} was written with other settings; rerun with the same ones")
        if state["data"] != method.data:
            raise UserError(f"--resume: {self.path} was written for other forget/retain data")
        from .distributed import shard_like

        tensors = load_file(str(self.path / TENSORS))
        with torch.no_grad():
            for name, p in method.params.items():
                p.copy_(shard_like(tensors[f"param.{name}"], p))
            if method.optimized is not method.params:
                for name, p in method.optimized.items():
                    p.copy_(shard_like(tensors[f"master.{name}"], p))
        by_index = _optimizer_params(method.optimizer)
        tensors.update({k: shard_like(v, by_index[int(k.split(".")[1])]) for k, v in tensors.items()
                        if k.startswith("optim.")})
        method.optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        method.load_extra_state({**state["extra_state"], **{k.removeprefix("extra."): v for k, v in tensors.items()
                                                            if k.startswith("extra.")}})
        method.history = state["history"]
        torch.set_rng_state(tensors["rng.cpu"])
        device = next(method.model.parameters()).device
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        return int(state["step"])

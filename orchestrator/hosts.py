"""Where the training loop runs, and how it reports: the two launchers of ``orchestrator.train``.

The epoch loop (``orchestrator.train``) is one function. What differs between its launchers is
behind a small host object:

- ``RayTrainHost``: one of the DDP workers of a Ray Train ``TorchTrainer`` (a multi-worker
  ``avlab run`` or trial). Ray Train gives the rank, the device, the DDP wrapper, the checkpoint to
  resume from, and persists each reported checkpoint into the run's storage folder.
- ``TrialHost``: the only worker of a single-worker Tune trial, running the loop in the trial's own
  process: no controller, no worker actors, nothing imported twice. It writes the same checkpoint
  folders into the same storage folder (``<storage>/trials/<sweep>-<run id>/checkpoint_epochNNNNN``)
  itself, keeps ``train.checkpoints_to_keep`` of them, and reports metrics to Tune. A
  single-worker ``avlab run`` uses it too, in one Ray task (``orchestrator.launch``), with its
  checkpoints where Ray Train puts a run's (``<storage>/<run>/checkpoint_epochNNNNN``) and no
  reports (its metrics are in MLflow).

Both find their checkpoint the same way after a restart (the newest folder, then the older ones
past a damaged one), so a trial resumes identically whichever launcher it had.
"""

from __future__ import annotations

import logging
import os
import posixpath
import secrets
from typing import Any

import ray.train
import torch

from orchestrator import checkpoint as ckpt


class RayTrainHost:
    """The loop as one worker of a Ray Train worker group."""

    def __init__(self) -> None:
        import ray.train.torch

        self._quiet_reports()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    @staticmethod
    def _quiet_reports() -> None:
        """Ray Train logs every report (all metrics) at INFO from a logger named after its file
        path; the per-epoch line avlab prints says the same in one line."""
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)

    def prepare_model(self, model: torch.nn.Module, **ddp: Any) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp)

    def latest_checkpoint(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, name: str | None = None) -> None:
        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                             checkpoint_dir_name=name)


class TrialHost:
    """The loop inside a single-worker Tune trial: rank 0 of 1, checkpoints written here."""

    rank, world = 0, 1

    def __init__(self, run_dir: str, *, keep: int, gpu: bool, tune: bool = True) -> None:
        """``run_dir``: the trial's checkpoint folder (a path or a ``s3://`` / ``gs://`` URI);
        ``keep``: how many checkpoints stay (the newest), 0 = all; ``tune``: report metrics to Tune."""
        import pyarrow.fs

        if gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("resources.gpu: this trial was given a GPU share but CUDA sees no GPU")
            # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU: it is device 0 here.
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.fs, self.root = pyarrow.fs.FileSystem.from_uri(run_dir if "://" in run_dir else os.path.abspath(run_dir))
        self.keep, self.tune = keep, tune
        self.fs.create_dir(self.root, recursive=True)

    def prepare_model(self, model: torch.nn.Module, **ddp: Any) -> torch.nn.Module:
        return model.to(self.device)  # one worker: no DDP wrapper (Ray Train adds none either)

    def _checkpoints(self) -> list[tuple[int, str]]:
        """(epoch, path) of every complete-looking checkpoint folder, oldest first."""
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True))
        found = [(ckpt.epoch_of(i.base_name), i.path) for i in infos if i.type == pyarrow.fs.FileType.Directory]
        return sorted((e, p) for e, p in found if e is not None)

    def latest_checkpoint(self) -> ray.train.Checkpoint | None:
        found = self._checkpoints()
        return ray.train.Checkpoint(found[-1][1], filesystem=self.fs) if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, name: str | None = None) -> None:
        """Persist the checkpoint (if any) into the run folder, then report the metrics to Tune:
        the order Ray Train keeps, so a reported epoch always has its checkpoint."""
        import ray.tune

        if checkpoint_dir is not None:
            self._persist(checkpoint_dir, name or "")
        if self.tune:
            ray.tune.report(metrics)

    def _persist(self, local: str, name: str) -> None:
        import pyarrow.fs

        if ckpt.epoch_of(name) is None:
            raise ValueError(f"checkpoint folder name {name!r} does not match {ckpt.DIR_PATTERN.pattern}")
        final = posixpath.join(self.root, name)
        if isinstance(self.fs, pyarrow.fs.LocalFileSystem):
            # Copied under a name no reader looks at, then renamed: a folder under the final
            # name is always whole (a kill mid-copy leaves only a temporary folder).
            tmp = posixpath.join(self.root, f".{name}.tmp-{secrets.token_hex(4)}")
            self.fs.create_dir(tmp, recursive=True)
            pyarrow.fs.copy_files(local, tmp, destination_filesystem=self.fs)
            if self.fs.get_file_info(final).type != pyarrow.fs.FileType.NotFound:
                self.fs.delete_dir(final)  # the same epoch again after a restart
            self.fs.move(tmp, final)
        else:  # object stores have no rename; the checksum file, checked on load, vouches for the files
            self.fs.create_dir(final, recursive=True)
            pyarrow.fs.copy_files(local, final, destination_filesystem=self.fs)
        self._prune()

    def _prune(self) -> None:
        """Keep the newest ``keep`` checkpoints (and no temporary folders of earlier attempts)."""
        import pyarrow.fs

        doomed = [path for _, path in self._checkpoints()[:-self.keep]] if self.keep else []
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True))
        doomed += [i.path for i in infos if i.base_name.startswith(".checkpoint_epoch") and ".tmp-" in i.base_name]
        for path in doomed:
            try:
                self.fs.delete_dir(path)
            except OSError:
                pass  # already gone, or another attempt removes it

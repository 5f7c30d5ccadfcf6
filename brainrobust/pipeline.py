"""One run: config -> data module -> encoder -> probes -> results store.

`run.py` is a thin Hydra wrapper around `run(cfg)`; tests call `run(cfg)` on composed configs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from brainrobust.checks import check_run_values
from brainrobust.data.datamodule import BrainDataModule
from brainrobust.errors import ConfigError, Interrupted
from brainrobust.files import check_writable, exclusive
from brainrobust.identity import config_identity, key_columns
from brainrobust.models.build import build, build_encoder
from brainrobust.models.features import (
    lightning_notices_off,
)
from brainrobust.models.ridge import SOLVERS
from brainrobust.models.zoo import ModelSpec
from brainrobust.probes.attack import check_budget
from brainrobust.probes.base import Probe, ProbeContext
from brainrobust.results.loggers import send
from brainrobust.results.store import ResultsStore, RunStore
from brainrobust.summary import render, summary_tables

log = logging.getLogger(__name__)


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The results key of `cfg` run in this process (see `identity.config_identity`)."""
    return config_identity(OmegaConf.to_container(cfg, resolve=True), torch.cuda.is_available())


def multirun_job() -> int | None:
    """This job's number within a Hydra --multirun, or None outside one."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return int(HydraConfig.get().job.num)
    return None


def pinned_devices(kwargs: dict[str, Any], job: int | None, gpus: int) -> Any:
    """trainer.devices, with a single-GPU job of a local multirun pinned to GPU job % gpus.

    Without it every joblib job of a sweep would land on GPU 0. Under SLURM each job sees only its
    own GPU (gpus = 1), so the pin is a no-op there.
    """
    devices = kwargs.get("devices", "auto")
    gpu = str(kwargs.get("accelerator", "auto")) in ("auto", "gpu", "cuda")
    if job is None or not gpu or devices not in (1, "1") or gpus < 1:
        return devices
    return [job % gpus]


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback] | None = None, logger: Any = False) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if kwargs.get("inference_mode", False):
        raise ConfigError("trainer.inference_mode must be false: probes need gradients")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    kwargs["devices"] = pinned_devices(kwargs, multirun_job(), gpus)
    try:
        # A copy: Lightning appends its own callbacks (the progress bar) to the list it is given.
        trainer = L.Trainer(callbacks=list(callbacks or []), logger=logger, **kwargs)
    except (TypeError, ValueError, MisconfigurationException, ImportError) as err:
        # ImportError: an accelerator whose package is missing (tpu needs torch_xla).
        reason = str(err).splitlines()[0]
        raise ConfigError(f"trainer config: {reason}; see conf/trainer/default.yaml") from None
    relaunches = isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and trainer.world_size > 1
    if relaunches and multirun_job() is not None:
        # Lightning would relaunch this script's command line, --multirun and all, per rank.
        raise ConfigError(
            "DDP (trainer.devices > 1) cannot start its ranks inside a local --multirun; run "
            "multi-GPU jobs one at a time (python run.py trainer=ddp ...), under torchrun, or on "
            "SLURM with hydra/launcher=slurm_ddp, or sweep single-GPU jobs")
    return trainer


def build_context(cfg: DictConfig, dm: BrainDataModule, store: RunStore, columns: dict) -> ProbeContext:
    test = dm.test
    roi_stats = {
        roi: {"test_sd": float(np.std(test.roi_mean[roi])),
              "noise_ceiling": float(test.roi_noise_ceiling.get(roi, np.nan))}
        for roi in dm.rois
    }
    return ProbeContext(
        images=dm.image_tensor("test"), image_ids=test.ids, responses=test.responses,
        rois=sorted(dm.rois), roi_stats=roi_stats, meta=columns, store=store, seed=int(cfg.seed),
    )


def build_probes(cfg: DictConfig) -> list[Probe]:
    probes = []
    for name, probe_cfg in (cfg.get("probe") or {}).items():
        # force=true at the top redoes every probe of the run, not only the run's DONE marker.
        overrides = {"force": True} if cfg.force else {}
        try:
            probe = build(probe_cfg, _convert_="all", **overrides)
        except ConfigError as error:
            # A probe names its own key (`probe.<name>.<key> ...`); the user may have set the
            # value elsewhere, under the key the probe's config interpolates.
            named = re.match(rf"probe\.{re.escape(name)}\.(\w+)(?![\w.])", str(error))
            if named is None or named[1] not in probe_cfg:
                raise
            raise ConfigError(_key_source(probe_cfg, name, named[1])
                              + str(error)[named.end():]) from None
        if not isinstance(probe, Probe):
            raise ConfigError(f"probe.{name} does not build a brainrobust Probe (got {type(probe).__name__})")
        probes.append(probe)
    return probes


def run(cfg: DictConfig) -> RunStore:
    # Every config object is built before any file is read or written, so a config error
    # costs nothing and leaves the results store as it was.
    check_run_values(cfg)
    probes = build_probes(cfg)
    spec: ModelSpec = build(cfg.model)
    if cfg.readout.method not in SOLVERS:
        raise ConfigError(f"unknown readout.method {cfg.readout.method!r}; valid: {sorted(SOLVERS)}")
    dm: BrainDataModule = build(cfg.data, _convert_="all")
    columns = key_columns(cfg)
    identity = run_identity(cfg)
    # Content, not paths: changed data gets a new key; a moved dataset or cache keeps it.
    identity["data_fingerprint"] = dm.fingerprint()
    store = ResultsStore(cfg.paths.results_dir).run(identity, columns)
    if cfg.dry_run:
        state = "complete" if store.is_complete() else "to run"
        print(f"run {store.key} ({state}): " + " ".join(f"{k}={v}" for k, v in columns.items()))
        return store
    for folder in (cfg.paths.results_dir, cfg.paths.cache_dir, cfg.paths.log_dir):
        check_writable(folder)
    logger = build_logger(cfg, store)
    with claimed(store):
        if store.is_complete() and not cfg.force and not any(p.stale(store) for p in probes):
            log.info("run %s is complete (%s): skipped; pass force=true to redo it", store.key,
                     store.dir)
            with closing_logger(logger):
                send_results(cfg, store, probes, logger)
            return store
        compute(cfg, store, spec, dm, probes, logger, columns)
    return store


@contextmanager
def claimed(store: RunStore) -> Iterator[None]:
    """Only one process computes a run: a job another live process is running (a second sweep
    on the same store) waits for it, then finds it complete. DDP ranks other than 0 are that
    run's own helpers and take no claim."""
    if rank_zero_only.rank != 0:
        yield
        return
    lock = store.dir.parent / ".claims" / f"{store.key}.lock"
    with exclusive(lock, on_wait=lambda: log.info(
            "run %s is being computed by another process; waiting for it", store.key)):
        yield


# An interpolation that names one key (`${epsilon.ladder}`), not a resolver or a relative one.
_PLAIN_REFERENCE = re.compile(r"\$\{(\w[\w.\[\]]*)\}")


def _key_source(node: DictConfig, name: str, key: str) -> str:
    """`probe.<name>.<key>`, after the key the user set where the probe's value is a plain
    interpolation of it: `epsilon.ladder (probe.sensitivity.eps)`."""
    where = f"probe.{name}.{key}"
    if OmegaConf.is_interpolation(node, key):
        source = _PLAIN_REFERENCE.fullmatch(OmegaConf.to_container(node, resolve=False)[key])
        where = f"{source[1]} ({where})" if source else where
    return where


def check_budgets(cfg: DictConfig, size: int) -> None:
    """Every probe's eps ladder or schedule against the stimulus size (`attack.check_budget`).
    A refusal names the key to change (`_key_source`)."""
    for name, node in (cfg.get("probe") or {}).items():
        norm = node.get("norm") or (node.get("attack") or {}).get("norm") or cfg.epsilon.norm
        for key in ("eps", "eps_schedule"):
            if node.get(key) is None:
                continue
            value = node[key]
            try:
                check_budget(list(value) if OmegaConf.is_list(value) else [value], norm, size)
            except ConfigError as error:
                raise ConfigError(f"{_key_source(node, name, key)}: {error}") from None


def compute(cfg: DictConfig, store: RunStore, spec: ModelSpec, dm: BrainDataModule,
            probes: list[Probe], logger: Any, columns: dict[str, Any]) -> None:
    """Data, encoder, predictivity and probes of one run, written to its store."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    trainer = build_trainer(cfg, callbacks=probes, logger=logger)
    dm.prepare_data()
    dm.setup()
    check_budgets(cfg, dm.stimulus_size)

    device = trainer.strategy.root_device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    log.info("run %s on %s: model %s, subject %s, ROIs %s", store.key, device, spec.name,
             dm.subject, ",".join(sorted(dm.rois)))
    encoder = build_encoder(cfg, spec, dm, trainer)
    context = build_context(cfg, dm, store, columns)
    for probe in probes:
        probe.bind(context)
    with closing_logger(logger):
        with lightning_notices_off():
            try:
                trainer.test(encoder, dataloaders=dm.test_dataloader(), verbose=False)
            except SIGTERMException:
                # Lightning ends its loop after the batch a SIGTERM arrived in, as a clean exit.
                raise Interrupted("stopped by a signal; the finished batches are kept: rerun the "
                                  "same command to resume") from None
        # Under DDP every rank holds the gathered predictivity; rank 0 alone writes.
        if trainer.is_global_zero:
            if not store.has_records("predictivity") or cfg.force:
                store.write_records("predictivity", encoder.predictivity)
            render_media(store, probes)
            store.mark_complete()
            send_results(cfg, store, probes, logger)


def render_media(store: RunStore, probes: list[Probe]) -> None:
    """The pictures the probes asked for, drawn from their stored arrays into the run's media/."""
    names = {name: options for probe in probes for name, options in probe.media().items()
             if store.has_array(name)}
    if names:
        from brainrobust.analysis.gallery import run_media

        run_media({name: store.load_array(name) for name in names}, store.dir / "media", names)


def build_logger(cfg: DictConfig, store: RunStore) -> Any:
    """The configured Lightning logger, or False. A logger config with `version: null` gets the
    run's results key, so sending a finished run again updates its W&B run instead of adding one."""
    node = cfg.get("logger")
    if not node:
        return False
    extra = {"version": store.key} if "version" in node and node.version is None else {}
    return build(node, **extra)


@contextmanager
def closing_logger(logger: Any) -> Iterator[None]:
    """W&B runs must be closed in every job of a multirun, also when one fails (W&B's logger
    starts its run lazily, on the first call that logs)."""
    try:
        yield
    finally:
        experiment = getattr(logger, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish()


def send_results(cfg: DictConfig, store: RunStore, probes: list[Probe], logger: Any) -> None:
    if logger:
        send([logger], store, {p.name: p.settings for p in probes},
             OmegaConf.to_container(cfg, resolve=True))


def show_results(cfg: DictConfig, store: RunStore) -> None:
    """The run's tables and where its records are; a sweep prints one table at its end."""
    if cfg.print_table and multirun_job() is None:
        print(render(summary_tables([store])))
    print(f"records: {store.records_dir}")

"""A model replica running Downpour SGD against the parameter shards.

The loop, top to bottom: every ``fetch_every`` steps pull the weights into the flat
buffer; forward/backward with the aux losses, accumulating into the flat gradient
buffer; every ``push_every`` steps push the accumulated gradient (with the versions
it was computed on and its example count) and clear it; log and export metrics.

With ``overlap`` the push and the following pull run in a background thread while
the next step computes, as Downpour's separate fetch and push threads did: the
gradient of step t travels while step t+1 runs, and the weights it brings back are
installed at the next step boundary (one step more staleness, no idle compute).

Data (``data_order``): ``dispatch`` trains the chunks of each epoch that shard 0's
dispatcher hands out (``distbelief.server.dispatch``; ``workers/feed.py``), reporting
in each push how far it got; ``static`` reads a fixed disjoint share of every epoch (a
seeded permutation cut into ``num_replicas`` strided shares, see
:func:`distbelief.data.partition_indices`), and a restarted replica resumes at the batch
after its last recorded step; ``auto`` dispatches when shard 0 orders a data set of this
replica's size (``serve --dataset-size``), else reads the static share. Either way the
batches come through a :class:`distbelief.loader.Loader` (``loader_workers`` processes
decode ahead of the loop). The seconds it waits for data are the ``data_wait`` metric
and status field.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from distbelief.client import ClientConfig, ParameterClient, default_worker_id
from distbelief.crops import Augmentation
from distbelief.data import load_dataset
from distbelief.layout import Layout, flatten_into
from distbelief.loader import Loader
from distbelief.metrics import WorkerMetrics, new_registry, serve_metrics
from distbelief.models import build_model
from distbelief.stages import StagePart, StagePlan, bind_stage
from distbelief.train import forward_backward

from .feed import ChunkFeed, DataMismatch
from .pipeline import Pipeline, Stages

log = logging.getLogger(__name__)

DATA_ORDERS = ("auto", "dispatch", "static")
STATUS_EVERY_S = 1.0  # how often the status file that `up` and `work` read is rewritten
WARM_START_POLL_S = 0.5  # how often a waiting replica asks shard 0 how far replica 0 got
WARM_START_STALL_S = 120.0  # stop waiting when the shards' examples stand still this long
LOSS_WINDOW = 10  # steps averaged for the status file's first and recent loss


@dataclass(frozen=True, kw_only=True)
class ReplicaConfig:
    servers: tuple[str, ...]
    index: int = 0
    num_replicas: int = 1
    device: str = "cpu"
    threads: int | None = None
    model: str = "googlenet"
    num_classes: int = 1000
    seed: int = 0
    data: str = "demo"
    image_size: int = 32
    batch_size: int = 32
    augmentation: Augmentation | None = None  # None: the data source's default
    loader_workers: int = 0  # processes decoding ahead of the training loop
    decode: str = "loader"  # where a folder's training JPEGs are decoded: loader | device
    fetch_every: int = 1
    push_every: int = 1
    wire_dtype: str = "auto"  # bf16 with shards on other hosts, f32 on this one
    wire_parts: str = "auto"  # push-and-pull in parts with shards on other hosts
    overlap: bool = False
    # model parallelism (workers/pipeline.py): this replica split into ``stages``
    # processes, cut before the blocks ``stage_cuts`` (None: balanced on measured times)
    stages: int = 1
    stage_cuts: tuple[str, ...] | None = None
    micro_batches: int = 1
    stage_transport: str = "shm"  # activations between stages: shm (one host) | wire
    stage_devices: tuple[str, ...] | None = None  # one per stage (default: all on device)
    stage_addresses: tuple[str, ...] | None = None  # stages 1..K-1 listen there (elsewhere)
    group: str | None = None  # set by stage 0 for its stages' pieces
    shared_memory: bool = False  # payloads through /dev/shm with shards on this host
    data_order: str = "auto"  # dispatch | static | auto (see the module's docstring)
    warm_start: float = 0.0  # share of the first epoch replica 0 trains alone
    warm_threads: int | None = None  # replica 0's torch threads while it trains alone
    amp: str | None = None  # "bf16" or "f16": autocast on CUDA
    channels_last: bool = False
    steps: int | None = None
    epochs: float | None = None
    metrics_port: int = 0
    metrics_bind: str = "127.0.0.1"
    timeout_s: float = 30.0
    retries: int = 5
    curve: str | None = None  # a key folder: CURVE to the shards
    log_every: int = 20
    status_file: str | None = None
    # where a restarted replica picks up (set by the supervisor from the status file)
    start_step: int = 0
    start_examples: int = 0
    start_epoch: int = 0
    restarts: int = 0

    def __post_init__(self) -> None:
        if self.fetch_every < 1 or self.push_every < 1:
            raise ValueError("--fetch-every and --push-every must be at least 1")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.amp not in (None, "bf16", "f16"):
            raise ValueError(f"--amp must be bf16 or f16, got {self.amp!r}")
        if not 0 <= self.warm_start <= 1:
            raise ValueError(f"--warm-start must lie in [0, 1], got {self.warm_start}")
        if not 0 <= self.index < self.num_replicas:
            raise ValueError(f"replica index {self.index} out of range for {self.num_replicas}")
        if self.loader_workers < 0:
            raise ValueError(f"--loader-workers must be ≥ 0, got {self.loader_workers}")
        if self.data_order not in DATA_ORDERS:
            raise ValueError(f"--data-order must be one of {', '.join(DATA_ORDERS)}")
        self._check_stages()

    def _check_stages(self) -> None:
        if self.stages < 1 or self.micro_batches < 1:
            raise ValueError("--stages and --micro-batches must be at least 1")
        if self.micro_batches > self.batch_size:
            raise ValueError(
                f"--micro-batches {self.micro_batches} is more than the batch of {self.batch_size}"
            )
        if self.stages > 1 and self.overlap:
            raise ValueError(
                "--overlap with --stages: the stages push in step with each other, not "
                "in the background"
            )
        if self.stage_devices is not None and len(self.stage_devices) != self.stages:
            raise ValueError(f"{len(self.stage_devices)} stage devices for {self.stages} stages")


@dataclass
class ReplicaStatus:
    """What a replica reports in its status file (and its final summary)."""

    index: int
    device: str
    step: int = 0
    total_steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    loss: float = math.nan
    loss_first: float = math.nan  # mean training loss of the first LOSS_WINDOW steps
    loss_recent: float = math.nan  # mean training loss of the last LOSS_WINDOW steps
    images_per_s: float = 0.0
    pushes: int = 0
    non_finite_pushes: int = 0  # gradients with NaN or Inf, dropped before the push
    pulls: int = 0
    retries: int = 0
    staleness: float = 0.0
    data_wait_s: float = 0.0  # seconds the loop waited for its next batch (this process)
    exchange_s: float = 0.0  # seconds in pushes and pulls (this process; with --overlap,
    # in the background thread)
    epoch: int = 0
    restarts: int = 0
    warm_start_examples: int = 0  # the shards' examples when this replica began training
    data_order: str = ""  # dispatch or static, once connected
    # a split replica: each stage's report (workers/pipeline.py StageReport), stage 0
    # first, and the seconds from each batch's first forward to its last backward
    stages: list[dict[str, Any]] = field(default_factory=list)
    pipeline_s: float = 0.0
    pid: int = 0
    done: bool = False

    def write(self, path: str | None) -> None:
        if not path:
            return
        tmp = f"{path}.tmp"
        Path(tmp).write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)


class Replica:
    """One model replica: a full model on one device, talking to every shard."""

    def __init__(self, cfg: ReplicaConfig, stages: Stages | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.train_set = load_dataset(
            cfg.data,
            "train",
            image_size=cfg.image_size,
            # random labels are drawn for the classifier; real sets have their own classes
            num_classes=cfg.num_classes if cfg.data == "synthetic" else None,
            seed=cfg.seed,
            augmentation=cfg.augmentation,
            decode=cfg.decode,
        )
        # the loader's processes start before any socket or thread of this one exists; a
        # dispatched replica's start once shard 0 has handed it its first chunk
        self.batches: Loader | None = None
        if cfg.data_order == "static":
            self.batches = replica_batches(cfg, self.train_set, self.device)
        self.feed: ChunkFeed | None = None
        self.alone = False  # training the warm start alone
        torch.manual_seed(cfg.seed + 1000 * (cfg.index + 1))  # dropout differs per replica
        self.model = build_model(cfg.model, cfg.num_classes).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.layout = Layout.of(self.model, cfg.model)
        self.pipeline: Pipeline | None = None
        ranges = None
        if stages is None:
            self.weights, self.grads = flatten_into(self.model, self.layout)
        else:  # stage 0 of a split replica: its own layers and parameter ranges only
            plan = StagePlan(cfg.stage_cuts)
            self.weights, self.grads = bind_stage(self.model, self.layout, plan, 0, self.device)
            ranges = plan.ranges(self.layout, 0)
            part = StagePart(self.model, plan, 0)
            self.pipeline = Pipeline(part, self.grads, stages.cut, cfg.micro_batches, stages.alive)
            self.pipeline.report.parameters = self.weights.numel()
            self.pipeline.report.blocks = plan.describe_stage(0)
        self.stages = stages
        on_cpu = self.device.type == "cpu"
        pin = not on_cpu
        # host buffers the client reads and writes; on CPU they are the model's own
        self.host_weights = self.weights if on_cpu else _host(self.weights.numel(), pin)
        self.host_grads = self.grads if on_cpu else _host(self.weights.numel(), pin)
        # the host name keeps replicas in separate containers (same pids) apart
        worker = f"replica{cfg.index}-{default_worker_id()}"  # new at every start
        self.client = ParameterClient(
            ClientConfig(
                servers=cfg.servers,
                timeout_s=cfg.timeout_s,
                retries=cfg.retries,
                wire_dtype=cfg.wire_dtype,
                wire_parts=cfg.wire_parts,
                worker=worker if stages is None else f"{cfg.group}-stage0",
                curve=cfg.curve,
                shared_memory=cfg.shared_memory and stages is None,
                ranges=ranges,
                group=cfg.group if stages is not None else None,
            ),
            self.layout,
        )
        self.metrics = WorkerMetrics(new_registry("worker"))
        self.losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self.compute_s = 0.0  # forward and backward passes, this process's life
        self.status = ReplicaStatus(
            index=cfg.index,
            device=str(self.device),
            step=cfg.start_step,
            examples=cfg.start_examples,
            epoch=cfg.start_epoch,
            restarts=cfg.restarts,
            pid=os.getpid(),
        )

    def total_steps(self) -> int:
        return replica_steps(self.cfg, len(self.train_set))

    def run(self) -> ReplicaStatus:
        """Train for the configured steps (or the dispatched data); return the final status."""
        cfg = self.cfg
        serve_metrics(self.metrics.registry, cfg.metrics_port, cfg.metrics_bind)
        info = self.client.connect()
        log.info("connected to %d shard(s); %d parameters", len(info), self.layout.parameters)
        self._train_in_shared_memory()
        dataset_size = info[0].hparams.get("dataset_size")
        total: int | None = self.total_steps()
        self.status.total_steps = total
        if self._dispatched(dataset_size):
            warm_goal = self._start_dispatched(dataset_size)
            total = cfg.steps  # else: until the dispatcher has no more data for us
        else:
            warm_goal = self._warm_start_goal(dataset_size)
            self._wait_for_warm_start(warm_goal)
            if self.batches is None:
                self.batches = replica_batches(cfg, self.train_set, self.device)
        batches = self.batches
        comm = _Overlap(self) if cfg.overlap else None
        began = last_status = time.perf_counter()
        pending = 0  # examples accumulated in the gradient buffer since the last push
        marks: dict[int, list[int]] = {}  # dispatched chunk -> [from, upto) of those examples
        pulled = False  # the last push brought the weights back
        step = cfg.start_step
        self.model.train()
        for step in itertools.count(cfg.start_step):
            if total is not None and step >= total:
                break
            if comm is not None:
                comm.install_weights()
            elif pulled:
                pulled = False  # with the last push (the push-and-pull op)
            elif step % cfg.fetch_every == 0 or step == cfg.start_step or self.client.must_pull:
                # on schedule; first of all (a restarted replica may resume between two
                # fetches); or at once when a shard lost versions
                self._pull()
            batch = self._next_batch(batches)
            if batch is None:
                break  # the dispatcher has handed out the data this run asked for
            epoch, images, labels = batch
            if batches.mark is not None:
                chunk, lo, hi = batches.mark
                marks[chunk] = [marks.get(chunk, [lo])[0], hi]
            loss = self._step(images, labels)
            pending += len(labels)
            if (step + 1) % cfg.push_every == 0:
                # the next step pulls on schedule: the push brings the weights back
                pull = (step + 1) % cfg.fetch_every == 0 and (total is None or step + 1 < total)
                pulled = self._send(comm, pending, marks, pull=pull)
                pending, marks = 0, {}
                warm_goal = self._end_warm_start(warm_goal)
            now = time.perf_counter()
            self._record(step + 1, epoch, loss, len(labels), now - began, step + 1 - cfg.start_step)
            if now - last_status >= STATUS_EVERY_S:
                self._estimate_total()
                self.status.write(cfg.status_file)
                last_status = now
            if (step + 1) % cfg.log_every == 0:
                log.info(
                    "step %d/%s loss %.4f %.1f img/s staleness %.1f",
                    step + 1,
                    total if total is not None else "?",
                    loss,
                    self.status.images_per_s,
                    self.status.staleness,
                )
        if pending:
            self._send(comm, pending, marks)
        if comm is not None:
            comm.wait()
        batches.close()
        if self.pipeline is not None:
            self.pipeline.end()
            self.stages.join()
        if self.feed is not None:
            self.feed.release()  # chunks prefetched and not trained (a --steps run's end)
            self.feed.client.close()
            self.status.total_steps = self.status.step  # the estimate, now known
        self.status.done = True
        self.status.write(cfg.status_file)
        self.client.close()
        return self.status

    def _estimate_total(self) -> None:
        """With dispatched data and --epochs, the step count this replica will reach, as
        far as shard 0's last answer tells (its share depends on the others' speed)."""
        left = self.feed.steps_left() if self.feed is not None else None
        if left is not None:
            self.status.total_steps = self.status.step + left

    def _next_batch(self, batches: Loader) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """The next batch to train, skipping those of chunks shard 0 has revoked; None at
        the end of the dispatched data."""
        while True:
            waited = batches.data_wait_s
            try:
                batch = next(batches)
            except StopIteration:
                return None
            finally:
                self.metrics.data_wait.observe(batches.data_wait_s - waited)
                self.status.data_wait_s = batches.data_wait_s
            if self.feed is None or batches.mark[0] not in self.feed.revoked:
                return batch

    def _send(
        self, comm: _Overlap | None, examples: int, marks: dict[int, list[int]], pull: bool = False
    ) -> bool:
        """Push the accumulated gradient (in the background with --overlap, which always
        pulls after); with ``pull``, bring the weights back in the same round trip.
        Return whether the weights were pulled here."""
        progress = [[chunk, *span] for chunk, span in marks.items()] or None
        if self.pipeline is not None:  # every stage pushes its piece of this step, or none
            self.pipeline.announce(push=self.pipeline.finite(), examples=examples)
        if comm is not None:
            comm.push_then_pull(examples, progress)
            return False
        return self._push(examples, progress=progress, pull=pull)

    def _dispatched(self, dataset_size: int | None) -> bool:
        """Whether this replica trains dispatched chunks (else its static share)."""
        cfg, n = self.cfg, len(self.train_set)
        if cfg.data_order == "static":
            self.status.data_order = "static"
            return False
        if dataset_size != n:
            msg = (
                f"the shards order a data set of {dataset_size} examples (serve "
                f"--dataset-size); this replica's {cfg.data} has {n}"
            )
            if cfg.data_order == "dispatch":
                raise DataMismatch(f"{msg}: start the shards with --dataset-size {n}")
            log.warning(
                "%s: reading the static share %d of %d (--first-replica, --total-replicas), "
                "not chunks from shard 0",
                msg,
                cfg.index,
                cfg.num_replicas,
            )
            self.status.data_order = "static"
            return False
        self.status.data_order = "dispatch"
        return True

    def _start_dispatched(self, dataset_size: int) -> float | None:
        """Open the feed, wait for the first chunk (through another replica's warm start)
        and start the loader on it; return the warm-start goal if this replica trains alone."""
        cfg = self.cfg
        client = ParameterClient(replace(self.client.cfg, servers=cfg.servers[:1]))
        until = None if cfg.steps is not None else int((cfg.epochs or 1.0) * dataset_size)
        self.feed = ChunkFeed(
            client,
            worker=self.client.cfg.worker,
            batch_size=cfg.batch_size,
            dataset_size=len(self.train_set),
            until=until,
            warm_examples=int(warm_start_examples(cfg, dataset_size)),
        )
        self.feed.first = self.feed.ask()
        self.status.warm_start_examples = int(self.client.stats()[0]["examples"])
        self.batches = replica_batches(cfg, self.train_set, self.device, self.feed)
        return self._train_alone(self.feed.warm_until) if self.feed.warm_until else None

    def _warm_start_goal(self, dataset_size: int | None) -> float | None:
        """The shards' example count at which the warm start ends; None: no warm start."""
        if self.cfg.warm_start <= 0 or not dataset_size:
            return None
        goal = warm_start_examples(self.cfg, dataset_size)
        return self._train_alone(goal) if self.cfg.index == 0 else goal

    def _train_alone(self, goal: float) -> float:
        """This replica trains the warm start alone: every core of the host, until ``goal``."""
        self.alone = True
        if self.cfg.warm_threads and self.status.examples < goal:
            torch.set_num_threads(self.cfg.warm_threads)
            log.info("warm start: training alone on %d threads", self.cfg.warm_threads)
        return goal

    def _end_warm_start(self, goal: float | None) -> float | None:
        """The replica training alone, at a push: once past the warm start, back to its
        share of the cores."""
        if goal is None or not self.alone or self.status.examples < goal:
            return goal
        if self.cfg.warm_threads and self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
            log.info("warm start over: the other replicas join")
        return None

    def _wait_for_warm_start(self, goal: float | None) -> None:
        """Replicas other than 0 wait until the shards have seen the warm-start share of
        the first epoch: replica 0 alone takes the network off its initial plateau, with
        fresh gradients, as DistBelief started Downpour with one replica."""
        if self.cfg.index == 0 or goal is None:
            return
        seen, last_change, logged = -1, time.monotonic(), 0.0
        while (examples := self.client.stats()[0]["examples"]) < goal:
            self.status.warm_start_examples = examples
            now = time.monotonic()
            if examples != seen:
                seen, last_change = examples, now
            elif now - last_change > WARM_START_STALL_S:
                log.warning("warm start: no progress for %g s; starting", WARM_START_STALL_S)
                return
            if now - logged >= 10.0:
                log.info("warm start: waiting for replica 0 (%d of %d examples)", examples, goal)
                logged = now
            time.sleep(WARM_START_POLL_S)
        self.status.warm_start_examples = examples

    def _train_in_shared_memory(self) -> None:
        """On CPU, without --overlap: compute in the client's shared-memory vectors, so the
        shards read the gradient and write the weights where the model has them."""
        shared = self.client.shared_buffers()
        if shared is None or self.device.type != "cpu" or self.cfg.overlap:
            return  # a GPU copies through host buffers; --overlap pulls into a spare one
        self.weights, self.grads = flatten_into(self.model, self.layout, shared)
        self.host_weights, self.host_grads = self.weights, self.grads
        log.info("training in shared memory: pushes and pulls copy nothing here")

    # -- the pieces of a step --------------------------------------------------------

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        began = time.perf_counter()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            if self.pipeline is not None:
                loss = self.pipeline.step(images, labels)
            else:
                loss = forward_backward(self.model, images, labels)  # .item() syncs the device
        spent = time.perf_counter() - began
        self.metrics.step_seconds.observe(spent)
        self.compute_s += spent
        return loss

    def _autocast(self):
        if self.cfg.amp is None or self.device.type != "cuda":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _pull(self, into: torch.Tensor | None = None) -> None:
        began = time.perf_counter()
        self.client.pull(self.host_weights if into is None else into)
        self._pulled(into)
        if self.pipeline is not None:  # (not --overlap) the others pull with the next batch
            self.pipeline.pulled = True
        spent = time.perf_counter() - began
        self.metrics.pull_seconds.observe(spent)
        self.status.exchange_s += spent

    def _pulled(self, into: torch.Tensor | None) -> None:
        if into is None and self.host_weights is not self.weights:
            self.weights.copy_(self.host_weights, non_blocking=True)
        self.status.pulls += 1

    def _push(
        self,
        examples: int,
        grads: torch.Tensor | None = None,
        progress: list[list[int]] | None = None,
        pull: bool = False,
        into: torch.Tensor | None = None,
    ) -> bool:
        """Push ``grads`` (default: the accumulated gradient); with ``pull``, the shards
        answer with their weights after it, written into ``into`` (default: the
        replica's weights). Return whether the weights were pulled: not when the
        gradient was dropped as non-finite."""
        began = time.perf_counter()
        if grads is None:
            if self.host_grads is not self.grads:
                self.host_grads.copy_(self.grads)  # blocks until the backward pass is done
            grads = self.host_grads
        if self.pipeline is not None:  # every stage's, as stage 0 announced it
            finite = self.pipeline.pushing
        else:
            finite = math.isfinite(float(grads.sum()))
        if not finite:
            # every shard would refuse its slice only if the NaN fell in it: the others
            # would apply theirs, a torn update. Dropped here whole, counted, logged.
            self.grads.zero_()
            self.metrics.non_finite.inc()
            self.status.non_finite_pushes += 1
            log.warning(
                "gradient of %d examples holds NaN or Inf: not pushed (%d so far)",
                examples,
                self.status.non_finite_pushes,
            )
            return False
        pull_into = (self.host_weights if into is None else into) if pull else None
        if self.pipeline is None:
            results = self.client.push(grads, examples, progress, pull_into=pull_into)
        else:  # stage 0: pieces held on the shards, then the step committed everywhere
            results = self.pipeline.push(self.client, grads, examples, progress, pull_into)
        if pull:
            self._pulled(into)
        if grads is self.grads or grads is self.host_grads:
            self.grads.zero_()
        if self.feed is not None and progress:
            self.feed.revoke(results[0].revoked, results[0].generation)
            for chunk, _, upto in progress:
                self.feed.done(chunk, upto)
        spent = time.perf_counter() - began
        self.metrics.push_seconds.observe(spent)
        self.status.exchange_s += spent
        staleness = sum(r.staleness for r in results) / len(results)
        self.metrics.staleness.observe(staleness)
        self.status.staleness = staleness
        self.status.pushes += 1
        return pull

    def _record(
        self, step: int, epoch: int, loss: float, examples: int, seconds: float, steps_here: int
    ) -> None:
        s = self.status
        s.step, s.epoch, s.loss, s.seconds = step, epoch, loss, seconds
        self.losses.append(loss)
        s.loss_recent = sum(self.losses) / len(self.losses)
        if steps_here <= LOSS_WINDOW:
            s.loss_first = s.loss_recent
        s.examples += examples
        # images/s of this process's life (a restart starts the clock again)
        s.images_per_s = steps_here * self.cfg.batch_size / seconds if seconds > 0 else 0.0
        if self.pipeline is not None:
            report = self.pipeline.report
            report.pushes, report.push_s = s.pushes, s.exchange_s
            s.stages, s.pipeline_s = self.pipeline.stages(), self.pipeline.pipeline_s
            self.metrics.observe_stages(s.stages)
        else:  # unsplit, a replica is its only stage: every dashboard query has its series
            whole = {"stage": 0, "compute_s": self.compute_s, "wait_s": 0.0, "sent_bytes": 0}
            whole |= {"received_bytes": 0, "parameters": self.layout.parameters}
            self.metrics.observe_stages([whole])
        m = self.metrics
        m.retries.inc(self.client.retries_total - s.retries)
        s.retries = self.client.retries_total
        m.steps.inc()
        m.examples.inc(examples)
        m.loss.set(loss)


class _Overlap:
    """Push and pull in a background thread while the next step computes."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        total = replica.weights.numel()
        self.send = _host(total, replica.device.type != "cpu")
        self.incoming = torch.empty(total, dtype=torch.float32)
        self.fresh = False
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def push_then_pull(self, examples: int, progress: list[list[int]] | None = None) -> None:
        self.wait()
        self.send.copy_(self.replica.grads)  # the grads buffer is free for the next step
        self.replica.grads.zero_()
        self.thread = threading.Thread(target=self._run, args=(examples, progress), daemon=True)
        self.thread.start()

    def _run(self, examples: int, progress: list[list[int]] | None) -> None:
        try:
            if not self.replica._push(
                examples, grads=self.send, progress=progress, pull=True, into=self.incoming
            ):
                self.replica._pull(into=self.incoming)  # the push was dropped: pull alone
            self.fresh = True
        except BaseException as exc:  # re-raised in the training thread
            self.error = exc

    def install_weights(self) -> None:
        """At a step boundary: first step pulls synchronously; later, take what arrived."""
        if self.replica.status.pulls == 0:
            self.replica._pull()
            return
        if self.thread is not None and not self.thread.is_alive():
            self.wait()
        if self.fresh:
            self.replica.weights.copy_(self.incoming)
            self.fresh = False

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise self.error


def replica_steps(cfg: ReplicaConfig, dataset_size: int) -> int:
    """Steps replica ``cfg.index`` trains: ``--steps``, or its share of ``--epochs``.

    Replica 0 trains the warm start alone, so with ``--epochs`` those steps move from
    the others to it and the replicas together still train the epochs asked for.
    """
    if cfg.steps is not None:
        return cfg.steps
    steps = (cfg.epochs or 1.0) * (dataset_size // (cfg.batch_size * cfg.num_replicas))
    if cfg.num_replicas > 1 and cfg.warm_start > 0:
        warm = warm_start_examples(cfg, dataset_size) / cfg.batch_size
        steps += (warm if cfg.index == 0 else 0) - warm / cfg.num_replicas
    return max(1, math.ceil(steps))


def warm_start_examples(cfg: ReplicaConfig, dataset_size: int) -> float:
    """Examples replica 0 trains alone: ``--warm-start`` times the first epoch, or times
    the whole run when the run is shorter than an epoch (``--steps 30`` must not wait
    for a share of an epoch that the run never reaches)."""
    if cfg.steps is not None:
        run = cfg.steps * cfg.batch_size * cfg.num_replicas
    else:
        run = (cfg.epochs or 1.0) * dataset_size
    return cfg.warm_start * min(dataset_size, run)


def replica_batches(
    cfg: ReplicaConfig,
    dataset: Any,
    device: torch.device | str = "cpu",
    feed: ChunkFeed | None = None,
) -> Loader:
    """This replica's batches: the chunks ``feed`` yields; without one, its own disjoint
    share of every epoch, epoch after epoch, from the batch of its step
    ``cfg.start_step`` on (one batch a step)."""
    return Loader(
        dataset,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=cfg.index,
        world=cfg.num_replicas,
        start=cfg.start_step,
        workers=cfg.loader_workers,
        device=device,
        feed=feed,
    )


def _host(size: int, pin: bool) -> torch.Tensor:
    return torch.zeros(size, dtype=torch.float32, pin_memory=pin)


def run_replica(cfg: ReplicaConfig, stages: Stages | None = None) -> dict[str, Any]:
    """Build and run one replica (stage 0 of ``stages`` when split); return its final
    status as a dict."""
    return asdict(Replica(cfg, stages).run())

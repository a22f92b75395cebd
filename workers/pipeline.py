"""A replica split into K stage processes (``work --stages K``), GPipe-style.

The replica's process is stage 0: it reads the data, runs the first blocks, and is the
:class:`distbelief.workers.replica.Replica` it would be unsplit, with its forward and
backward pass handed to a :class:`Pipeline`. Before it builds anything it forks stages
1..K-1 (:func:`start_stages`), decides the cuts (given, or measured: the blocks' forward
and backward times on this device, balanced by :func:`distbelief.stages.balance`) and
sends them down the chain with the replica's group id. Each later stage
(:class:`StageWorker`) builds its layers only, pulls and pushes only its own parameter
ranges as pieces of the group's steps (the shards apply a step once every piece is in:
``server/pieces.py``), and loops on what the previous stage sends.

Schedule: fill and drain (GPipe). Stage 0 cuts a batch into ``m`` micro-batches and
sends each forward as soon as it is computed; every stage runs all ``m`` forwards,
then all ``m`` backwards in the same order, sending each input gradient back at once.
1F1B would hold fewer activations at once but has the same bubble, ``(K − 1)/(m + K −
1)`` of each stage's time; fill and drain keeps the accumulation order of the
reference (:func:`distbelief.stages.accumulate`), so the gradients stay equal to it.

A step's pushes: stage 0 finishes its backward last; it then knows whether every
stage's gradient is finite (each stage's answer rides on its last input gradient) and
sends ``push`` down the chain. Every stage pushes on that word (or all drop the step),
so their pieces carry the same sequence numbers; no stage pushes a step before every
stage has finished it. A stage that dies stops the replica: stage 0 watches its
children and ends them and itself (the supervisor then restarts the replica whole);
a later stage whose replica process is gone ends itself. A step some stages pushed
and others did not is never applied: its open pieces expire on the shards.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from distbelief.client import ClientConfig, ParameterClient, default_worker_id
from distbelief.launcher import free_port_run
from distbelief.layout import Layout
from distbelief.logs import setup_logging
from distbelief.models import build_model
from distbelief.stages import StagePart, StagePlan, balance, bind_stage, measure_blocks

from .cut import Cut, StageLost

log = logging.getLogger(__name__)

WATCH_S = 0.2  # how often stage 0 looks at its stage processes
END_GRACE_S = 30.0  # stages finish their last push after "end"
STAGE_EXIT = {"config": 2, "lost": 3}
WIRE_PORTS = (20000, 60000)  # where the loopback cuts of --stage-transport wire are sought


@dataclass
class StageReport:
    """What one stage did so far (sent back to stage 0 with its last gradient)."""

    stage: int
    pid: int = field(default_factory=os.getpid)
    blocks: str = ""  # its first and last block, e.g. "4b-head"
    compute_s: float = 0.0  # forward and backward
    # within its batches' pipeline phase, not waiting at a cut; from the second batch
    # on, as pipeline_s (the first builds the kernels for its shapes)
    busy_s: float = 0.0
    wait_s: float = 0.0  # waiting at its cuts
    sent_bytes: int = 0  # over its cuts
    received_bytes: int = 0
    pushes: int = 0
    push_s: float = 0.0
    parameters: int = 0  # in its ranges


@dataclass
class Pipeline:
    """Stage 0's side of the chain: the forward and backward of one batch through every
    stage, the push decision, the end."""

    part: StagePart
    grads: torch.Tensor
    cut: Cut
    micro_batches: int
    alive: Any
    report: StageReport = field(default_factory=lambda: StageReport(stage=0))
    reports: list[dict[str, Any]] = field(default_factory=list)  # of stages 1..K-1
    downstream_finite: bool = True
    pushing: bool = True  # the word of the last announce: push (every gradient finite)
    pulled: bool = False  # stage 0 pulled before this batch: the others pull too
    # from the first forward to the last backward, summed over the batches after the first
    pipeline_s: float = 0.0
    count: int = 0  # batches sent down the chain

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Forward and backward of one batch through every stage; the batch's loss."""
        began = time.perf_counter()
        self.count += 1
        step, waited = self.count, self.cut.wait_s
        m = self.micro_batches
        chunks = list(zip(images.chunk(m), labels.chunk(m), strict=True))
        scale = 1.0 if len(chunks) == 1 else 1.0 / len(chunks)
        outputs, losses = [], []
        pull, self.pulled = self.pulled, False  # said with this batch's activations
        for j, (x, y) in enumerate(chunks):
            t = time.perf_counter()
            out, loss = self.part.forward(x, y, scale)
            self.report.compute_s += time.perf_counter() - t
            fields = {"mb": j, "of": len(chunks), "labels": y.tolist(), "pull": pull}
            self.cut.send("act", step, out, **fields)
            outputs.append((out, loss))
        for j, (out, loss) in enumerate(outputs):
            header, grad = self.cut.recv(self.alive)
            _expect(header, "grad", step, j)
            t = time.perf_counter()
            backward(out, grad.to(out.device), loss)
            self.report.compute_s += time.perf_counter() - t
            losses.append(header["loss"] + (float(loss.detach()) if loss is not None else 0.0))
            if j == len(outputs) - 1:
                self.downstream_finite = header["finite"]
                self.reports = header["reports"]
        if step > 1:
            self.pipeline_s += time.perf_counter() - began
            self.report.busy_s += time.perf_counter() - began - (self.cut.wait_s - waited)
        self.report.wait_s, self.report.sent_bytes = self.cut.wait_s, self.cut.sent_bytes
        self.report.received_bytes = self.cut.received_bytes
        return sum(losses)

    def finite(self) -> bool:
        """Whether every stage's gradient of the last batch is finite."""
        return self.downstream_finite and math.isfinite(float(self.grads.sum()))

    def announce(self, push: bool, examples: int) -> None:
        """Tell every stage to push its piece of the step (``push``) or drop it. Every
        piece counts ``examples``."""
        self.pushing = push
        self.cut.send("push", self.count, push=push, examples=examples)

    def push(
        self,
        client: ParameterClient,
        grads: torch.Tensor,
        examples: int,
        progress: list[list[int]] | None,
        pull_into: torch.Tensor | None,
    ) -> list[Any]:
        """Stage 0's piece of the step, after :meth:`announce`: pushed (the shards hold
        it); once every later stage says its pieces are held too, the step committed on
        every shard (weights into ``pull_into``), then the word to commit sent down.
        Returns when every stage has committed (and has its weights): the next batch's
        pipeline does not run beside a stage's exchange."""
        client.push(grads, examples, progress)
        self._expect_word("held")
        results = client.commit(pull_into, everywhere=True)
        self.cut.send("commit", self.count, pull=pull_into is not None)
        self._expect_word("ready")
        return results

    def _expect_word(self, kind: str) -> None:
        header, _ = self.cut.recv(self.alive)
        _expect(header, kind, self.count)

    def end(self) -> None:
        self.cut.send("end", self.count)

    def stages(self) -> list[dict[str, Any]]:
        """Every stage's report, stage 0 first."""
        return [asdict(self.report), *self.reports]


def backward(out: torch.Tensor, grad: torch.Tensor | None, loss: torch.Tensor | None) -> None:
    """Backward from this stage's output (its gradient from the next stage) and its own
    loss terms, in one pass (their gradients meet where the aux heads branch off)."""
    roots = [t for t in (out, loss) if t is not None and (t is loss or grad is not None)]
    grads = [grad if t is out else None for t in roots]
    torch.autograd.backward(roots, grads)


def _expect(header: dict[str, Any], kind: str, step: int, mb: int | None = None) -> None:
    if header["kind"] != kind or header["step"] != step or (mb is not None and header["mb"] != mb):
        raise StageLost(
            f"stages out of step: expected {kind} of step {step} micro-batch {mb}, got "
            f"{header['kind']} of step {header['step']}"
        )


# -- the later stages ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """What a stage after the first needs, besides what stage 0 sends it."""

    servers: tuple[str, ...]
    replica: int
    stage: int
    num_stages: int
    device: str = "cpu"
    threads: int | None = None
    model: str = "googlenet"
    num_classes: int = 1000
    seed: int = 0
    wire_dtype: str = "auto"
    timeout_s: float = 30.0
    retries: int = 5
    curve: str | None = None
    transport: str = "shm"
    addresses: tuple[str, ...] = ()  # stage k listens on addresses[k - 1]
    parent: int = 0  # the replica's process (0: none, a stage of its own: work --stage)


class StageWorker:
    """Stage k ≥ 1: receive activations, run its blocks, send gradients back, push."""

    def __init__(self, cfg: StageConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.upstream = Cut(cfg.addresses[cfg.stage - 1], bind=True, transport=cfg.transport)
        last = cfg.stage == cfg.num_stages - 1
        self.downstream = (
            None if last else Cut(cfg.addresses[cfg.stage], bind=False, transport=cfg.transport)
        )
        self.report = StageReport(stage=cfg.stage)

    def alive(self) -> bool:
        """Whether the replica's process (a forked stage) and both neighbours are there."""
        if self.cfg.parent and os.getppid() != self.cfg.parent:
            return False
        return not any(c.lost() for c in (self.upstream, self.downstream) if c is not None)

    def _forward_plan(self) -> tuple[StagePlan, str]:
        header, _ = self.upstream.recv(self.alive)
        _expect(header, "plan", 0)
        if self.downstream is not None:
            self.downstream.send("plan", 0, starts=header["starts"], group=header["group"])
        return StagePlan(tuple(header["starts"])), header["group"]

    def setup(self) -> None:
        cfg = self.cfg
        plan, group = self._forward_plan()
        # the replica's seed: the same initial weights and dropout masks as unsplit
        torch.manual_seed(cfg.seed + 1000 * (cfg.replica + 1))
        model = build_model(cfg.model, cfg.num_classes)
        layout = Layout.of(model, cfg.model)
        self.part = StagePart(model, plan, cfg.stage)
        self.report.blocks = plan.describe_stage(cfg.stage)
        self.weights, self.grads = bind_stage(model, layout, plan, cfg.stage, self.device)
        model.train()
        ranges = plan.ranges(layout, cfg.stage)
        self.report.parameters = self.weights.numel()
        self.host_weights = self.weights if self.device.type == "cpu" else self.weights.cpu()
        self.host_grads = self.grads if self.device.type == "cpu" else self.grads.cpu()
        self.client = ParameterClient(
            ClientConfig(
                servers=cfg.servers,
                timeout_s=cfg.timeout_s,
                retries=cfg.retries,
                wire_dtype=cfg.wire_dtype,
                worker=f"{group}-stage{cfg.stage}",
                curve=cfg.curve,
                ranges=ranges,
                group=group,
            ),
            layout,
        )
        self.client.connect()
        log.info(
            "holds %s: %d parameters in %d range(s)", self.part.mine, len(self.weights), len(ranges)
        )

    def run(self) -> None:
        """Follow stage 0's word until the end."""
        while True:
            header, tensor = self.upstream.recv(self.alive)
            kind = header["kind"]
            if kind == "end":
                if self.downstream is not None:
                    self.downstream.send("end", header["step"])
                return
            if kind == "push":
                if self.downstream is not None:
                    fields = {k: header[k] for k in ("push", "examples")}
                    self.downstream.send("push", header["step"], **fields)
                self._push(header["step"], header["push"], header["examples"])
                continue
            if kind == "commit":
                if self.downstream is not None:
                    self.downstream.send("commit", header["step"], pull=header["pull"])
                self._commit(header["pull"])
                self._pass_up("ready", header["step"])
                continue
            if header["pull"] or self.client.must_pull:  # when stage 0 pulls (or a shard
                self._pull()  # went back): every stage computes on the same versions
            self._step(header["step"], header, tensor)

    def _step(self, step: int, header: dict[str, Any], tensor: torch.Tensor) -> None:
        """All micro-batches of one step: forwards, then backwards in the same order."""
        began, waited = time.perf_counter(), self._waited()
        held = []
        total = header["of"]
        scale = 1.0 if total == 1 else 1.0 / total
        for j in range(total):
            if j:
                header, tensor = self.upstream.recv(self.alive)
                _expect(header, "act", step, j)
            x = tensor.to(self.device).requires_grad_()
            y = torch.tensor(header["labels"], dtype=torch.long, device=self.device)
            t = time.perf_counter()
            out, loss = self.part.forward(x, y, scale)
            self.report.compute_s += time.perf_counter() - t
            if self.downstream is not None:
                fields = {"mb": j, "of": total, "labels": header["labels"], "pull": header["pull"]}
                self.downstream.send("act", step, out, **fields)
            held.append((x, out, loss))
        for j, (x, out, loss) in enumerate(held):
            below: dict[str, Any] = {"loss": 0.0, "finite": True, "reports": []}
            grad = None
            if self.downstream is not None:
                below, grad = self.downstream.recv(self.alive)
                _expect(below, "grad", step, j)
                grad = grad.to(out.device)
            t = time.perf_counter()
            backward(out, grad, loss)
            self.report.compute_s += time.perf_counter() - t
            mine = float(loss.detach()) if loss is not None else 0.0
            fields = {"loss": below["loss"] + mine, "finite": True, "reports": []}
            if j == total - 1:
                fields["finite"] = below["finite"] and math.isfinite(float(self.grads.sum()))
            if j == total - 1:
                if step > 1:
                    spent = time.perf_counter() - began
                    self.report.busy_s += spent - (self._waited() - waited)
                fields["reports"] = [asdict(self._report()), *below["reports"]]
            self.upstream.send("grad", step, x.grad, mb=j, **fields)

    def _waited(self) -> float:
        return sum(c.wait_s for c in (self.upstream, self.downstream) if c is not None)

    def _report(self) -> StageReport:
        r = self.report
        cuts = [c for c in (self.upstream, self.downstream) if c is not None]
        r.wait_s = sum(c.wait_s for c in cuts)
        r.sent_bytes = sum(c.sent_bytes for c in cuts)
        r.received_bytes = sum(c.received_bytes for c in cuts)
        return r

    def _pull(self) -> None:
        self.client.pull(self.host_weights)
        if self.host_weights is not self.weights:
            self.weights.copy_(self.host_weights)

    def _push(self, step: int, push: bool, examples: int) -> None:
        """Push this stage's piece of the step (the shards hold it) and, once the later
        stages' pieces are held too, say so to the previous stage; or drop the step
        with every other stage."""
        began = time.perf_counter()
        if push:
            if self.host_grads is not self.grads:
                self.host_grads.copy_(self.grads)
            self.client.push(self.host_grads, examples)
            self._pass_up("held", step)
            self.report.pushes += 1
        self.grads.zero_()  # pushed, or dropped with every other stage's
        self.report.push_s += time.perf_counter() - began

    def _pass_up(self, kind: str, step: int) -> None:
        """Say ``kind`` (held, ready) to the previous stage once the next one has said
        it for itself and every later one: then it holds for the whole chain."""
        if self.downstream is not None:
            header, _ = self.downstream.recv(self.alive)
            _expect(header, kind, step)
        self.upstream.send(kind, step)

    def _commit(self, pull: bool) -> None:
        """Commit the step on this stage's shards (stage 0 has on every shard already:
        they answer with the weights after it)."""
        began = time.perf_counter()
        self.client.commit(self.host_weights if pull else None)
        if pull and self.host_weights is not self.weights:
            self.weights.copy_(self.host_weights)
        self.report.push_s += time.perf_counter() - began

    def close(self) -> None:
        for cut in (self.upstream, self.downstream):
            if cut is not None:
                cut.close()
        if hasattr(self, "client"):
            self.client.close()


def stage_process(cfg: StageConfig, level: int) -> None:
    """Entry point of a forked stage k ≥ 1's process."""
    setup_logging(f"replica[{cfg.replica}].stage", cfg.stage, level=level)
    _die_with_parent()
    code, _ = run_stage(cfg)
    if code:
        os._exit(code)


def run_stage(cfg: StageConfig) -> tuple[int, StageReport]:
    """Run stage k ≥ 1 to the replica's end; its exit code (``STAGE_EXIT``) and report."""
    from distbelief.client import ServerRefused, ServerUnavailable

    worker = None
    code = 0
    try:
        worker = StageWorker(cfg)
        worker.setup()
        worker.run()
    except StageLost as exc:
        log.error("%s; stopping", exc)
        code = STAGE_EXIT["lost"]
    except (ServerRefused, ValueError) as exc:
        log.error("%s", exc)
        code = STAGE_EXIT["config"]
    except ServerUnavailable as exc:
        log.error("%s", exc)
        code = 1
    finally:
        if worker is not None:
            worker.close()
    return code, worker._report() if worker is not None else StageReport(stage=cfg.stage)


def _die_with_parent() -> None:
    """Have the kernel end this process when the replica's process ends (Linux), also
    while it waits on a shard: nothing would read what it computes."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# -- stage 0: start the others, watch them ------------------------------------------


@dataclass
class Stages:
    """Stage 0's view of the stage processes of its replica."""

    processes: list[Any]
    cut: Cut
    folder: str  # the cuts' Unix sockets
    plan: StagePlan | None = None
    group: str = ""
    failed: int | None = None  # exit code of the first stage that died

    def alive(self) -> bool:
        processes = all(p.is_alive() or p.exitcode == 0 for p in self.processes)
        return self.failed is None and processes and not self.cut.lost()

    def watch(self) -> None:
        """In a thread: when a stage dies, end the others and this process (the
        supervisor restarts the replica whole)."""
        while True:
            for k, p in enumerate(self.processes, start=1):
                if p.exitcode not in (None, 0):
                    self.failed = p.exitcode
                    log.error("stage %d exited with %s: stopping the replica", k, p.exitcode)
                    self.stop()
                    code = STAGE_EXIT["config"] if p.exitcode == STAGE_EXIT["config"] else 1
                    os._exit(code)
            if all(p.exitcode == 0 for p in self.processes):
                return
            time.sleep(WATCH_S)

    def stop(self) -> None:
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        for p in self.processes:
            p.join(5.0)
        shutil.rmtree(self.folder, ignore_errors=True)

    def join(self) -> None:
        """After ``end``: wait for the stages to finish their last push."""
        deadline = time.monotonic() + END_GRACE_S
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        self.stop()
        self.cut.close()


def start_stages(cfg: Any, level: int) -> Stages:
    """Fork stages 1..K-1 of replica ``cfg`` (a ReplicaConfig) before this process has
    started a thread or used torch's thread pool; return them with the cut to stage 1.
    With ``cfg.stage_addresses`` the stages run elsewhere (``work --stage I``), listening
    there: nothing is forked, stage 0 connects over the wire."""
    folder = tempfile.mkdtemp(prefix="distbelief-stages-")
    k = cfg.stages
    if cfg.stage_addresses:
        cut = Cut(cfg.stage_addresses[0], bind=False, transport="wire")
        return Stages(processes=[], cut=cut, folder=folder)
    if cfg.stage_transport == "wire":
        base = free_port_run(k - 1, random.randint(*WIRE_PORTS))
        addresses = tuple(f"tcp://127.0.0.1:{base + i}" for i in range(k - 1))
    else:
        addresses = tuple(f"ipc://{folder}/cut{i}" for i in range(1, k))
    devices = cfg.stage_devices or (cfg.device,) * k
    context = multiprocessing.get_context("fork")
    processes = []
    for stage in range(1, k):
        scfg = StageConfig(
            servers=cfg.servers,
            replica=cfg.index,
            stage=stage,
            num_stages=k,
            device=devices[stage],
            threads=cfg.threads,
            model=cfg.model,
            num_classes=cfg.num_classes,
            seed=cfg.seed,
            wire_dtype=cfg.wire_dtype,
            timeout_s=cfg.timeout_s,
            retries=cfg.retries,
            curve=cfg.curve,
            transport=cfg.stage_transport,
            addresses=addresses,
            parent=os.getpid(),
        )
        p = context.Process(target=stage_process, args=(scfg, level), name=f"stage{stage}")
        p.start()
        processes.append(p)
    cut = Cut(addresses[0], bind=False, transport=cfg.stage_transport)
    return Stages(processes=processes, cut=cut, folder=folder)


def decide_plan(cfg: Any, stages: Stages) -> StagePlan:
    """The cuts: given, or balanced on the blocks' measured times on this device; sent
    down the chain with the replica's group id."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.stage_cuts:
        plan = StagePlan(tuple(cfg.stage_cuts))
        if plan.num_stages != cfg.stages:
            raise ValueError(
                f"--stage-cuts {','.join(cfg.stage_cuts)} makes {plan.num_stages} stages, "
                f"--stages says {cfg.stages}"
            )
    else:
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.num_classes)
        costs = measure_blocks(
            model, cfg.image_size, cfg.batch_size // cfg.micro_batches, cfg.device
        )
        plan = balance(costs, cfg.stages)
        log.info("block times (ms): %s", ", ".join(f"{c * 1e3:.1f}" for c in costs))
    stages.plan = plan
    stages.group = f"replica{cfg.index}-{default_worker_id()}"
    stages.cut.send("plan", 0, starts=list(plan.starts), group=stages.group)
    log.info("split into %d stages: %s", plan.num_stages, plan.describe())
    return plan


def split_replica(cfg: Any, level: int) -> tuple[Any, Stages]:
    """Start the stages of replica ``cfg``, decide its cuts and watch the stages from a
    thread; return the config stage 0 runs with (cuts and group filled in)."""
    stages = start_stages(cfg, level)  # first: no thread of ours and no torch work yet
    try:
        plan = decide_plan(cfg, stages)
    except BaseException:
        stages.stop()
        raise
    threading.Thread(target=stages.watch, daemon=True, name="stages").start()
    return replace(cfg, stage_cuts=plan.starts, group=stages.group), stages

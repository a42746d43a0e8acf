"""The step loop: schedule, execute, update (vLLM v1's shape). Runs in one thread; gRPC
handlers submit requests and read their output queues."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import torch
from opentelemetry import context as otel_context

from services.common import tensors
from services.common.errors import VlmeshError
from vlmesh.v1 import coordinator_pb2, tensor_pb2

from .detokenizer import IncrementalDetokenizer
from .runner import Runner, StepOutcome, StepPlan
from .scheduler import Scheduler
from .session import Session

log = logging.getLogger(__name__)

FINISH_STOP = coordinator_pb2.FINISH_REASON_STOP
FINISH_LENGTH = coordinator_pb2.FINISH_REASON_LENGTH
FINISH_STOP_STRING = coordinator_pb2.FINISH_REASON_STOP_STRING


CANCELLED = object()  # queued by Request.cancel: the turn ends without a finish reason


@dataclass
class Request:
    """One Generate call in flight."""

    session: Session
    prompt_ids: list[int]  # [T] new tokens to feed (history[cached:])
    positions: torch.Tensor  # [3, T]
    visual: torch.Tensor | None  # [N, H]
    deepstack: list[torch.Tensor] | None  # Qwen3-VL: [N, H] per DeepStack layer 0..k-1
    sampling: tensor_pb2.SamplingParams
    max_tokens: int
    logprobs: int
    detok: IncrementalDetokenizer
    eos_token_ids: set[int]
    trace_context: otel_context.Context | None
    cached_tokens: int
    out: queue.Queue = field(default_factory=queue.Queue)  # GenerateResponse | VlmeshError | None (end)
    generated: list[int] = field(default_factory=list)
    done: bool = False
    started: bool = False
    released: threading.Event = field(default_factory=threading.Event)  # the engine let go of it
    wake: object = None  # set by the engine: nudges an idle loop to notice a cancellation

    def cancel(self) -> None:
        """The caller went away (or the handler gave up): stop generating and unblock the handler."""
        if self.done:
            return
        self.done = True
        self.out.put(CANCELLED)
        if self.wake is not None:
            self.wake()


class Engine:
    def __init__(self, runner: Runner, max_batch: int = 32):
        self.runner = runner
        self.scheduler = Scheduler(max_batch=max_batch)
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        request.wake = lambda: self._inbox.put(None)
        self._inbox.put(request)

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            block = not self.scheduler.has_work()
            try:
                while True:
                    item = self._inbox.get(block=block, timeout=None)
                    block = False
                    if item is not None:
                        self.scheduler.add(item)
            except queue.Empty:
                pass
            if self._stop.is_set():
                break
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the loop must survive anything one step does
                log.exception("engine step failed")

    def step(self) -> None:
        sched = self.scheduler.schedule()
        for req in sched.prefill:
            plan = StepPlan(
                req.session.id,
                req.session.cached,
                req.prompt_ids,
                req.positions,
                req.visual,
                req.sampling,
                req.logprobs,
                deepstack=req.deepstack,
                turn_start=True,
                trace_context=req.trace_context,
            )
            req.started = True
            self._update(req, self.runner.execute([plan])[0], len(req.prompt_ids))
            self.scheduler.started(req)
        if sched.decode:
            plans = []
            for req in sched.decode:
                s = req.session
                pos = torch.full((3, 1), s.cached + s.rope_delta, dtype=torch.long)
                plans.append(
                    StepPlan(s.id, s.cached, [s.token_ids[-1]], pos, None, req.sampling, req.logprobs, trace_context=req.trace_context)
                )
            for req, outcome in zip(sched.decode, self.runner.execute(plans)):
                self._update(req, outcome, 1)

    def _update(self, req: Request, outcome: StepOutcome, fed: int) -> None:
        s = req.session
        if outcome.error is not None:
            # The stages may now disagree about this session's KV: rebuild it from the token
            # history on the next turn instead of trusting it.
            s.cached = 0
            s.kv_log = type(s.kv_log)()
            self._finish(req, error=outcome.error)
            return
        for d in outcome.kv_deltas:
            s.kv_log.append(
                d.layer,
                d.start_position,
                tensors.from_proto(d.key, "kv delta key"),
                tensors.from_proto(d.value, "kv delta value"),
            )
        s.cached += fed
        out = outcome.output
        token = out.token_id
        s.token_ids.append(token)
        req.generated.append(token)
        if req.done:  # cancelled while this step ran: keep the state, say nothing
            return
        resp = coordinator_pb2.GenerateResponse(token_ids=[token])
        if req.logprobs > 0:
            resp.logprobs.add(
                token=tensor_pb2.TokenLogprob(token_id=token, logprob=out.logprob), top=list(out.top_logprobs)
            )
        finish = None
        if token in req.eos_token_ids:
            finish = FINISH_STOP
        else:
            resp.text = req.detok.push(token)
            if req.detok.stopped:
                finish = FINISH_STOP_STRING
        if finish is None and len(req.generated) >= req.max_tokens:
            finish = FINISH_LENGTH
        if finish is not None and finish != FINISH_STOP_STRING:
            resp.text += req.detok.flush()
        req.out.put(resp)
        if finish is not None:
            self._finish(req, finish=finish)

    def _finish(self, req: Request, finish: int | None = None, error: VlmeshError | None = None) -> None:
        req.done = True
        if error is not None:
            req.out.put(error)
        else:
            req.out.put(
                coordinator_pb2.GenerateResponse(
                    finish_reason=finish,
                    usage=coordinator_pb2.Usage(
                        prompt_tokens=len(req.prompt_ids),
                        completion_tokens=len(req.generated),
                        cached_tokens=req.cached_tokens,
                    ),
                )
            )
        req.out.put(None)
        req.released.set()

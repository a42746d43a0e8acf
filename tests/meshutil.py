"""Test helpers: an in-process mesh of real gRPC servers, and the transformers reference."""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeVar

import grpc
import torch
from PIL import Image
from threaded_server import ThreadedServer

from services.common.channels import sync_mesh_channel
from services.common.tls import MeshTLS
from services.coordinator.server import CoordinatorConfig
from services.coordinator.server import start as start_coordinator
from services.stage.server import StageConfig
from services.stage.server import start as start_stage
from services.vision.server import VisionConfig
from services.vision.server import start as start_vision
from vlmesh.v1 import coordinator_pb2 as cpb
from vlmesh.v1 import coordinator_pb2_grpc as cgrpc
from vlmesh.v1 import tensor_pb2

T = TypeVar("T")

# Where the in-process meshes and the reference compute: cpu unless VLMESH_TEST_DEVICE says (cuda on
# a GPU machine, to run the parity suite there). Both sides follow it, in float32: the truth is
# generate() on the same device, and a service's "auto" would take bfloat16 on a GPU.
TEST_DEVICE = torch.device(os.environ.get("VLMESH_TEST_DEVICE", "cpu"))
_ON_DEVICE = {} if TEST_DEVICE.type == "cpu" else {"device": str(TEST_DEVICE), "dtype": "float32"}


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str | Callable[[], str],
    *,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy, and return that.
    After `timeout` seconds the test fails: an AssertionError "timed out after N s waiting for
    <what>" (`what` may be a function, called then, to say what was seen last). The timeout bounds
    a wait for something that must happen; it is no measure of speed.

    An exception from `predicate` ends the wait at once (so a predicate can assert that the process
    it waits on is still alive), except those in `ignore`: they mean "not yet" (a port that does not
    answer yet), and the last one is named if the wait times out."""
    deadline = time.monotonic() + timeout
    error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as e:
            error = e
        else:
            if value:
                return value
            error = None
        if time.monotonic() >= deadline:
            detail = what() if callable(what) else what
            last = f"; last error: {error!r}" if error is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {detail}{last}")
        time.sleep(interval)


@lru_cache(maxsize=1)
def certs_dir() -> str:
    """One mesh CA and its service certificates for the whole test run (removed at its end)."""
    from services.launcher import make_run_certs

    d = make_run_certs()
    atexit.register(shutil.rmtree, d, True)
    return d


def mesh_tls_kw(service: str) -> dict:
    d = certs_dir()
    return {"mesh_ca": f"{d}/ca.crt", "mesh_cert": f"{d}/{service}.crt", "mesh_key": f"{d}/{service}.key"}


def coordinator_tls(certs: str | None = None) -> MeshTLS:
    """What the coordinator presents inside the mesh (from `certs`, e.g. the directory `vlmesh up`
    reports, else the tests' own): a test calling a stage or vision directly uses it (a caller
    without it is refused)."""
    d = certs or certs_dir()
    with open(f"{d}/ca.crt", "rb") as ca, open(f"{d}/coordinator.crt", "rb") as cert, open(f"{d}/coordinator.key", "rb") as key:
        return MeshTLS(ca.read(), cert.read(), key.read())


def internal_channel(address: str, certs: str | None = None):
    """A blocking channel to a stage or vision service, as the coordinator dials it."""
    return sync_mesh_channel(address, coordinator_tls(certs))


@dataclass
class InProcessMesh:
    vision: ThreadedServer
    stages: list[ThreadedServer]
    coordinator: ThreadedServer
    ranges: list[tuple[int, int]]
    stub: cgrpc.CoordinatorServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.coordinator.address)
        self.stub = cgrpc.CoordinatorServiceStub(self.channel)

    @property
    def address(self) -> str:
        return self.coordinator.address

    def stop(self) -> None:
        self.channel.close()
        for s in [self.coordinator, *self.stages, self.vision]:
            s.stop(0)

    def generate(self, messages: list[dict], **kw) -> tuple[list[int], str, cpb.GenerateResponse]:
        """Returns (token ids, text, last response)."""
        req = cpb.GenerateRequest(messages=to_proto(messages), **kw)
        ids, text, last, trace_id = [], "", None, ""
        for r in self.stub.Generate(req, timeout=120):
            ids += list(r.token_ids)
            text += r.text
            trace_id = trace_id or r.trace_id  # sent with the first response
            last = r
        last.trace_id = trace_id
        return ids, text, last


def start_mesh(model, ranges, vision_kw: dict | None = None, stage_kw: dict | None = None, coord_kw: dict | None = None) -> InProcessMesh:
    """Vision, one stage per range (a list of ranges may repeat one: replicas) and a coordinator,
    each on its own event loop, talking mutual TLS inside the mesh."""
    vision_kw, stage_kw = {**_ON_DEVICE, **(vision_kw or {})}, {**_ON_DEVICE, **(stage_kw or {})}
    vision = ThreadedServer(start_vision, VisionConfig(model=str(model), port=0, **mesh_tls_kw("vision"), **vision_kw))
    stages = [
        ThreadedServer(start_stage, StageConfig(model=str(model), layers=f"{a}:{b}", port=0, **mesh_tls_kw("stage"), **stage_kw)) for a, b in ranges
    ]
    state = tempfile.mkdtemp(prefix="vlmesh-state-")
    atexit.register(shutil.rmtree, state, True)
    coord = {"state_dir": state, **(coord_kw or {})}
    coordinator = ThreadedServer(
        start_coordinator,
        CoordinatorConfig(
            model=str(model),
            stages=",".join(s.address for s in stages),
            vision=vision.address,
            port=0,
            **mesh_tls_kw("coordinator"),
            **coord,
        ),
    )
    return InProcessMesh(vision, stages, coordinator, list(ranges))


_ROLE = {"system": cpb.ROLE_SYSTEM, "user": cpb.ROLE_USER, "assistant": cpb.ROLE_ASSISTANT}

# Frames per second the tests sample video files at: the vision service's default (the tiny
# checkpoints' video processors say 2.0 as well).
VIDEO_FPS = 2.0


def _content(c: dict) -> cpb.Content:
    if c["type"] == "image":
        return cpb.Content(image=c["image"])
    if c["type"] == "video":
        if isinstance(c["video"], (list, tuple)):
            return cpb.Content(video_frames=tensor_pb2.VideoFrames(frames=c["video"], fps=c.get("fps", 0.0)))
        return cpb.Content(video=c["video"])
    return cpb.Content(text=c["text"])


def to_proto(messages: list[dict]) -> list[cpb.Message]:
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append(cpb.Message(role=_ROLE[m["role"]], content=[_content(c) for c in content]))
    return out


def with_pil(messages: list[dict]) -> list[dict]:
    """The same messages as transformers users write them: images as PIL objects."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": Image.open(io.BytesIO(c["image"]))} if c["type"] == "image" else c for c in content]
        out.append({"role": m["role"], "content": content})
    return out


def images_of(messages: list[dict]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(c["image"])) for m in messages if isinstance(m["content"], list) for c in m["content"] if c["type"] == "image"]


def videos_of(messages: list[dict]) -> list[dict]:
    """The video parts, in order ({"type": "video", "video": bytes | [frame bytes], "fps"?: float})."""
    return [c for m in messages if isinstance(m["content"], list) for c in m["content"] if c["type"] == "video"]


class Reference:
    """`generate()` of the same checkpoint: the truth.

    Videos go the way a transformers user sends them here: a file decoded whole by
    `load_video(path, backend="pyav")` (the backend that works without torchcodec) and sampled by
    the processor (do_sample_frames, fps); frames as PIL images with their `video_metadata`."""

    def __init__(self, model_dir):
        import transformers
        from transformers import AutoConfig, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_dir)
        cls = getattr(transformers, AutoConfig.from_pretrained(model_dir).architectures[0])
        self.model = cls.from_pretrained(model_dir, dtype=torch.float32).to(TEST_DEVICE).eval()
        self.eos = self.model.generation_config.eos_token_id

    def video_kwargs(self, videos: list[dict]) -> dict:
        """Processor kwargs for the video parts (all files or all frame lists)."""
        from transformers.video_utils import load_video

        if not videos:
            return {}
        frame_lists = [isinstance(v["video"], (list, tuple)) for v in videos]
        if all(frame_lists):
            clips = [[Image.open(io.BytesIO(f)).convert("RGB") for f in v["video"]] for v in videos]
            meta = [{"total_num_frames": len(c), "fps": v.get("fps") or None, "frames_indices": list(range(len(c)))} for c, v in zip(clips, videos)]
            return dict(videos=clips, video_metadata=meta, do_sample_frames=False)
        if any(frame_lists):
            raise ValueError("the reference takes video files or frame lists in one prompt, not both")
        clips, meta = [], []
        for v in videos:
            with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
                f.write(v["video"])
                f.flush()
                frames, m = load_video(f.name, backend="pyav")
            clips.append(frames)
            meta.append(m)
        return dict(videos=clips, video_metadata=meta, do_sample_frames=True, fps=VIDEO_FPS)

    def visual_inputs(self, images: list[Image.Image], videos: list[dict]) -> dict:
        inputs = {}
        if images:
            pix = self.processor.image_processor(images=images, return_tensors="pt")
            inputs.update(pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"])
        if videos:
            vid = self.processor(**self.video_kwargs(videos), return_tensors="pt")
            wanted = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
            inputs.update({k: v for k, v in vid.items() if k in wanted})
        return inputs

    def generate_ids(self, input_ids: list[int], images: list[Image.Image], max_new_tokens: int, videos: list[dict] = (), **kw):
        inputs = {"input_ids": torch.tensor([input_ids])}
        inputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids([input_ids]))
        inputs.update(self.visual_inputs(images, list(videos)))
        inputs = {k: v.to(TEST_DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, **kw)
        return out.sequences[0, len(input_ids) :].tolist(), out

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if not videos_of(messages):
            inputs = self.processor.apply_chat_template(
                with_pil(messages), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
            return inputs["input_ids"][0].tolist()
        text = self.processor.apply_chat_template(strip_images(messages), tokenize=False, add_generation_prompt=True)
        return self._expand(text, messages)

    def _expand(self, text: str, messages: list[dict]) -> list[int]:
        """The processor's own placeholder expansion and tokenisation of `text`."""
        imgs, vids = images_of(messages), videos_of(messages)
        enc = self.processor(text=[text], images=imgs or None, **self.video_kwargs(vids), return_tensors="pt")
        return enc["input_ids"][0].tolist()

    def continuation_ids(self, history: list[dict], new: list[dict], last_token: int) -> list[int]:
        """Token ids the Qwen chat template adds for `new` after `history` (which ends with an
        assistant reply whose last generated token is `last_token`), images and videos expanded by
        the processor itself."""
        p = self.processor
        before = p.apply_chat_template(strip_images(history), tokenize=False)
        full = p.apply_chat_template(strip_images(history + new), tokenize=False, add_generation_prompt=True)
        assert full.startswith(before)
        im_end = p.tokenizer.convert_tokens_to_ids("<|im_end|>")
        text = ("\n" if last_token == im_end else "<|im_end|>\n") + full[len(before) :]
        return self._expand(text, new)


def strip_images(messages: list[dict]) -> list[dict]:
    """What the chat template sees: images and videos as bare parts."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            c = [{"type": x["type"]} if x["type"] in ("image", "video") else x for x in c]
        out.append({"role": m["role"], "content": c})
    return out


@lru_cache(maxsize=8)
def reference(model_dir) -> Reference:
    return Reference(model_dir)


def image_prompts(images) -> dict[str, list[dict]]:
    """Text-only, one-image and two-image conversations over the `images` fixture's pictures."""
    return {
        "text": [{"role": "user", "content": "Tell me about shapes and colours."}],
        "one image": [{"role": "user", "content": [{"type": "image", "image": images["wide"]}, {"type": "text", "text": "What is this?"}]}],
        "two images": [
            {"role": "system", "content": "You describe pictures."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": images["wide"]},
                    {"type": "text", "text": "and"},
                    {"type": "image", "image": images["tall"]},
                    {"type": "text", "text": "Compare them."},
                ],
            },
        ],
    }


def forward_once(address: str, step):
    """One StepInput sent straight to a stage (as the coordinator would); its StepOutput."""
    from vlmesh.internal.v1 import stage_pb2, stage_pb2_grpc

    with internal_channel(address) as ch:
        out = list(stage_pb2_grpc.StageServiceStub(ch).Forward(iter([stage_pb2.ForwardRequest(steps=[step])]), timeout=30))
    return out[0].outputs[0]


def stage_info(address: str, certs: str | None = None):
    from vlmesh.internal.v1 import stage_pb2, stage_pb2_grpc

    with internal_channel(address, certs) as ch:
        return stage_pb2_grpc.StageServiceStub(ch).GetInfo(stage_pb2.GetInfoRequest(), timeout=10)


def vision_stats(address: str):
    from vlmesh.internal.v1 import vision_pb2, vision_pb2_grpc

    with internal_channel(address) as ch:
        return vision_pb2_grpc.VisionServiceStub(ch).GetStats(vision_pb2.GetStatsRequest(), timeout=10)


def kv_log(channel: grpc.Channel, session_id: str, metadata=None) -> dict:
    """layer -> KVDelta of a session's KV log (the coordinator's internal admin service)."""
    from vlmesh.internal.v1 import admin_pb2, admin_pb2_grpc

    stub = admin_pb2_grpc.CoordinatorAdminServiceStub(channel)
    return {r.delta.layer: r.delta for r in stub.GetKVLog(admin_pb2.GetKVLogRequest(session_id=session_id), metadata=metadata, timeout=30)}


def stage_holds(address: str, session_id: str) -> bool:
    """Whether a stage holds KV of the session (asked without renewing anything it lacks)."""
    from vlmesh.internal.v1 import stage_pb2, stage_pb2_grpc

    with internal_channel(address) as ch:
        resp = stage_pb2_grpc.StageServiceStub(ch).RenewLeases(stage_pb2.RenewLeasesRequest(session_ids=[session_id]), timeout=10)
    return session_id not in resp.unknown_session_ids


@contextlib.contextmanager
def vlmesh_up(model, log_dir, *args: str, env: dict | None = None):
    """`vlmesh up --model MODEL --stages 2 --port 0 ARGS...` as a child process: yields the
    addresses it prints on its first line; SIGTERM (then SIGKILL) at the end."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import pytest

    cmd = [sys.executable, "-m", "services.cli", "up", "--model", str(model), "--stages", "2", "--port", "0", "--log-dir", str(log_dir), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        pytest.fail(f"vlmesh up exited: {proc.stderr.read()}")
    try:
        yield json.loads(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

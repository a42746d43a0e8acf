"""How many attention kernel calls a stage makes per decoder layer for one micro-batch: one in the
fast numerics whatever the number of sessions (decodes, fresh prompts and prompt chunks after
cached positions mixed), one per session in the exact numerics (transformers' own call per session,
the arrangement that keeps greedy output equal to generate()). Counted by a torch function mode
that sees every scaled_dot_product_attention call torch makes, attributed to the layer whose
self_attn is running (a forward pre-hook)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_profile import AttentionCalls, Stages  # noqa: E402


def mixed_micro_batch(stages: Stages) -> list[tuple[str, int, torch.Tensor]]:
    """Run prompts for four sessions, then return one micro-batch that holds: two decodes (at
    different cache lengths), a prompt chunk after cached positions, a fresh prompt, and a
    one-token fresh prompt."""
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(3, stages.vocab, (n,), generator=g)

    stages.step([("d1", 0, ids(5)), ("d2", 0, ids(11)), ("chunk", 0, ids(7))])
    return [("d1", 5, ids(1)), ("d2", 11, ids(1)), ("chunk", 7, ids(6)), ("fresh", 0, ids(9)), ("one", 0, ids(1))]


def count_calls(stages: Stages, work: list[tuple[str, int, torch.Tensor]]) -> dict[int, int]:
    calls = AttentionCalls(stages.stages)
    try:
        with calls:
            stages.step(work)
    finally:
        calls.remove()
    return calls.per_layer


@pytest.fixture(scope="module")
def model(tiny_models) -> Path:
    return tiny_models["a"]  # 4 layers, GQA


@pytest.mark.parametrize("sessions", [2, 5])
def test_fast_numerics_makes_one_attention_call_per_layer_per_micro_batch(model, sessions):
    stages = Stages(model, torch.float32, "fast", splits=2)
    work = mixed_micro_batch(stages)[:sessions]
    assert count_calls(stages, work) == {layer: 1 for layer in range(4)}


def test_exact_numerics_calls_attention_once_per_session(model):
    stages = Stages(model, torch.float32, "exact", splits=2)
    work = mixed_micro_batch(stages)
    assert count_calls(stages, work) == {layer: len(work) for layer in range(4)}


def test_fast_numerics_attends_like_exact(model):
    """The batched call computes the same attention (to float rounding) over the same KV: the
    padding and masks hide nothing that belongs and let in nothing that does not."""
    exact, fast = Stages(model, torch.float32, "exact"), Stages(model, torch.float32, "fast")
    a, b = exact.step(mixed_micro_batch(exact)), fast.step(mixed_micro_batch(fast))
    for ra, rb in zip(a[0], b[0]):  # stage 0's hidden states, every session
        assert ra.hidden is not None and rb.hidden is not None
        torch.testing.assert_close(rb.hidden, ra.hidden, rtol=1e-5, atol=1e-5)
    assert [r.token.token_id for r in a[-1]] == [r.token.token_id for r in b[-1]]  # type: ignore[union-attr]


def test_unknown_numerics_is_refused(model):
    with pytest.raises(ValueError, match="numerics"):
        Stages(model, torch.float32, "approximate")


def test_the_step_profile_runs_in_its_smoke_mode_and_counts_the_calls():
    """bench/bench_profile.py --smoke (what CI runs so the script does not rot): its profile of 3
    sessions shows one attention call per layer in fast, three in exact."""
    import subprocess

    bench = Path(__file__).resolve().parent.parent / "bench" / "bench_profile.py"
    run = subprocess.run([sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    calls = {}
    for line in run.stdout.splitlines():
        f = line.split()
        if len(f) == 10 and f[0] == "3" and f[2] in ("0", "1"):  # B numerics stage compute linear attn calls/L ...
            calls[(f[1].split("/")[0], f[2])] = float(f[6])  # numerics/packing
    assert calls == {("exact", "0"): 3.0, ("exact", "1"): 3.0, ("fast", "0"): 1.0, ("fast", "1"): 1.0}, run.stdout
    assert "transformers generate() decode step" in run.stdout and "top-1" in run.stdout

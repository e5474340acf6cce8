"""models/compiled.py: when objectives compile by default, the per-process cache, the eager fallback."""

import torch

from models.compiled import (
    COMPILE_MIN_HIDDEN,
    compile_by_default,
    compile_once,
    compiled_unless_tracing,
    eager_on_failure,
)


def test_compile_by_default_follows_the_setting_else_cuda_and_width():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # only the device type is read: no GPU needed
    assert compile_by_default(True, cpu, 64) and not compile_by_default(False, cuda, 4096)
    assert compile_by_default(None, cuda, COMPILE_MIN_HIDDEN)
    assert not compile_by_default(None, cuda, 576)  # SmolLM2: launch-bound, stays eager
    assert not compile_by_default(None, cpu, 4096)


def test_compile_once_builds_one_function_per_function_and_options():
    def double(x):
        return x * 2

    first = compile_once(double, dynamic=True)
    assert compile_once(double, dynamic=True) is first
    assert compile_once(double, fullgraph=True) is not first
    torch.testing.assert_close(first(torch.arange(3.0)), torch.tensor([0.0, 2.0, 4.0]))


def test_compiled_unless_tracing_gives_the_plain_function_when_off_or_traced():
    def halve(x):
        return x / 2

    assert compiled_unless_tracing(halve, False) is halve
    assert compiled_unless_tracing(halve, True, dynamic=True) is compile_once(halve, dynamic=True)

    def caller(x):  # traced by torch.compile: the inner choice must be the plain function
        return compiled_unless_tracing(halve, True, dynamic=True)(x) + 1

    traced = torch.compile(caller, backend="eager", fullgraph=True)
    torch.testing.assert_close(traced(torch.ones(2)), torch.full((2,), 1.5))


def test_a_compile_failure_falls_back_to_eager_once_and_says_why(caplog):
    from models.fused_linear_ce import softmax_rows

    attempts = []

    def broken(*args):
        attempts.append(1)
        raise RuntimeError("triton: no CUDA toolkit\nlong traceback")

    run = eager_on_failure(broken, softmax_rows)
    logits, target = torch.randn(3, 5), torch.tensor([0, 4, 2])
    valid, inv = torch.tensor([True, False, True]), torch.tensor(0.5)
    with caplog.at_level("WARNING"):
        first = run(logits.clone(), target, valid, inv)
        second = run(logits.clone(), target, valid, inv)
    expected = softmax_rows(logits.clone(), target, valid, inv)
    for got in (first, second):
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1])
    assert attempts == [1]  # not retried
    assert "softmax_rows failed (RuntimeError: triton: no CUDA toolkit)" in caplog.text

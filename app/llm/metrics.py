"""What the generation engine reports as it works, for whoever keeps metrics.

The engine calls these from its worker thread, between forward passes; an implementation must be
quick and must not raise. `EngineMetrics` does nothing: the engine works without metrics, and the
GPU benchmarks use it bare. The server passes one that feeds Prometheus (app/observability.py).
"""

from __future__ import annotations


class EngineMetrics:
    """No-op base: override what you record. Times are seconds."""

    def request_queued(self, queue_depth: int) -> None:
        """A request joined the waiting queue; `queue_depth` counts it."""

    def request_rejected(self, reason: str) -> None:
        """A request was refused at submit time: `reason` is "overloaded" (queue full)."""

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        """A request's first token was sampled, `seconds` after it was submitted."""

    def inter_token(self, seconds: float) -> None:
        """The gap between two consecutive tokens of one request."""

    def request_finished(
        self, reason: str, prompt_tokens: int, completion_tokens: int, seconds: float
    ) -> None:
        """A request ended: reason is stop, length, cancelled or error."""

    def step(self, batch_size: int, queue_depth: int, tokens: int, seconds: float) -> None:
        """One decoding step: `batch_size` sequences, `tokens` sampled, `queue_depth` still waiting."""

    def idle(self) -> None:
        """Nothing is running or waiting: the batch and the queue are empty."""

    def prefill(self, tokens: int, seconds: float) -> None:
        """A prompt (or a chunk of one) went through the model."""

    def adapter_loaded(self, seconds: float) -> None:
        """An adapter version was made resident, taking `seconds`."""

    def adapter_evicted(self) -> None:
        """A resident adapter was unloaded to make room for another."""

    def resident_adapters(self, count: int) -> None:
        """How many adapter versions are resident now."""

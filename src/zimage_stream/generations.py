"""The worker's ``generate`` path around the engine: a request on its way to a result
(``Pending``), and how its answer becomes a result event. A batch item's images are
stored, settled in the fast path (remembered before anyone is told) and turned into its
result; a request answered without inference (a cache hit, or the outcome of identical
work it waited for) gets its result from that answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache import CacheEntry, content_key
from .consumer import Delivery
from .dedup import Answer, Dedup
from .engine import BatchShape, GenerateJob, JobResult
from .engine.calls import CAPTION_MULTIPLE
from .engine_process import EngineProcess
from .errors import as_error
from .logs import request_context
from .progress import StepReport
from .schemas import GenerateRequest, ModelInfo, Provenance, ResultEvent
from .storage import Storage
from .styles import style_prompt
from .suspects import Suspects


@dataclass(eq=False)
class Pending:
    """A validated generate request on its way to a result."""

    delivery: Delivery
    request: GenerateRequest
    job: GenerateJob
    content_key: str
    arrived_at: float  # wall-clock seconds: submitted_at, else the broker's timestamp
    #: the styled prompt's caption length in tokens (0 when unknown)
    caption_tokens: int = 0

    @classmethod
    def admit(
        cls, delivery: Delivery, request: GenerateRequest, model: ModelInfo, caption_tokens: int = 0
    ) -> Pending:
        params = request.params
        job = GenerateJob(
            prompt=style_prompt(params.prompt, params.style),
            num_images=params.num_images,
            seed=params.resolved_seed(),
        )
        key = content_key(request, model)
        arrived = request.arrived_at(delivery.record.timestamp)
        return cls(delivery, request, job, key, arrived, caption_tokens)

    @property
    def shape(self) -> BatchShape:
        """What the requests of one pipeline call must share."""
        params = self.request.params
        return BatchShape(
            params.width, params.height, params.num_inference_steps, params.guidance_scale
        )

    @property
    def batch_key(self) -> tuple[BatchShape, int]:
        """What requests batched together share: the call's shape and the caption-length
        bucket (the transformer pads captions to multiples of ``CAPTION_MULTIPLE`` tokens and
        masks attention only when they differ, which changes pixels by rounding). Within
        one bucket an image is the same whatever its batch mates, so a crash-replay that
        batches differently writes the same objects, and mask-free kernels apply."""
        return self.shape, -(-self.caption_tokens // CAPTION_MULTIPLE)

    @property
    def provenance(self) -> Provenance:
        params = self.request.params
        return Provenance(
            seed=self.job.seed,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
        )


@dataclass(eq=False)
class Generations:
    """Turns generate outcomes and answers into result events, with the worker's parts."""

    engine: EngineProcess
    storage: Storage
    dedup: Dedup
    suspects: Suspects
    image_format: str

    async def infer(
        self, items: list[Pending], budgets_s: list[float], progress: StepReport | None
    ) -> list[JobResult]:
        """Each request's encoded images or error: one engine call for the batch, through
        ``suspects`` (which runs a suspect alone and answers a poison request)."""
        shape = items[0].shape

        async def call(group: list[int], alone: bool) -> list[JobResult]:
            """One engine call for the requests ``group`` (indices into ``items``)."""
            on_step = None
            if progress is not None:
                report = progress

                def on_step(jobs: list[int], step: int, total: int) -> None:
                    report([group[j] for j in jobs], step, total)

            return await self.engine.generate(
                [items[i].job for i in group],
                shape,
                [budgets_s[i] for i in group],
                self.image_format,
                on_step,
                alone,
            )

        deliveries = [p.delivery for p in items]
        contexts = [
            request_context(p.request.request_id, p.request.task, p.delivery.headers) for p in items
        ]
        answers = await self.suspects.run(deliveries, budgets_s, call, contexts)
        return [a if isinstance(a, JobResult) else JobResult(error=a) for a in answers]

    async def answer(self, pending: Pending, outcome: JobResult, started_at: float) -> ResultEvent:
        """The result of a batch item: its images stored and settled, or its error."""
        request, model = pending.request, self.engine.model_info
        error, refs = outcome.error, []
        if outcome.images is not None:
            try:
                refs = await self.storage.put_encoded(outcome.images, self.image_format)
            except Exception as exc:
                error = as_error(exc, "storing the images")
        entry = (
            None if error else CacheEntry(content_key=pending.content_key, images=refs, model=model)
        )
        await self.dedup.settle(pending.content_key, request.request_id, Answer(entry, error))
        return ResultEvent.build(
            request.request_id,
            request.task,
            error,
            model=model,
            arrived_at=pending.arrived_at,
            images=refs,
            started_at=started_at,
            inference_s=outcome.seconds,
            provenance=pending.provenance,
        )

    def recalled(self, pending: Pending, answer: Answer) -> ResultEvent:
        """The result of a request that ran no inference: a stored result, or the error of
        the identical request it waited for."""
        request, entry = pending.request, answer.entry
        return ResultEvent.build(
            request.request_id,
            request.task,
            answer.error,
            model=entry.model if entry else self.engine.model_info,
            arrived_at=pending.arrived_at,
            images=entry.images if entry else None,
            cache_hit=entry is not None,
            provenance=pending.provenance,
        )

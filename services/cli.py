"""`entitle`: run the stack, run one service, or operate the system."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import json
import logging
import os
import signal
import sqlite3
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
import psycopg_pool
import uvicorn
from pydantic import ValidationError

from services import version
from services.app import ROLES, Roles, build_app
from services.codes import load_secret
from services.config import (
    ConfigError,
    Environment,
    Settings,
    admin_keys,
    generate_admin_key,
    load_config,
)
from services.http import BODIES, Shortcut, ascii_int, aware_time
from services.kafka import EmbeddedBroker, free_port
from services.logs import LineBudget, RequestLog, configure, route_of
from services.outbound.mail import mail_settings
from services.progress import Bar
from services.readmodel import ReadModel
from services.server import HttpLimits, guarded, tune_gc
from services.supervisor import Child, Peers, Supervisor, role_command

log = logging.getLogger("entitle")


def _serve(
    args: argparse.Namespace,
    roles: Roles,
    settings: Settings,
    keys_env: str | None,
    peers: Peers | None = None,
) -> None:
    configure(args.log_format or Environment.read().log_format, args.log_level)
    config = load_config(Path(args.config))
    limits = HttpLimits.from_env()
    budget = LineBudget(Environment.read().access_lines)
    BODIES.limit = limits.max_body_buffer
    try:
        app = build_app(config, settings, roles, admin_keys(keys_env), peers)
    except ValueError as exc:  # a setting it cannot use (a code secret too short)
        raise ConfigError(str(exc)) from None
    paths, inner = set(), app
    while isinstance(inner, Shortcut):
        paths.add(inner.path)
        inner = inner.app
    shortcuts = frozenset(paths)
    server = uvicorn.Server(
        uvicorn.Config(
            RequestLog(app, route_of(shortcuts), budget),
            http=guarded(limits, budget),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,  # RequestLog's lines instead
            log_config=None,  # `configure`'s handler
            lifespan="on",
            proxy_headers=True,
            forwarded_allow_ips=settings.trusted_proxies,
        )
    )
    # uvicorn shuts down cleanly on SIGINT/SIGTERM, then re-raises the signal
    # with the previous handlers back: make SIGTERM unwind like Ctrl-C, so the
    # caller's cleanup (the embedded broker) runs either way, and exit 0.
    signal.signal(signal.SIGTERM, _interrupt)
    tune_gc()
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if getattr(getattr(inner, "state", None), "unfolded", 0) > 0:
        raise SystemExit(UNFOLDED)


#: The exit status of a domain service that stopped with acknowledged
#: webhooks not yet folded (it said how many in its log).
UNFOLDED = 3


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _dev_admin_key(path: Path) -> str:
    """The admin key `entitle dev` generated at its first start (owner-only file)."""
    if path.exists():
        kept = path.read_text().strip()
        if kept:
            return kept
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_admin_key()
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def cmd_dev(args: argparse.Namespace) -> int:
    _can_listen(args.host, args.port)  # before anything is made or started
    settings = dataclasses.replace(Settings.from_env(), dev=True)
    # Its owner's only: the database holds buyers' addresses, and the
    # secrets and mails (with codes) are kept here too.
    data_dir = Path(".entitle")
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    # One process: secrets kept in .entitle/ are enough (see services/codes.py).
    if not settings.code_secret:
        settings = dataclasses.replace(settings, code_secret=load_secret(generate=True))
    if not settings.license_key:
        license_key = load_secret(generate=True, env="ENTITLE_LICENSE_KEY", file_name="license-key")
        settings = dataclasses.replace(settings, license_key=license_key)
    keys_env = os.environ.get("ENTITLE_ADMIN_KEYS")
    generated = None
    if not keys_env:
        # Kept like the other secrets, so a restart does not change it.
        generated = _dev_admin_key(Path(".entitle") / "admin-key")
        keys_env = f"dev:{generated}"
    admin_keys(keys_env)  # fail before starting anything
    config = load_config(Path(args.config))
    email = mail_settings(config.email, dev=True)
    assert email is not None
    broker: EmbeddedBroker | None = None
    if settings.kafka_bootstrap is None:
        broker = EmbeddedBroker()
        broker.start()
        settings = dataclasses.replace(
            settings, kafka_bootstrap=broker.bootstrap, kafka_idempotence=False
        )
    # So the operating commands run here (redrive, stripe backfill) read
    # the configuration this stack uses.
    Path(".entitle").mkdir(parents=True, exist_ok=True)
    (Path(".entitle") / "config").write_text(str(Path(args.config).resolve()) + "\n")
    broker_file = Path(".entitle") / "broker"
    if broker is not None:
        # So `entitle stripe backfill` run here finds the embedded broker.
        broker_file.parent.mkdir(parents=True, exist_ok=True)
        broker_file.write_text(broker.bootstrap)
    base = f"http://{args.host}:{args.port}"
    if settings.public_url is None:
        settings = dataclasses.replace(settings, public_url=base)
    lines = [
        "entitle dev",
        f"  broker:   {settings.kafka_bootstrap}" + (" (embedded)" if broker else ""),
        f"  store:    {_redact(settings.database_url)}",
        f"  API:      {base}/v1/entitlements",
        f"  docs:     {base}/docs  (OpenAPI: {base}/openapi.json)",
        f"  console:  {base}/admin   portal: {base}/portal",
    ]
    lines += [
        f"  webhook:  {base}/webhooks/{name}  ({s.provider.name})"
        for name, s in config.sources.items()
    ]
    if email.host is None:
        lines.append(f"  mail:     {email.outbox_dir}/  (an .eml file each; no SMTP host set)")
    else:
        lines.append(f"  mail:     smtp://{email.host}:{email.port}  ({email.security})")
    if generated:
        lines.append(
            f"  admin key (kept in .entitle/admin-key; set ENTITLE_ADMIN_KEYS to choose one):"
            f" {generated}"
        )
    print("\n".join(lines), flush=True)
    configure(args.log_format or Environment.read().log_format, args.log_level)
    env = {
        **os.environ,
        "ENTITLE_ADMIN_KEYS": keys_env,
        "ENTITLE_CODE_SECRET": settings.code_secret or "",
        "ENTITLE_LICENSE_KEY": settings.license_key or "",
        "ENTITLE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap or "",
        "ENTITLE_PUBLIC_URL": settings.public_url or "",
    }
    if broker is not None:
        env["ENTITLE_KAFKA_IDEMPOTENCE"] = "false"  # the embedded one has none
    common = ["--config", args.config, "--log-level", args.log_level]
    if args.log_format:
        common += ["--log-format", args.log_format]
    # The domain service and the projector answer /readyz and /metrics on
    # ports of their own, which the web process adds to its answers.
    ports = {"domain": free_port(), "projector": free_port()}
    peers = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    web = ["--host", args.host, "--port", str(args.port)]
    children = [
        Child(
            "web",
            role_command(["ingress", "api"], [*common, *web], peers),
            env,
            health=f"http://{_loopback(args.host)}:{args.port}/healthz",
        ),
        Child(
            "domain",
            role_command(["domain"], [*common, "--port", str(ports["domain"])]),
            env,
            health=f"{peers['domain']}/healthz",
            # It folds what the stack acknowledged before it exits, for as
            # long as the backlog shrinks (RawLog.drain): no deadline here.
            stop_timeout=None,
            failed_stop={UNFOLDED: "webhooks it acknowledged were not folded: lost"},
        ),
        Child(
            "projector",
            role_command(["projector"], [*common, "--port", str(ports["projector"])]),
            env,
            health=f"{peers['projector']}/healthz",
        ),
    ]

    def broken() -> str | None:
        if broker is None or broker.exited() is None:
            return None
        # Without it nothing can be accepted or folded, and its log is gone.
        return (
            f"the embedded broker exited (code {broker.exited()}); stopping. Webhooks it"
            " acknowledged but the domain service had not yet folded are lost with it"
        )

    # As Ctrl-C: stop in order (SIGHUP: its terminal closed; the role
    # processes have sessions of their own, so it reaches only this one).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    try:
        return Supervisor(children, broken).run()
    finally:
        if broker is not None:
            broker.stop()
            broker_file.unlink(missing_ok=True)


def _loopback(host: str) -> str:
    """An address of `host` to reach it at from this machine."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _can_listen(host: str, port: int) -> None:
    """ConfigError unless `host:port` is free to listen on: the web process
    would otherwise fail, be started again, and stop the stack only after
    its third try."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn
            probe.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _redact(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def cmd_serve(args: argparse.Namespace) -> int:
    roles = Roles.parse(args.roles)
    settings = Settings.from_env()
    peers = None
    if getattr(args, "dev_stack", False):  # a process of `entitle dev`
        settings = dataclasses.replace(settings, dev=True)
        peers = Peers(dict(p.split("=", 1) for p in args.peer)) if args.peer else None
    _serve(args, roles, settings, os.environ.get("ENTITLE_ADMIN_KEYS"), peers)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from services.projections import replay
    from services.readmodel import ReadModel
    from services.store import EntitlementStore

    settings = Settings.from_env()
    if args.webhooks:
        return _replay_webhooks(ReadModel(settings.database_url))
    store = EntitlementStore(settings.database_url)
    read_model = ReadModel(settings.database_url)
    bar = Bar("replay")
    try:
        count = replay(store, read_model, progress=bar)
    finally:
        bar.end()
        read_model.close()
        store.close()
    print(f"read model rebuilt from {count} events")
    return 0


def _replay_webhooks(read_model: ReadModel) -> int:
    """Send the webhooks projection back to the first event: at its next
    start the projector queues what is missing (a lost outbox), for the
    endpoints as they were at each event; what is queued stays as it is."""
    from services.outbound.outbox import Lease
    from services.projections.webhooks import WEBHOOKS

    lease = Lease(read_model)
    try:
        if not lease.hold():
            print(
                "error: a projector is running (it holds the outbox's dispatcher lease):"
                " stop it first, then start it again after this",
                file=sys.stderr,
            )
            return 1
        read_model.rewind(WEBHOOKS)
    finally:
        lease.release()
        read_model.close()
    print(
        "the webhooks projection starts again from the first event when the projector"
        " next starts; queued deliveries are kept (none is sent twice)"
    )
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """An entitlement's events as a timeline (state changes, changed fields,
    causes), or as JSON lines with --json."""
    from services.projections import history_entry
    from services.store import EntitlementStore
    from services.timeline import timeline, with_state

    try:
        entitlement_id = uuid.UUID(args.entitlement_id)
    except ValueError:
        print(f"entitle: {args.entitlement_id!r} is not an entitlement id", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    store = EntitlementStore(settings.database_url)
    try:
        # An order's id has a history too, but is no entitlement.
        found = store.entitlement(entitlement_id) is not None
        events = store.history(entitlement_id) if found else []
    finally:
        store.close()
    if not events:
        print(f"no entitlement {args.entitlement_id}", file=sys.stderr)
        return 1
    if args.json:
        for event in events:
            print(history_entry(event).model_dump_json())
        return 0
    read_model = ReadModel(settings.database_url)
    try:
        entries = with_state(events, read_model.receipts_of)
    finally:
        read_model.close()
    for line in timeline(entries):
        print(line)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """An entitlement as JSON: now (the read model), or as of a recorded
    time or version (folded from its stored events). Codes show as indices."""
    from services.store import EntitlementStore
    from services.timeline import NotThen, NotYet, as_of

    try:
        entitlement_id = uuid.UUID(args.entitlement_id)
    except ValueError:
        print(f"entitle: {args.entitlement_id!r} is not an entitlement id", file=sys.stderr)
        return 2
    at = None
    if args.as_of is not None:
        at = aware_time(args.as_of)
        if at is None:
            raise ConfigError(f"--as-of {args.as_of!r} is not an RFC 3339 time with an offset (…Z)")
    settings = Settings.from_env()
    if at is None and args.as_of_version is None:
        read_model = ReadModel(settings.database_url)
        try:
            view = read_model.entitlement(str(entitlement_id))
        finally:
            read_model.close()
        if view is None:
            print(f"no entitlement {entitlement_id}", file=sys.stderr)
            return 1
        print(view.model_dump_json())
        return 0
    store = EntitlementStore(settings.database_url)
    try:
        view = as_of(store, entitlement_id, at, args.as_of_version, now=datetime.now(UTC))
    except NotThen as exc:
        print(f"entitle: {exc}", file=sys.stderr)
        return 1
    except NotYet:
        raise ConfigError(
            f"--as-of {args.as_of} is in the future: the engine has not seen it"
        ) from None
    finally:
        store.close()
    print(view.model_dump_json())
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from services.readmodel import ReadModel

    read_model = ReadModel(Settings.from_env().database_url)
    try:
        for letter in read_model.dead_letters(args.limit):
            print(json.dumps(letter.model_dump(mode="json")))
    finally:
        read_model.close()
    return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    """Receipts of accepted webhooks, newest first (JSON lines), or one with
    the webhook itself."""
    from contracts.webhooks import RawWebhookV1
    from services.readmodel import ReadModel
    from services.store import EntitlementStore

    settings = Settings.from_env()
    read_model = ReadModel(settings.database_url)
    try:
        if args.receipt_id:
            store = EntitlementStore(settings.database_url)
            try:
                webhook = store.webhook(args.receipt_id)
            finally:
                store.close()
            view = read_model.receipt(args.receipt_id)
            if view is None:
                print(f"no webhook receipt {args.receipt_id!r} (yet)", file=sys.stderr)
                return 1
            if webhook is None:
                # As GET /v1/webhooks/{id}: the receipt stays, its webhook
                # was erased with the customer's personal data.
                print(f"the webhook of receipt {args.receipt_id} was erased", file=sys.stderr)
            else:
                view.webhook = RawWebhookV1.model_validate_json(webhook)
            print(view.model_dump_json())
            return 0
        since = _since(args.since)
        items, _ = read_model.receipts(
            args.limit,
            None,
            since,
            source=args.source,
            outcome=args.outcome,
            order_ref=args.order_ref,
        )
        for item in items:
            print(item.model_dump_json(exclude={"webhook"}))
    finally:
        read_model.close()
    return 0


def cmd_erase_customer(args: argparse.Namespace) -> int:
    """Erase a customer's personal data and print what was done (JSON), or
    list the erasures done (`--list`, JSON lines)."""
    from services.erasure import erase_customer, erasures
    from services.personal import MAX_ADDRESS
    from services.providers import has_control_character
    from services.readmodel import ReadModel
    from services.store import EntitlementStore

    email = (args.email or "").strip()
    problem = None
    if args.list:
        if args.email is not None:
            problem = "--list lists the erasures done: give it no address"
    elif not email:
        problem = "give the customer's e-mail address (or --list)"
    elif has_control_character(email):
        problem = "the e-mail address contains a control character"
    elif len(email) > MAX_ADDRESS:
        problem = f"an e-mail address is at most {MAX_ADDRESS} characters (this one: {len(email)})"
    if problem:
        print(f"entitle: {problem}", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    store = EntitlementStore(settings.database_url)
    read_model = ReadModel(settings.database_url)
    try:
        if args.list:
            for view in erasures(store, args.limit):
                print(view.model_dump_json())
            return 0
        view = erase_customer(store, read_model, email, args.by)
    finally:
        read_model.close()
        store.close()
    print(view.model_dump_json())
    if not view.keys and not view.entitlements and not view.plaintext_events:
        print("nothing was stored for this address (or it was erased before)", file=sys.stderr)
    return 0


def cmd_stripe_backfill(args: argparse.Namespace) -> int:
    """List Stripe's events since --since and send the ones without a
    receipt through the raw topic (`via: backfill`), with a progress bar."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    from contracts.webhooks import RAW_TOPIC
    from services.config import duration
    from services.readmodel import ReadModel
    from services.stripe_api import StripeAPI, backfill

    config_path = _operating_config(args.config)
    config = load_config(config_path)
    source = config.sources.get(args.source)
    if source is None or source.provider.name != "stripe":
        raise ConfigError(f"no stripe source named {args.source!r} in {config_path}")
    if source.api_key is None:
        raise ConfigError(f"source {args.source!r} has no api_key (or api_key_env)")
    from services.stripe_api import EVENTS_KEPT

    try:
        since = datetime.now(UTC) - min(duration(args.since), EVENTS_KEPT)
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}") from None
    settings = Settings.from_env()
    bootstrap = settings.kafka_bootstrap or _dev_broker()
    if bootstrap is None:
        raise ConfigError(
            "no broker: set ENTITLE_KAFKA_BOOTSTRAP, or run this beside a running `entitle dev`"
        )
    api = StripeAPI(source.api_key.get_secret_value(), settings.stripe_api_base)
    read_model = ReadModel(settings.database_url)

    progress = Bar(f"backfill {source.name}")

    async def run() -> tuple[int, int]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:

            async def seen(ids: list[str]) -> set[str]:
                return await asyncio.to_thread(read_model.seen_events, source.name, ids)

            async def publish(value: bytes, key: bytes) -> object:
                return await producer.send_and_wait(RAW_TOPIC, value, key=key)

            result = await backfill(source, api, since, seen, publish, progress)
            return result.listed, result.sent
        finally:
            await producer.stop()

    import stripe

    try:
        listed, sent = asyncio.run(run())
    except stripe.StripeError as exc:
        raise ConfigError(f"Stripe answered: {exc.user_message or exc}") from None
    finally:
        progress.end()
        read_model.close()
    print(
        json.dumps(
            {"source": source.name, "since": since.isoformat(), "listed": listed, "sent": sent}
        )
    )
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Send stored events again onto the event, state and dead-letter
    topics (`--all`, or from a log position on), with their event ids, for
    consumers that lost them; the projector's own position stays."""
    import asyncio

    from services.kafka import ensure_topics, make_broker
    from services.projections import Follower
    from services.projections.public_events import Published, republish
    from services.readmodel import ReadModel
    from services.store import EntitlementStore

    settings = Settings.from_env()
    bootstrap, idempotence = settings.kafka_bootstrap, settings.kafka_idempotence
    if bootstrap is None:
        bootstrap, idempotence = _dev_broker(), False  # the embedded one: no idempotence
    if bootstrap is None:
        raise ConfigError(
            "no broker: set ENTITLE_KAFKA_BOOTSTRAP, or run this beside a running `entitle dev`"
        )
    start = 1 if args.all else args.from_position
    store = EntitlementStore(settings.database_url)
    read_model = ReadModel(settings.database_url)
    try:
        head = store.process_recorder.max_notification_id() or 0
        if start > max(head, 1):
            raise ConfigError(f"--from-position {start}: the event log ends at position {head}")

        async def run() -> tuple[Published, int]:
            try:
                await ensure_topics(
                    bootstrap,
                    settings.raw_partitions,
                    timeout=5.0,
                    replication=settings.topic_replication,
                )
            except Exception as exc:
                raise ConfigError(f"cannot reach the broker at {bootstrap}: {exc!r}") from None
            broker = make_broker(bootstrap, idempotence, linger_ms=0, client_id="entitle-publish")
            try:
                await broker.start()
            except Exception as exc:
                await broker.stop()
                hint = " (the embedded broker needs ENTITLE_KAFKA_IDEMPOTENCE=false)"
                raise ConfigError(
                    f"the broker at {bootstrap} refused a producer: {exc!r}"
                    + (hint if idempotence else "")
                ) from None
            try:
                return await republish(
                    Follower(store),
                    broker,
                    read_model,
                    start - 1,
                    head,
                    progress=lambda at: bar(at - start + 1, head - start + 1),
                )
            finally:
                await broker.stop()

        bar = Bar("publish")
        try:
            published, unreadable = asyncio.run(run())
        finally:
            bar.end()
    finally:
        read_model.close()
        store.close()
    print(
        f"published {published.events} events, {published.states} entitlement states and "
        f"{published.dead_letters} dead letters from positions {start} to {head}"
        + (f" ({unreadable} unreadable events skipped)" if unreadable else "")
    )
    return 0


def _operating_config(given: str | None) -> Path:
    """--config, else the configuration the `entitle dev` started in this
    directory uses (it notes it in .entitle/config), else entitle.yaml."""
    if given is not None:
        return Path(given)
    with contextlib.suppress(OSError):
        noted = (Path(".entitle") / "config").read_text().strip()
        if noted:
            return Path(noted)
    return Path("entitle.yaml")


def _dev_broker() -> str | None:
    """The embedded broker of an `entitle dev` running in this directory."""
    path = Path(".entitle") / "broker"
    with contextlib.suppress(OSError):
        return path.read_text().strip() or None
    return None


def _since(raw: str | None) -> datetime | None:
    if raw is None:
        return None
    since = aware_time(raw)
    if since is None:
        raise ConfigError(f"--since {raw!r} is not an RFC 3339 time with an offset (…Z)")
    return since


def _positive(raw: str) -> int:
    value = ascii_int(raw)
    if value is None:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number")
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError("must be from 1 to 1000000")
    return value


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be from 0 to 3600 seconds")
    return value


def _position(raw: str) -> int:
    value = ascii_int(raw)
    if value is None:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a position (a whole number)")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: positions start at 1")
    return value


def _who(raw: str) -> str:
    """A name recorded as who asked (as an admin key's or an endpoint's name)."""
    from contracts.text import text_problem

    if not 1 <= len(raw.strip()) <= 100 or text_problem(raw):
        raise argparse.ArgumentTypeError("a name is 1 to 100 characters, no control characters")
    return raw.strip()


def _uuid(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an id (a UUID)") from None


def cmd_redrive(args: argparse.Namespace) -> int:
    """Re-process unresolved dead letters with the current configuration."""
    from services.codes import CodeBook
    from services.fold import DomainService
    from services.readmodel import ReadModel
    from services.store import EntitlementStore

    config = load_config(_operating_config(args.config))
    settings = Settings.from_env()
    if not settings.code_secret:
        raise ConfigError("redrive needs ENTITLE_CODE_SECRET (the one the services use)")
    read_model = ReadModel(settings.database_url)
    store = EntitlementStore(settings.database_url)
    try:
        if args.ids:
            ids = list(args.ids)
        else:
            # Oldest first, as they arrived (a payment before its refund).
            letters = read_model.dead_letters(args.limit, unresolved=True)
            ids = [letter.id for letter in reversed(letters)]
        codes = CodeBook(settings.code_secret)
        service = DomainService(store, config, codes)
        resolved = failed = 0
        bar = Bar("redrive", unit=" dead letters")
        try:
            for start in range(0, len(ids), 100):  # a transaction per hundred
                done, still = service.redrive(ids[start : start + 100])
                resolved, failed = resolved + done, failed + still
                bar(start + len(ids[start : start + 100]), len(ids))
        finally:
            bar.end()
    finally:
        store.close()
        read_model.close()
    print(
        f"re-drove {resolved + failed} dead letter(s): {resolved} applied, "
        f"{failed} still unmappable"
    )
    return 0 if failed == 0 else 1


def cmd_outbound(args: argparse.Namespace) -> int:
    """Outbound notifications from the database (the API's equivalents):
    endpoints and deliveries (JSON lines, as the API shows them), resend,
    recover (with progress). Exit 1 for an unknown endpoint or delivery, or
    one that cannot be sent to now."""
    from services.outbound.outbox import Outbox
    from services.outbound.webhooks import Endpoints
    from services.outbound_api import (
        delivery_view,
        endpoint_view,
        job_endpoint,
        unsendable,
        unsendable_job,
    )
    from services.readmodel import ReadModel

    def refuse(why: str) -> int:
        print(f"entitle: {why}", file=sys.stderr)
        return 1

    read_model = ReadModel(Settings.from_env().database_url)
    try:
        outbox = Outbox(read_model)
        # The table the webhooks projection keeps: the API's endpoints and,
        # since the projector last started, those the configuration declares.
        endpoints = Endpoints(outbox, []).load()
        command = args.outbound_command
        if command == "endpoints":
            for each in endpoints.values():
                if not each.deleted:
                    print(endpoint_view(each, outbox).model_dump_json(exclude={"secret"}))
            return 0
        endpoint_id = getattr(args, "endpoint_id", None)
        endpoint = endpoints.get(endpoint_id) if endpoint_id else None
        if endpoint_id is not None and endpoint is None:
            return refuse(f"no webhook endpoint {endpoint_id}")
        if command in ("deliveries", "mails"):
            after = None
            shown = 0
            filters = (
                {"channel": str(endpoint_id), "kind": "webhook"}
                if command == "deliveries"
                else {"kind": "mail"}
            )
            while shown < args.limit:
                want = min(500, args.limit - shown)
                page = outbox.jobs(status=args.status, after=after, limit=want, **filters)
                for record in page:
                    print(delivery_view(record).model_dump_json())
                shown += len(page)
                if len(page) < want:
                    break
                after = (page[-1].job.seq, page[-1].job.id)
            return 0
        failed: list[str] = []
        retrying: list[str] = []
        problems = 0
        if command == "resend":
            for job_id in dict.fromkeys(str(i) for i in args.ids):
                found = outbox.job(job_id)
                refusal = None
                if found is not None:
                    target = job_endpoint(found)
                    endpoint = endpoints.get(target) if target is not None else None
                    refusal = unsendable_job(found, outbox, endpoint)
                if found is None or refusal is not None:
                    problems += 1
                    refuse(f"{job_id}: " + (refusal[1] if refusal else "no such delivery"))
                else:
                    failed.append(job_id)
        else:  # recover
            since = _since(args.since)
            assert since is not None
            if since > datetime.now(UTC):
                raise ConfigError(f"--since {args.since!r} is in the future")
            refusal = unsendable(endpoint, outbox)
            if refusal is not None:
                return refuse(refusal[1])
            failed, retrying = outbox.unsuccessful_since(str(endpoint_id), since)
        total = len(failed) + len(retrying)
        done = outbox.send_again(
            failed,
            retrying,
            lambda done, total: print(
                f"\rresent {done} of {total}", end="", file=sys.stderr, flush=True
            ),
        )
        if total:
            print(file=sys.stderr)
        print(f"{done} deliver{'y' if done == 1 else 'ies'} will be sent again")
        return 0 if done == total and not problems else 1
    finally:
        read_model.close()


def cmd_audit(args: argparse.Namespace) -> int:
    """`audit verify`: fold the log and compare with the read model and the
    validation index (exit 1 on a mismatch); `audit export`: stored events
    as JSON lines on stdout."""
    import sqlite3

    import psycopg
    import psycopg_pool
    from eventsourcing.persistence import PersistenceError

    from services import audit
    from services.readmodel import ReadModel
    from services.store import DatabaseURLError, EntitlementStore

    settings = Settings.from_env()
    store: EntitlementStore | None = None
    read_model: ReadModel | None = None
    try:
        if settings.database_url.startswith(("postgresql:", "postgres:")):
            # Fail in seconds, not after the store's pool waited 30 s.
            psycopg.connect(settings.database_url, connect_timeout=5).close()
        store = EntitlementStore(settings.database_url)
        if args.audit_command == "verify":
            read_model = ReadModel(settings.database_url)
            bar = Bar("verify")
            try:
                report = audit.verify(
                    store, read_model, limit=args.limit, progress=bar, catch_up=args.wait
                )
            finally:
                bar.end()
            lines = report.lines()
            print("\n".join(lines[:-1]))
            print(lines[-1], file=sys.stderr)
            return 0 if report.ok else 1
        since, until = _since(args.since), _since(args.until)
        if since is not None and until is not None and until <= since:
            raise ConfigError("--until must be after --since")
        aggregate_id = None
        if args.entitlement is not None:
            try:
                aggregate_id = uuid.UUID(args.entitlement)
            except ValueError:
                raise ConfigError(f"--entitlement {args.entitlement!r} is not an id") from None
            if store.entitlement(aggregate_id) is None:
                raise ConfigError(f"no entitlement {aggregate_id}")
        bar = Bar("export")
        try:
            count = audit.export(store, sys.stdout, since, until, aggregate_id, progress=bar)
        finally:
            bar.end()
        print(f"exported {count} events", file=sys.stderr)
        return 0
    except BrokenPipeError:
        raise  # not the database's: main() ends quietly
    except (
        DatabaseURLError,
        PersistenceError,
        psycopg.Error,
        psycopg_pool.PoolTimeout,
        sqlite3.Error,
        OSError,  # an SQLite path that cannot be made or opened
    ) as exc:
        raise ConfigError(f"the database cannot be read: {str(exc).splitlines()[0]}") from None
    finally:
        if read_model is not None:
            read_model.close()
        if store is not None:
            store.close()


class _Help(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default (and the environment
    variable that sets it, where one does)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.option_strings
            and "default" not in text
            and action.default not in (None, False, argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        variable = _OPTION_ENV.get(action.dest)
        if variable is not None:
            text += f" [{variable}]"
        return text.strip()


#: Options whose default an environment variable sets.
_OPTION_ENV = {"log_format": "ENTITLE_LOG_FORMAT"}


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="entitle",
        description="Event-sourced entitlement engine",
        epilog="environment variables (an empty one counts as unset):\n" + Environment.help(),
    )
    top.add_argument("--version", action="version", version=f"entitle {version()}")
    sub = top.add_subparsers(dest="command", required=True)

    def server(p: argparse.ArgumentParser, port: int = 8080) -> None:
        p.add_argument("--config", default="entitle.yaml", help="configuration file (YAML)")
        p.add_argument("--host", default="127.0.0.1", help="address to listen on")
        p.add_argument("--port", type=int, default=port, help="HTTP port")
        p.add_argument(
            "--log-level",
            default="info",
            choices=["debug", "info", "warning", "error"],
            help="least important log lines shown",
        )
        p.add_argument(
            "--log-format",
            default=None,
            choices=["text", "json"],
            help="text, or one JSON object a line (default: text)",
        )

    dev = sub.add_parser("dev", help="run the whole stack on embedded defaults")
    server(dev)
    dev.set_defaults(run=cmd_dev)
    for role in ROLES:
        p = sub.add_parser(role, help=f"run the {role} service alone")
        server(p)
        p.set_defaults(run=cmd_serve, roles=[role])
    serve = sub.add_parser("serve", help="run a chosen set of roles in one process")
    server(serve)
    serve.add_argument("roles", nargs="+", choices=ROLES)
    # How `entitle dev` runs its processes (services/supervisor.py).
    serve.add_argument("--dev-stack", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--peer", action="append", default=[], help=argparse.SUPPRESS)
    serve.set_defaults(run=cmd_serve)
    p = sub.add_parser("replay", help="rebuild the read model from the event store")
    p.add_argument(
        "--webhooks",
        action="store_true",
        help="instead, rebuild the outbound webhook jobs at the projector's next start",
    )
    p.set_defaults(run=cmd_replay)
    p = sub.add_parser(
        "history", help="an entitlement's events as a timeline: status, changed fields, causes"
    )
    p.add_argument("entitlement_id")
    p.add_argument("--json", action="store_true", help="the stored events as JSON lines")
    p.set_defaults(run=cmd_history)
    p = sub.add_parser("show", help="an entitlement (JSON): now, or as of a time or version")
    p.add_argument("entitlement_id")
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--as-of", help="as the engine saw it at this RFC 3339 time, e.g. 2026-11-30T00:00:00Z"
    )
    when.add_argument(
        "--as-of-version", type=_positive, help="as its events up to this version left it"
    )
    p.set_defaults(run=cmd_show)
    p = sub.add_parser("dead-letters", help="list webhooks that could not be mapped")
    p.add_argument("--limit", type=_positive, default=100, help="most dead letters, newest first")
    p.set_defaults(run=cmd_dead_letters)
    p = sub.add_parser("webhooks", help="what became of accepted webhooks (receipts)")
    p.add_argument("receipt_id", nargs="?", help="show one, with the webhook as received")
    p.add_argument("--source", help="only this configured source's")
    p.add_argument(
        "--outcome",
        choices=["applied", "duplicate", "ignored", "parked", "dead_letter"],
        help="only webhooks that came to this",
    )
    p.add_argument("--order-ref", help="only this provider order's or subscription's")
    p.add_argument("--since", help="RFC 3339 time, e.g. 2026-11-30T00:00:00Z")
    p.add_argument("--limit", type=_positive, default=100, help="most receipts, newest first")
    p.set_defaults(run=cmd_webhooks)
    p = sub.add_parser(
        "redrive", help="re-process dead letters after fixing the catalog (all unresolved, or ids)"
    )
    p.add_argument(
        "--config",
        default=None,
        help="configuration file (YAML); default the one the `entitle dev` running here"
        " uses, else entitle.yaml",
    )
    p.add_argument("--limit", type=_positive, default=10_000, help="most dead letters re-driven")
    p.add_argument(
        "ids", nargs="*", type=_uuid, help="dead letter ids (default: every unresolved one)"
    )
    p.set_defaults(run=cmd_redrive)
    p = sub.add_parser(
        "erase-customer", help="erase a customer's personal data (e-mail, name) for good"
    )
    p.add_argument("email", nargs="?", help="the customer's e-mail address")
    p.add_argument("--by", type=_who, default="cli", help="who asked, recorded with the erasure")
    p.add_argument("--list", action="store_true", help="list the erasures done (JSON lines)")
    p.add_argument("--limit", type=_positive, default=100, help="most erasures --list shows")
    p.set_defaults(run=cmd_erase_customer)
    out = sub.add_parser("outbound", help="outbound webhooks and mails: list, resend, recover")
    out_sub = out.add_subparsers(dest="outbound_command", required=True)
    p = out_sub.add_parser("endpoints", help="the webhook endpoints (JSON lines)")
    p.set_defaults(run=cmd_outbound)
    for name, what in (("deliveries", "an endpoint's deliveries"), ("mails", "mails to buyers")):
        p = out_sub.add_parser(name, help=f"{what}, oldest first, with attempts (JSON lines)")
        if name == "deliveries":
            p.add_argument("endpoint_id", type=_uuid)
        p.add_argument("--status", choices=["pending", "succeeded", "failed"], help="only these")
        p.add_argument("--limit", type=_positive, default=1000, help="most listed")
        p.set_defaults(run=cmd_outbound)
    p = out_sub.add_parser("resend", help="send deliveries (or mails) again, by id")
    p.add_argument("ids", nargs="+", type=_uuid)
    p.set_defaults(run=cmd_outbound)
    p = out_sub.add_parser("recover", help="send again what failed to an endpoint since a time")
    p.add_argument("endpoint_id", type=_uuid)
    p.add_argument("--since", required=True, help="RFC 3339 time, e.g. 2026-11-30T00:00:00Z")
    p.set_defaults(run=cmd_outbound)
    p = sub.add_parser(
        "publish",
        help="send stored events again onto the event and state topics (same event ids)",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="from the first stored event")
    which.add_argument(
        "--from-position",
        type=_position,
        metavar="N",
        help="from position N of the event store's notification log (1 is the first)",
    )
    p.set_defaults(run=cmd_publish)
    audit_cmd = sub.add_parser("audit", help="verify the read model against the log; export it")
    audit_sub = audit_cmd.add_subparsers(dest="audit_command", required=True)
    p = audit_sub.add_parser(
        "verify", help="fold every aggregate and compare with the read model and code index"
    )
    p.add_argument("--limit", type=_positive, default=50, help="most mismatches listed")
    p.add_argument(
        "--wait",
        type=_seconds,
        default=10.0,
        help="seconds the read model may take to reach the head when it is behind (a"
        " running projector catches up in moments); not reached: a mismatch (default 10)",
    )
    p.set_defaults(run=cmd_audit)
    p = audit_sub.add_parser("export", help="stored events as JSON lines on stdout")
    p.add_argument("--since", help="recorded at or after (RFC 3339, e.g. 2026-11-30T00:00:00Z)")
    p.add_argument("--until", help="recorded before (RFC 3339)")
    p.add_argument("--entitlement", help="only this entitlement's events (its id)")
    p.set_defaults(run=cmd_audit)
    stripe_cmd = sub.add_parser("stripe", help="Stripe's API, with a source's api_key")
    stripe_sub = stripe_cmd.add_subparsers(dest="stripe_command", required=True)
    p = stripe_sub.add_parser(
        "backfill", help="send Stripe's events that never reached us through the raw topic"
    )
    p.add_argument(
        "--config",
        default=None,
        help="configuration file (YAML); default the one the `entitle dev` running here"
        " uses, else entitle.yaml",
    )
    p.add_argument("--source", required=True, help="a stripe source with an api_key")
    p.add_argument(
        "--since", default="72h", help="how far back: 90m, 72h, 30d (Stripe keeps 30 days)"
    )
    p.set_defaults(run=cmd_stripe_backfill)
    return top


def main(argv: list[str] | None = None) -> int:
    faulthandler.enable()  # a crash in a C extension prints every thread's stack
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (see services/__init__.py)
    args = parser().parse_args(argv)
    try:
        if args.run not in (cmd_dev, cmd_serve):
            _require_store()
        code = int(args.run(args))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except ConfigError as exc:
        print(f"entitle: {exc}", file=sys.stderr)
        return 2
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        url = urlsplit(Settings.from_env().database_url)
        where = f"{url.scheme}://{url.netloc.rpartition('@')[2]}"  # never the password
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"entitle: cannot reach the database at {where}: {first}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # a stored row that does not parse
        print(
            f"entitle: a stored row cannot be read ({exc.title}: {exc.errors()[0]['msg']});"
            " `entitle audit verify` names it, `entitle replay` rebuilds the read model",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (`| head`) closed the pipe: end quietly, and keep
        # Python's own flush at exit from complaining about it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _require_store() -> None:
    """Every command but `dev` and the services reads a store that exists:
    opening an SQLite file that is not there would make an empty one (and
    its directories) and report on that. Raises ConfigError."""
    url = urlsplit(Settings.from_env().database_url)
    if url.scheme != "sqlite":
        return
    path = unquote(url.path[1:] if url.path.startswith("/") else url.path)
    if not path:
        return
    missing = ConfigError(
        f"no event store at {path} (set ENTITLE_DATABASE_URL or run from the directory of .entitle)"
    )
    if not Path(path).is_file():
        raise missing
    # A file that is no SQLite database, or one that holds no event store
    # (an empty file, another program's): said so, and nothing written to it.
    try:
        with contextlib.closing(
            sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        ) as db:
            found = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table'"
                " AND (name = 'stored_events' OR name LIKE 'entitle\\_%' ESCAPE '\\')"
            ).fetchone()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{path} cannot be read as a database: {exc}") from None
    if found is None:
        raise ConfigError(f"{path} holds no event store (none of entitle's tables)")


if __name__ == "__main__":
    sys.exit(main())

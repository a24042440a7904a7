"""The configuration file (`entitle.yaml`) and the environment settings."""

from __future__ import annotations

import base64
import functools
import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from email.errors import NonASCIILocalPartDefect
from email.headerregistry import Address, AddressHeader, BaseHeader, HeaderRegistry
from email.policy import SMTPUTF8
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.text import Text, text_problem
from domain.catalog import Catalog, Offering
from domain.lifecycle import Policy
from services.codes import load_secret
from services.mail_templates import (
    DEFAULT_ON,
    TEMPLATE_TYPES,
    MailTemplate,
    MailTemplateError,
    check,
    shipped,
)
from services.outbound.rules import endpoint_problem
from services.providers import PROVIDERS, Credentials, Provider


class ConfigError(Exception):
    """The configuration file or environment is unusable; the message says why."""


class _SourceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str
    secret: SecretStr | None = None
    secret_env: str | None = None
    username: str | None = None
    tolerance_seconds: float | None = Field(default=None, gt=0, le=86400)
    webhook_id: str | None = None
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    backfill_every: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?[smhd]$")
    write_back_codes: StrictBool = False
    allow_unsigned: StrictBool = False
    billing_portal_url: str | None = Field(default=None, max_length=2000)

    @model_validator(mode="after")
    def _one_secret(self) -> _SourceFile:
        if self.secret is not None and self.secret_env is not None:
            raise ValueError("give only one of 'secret' or 'secret_env'")
        if self.allow_unsigned and (self.secret is not None or self.secret_env is not None):
            raise ValueError(
                "allow_unsigned is for a source without a secret; give one or the other"
            )
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give only one of 'api_key' or 'api_key_env'")
        if self.backfill_every is not None and self.api_key is None and self.api_key_env is None:
            raise ValueError("backfill_every needs an api_key (or api_key_env)")
        if self.write_back_codes and self.provider != "stripe":
            raise ValueError("write_back_codes is for stripe sources only")
        if self.billing_portal_url is not None and not self.billing_portal_url.startswith(
            "https://"
        ):
            raise ValueError("billing_portal_url must be an https:// address")
        if self.write_back_codes and self.api_key is None and self.api_key_env is None:
            raise ValueError(
                "write_back_codes needs an api_key (or api_key_env) that may write subscriptions"
            )
        return self


class _OfferingFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sku: str
    product: str
    period: str = "P1M"
    seats: int = 1
    features: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, int] = Field(default_factory=dict)
    suspend_after_days: int | None = None
    expire_after_days: int | None = None
    stripe_price_ids: list[str] = Field(default_factory=list)
    prices: dict[str, list[str | int]] = Field(default_factory=dict)
    floating: StrictBool = False
    lease_seconds: int = Field(default=900, ge=30)


class _LifecycleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expiry_leeway_hours: float = Field(default=24, ge=0)
    parked_days: float = Field(default=7, gt=0)


class _LicensingFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    license_file_days: float = Field(default=7, gt=0)
    # Token buckets: requests per second (and burst) per activation code and
    # per client address, on activation, validation, usage and the portal.
    per_code_per_second: float = Field(default=10, gt=0)
    per_code_burst: int = Field(default=20, ge=1)
    per_address_per_second: float = Field(default=100, gt=0)
    per_address_burst: int = Field(default=200, ge=1)
    # Per client address on the seat routes (release, heartbeat, license file).
    seat_per_address_per_second: float = Field(default=10, gt=0)
    seat_per_address_burst: int = Field(default=50, ge=1)


class _AdminFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Wrong admin keys per client address, as a token bucket: past the burst,
    # the address waits (every admin request a 429) until a token is back.
    failed_auth_per_second: float = Field(default=0.1, gt=0)
    failed_auth_burst: int = Field(default=10, ge=1)


class _MailTemplateFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # jinja2 sources; a part not given is the shipped template's.
    subject: str | None = None
    text: str | None = None
    html: str | None = None


class _EmailFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    user: str | None = None
    password_env: str | None = None
    from_address: str | None = None
    portal_url: str | None = None
    timeout_seconds: float = Field(default=30, gt=0, le=600)
    max_connections: int = Field(default=4, ge=1, le=100)
    outbox_dir: str | None = None
    # Per event type: true or empty (the shipped template), false (no
    # mail), or a mapping of the parts to replace.
    templates: dict[str, _MailTemplateFile | StrictBool | None] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _no_password(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError(
                "never the password in the file: name the environment variable "
                "holding it with password_env"
            )
        return data


class _NotificationsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: _EmailFile | None = None


class _EndpointFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    # A Standard Webhooks secret (whsec_ + base64) from the environment.
    secret_env: str
    events: list[str] = Field(default_factory=list)
    description: Text | None = Field(default=None, max_length=500)
    include_codes: StrictBool = False
    ordered: StrictBool = True


class _OutboundFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Unset: true in `entitle dev`, false elsewhere.
    allow_http: StrictBool | None = None
    allow_private_networks: StrictBool | None = None
    # Seconds after each failed attempt (the last given up after the last).
    retry_schedule: list[float] | None = Field(default=None, min_length=1, max_length=20)
    endpoints: dict[str, _EndpointFile] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _positive(self) -> _OutboundFile:
        if self.retry_schedule is not None and not all(
            0 < s <= 7 * 86400 for s in self.retry_schedule
        ):
            raise ValueError("retry_schedule: every wait must be over 0 and at most 7 days")
        return self


class _ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: dict[str, _SourceFile] = Field(default_factory=dict)
    offerings: list[_OfferingFile] = Field(default_factory=list)
    lifecycle: _LifecycleFile = Field(default_factory=_LifecycleFile)
    licensing: _LicensingFile = Field(default_factory=_LicensingFile)
    admin: _AdminFile = Field(default_factory=_AdminFile)
    notifications: _NotificationsFile = Field(default_factory=_NotificationsFile)
    outbound: _OutboundFile = Field(default_factory=_OutboundFile)


@dataclass(frozen=True)
class Source:
    """A configured webhook endpoint: POST /webhooks/<name>."""

    name: str
    provider: Provider
    secret: SecretStr
    username: str | None = None
    tolerance_seconds: float | None = None
    webhook_id: str | None = None
    #: A (restricted, read-only is enough) key for the provider's API:
    #: backfills and fetching what a webhook left out. Stripe only.
    api_key: SecretStr | None = None
    backfill_every: timedelta | None = None
    #: Write each subscription's activation codes into its Stripe metadata
    #: (`activation_codes`, see `services.stripe_api.StripeAPI.write_codes`);
    #: needs an `api_key` allowed to write subscriptions. Stripe only.
    write_back_codes: bool = False
    #: No signature is checked (`allow_unsigned: true`): its webhooks may
    #: grant, never end, suspend or refund (services.providers.unsigned_refusal).
    unsigned: bool = False
    #: Where the buyer manages billing at the provider (e.g. the login link
    #: of Stripe's customer portal, https://docs.stripe.com/customer-management/activate-no-code-customer-portal);
    #: the customer portal links to it.
    billing_portal_url: str | None = None

    def __repr__(self) -> str:  # never show the secret
        return f"Source(name={self.name!r}, provider={self.provider.name!r})"

    def credentials(self) -> Credentials:
        return Credentials(
            secret=self.secret.get_secret_value(),
            username=self.username,
            tolerance_seconds=self.tolerance_seconds,
            webhook_id=self.webhook_id,
        )


#: A token bucket's rate (tokens a second) and burst.
Rate = tuple[float, int]


@dataclass(frozen=True)
class RateLimits:
    """Every rate limit, per API process (`licensing:` and `admin:` in the file)."""

    per_code: Rate = (10, 20)
    per_address: Rate = (100, 200)
    seat_per_address: Rate = (10, 50)
    admin_failures_per_address: Rate = (0.1, 10)


_DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}


@dataclass(frozen=True)
class EmailSettings:
    """`notifications.email`: how the buyer gets mail (services.outbound.mail).

    With a `host`, mail goes by SMTP; without one, each mail is written as
    `<outbox_dir>/<job id>.eml` (`entitle dev` uses `.entitle/outbox`)."""

    host: str | None = None
    port: int = 587
    #: starttls: upgrade a plain connection (and fail if the server cannot);
    #: tls: TLS from the start (SMTPS); none: plain, for a relay on this host.
    security: Literal["starttls", "tls", "none"] = "starttls"
    user: str | None = None
    password: SecretStr | None = None
    #: The From header: an address, or `Name <address>`.
    from_address: str = "entitle@localhost"
    #: Shown to the buyer as the address of their license, if set.
    portal_url: str | None = None
    timeout_seconds: float = 30.0
    #: SMTP connections open at once (each mail is one connection).
    max_connections: int = 4
    outbox_dir: Path | None = None
    #: The templates of the event types that send mail.
    templates: Mapping[str, MailTemplate] = field(
        default_factory=lambda: {t: shipped(t) for t in DEFAULT_ON}
    )

    def __repr__(self) -> str:  # never show the password
        return (
            f"EmailSettings(host={self.host!r}, port={self.port}, "
            f"security={self.security!r}, templates={sorted(self.templates)})"
        )


@dataclass(frozen=True)
class DeclaredEndpoint:
    """A webhook endpoint declared in the file (`outbound.endpoints.<name>`)."""

    name: str
    url: str
    secret: SecretStr
    events: list[str]
    description: str | None
    include_codes: bool
    ordered: bool


@dataclass(frozen=True)
class Outbound:
    """`outbound:` in the file: where webhooks may go, and how often to retry."""

    allow_http: bool | None = None
    allow_private_networks: bool | None = None
    retry_schedule: tuple[float, ...] | None = None
    endpoints: tuple[DeclaredEndpoint, ...] = ()


@dataclass(frozen=True)
class Config:
    sources: dict[str, Source]
    catalog: Catalog
    policy: Policy = field(default_factory=Policy)
    license_file_ttl: timedelta = timedelta(days=7)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    #: None when the file has no `notifications.email`: no mail (except in
    #: `entitle dev`, which writes the default mails to its outbox).
    email: EmailSettings | None = None
    outbound: Outbound = field(default_factory=Outbound)


def parse_config(
    text: str, environ: dict[str, str] | None = None, origin: str = "config"
) -> Config:
    env = os.environ if environ is None else environ
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    try:
        parsed = _ConfigFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{origin}: {problems}") from None
    sources: dict[str, Source] = {}
    for name, source in parsed.sources.items():
        if name == "manual":  # the source of grants made by hand (POST /v1/entitlements)
            raise ConfigError(f"{origin}: the source name 'manual' is taken by manual grants")
        provider = PROVIDERS.get(source.provider)
        if provider is None:
            known = ", ".join(sorted(PROVIDERS))
            raise ConfigError(
                f"{origin}: source {name!r} names provider {source.provider!r}; known: {known}"
            )
        missing = [need for need in provider.needs if not getattr(source, need)]  # "" too
        unsigned = source.allow_unsigned
        no_secret = source.secret is None and source.secret_env is None
        if not unsigned and no_secret and provider.secret_required:
            missing.insert(0, "secret (or secret_env, or allow_unsigned: true)")
        if missing:
            raise ConfigError(
                f"{origin}: source {name!r} ({source.provider}) needs {', '.join(missing)}"
            )
        where = f"{origin}: source {name!r}"
        secret = _from_env(env, source.secret_env, where, "secret") or source.secret
        if secret is not None:
            # An empty key would "verify" what anyone signs with it.
            value = secret.get_secret_value()
            problem = "the secret is empty" if not value.strip() else provider.secret_problem(value)
            if problem is not None:
                raise ConfigError(f"{where}: {problem}; give a secret, or allow_unsigned: true")
        api_key = _from_env(env, source.api_key_env, where, "api_key") or source.api_key
        if api_key is not None and source.provider != "stripe":
            raise ConfigError(f"{origin}: source {name!r}: api_key is for stripe sources only")
        if source.write_back_codes and (api_key is None or not api_key.get_secret_value().strip()):
            raise ConfigError(f"{where}: write_back_codes needs an api_key, and it is empty")
        sources[name] = Source(
            name=name,
            provider=provider,
            secret=secret or SecretStr(""),
            username=source.username,
            tolerance_seconds=source.tolerance_seconds,
            webhook_id=source.webhook_id,
            api_key=api_key,
            backfill_every=duration(source.backfill_every) if source.backfill_every else None,
            write_back_codes=source.write_back_codes,
            unsigned=unsigned,
            billing_portal_url=source.billing_portal_url,
        )
    try:
        catalog = Catalog(
            Offering(
                sku=o.sku,
                product=o.product,
                period=o.period,
                seats=o.seats,
                features=o.features,
                limits=o.limits,
                suspend_after_days=o.suspend_after_days,
                expire_after_days=o.expire_after_days,
                stripe_price_ids=tuple(o.stripe_price_ids),
                prices={name: tuple(str(p) for p in ids) for name, ids in o.prices.items()},
                floating=o.floating,
                lease_seconds=o.lease_seconds,
            )
            for o in parsed.offerings
        )
    except ValueError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    policy = Policy(
        expiry_leeway=timedelta(hours=parsed.lifecycle.expiry_leeway_hours),
        parked_for=timedelta(days=parsed.lifecycle.parked_days),
    )
    licensing = parsed.licensing
    email = parsed.notifications.email
    endpoints = []
    for name, declared in parsed.outbound.endpoints.items():
        where = f"{origin}: outbound endpoint {name!r}"
        if not 1 <= len(name) <= 100 or text_problem(name):
            raise ConfigError(f"{where}: a name is 1 to 100 characters, no control characters")
        # Unset, both depend on `entitle dev`: checked again at start.
        allow_http = parsed.outbound.allow_http is not False
        allow_private = parsed.outbound.allow_private_networks is not False
        problem = endpoint_problem(declared.url, declared.events, allow_http, allow_private)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        secret = _from_env(env, declared.secret_env, where, "secret")
        assert secret is not None
        if not _webhook_secret(secret.get_secret_value()):
            raise ConfigError(f"{where}: ${declared.secret_env} is not whsec_ and base64")
        endpoints.append(
            DeclaredEndpoint(
                name,
                declared.url,
                secret,
                declared.events,
                declared.description,
                declared.include_codes,
                declared.ordered,
            )
        )
    outbound = Outbound(
        allow_http=parsed.outbound.allow_http,
        allow_private_networks=parsed.outbound.allow_private_networks,
        retry_schedule=tuple(parsed.outbound.retry_schedule)
        if parsed.outbound.retry_schedule
        else None,
        endpoints=tuple(endpoints),
    )
    return Config(
        outbound=outbound,
        sources=sources,
        catalog=catalog,
        policy=policy,
        license_file_ttl=timedelta(days=parsed.licensing.license_file_days),
        rate_limits=RateLimits(
            per_code=(licensing.per_code_per_second, licensing.per_code_burst),
            per_address=(licensing.per_address_per_second, licensing.per_address_burst),
            seat_per_address=(
                licensing.seat_per_address_per_second,
                licensing.seat_per_address_burst,
            ),
            admin_failures_per_address=(
                parsed.admin.failed_auth_per_second,
                parsed.admin.failed_auth_burst,
            ),
        ),
        email=_email(email, env, f"{origin}: notifications.email") if email else None,
    )


def _email(email: _EmailFile, env: Mapping[str, str], where: str) -> EmailSettings:
    if email.host is not None and not email.host.strip():
        raise ConfigError(f"{where}: host is empty; leave it out to write mails to outbox_dir")
    if email.host is not None and email.from_address is None:
        raise ConfigError(f"{where}: from_address is needed to send mail")
    if (email.user is None) != (email.password_env is None):
        raise ConfigError(f"{where}: give both user and password_env, or neither")
    if email.user is not None and email.security == "none":
        raise ConfigError(
            f"{where}: with security: none the password would travel in the clear; "
            "use starttls or tls"
        )
    password = _from_env(env, email.password_env, where, "password")
    from_address = email.from_address or EmailSettings.from_address
    problem = address_problem(from_address)
    if problem:
        raise ConfigError(f"{where}: from_address {from_address!r} {problem}")
    if email.portal_url is not None:
        url = urlsplit(email.portal_url)
        if url.scheme not in ("https", "http") or not url.hostname:
            raise ConfigError(f"{where}: portal_url {email.portal_url!r} is no http(s) address")
    templates: dict[str, MailTemplate] = {t: shipped(t) for t in DEFAULT_ON}
    for event_type, given in email.templates.items():
        if event_type not in TEMPLATE_TYPES:
            known = ", ".join(TEMPLATE_TYPES)
            raise ConfigError(f"{where}: no mail for {event_type!r}; known: {known}")
        if given is False:
            templates.pop(event_type, None)
            continue
        template = shipped(event_type)
        if isinstance(given, _MailTemplateFile):
            template = MailTemplate(
                subject=template.subject if given.subject is None else given.subject,
                text=template.text if given.text is None else given.text,
                html=template.html if given.html is None else given.html,
            )
        try:
            check(template, email.portal_url)
        except MailTemplateError as exc:
            raise ConfigError(f"{where}: template {event_type} {exc}") from None
        templates[event_type] = template
    return EmailSettings(
        host=email.host,
        port=email.port or _DEFAULT_PORTS[email.security],
        security=email.security,
        user=email.user,
        password=password,
        from_address=from_address,
        portal_url=email.portal_url,
        timeout_seconds=email.timeout_seconds,
        max_connections=email.max_connections,
        outbox_dir=Path(email.outbox_dir) if email.outbox_dir else None,
        templates=templates,
    )


class _HeaderRegistry(HeaderRegistry):
    """The email package's header registry, making each header's class once.

    `HeaderRegistry.__getitem__` makes a new class (`type(...)`) for every
    header it parses (some 25 times a mail on CPython 3.11); making each
    once is most of what `Mailer._headed` saves."""

    @functools.cache  # noqa: B019 -- one registry, kept for the process's life
    def __getitem__(self, name: str) -> type[BaseHeader]:
        return super().__getitem__(name)


#: How mails are built and written: UTF-8 headers where the server speaks
#: SMTPUTF8 (RFC 6531), CRLF line ends.
MAIL_POLICY = SMTPUTF8.clone(header_factory=_HeaderRegistry())


_NOT_ONE_ADDRESS = "is not one address such as 'Acme <licenses@acme.example>'"


def address_problem(value: str) -> str | None:
    """Why `value` is no usable From or To header (one address with a user
    and a domain, optionally with a name), or None."""
    return address_header(value)[1]


def address_header(value: str, name: str = "To") -> tuple[AddressHeader | None, str | None]:
    """`value` parsed as header `name` (To or From), and why it is no usable one
    (see `address_problem`): (header, None) or (None, problem). The header
    can be set on an `EmailMessage` as it is, without parsing it again
    (the policy keeps a header object named as the field: email.policy,
    `header_store_parse`)."""
    if len(value.splitlines()) > 1:
        # What `EmailMessage.__setitem__` refuses: another header smuggled in.
        return None, _NOT_ONE_ADDRESS
    try:
        header = MAIL_POLICY.header_factory(name, value)
        addresses: tuple[Address, ...] = header.addresses
    except Exception:  # the header parser's IndexError, ValueError, ...
        return None, _NOT_ONE_ADDRESS
    # The registry's class for To and From is both (typeshed knows it not).
    assert isinstance(header, AddressHeader) and isinstance(header, BaseHeader)
    # A non-ASCII user name is fine where the server speaks SMTPUTF8.
    defects = [d for d in header.defects if not isinstance(d, NonASCIILocalPartDefect)]
    if defects or len(addresses) != 1:
        return None, _NOT_ONE_ADDRESS
    if not addresses[0].username or not addresses[0].domain:
        return None, "has no user or no domain"
    return header, None


def _webhook_secret(value: str) -> bool:
    """A Standard Webhooks secret: whsec_ and base64 of 24 to 64 bytes."""
    try:
        key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except ValueError:
        return False
    return value.startswith("whsec_") and 24 <= len(key) <= 64


def _from_env(
    env: Mapping[str, str], variable: str | None, where: str, what: str
) -> SecretStr | None:
    """The secret in environment variable `variable`, if one is named."""
    if variable is None:
        return None
    value = env.get(variable)
    if not value:
        raise ConfigError(f"{where} reads its {what} from ${variable}, which is not set")
    return SecretStr(value)


def duration(text: str) -> timedelta:
    """`90s`, `15m`, `72h`, `30d` as a timedelta; ValueError otherwise."""
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    number, unit = text[:-1], text[-1:]
    if unit not in units:
        raise ValueError(f"{text!r} is not a duration such as 15m, 72h or 30d")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration such as 15m, 72h or 30d") from None
    if not value > 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return timedelta(**{units[unit]: value})


def load_config(path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    return parse_config(text, origin=str(path))


@dataclass(frozen=True)
class AdminKey:
    name: str
    secret: str


#: Fewer characters than this is a key someone could guess.
MIN_ADMIN_KEY = 16
_KEY_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def admin_keys(value: str | None) -> list[AdminKey]:
    """`ENTITLE_ADMIN_KEYS`: comma-separated `key` or `name:key` entries
    (a name of letters, digits and `_.@-`; a key of at least 16 printable
    characters without spaces); ConfigError saying which entry is wrong
    (by position, never showing a key)."""
    keys: list[AdminKey] = []
    for n, entry in enumerate((e.strip() for e in (value or "").split(",")), start=1):
        if not entry:
            continue
        name, sep, secret = entry.partition(":")
        if not sep:
            name, secret = f"key{n}", entry
        problem = (
            "has no name before ':'"
            if not name
            else f"names it {name[:64]!r}: use letters, digits and _.@-"
            if not _KEY_NAME.fullmatch(name)
            else f"has a key of {len(secret)} characters: use at least {MIN_ADMIN_KEY}"
            if len(secret) < MIN_ADMIN_KEY
            else "has a space or control character in its key"
            if not secret.isprintable() or any(c.isspace() for c in secret)
            else f"repeats the name {name!r}"
            if any(k.name == name for k in keys)
            else "repeats a key given before"
            if any(k.secret == secret for k in keys)
            else None
        )
        if problem is not None:
            raise ConfigError(
                f"ENTITLE_ADMIN_KEYS: entry {n} {problem} (entries are key or name:key,"
                " comma-separated)"
            )
        keys.append(AdminKey(name, secret))
    if value is not None and value.strip() and not keys:
        raise ConfigError("ENTITLE_ADMIN_KEYS names no key (entries are key or name:key)")
    return keys


def generate_admin_key() -> str:
    return "ek_" + secrets.token_urlsafe(24)


def _proxies(value: str) -> str:
    """ENTITLE_TRUSTED_PROXIES: "*", or addresses and networks, comma-separated."""
    for entry in (e.strip() for e in value.split(",")):
        if entry and entry != "*":
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is no address or network") from None
    return value


def _database_url(value: str | None) -> str | None:
    if value is not None and urlsplit(value).scheme not in ("sqlite", "postgresql", "postgres"):
        raise ValueError("must be sqlite:///PATH or postgresql://USER@HOST/DATABASE")
    return value


def _public_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("must be an address such as https://licenses.example.com")
    return value.rstrip("/")


class Environment(BaseSettings):
    """Every `ENTITLE_*` environment variable this process reads, with its
    default and what it allows (`entitle --help` lists them). An empty
    variable counts as unset. Secrets (`ENTITLE_CODE_SECRET`,
    `ENTITLE_LICENSE_KEY`) and the admin keys are read apart, where they
    are used, so that no settings object ever holds them."""

    model_config = SettingsConfigDict(
        env_prefix="ENTITLE_", env_ignore_empty=True, extra="ignore", frozen=True
    )

    kafka_bootstrap: str | None = Field(
        default=None,
        description="Kafka bootstrap servers (host:port,…); unset: the embedded broker",
    )
    database_url: Annotated[str | None, AfterValidator(_database_url)] = Field(
        default=None,
        description="sqlite:///PATH or postgresql://…; default sqlite:///.entitle/entitle.db",
    )
    kafka_idempotence: bool | None = Field(
        default=None, description="idempotent producers; default true with ENTITLE_KAFKA_BOOTSTRAP"
    )
    raw_partitions: int = Field(
        default=8, ge=1, le=10**9, description="partitions of the raw topic"
    )
    domain_batch: int | None = Field(
        default=None,
        ge=1,
        le=10**9,
        description="webhooks folded per batch; default 2000 on PostgreSQL, 500 on SQLite",
    )
    schedule_interval: float = Field(
        default=1.0, ge=0.01, le=1e9, description="seconds between the scheduler's passes"
    )
    # Orders and entitlements count apart, about 4-6 KB each: 100,000 hold
    # 50,000 subscriptions' (at most about 0.5 GB; an LRU holds only what
    # was used). 10,000 held 5,000: the fold of 10,000 subscriptions then
    # ran at 1,934-2,171 webhooks/s, against 2,338-2,652 with all of them
    # held (bench/lifecycle.py, 3 alternating runs each).
    aggregate_cache: int = Field(
        default=100_000, ge=0, le=10**9, description="aggregates kept in memory"
    )
    trusted_proxies: Annotated[str, AfterValidator(_proxies)] = Field(
        default="127.0.0.1",
        description="proxies whose X-Forwarded-For names the client (* for any)",
    )
    kafka_topic_ids: bool = Field(default=True, description="tell a recreated raw topic by its id")
    stripe_api_base: str | None = Field(default=None, description="Stripe's API address (tests)")
    kafka_session_timeout: float = Field(
        default=6.0,
        ge=0.1,
        le=1e9,
        description="seconds before a silent domain service is replaced",
    )
    topic_replication: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="brokers each topic is kept on when created; default 3, or the"
        " cluster's brokers when fewer (1 on one broker)",
    )
    instance: str | None = Field(
        default=None, description="this process's name; default the host name"
    )
    http_header_timeout: float = Field(
        default=10.0, gt=0, le=1e12, description="seconds a client has to send a request's head"
    )
    http_body_timeout: float = Field(
        default=30.0, gt=0, le=1e12, description="seconds a client has to send a request's body"
    )
    http_max_connections: int = Field(default=1000, gt=0, le=10**12, description="open connections")
    http_max_headers: int = Field(
        default=100, gt=0, le=10**12, description="header lines a request may have"
    )
    http_max_header_bytes: int = Field(
        default=32 * 1024, gt=0, le=10**12, description="bytes a request's head may take"
    )
    http_max_body_buffer: int = Field(
        default=64 * 1024 * 1024, gt=0, le=10**12, description="body bytes held by all requests"
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="text or json log lines"
    )
    access_lines: int = Field(
        default=100,
        ge=0,
        le=10**9,
        description="request lines a process logs a second, one each; beyond, one line a"
        " second counts the rest by route and status (5xx always one each); 0: every one",
    )
    public_url: Annotated[str | None, AfterValidator(_public_url)] = Field(
        default=None,
        description="the https address browsers reach the API role at, for links in mail"
        " (portal sign-in links); dev: its own",
    )

    @classmethod
    def read(cls) -> Environment:
        """The environment's settings; ConfigError naming the variable and
        what it allows when one is wrong (one line, no traceback)."""
        try:
            return cls()  # reads the environment
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                name = "ENTITLE_" + str(error["loc"][0]).upper() if error["loc"] else "ENTITLE_*"
                message = str(error["msg"]).removeprefix("Value error, ")
                given = os.environ.get(name, "")
                if name == "ENTITLE_DATABASE_URL":  # may hold a password
                    given = urlsplit(given).scheme + "://…"
                problems.append(f"{name}: {message}, not {given!r}")
            raise ConfigError("; ".join(problems)) from None

    @classmethod
    def help(cls) -> str:
        """One line per variable: name, default, what it is."""
        lines = []
        for name, info in cls.model_fields.items():
            text = str(info.description)
            if "default" not in text:
                default = "unset" if info.default is None else str(info.default).lower()
                text += f" (default {default})"
            lines.append(f"  ENTITLE_{name.upper():<24} {text}")
        lines += [f"  {name:<32} {text}" for name, text in _SECRETS.items()]
        return "\n".join(lines)


#: Read apart, where each is used, and never kept in a settings object.
_SECRETS = {
    "ENTITLE_ADMIN_KEYS": "admin keys: key or name:key, comma-separated (dev: generated)",
    "ENTITLE_CODE_SECRET": "derives activation codes (default: .entitle/code-secret)",
    "ENTITLE_LICENSE_KEY": "signs license files (default: .entitle/license-key)",
    "ENTITLE_PAYPAL_TRUST_ROOTS": "PEM file of roots PayPal's certificates chain to",
    "ENTITLE_PAYPAL_CERT_CACHE": "directory caching PayPal's certificates",
}


def default_domain_batch(database_url: str | None) -> int:
    """Webhooks the domain service folds per transaction unless told.

    On PostgreSQL 2,000: a backlog of 10,000 subscriptions was folded at
    2,512-2,995 webhooks/s by one domain process and 4,020-5,265 by two (8
    runs, median 4,695), against 2,438-2,618 and 3,880-4,698 with 500
    (bench/lifecycle.py): fewer transactions, each taking the log's table
    lock and waiting for its commit once. On SQLite (one writer for the
    whole database) 500, so that a backlog holds the write lock, which the
    projector and the API's writes wait for, a fraction of a second at a
    time."""
    postgres = urlsplit(database_url or "").scheme in ("postgresql", "postgres")
    return 2000 if postgres else 500


@dataclass(frozen=True)
class Settings:
    """Where the infrastructure is, from the environment."""

    kafka_bootstrap: str | None
    database_url: str
    kafka_idempotence: bool
    raw_partitions: int
    domain_batch: int = 500
    schedule_interval: float = 1.0
    aggregate_cache: int = 100_000
    code_secret: str | None = None
    license_key: str | None = None
    #: Peers whose X-Forwarded-For names the client (rate limits are per client).
    trusted_proxies: str = "127.0.0.1"
    #: Tell a recreated raw topic by the broker's topic id; off, by a marker
    #: record (for brokers whose ids are missing or not to be trusted).
    kafka_topic_ids: bool = True
    #: Stripe's API address, to point backfills at a test double (stripe-mock).
    stripe_api_base: str | None = None
    #: Seconds the broker waits for a silent domain service before its
    #: partitions go to another. A restarted one takes its killed
    #: predecessor's out of the group at once (`evict_predecessor`); Tansu
    #: then still holds a new member's join about half this long. Apache
    #: Kafka refuses less than 6 s (group.min.session.timeout.ms).
    kafka_session_timeout: float = 6.0
    #: This process's name among its peers (default: the host name); two
    #: domain services on one host need different ones.
    instance: str | None = None
    #: Brokers each topic is kept on when created (None: 3, or fewer brokers).
    topic_replication: int | None = None
    #: The address browsers reach the API role at (ENTITLE_PUBLIC_URL,
    #: without a trailing slash): links in mail point there, never at a
    #: request's Host header. None: no sign-in links by mail.
    public_url: str | None = None
    #: `entitle dev`: development defaults (http webhooks to loopback).
    dev: bool = False

    def __repr__(self) -> str:  # never show the code secret
        return f"Settings(kafka_bootstrap={self.kafka_bootstrap!r})"

    @classmethod
    def from_env(cls, data_dir: Path = Path(".entitle")) -> Settings:
        env = Environment.read()
        return cls(
            kafka_bootstrap=env.kafka_bootstrap,
            database_url=env.database_url or f"sqlite:///{data_dir / 'entitle.db'}",
            kafka_idempotence=(
                env.kafka_idempotence
                if env.kafka_idempotence is not None
                else env.kafka_bootstrap is not None
            ),
            raw_partitions=env.raw_partitions,
            domain_batch=env.domain_batch or default_domain_batch(env.database_url),
            schedule_interval=env.schedule_interval,
            aggregate_cache=env.aggregate_cache,
            code_secret=load_secret(data_dir),
            license_key=load_secret(data_dir, env="ENTITLE_LICENSE_KEY", file_name="license-key"),
            trusted_proxies=env.trusted_proxies,
            kafka_topic_ids=env.kafka_topic_ids,
            stripe_api_base=env.stripe_api_base,
            kafka_session_timeout=env.kafka_session_timeout,
            instance=env.instance,
            topic_replication=env.topic_replication,
            public_url=env.public_url,
        )

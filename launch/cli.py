"""The `difffit` command.

    difffit params --shape DiT-XL/2 --classes 101 [--method bitfit] [--json]
    difffit tenant create NAME          prints a new API key (shown once)
    difffit tenant key NAME             another key for an existing tenant
    difffit tenant revoke KEY_OR_PREFIX
    difffit db upgrade                  create / upgrade the registry schema
    difffit serve                       redis + worker + API, embedded
    difffit export TENANT ADAPTER --out DIR [--version N]
    difffit gc [--dry-run] [--grace-s S] [--every S]
                                        remove blobs nothing references (adapters_store.gc)
    difffit finetune | generate | download | import ...   a tenant's verbs (launch.tenant_cli)

Torch is imported only by the subcommands that need it (params, export).
"""

from __future__ import annotations

import argparse
import json
import sys

from difffit.errors import DiffFitError
from difffit.settings import get_settings


def _params(args: argparse.Namespace) -> int:
    from core.params import count_for_shape, format_counts

    counts = count_for_shape(args.shape, args.classes, args.method)
    print(json.dumps(counts, indent=2) if args.json else format_counts(counts))
    return 0


def _registry():
    from adapters_store import Registry

    registry = Registry.from_settings(get_settings())
    registry.create_schema()
    return registry


def _tenant(args: argparse.Namespace) -> int:
    registry = _registry()
    if args.action == "create":
        registry.create_tenant(args.name)
        print(registry.create_api_key(args.name))
    elif args.action == "key":
        print(registry.create_api_key(args.name))
    elif args.action == "revoke":
        registry.revoke_key(args.name)
        print("revoked")
    return 0


def _db(args: argparse.Namespace) -> int:
    # The one-shot migration (compose's `migrate` service): alembic upgrade
    # head in code, stamping a database built before migrations existed.
    from sqlalchemy.engine import make_url

    from adapters_store.db import database_revision, upgrade_schema

    url = get_settings().resolved_database_url
    upgrade_schema(url)
    revision = database_revision(url)
    print(f"registry at {make_url(url).render_as_string(hide_password=True)} is at revision {revision}")
    return 0


def _serve(_: argparse.Namespace) -> int:
    from launch.embedded import serve

    return serve(get_settings())


def _export(args: argparse.Namespace) -> int:
    from adapters_store import blob_store_from_settings
    from core.adapter.file import load_adapter
    from core.adapter.merge import export_merged

    settings = get_settings()
    registry = _registry()
    tenant = registry.get_tenant(args.tenant)
    version = registry.get_version(tenant.id, args.adapter, args.version)
    tensors, meta = load_adapter(blob_store_from_settings(settings).get_bytes(version.sha256))
    out = export_merged(settings.base_model, tensors, meta, args.out)
    print(out)
    return 0


def _gc(args: argparse.Namespace) -> int:
    # Thin: the pass itself is adapters_store.gc.collect_garbage.
    import time

    from adapters_store import blob_store_from_settings
    from adapters_store.gc import collect_garbage

    settings = get_settings()
    registry, store = _registry(), blob_store_from_settings(settings)
    grace_s = settings.gc_grace_s if args.grace_s is None else args.grace_s
    if grace_s < 0 or (args.every is not None and args.every <= 0):
        raise ValueError("--grace-s must be >= 0 and --every > 0 (seconds)")
    while True:
        try:
            report = collect_garbage(
                registry,
                store,
                grace_s=grace_s,
                checkpoint_retention_s=settings.checkpoint_retention_s,
                dry_run=args.dry_run,
            )
            print(json.dumps(report.as_dict()), flush=True)
        except DiffFitError as exc:
            if not args.every:
                raise
            # A sidecar outlives an unreachable store or database: try again next round.
            print(f"error ({exc.code}): {exc.message}", file=sys.stderr, flush=True)
        if not args.every:
            return 0
        time.sleep(args.every)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from core.shapes import SHAPES

    parser = argparse.ArgumentParser(prog="difffit", description="DiffFit Serve command line.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="count total and trainable parameters (meta device, no weights)")
    p.add_argument("--shape", default="DiT-XL/2", choices=list(SHAPES))
    p.add_argument("--classes", type=int, default=1000, help="classes of the downstream data set")
    p.add_argument("--method", default="difffit", choices=["difffit", "bitfit"])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_params)

    p = sub.add_parser("tenant", help="manage tenants and their API keys")
    p.add_argument("action", choices=["create", "key", "revoke"])
    p.add_argument("name", help="tenant name (create, key) or key / key prefix (revoke)")
    p.set_defaults(func=_tenant)

    p = sub.add_parser("db", help="create or upgrade the registry schema (one-shot migration)")
    p.add_argument("action", choices=["upgrade"])
    p.set_defaults(func=_db)

    p = sub.add_parser("serve", help="run redis-server, one worker and the API; Ctrl-C stops all")
    p.set_defaults(func=_serve)

    p = sub.add_parser("export", help="write adapter + base as a plain diffusers model folder")
    p.add_argument("tenant")
    p.add_argument("adapter")
    p.add_argument("--version", type=int, default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_export)

    p = sub.add_parser("gc", help="remove blobs nothing references, older than DIFFFIT_GC_GRACE_S")
    p.add_argument("--dry-run", action="store_true", help="report what would go, delete nothing")
    p.add_argument(
        "--grace-s", type=float, default=None, help="override DIFFFIT_GC_GRACE_S for this run (seconds)"
    )
    p.add_argument("--every", type=float, default=None, help="repeat every this many seconds (a sidecar)")
    p.set_defaults(func=_gc)
    from launch.tenant_cli import add_tenant_commands

    add_tenant_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `difffit` console script."""
    import httpx

    from difffit.client import APIError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except APIError as exc:
        print(f"error ({exc.code}): {exc.detail}", file=sys.stderr)
        return 2
    except httpx.TransportError as exc:
        print(f"error: cannot reach the server: {exc}", file=sys.stderr)
        return 2
    except DiffFitError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

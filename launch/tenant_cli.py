"""The tenant's verbs of the `difffit` command, on top of :mod:`difffit.client`.

    difffit finetune ./folder --adapter NAME [--steps N] ...   upload, fine-tune, follow
    difffit generate --adapter NAME --class C -o out.png [--n N] [--seed S]
    difffit download NAME [--version N] -o adapter.safetensors
    difffit import NAME adapter.safetensors

The server and key come from ``--url`` / ``--api-key`` or ``DIFFFIT_URL`` /
``DIFFFIT_API_KEY``. Nothing here imports torch or the server's packages.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from difffit.client import Client, Event


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.api_key)


def _print_event(event: Event) -> None:
    data = event.data if isinstance(event.data, dict) else {}
    if event.kind == "progress":
        eta = data.get("eta_s")
        loss = data.get("loss")
        print(
            f"  step {data.get('step')}/{data.get('total')}"
            + (f"  loss {loss:.4f}" if isinstance(loss, float) else "")
            + (f"  eta {eta:.0f} s" if isinstance(eta, float | int) else ""),
            flush=True,
        )
    elif event.kind not in ("end", "checkpoint", "preview"):
        print(f"  {event.kind} {data or ''}".rstrip(), flush=True)


def _finetune(args: argparse.Namespace) -> int:
    with _client(args) as c:
        body = {
            "adapter": args.adapter,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "method": args.method,
            "seed": args.seed,
            "preview_every": args.preview_every,
            "webhook_url": args.webhook_url,
        }
        if args.data.startswith(("http://", "https://")):
            body["dataset_url"] = args.data
        else:
            ds = c.upload_dataset(args.data)
            print(f"dataset {ds['id']}: {ds['images']} images in {len(ds['classes'])} classes", flush=True)
            body["dataset_id"] = ds["id"]
        job = c.finetune(**body)
        print(f"job {job['id']} {job['state']}", flush=True)
        if args.no_wait:
            return 0
        job = c.wait(job["id"], on_event=_print_event)
        print(f"job {job['id']} {job['state']}", flush=True)
        if job["state"] != "succeeded":
            error = job.get("error") or {}
            print(f"error ({error.get('code')}): {error.get('message')}", file=sys.stderr)
            return 1
        print(f"adapter {job['adapter']} version {job['adapter_version']}")
        return 0


def _out_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(n)]


def _generate(args: argparse.Namespace) -> int:
    with _client(args) as c:
        pngs = c.generate_png(
            args.adapter,
            args.class_,
            args.n,
            args.seed,
            version=args.version,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
        )
    for path, png in zip(_out_paths(Path(args.out), len(pngs)), pngs, strict=True):
        path.write_bytes(png)
        print(path)
    return 0


def _download(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print(c.download_adapter(args.name, args.version, args.out))
    return 0


def _import(args: argparse.Namespace) -> int:
    with _client(args) as c:
        version = c.import_adapter(args.name, args.file)
    print(f"adapter {args.name} version {version['version']} ({version['sha256'][:12]})")
    return 0


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="API base URL (default $DIFFFIT_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="API key (default $DIFFFIT_API_KEY)")


def add_tenant_commands(sub: argparse._SubParsersAction) -> None:
    """Register finetune, generate, download and import on the `difffit` parser."""
    p = sub.add_parser("finetune", help="upload a folder (or archive, or URL) and fine-tune an adapter")
    p.add_argument("data", help="folder with one subfolder per class, a zip/tar, or an http(s) URL")
    p.add_argument("--adapter", required=True, help="adapter name (lowercase, digits, _ and -)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--method", choices=["difffit", "bitfit"], default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--preview-every", type=int, default=None, help="preview grids every N steps")
    p.add_argument("--webhook-url", default=None, help="gets a signed POST of the job when it ends")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    _connection(p)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("generate", help="sample images from an adapter (or the base) into PNG files")
    p.add_argument("--adapter", default=None, help="adapter name; omit for the base model")
    p.add_argument("--class", dest="class_", required=True, help="class name or index")
    p.add_argument("-o", "--out", required=True, help="output PNG (name-<i>.png when --n > 1)")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--version", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    _connection(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("download", help="download an adapter version's .safetensors file")
    p.add_argument("name")
    p.add_argument("--version", type=int, default=None, help="default: the latest")
    p.add_argument("-o", "--out", required=True)
    _connection(p)
    p.set_defaults(func=_download)

    p = sub.add_parser("import", help="register an adapter .safetensors file as a new version")
    p.add_argument("name")
    p.add_argument("file")
    _connection(p)
    p.set_defaults(func=_import)

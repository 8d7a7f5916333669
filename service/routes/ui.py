"""The web console at ``/ui``: server-rendered pages, a small script, no build step.

The pages are Jinja2 templates (``service/ui/templates``) with labelled
forms and tables; ``service/ui/static/console.js`` (plain JS, ours, no
library) fills them from the same JSON API a client uses, with the API key
the user typed at ``/ui/login`` kept in the tab's ``sessionStorage`` and sent
as ``Authorization: Bearer``. The pages themselves need no key (they hold no
data), so nothing here authenticates: the API routes the script calls do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from service.routes.adapters import AdapterName

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
STATIC = "/ui/static"
templates = Jinja2Templates(directory=str(UI_DIR / "templates"))
router = APIRouter(prefix="/ui", include_in_schema=False)


def static_files() -> StaticFiles:
    """The console's script and stylesheet, mounted at ``/ui/static``."""
    return StaticFiles(directory=str(UI_DIR / "static"))


def _page(request: Request, template: str, page: str, title: str, **data: Any) -> HTMLResponse:
    context = {"page": page, "title": title, "static": STATIC, "data": data}
    return templates.TemplateResponse(request, template, context)


@router.get("", response_class=HTMLResponse)
def jobs_page(request: Request) -> HTMLResponse:
    return _page(request, "jobs.html", "jobs", "Jobs")


@router.get("/", include_in_schema=False)
def slash() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return _page(request, "login.html", "login", "Log in")


@router.get("/datasets", response_class=HTMLResponse)
def datasets_page(request: Request) -> HTMLResponse:
    return _page(request, "datasets.html", "datasets", "Data sets")


@router.get("/finetune", response_class=HTMLResponse)
def finetune_page(request: Request) -> HTMLResponse:
    return _page(request, "finetune.html", "finetune", "Fine-tune")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> HTMLResponse:
    return _page(request, "job.html", "job", f"Job {job_id[:12]}", job=job_id[:64])


@router.get("/adapters", response_class=HTMLResponse)
def adapters_page(request: Request) -> HTMLResponse:
    return _page(request, "adapters.html", "adapters", "Adapters")


@router.get("/adapters/{name}", response_class=HTMLResponse)
def adapter_page(request: Request, name: AdapterName) -> HTMLResponse:
    return _page(request, "adapter.html", "adapter", f"Adapter {name}", name=name)


@router.get("/generate", response_class=HTMLResponse)
def generate_page(request: Request) -> HTMLResponse:
    return _page(request, "generate.html", "generate", "Generate")

"""DiffFit Serve's HTTP API (FastAPI). No torch, diffusers or worker imports here.

The service validates and authenticates requests, reads the registry
(``adapters_store``) and hands work to the workers by Celery task name over
Redis (``service.queue``). ``service.main.create_app`` builds the app.
"""

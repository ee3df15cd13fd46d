"""The OpenAI-compatible HTTP front (FastAPI on uvicorn), a client of kiln-infer's gRPC API."""

from kiln_infer.http.app import create_app
from kiln_infer.http.server import HttpServer, HttpThread, serve_http

__all__ = ["HttpServer", "HttpThread", "create_app", "serve_http"]

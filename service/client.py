"""A small client for the native API: `python -m service.client IMAGE... [--url] [--top-k] [--model]`.

As a library: `Client(url).predict(path)` or, with asyncio, `await AsyncClient(url).predict(path)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class PredictionError(Exception):
    """The server refused the request; `status` and the server's message are kept."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _request(paths: list[Path], top_k: int, model: str | None, version: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {"top_k": top_k}
    if model:
        params["model"] = model
    if version:
        params["version"] = version
    files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    return {"params": params, "files": files}


def _answer(r: httpx.Response) -> dict[str, Any]:
    if r.status_code != 200:
        try:
            message = r.json().get("error", r.text)
        except ValueError:
            message = r.text
        raise PredictionError(r.status_code, message)
    return r.json()  # type: ignore[no-any-return]


class Client:
    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 60.0, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url, timeout=timeout_s, headers=headers)

    def predict(self, *paths: str | Path, top_k: int = 5, model: str | None = None,
                version: int | None = None) -> dict[str, Any]:
        """Classify images (one request); returns the server's JSON answer."""
        return _answer(self._http.post("/predict", **_request([Path(p) for p in paths], top_k, model, version)))

    def models(self) -> list[dict[str, Any]]:
        return _answer(self._http.get("/v1/models"))["models"]  # type: ignore[no-any-return]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 60.0, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=headers)

    async def predict(self, *paths: str | Path, top_k: int = 5, model: str | None = None,
                      version: int | None = None) -> dict[str, Any]:
        req = _request([Path(p) for p in paths], top_k, model, version)
        return _answer(await self._http.post("/predict", **req))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def format_table(answer: dict[str, Any]) -> str:
    lines = [f"model {answer['model']} version {answer['version']}"]
    for pred in answer["predictions"]:
        lines.append(pred["filename"])
        for rank, t in enumerate(pred["top"], 1):
            lines.append(f"  {rank:>2}  {t['label']:<24} {t['score'] * 100:6.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.client", description="Classify images with imgserve.")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--model")
    p.add_argument("--version", type=int)
    p.add_argument("--api-key")
    args = p.parse_args(argv)
    missing = [str(i) for i in args.images if not i.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        with Client(args.url, api_key=args.api_key) as client:
            print(format_table(client.predict(*args.images, top_k=args.top_k, model=args.model,
                                              version=args.version)))
    except PredictionError as exc:
        print(f"error: the server answered {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: could not reach {args.url}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())



"""One HTTP client for OpenAI-compatible endpoints (stdlib urllib): the serving engine that generates the evaluation's
completions (`eval.backend=openai`, evaluation/serving.py) and MT-Bench's judge (evaluation/mt_bench.py).

The API key is read from an environment variable (`api_key_env`) for each request's `Authorization` header and
appears in nothing else: not in the client's attributes, not in an error message (a server's answer quoted in one
has the key's value, and any other secret's, blanked: core/secrets.py). Requests to a loopback address bypass HTTP
proxies (a cluster's `http_proxy` must not route `127.0.0.1`). Transient failures (a timeout, a reset or refused
connection, HTTP 408/409/429/5xx) are retried with exponential backoff (`backoff` * 1, 2, 4, ... seconds); anything
else fails at once with one line naming the config key (`<prefix>.base_url`).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from lightning_ralora.core.secrets import scrub, secret_values

log = logging.getLogger(__name__)

RETRY_STATUS = (408, 409, 429)  # and every 5xx: the server may answer the same request later


class EndpointError(RuntimeError):
    """An endpoint that cannot be reached, refuses the key or the request, or answers in an unexpected shape."""


def _loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpenAIClient:
    """GET `{base_url}/models` and POST `{base_url}/<route>` with JSON bodies: timeouts, retries with backoff, errors
    (`error`, an EndpointError subclass) as one line naming `<prefix>.base_url`."""

    error: type[EndpointError] = EndpointError

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 2.0,
        probe_timeout: float = 5.0,
        prefix: str = "eval",
    ) -> None:
        if not base_url:
            raise self.error(f"{prefix}.base_url is not set (an OpenAI-compatible endpoint, e.g. .../v1)")
        if not model:
            raise self.error(f"{prefix}.model is not set (the model's name at {prefix}.base_url, as its /models lists)")
        self.base_url = str(base_url).rstrip("/")
        self.model = str(model)
        self.api_key_env = api_key_env or "OPENAI_API_KEY"
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.probe_timeout = float(probe_timeout)
        self.prefix = prefix
        handlers = [urllib.request.ProxyHandler({})] if _loopback(self.base_url) else []
        self._opener = urllib.request.build_opener(*handlers)

    @property
    def where(self) -> str:
        """`<prefix>.base_url=<url>`, how every message names the endpoint."""
        return f"{self.prefix}.base_url={self.base_url}"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _scrub(self, text: str) -> str:
        """`text` with the API key's value (and any other secret's) blanked: a server may quote a request's
        headers in its error."""
        key = os.environ.get(self.api_key_env, "")
        return scrub(text, [key, *secret_values()] if key else secret_values())

    def _refused_key(self, code: int) -> EndpointError:
        return self.error(
            f"{self.where} refused the API key (HTTP {code}); check the environment variable ${self.api_key_env}"
        )

    def models(self) -> list[dict[str, Any]] | None:
        """The entries of GET /models; None when the server answered without a readable list (any HTTP answer but
        401/403 means it is reachable). Raises `error` at once when it cannot be reached or refuses the key."""
        request = urllib.request.Request(f"{self.base_url}/models", headers=self._headers(), method="GET")
        try:
            with self._opener.open(request, timeout=self.probe_timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise self._refused_key(err.code) from None
            return None  # the server answered; it has no /models route
        except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", None) or err
            raise self.error(f"{self.where} unreachable ({self._scrub(str(reason))})") from None
        try:
            data = json.loads(body).get("data")
        except (ValueError, AttributeError):
            return None
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else None

    def post(self, route: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The JSON answer to POST `{base_url}/{route}`, retried on transient failures; `error` (one line) when it
        keeps failing, when the server rejects the request (4xx) or when the answer is not a JSON object."""
        data = json.dumps(payload).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                f"{self.base_url}/{route}", data=data, headers=self._headers(), method="POST"
            )
            try:
                with self._opener.open(request, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}"
                if err.code in (401, 403):
                    raise self._refused_key(err.code) from None
                if err.code not in RETRY_STATUS and err.code < 500:
                    detail = " ".join(err.read()[:300].decode(errors="replace").split())
                    raise self.error(f"{self.where} rejected the request ({last}): {self._scrub(detail)}") from None
            except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as err:
                last = self._scrub(str(getattr(err, "reason", None) or err) or type(err).__name__)
            else:
                try:
                    answer = json.loads(raw)
                except ValueError:
                    answer = None
                if not isinstance(answer, dict):
                    head = self._scrub(" ".join(raw[:120].decode(errors="replace").split()))
                    raise self.error(f"{self.where}: the answer to POST /{route} is not a JSON object: {head!r}")
                return answer
            log.warning("%s: request failed (%s), attempt %d/%d", self.where, last, attempt + 1, self.max_retries + 1)
        raise self.error(f"{self.where} unreachable ({last}) after {self.max_retries + 1} attempts")

"""StealGuard's TorchServe handler: the one class TorchServe loads from this file.

It is thin: :mod:`handlers.config` validates the archive's ``stealguard:`` section, :mod:`handlers.service`
loads the victim, surrogate and defense (``handlers.runtimes``) and defends batches, :mod:`handlers.codec`
decodes requests and encodes responses, :mod:`handlers.metrics` emits metrics. This class maps TorchServe's
batch of requests onto one defended batch and sets each request's status code and headers.

Fail closed: a request whose rows cannot be defended gets a 5xx and an error message, never probabilities.

The deployment (handlers/deployment.py) supplies the secret of a randomised defense and says whether responses
carry the ``X-StealGuard-Defense`` header (development only); ``describe_handle`` answers TorchServe's describe
API (``GET /models/<name>?customized=true``) with the archive's input contract.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
# In a .mar this file sits at the archive root next to handlers/ and plugins/; in the repository it is
# handlers/stealguard_handler.py. Either way, the directory holding handlers/ and plugins/ goes first on
# sys.path.
_ROOT = os.path.dirname(_HERE) if os.path.basename(_HERE) == "handlers" else _HERE
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

import plugins  # noqa: E402
from handlers import EXTRA_CODE_DIR  # noqa: E402
from handlers import config as sg_config  # noqa: E402
from handlers import deployment as sg_deployment  # noqa: E402
from handlers import registry as sg_registry  # noqa: E402
from handlers.codec import error_body  # noqa: E402
from handlers.errors import REASONS, RequestError  # noqa: E402
from handlers.metrics import DefenseMetrics  # noqa: E402
from handlers.monitor import BLOCK_MESSAGE, ClientMonitor  # noqa: E402
from handlers.service import Answered, DefendedModel, DefenseFailed  # noqa: E402

log = logging.getLogger(__name__)

HEADER = "X-StealGuard-Defense"
JSON = "application/json"
BODY_KEYS = ("body", "data")


class StealGuardHandler:
    """TorchServe entry point: ``initialize(context)`` once per worker, ``handle(data, context)`` a batch."""

    def __init__(self) -> None:
        self.initialized = False
        self.model: DefendedModel | None = None
        self.metrics: DefenseMetrics | None = None
        self.send_header = False
        self.monitor: ClientMonitor | None = None

    def initialize(self, context) -> None:
        model_dir = context.system_properties.get("model_dir") or _ROOT
        if model_dir not in sys.path:
            sys.path.insert(0, model_dir)
        try:
            use_extra_code(model_dir)
            cfg = sg_config.parse(context.model_yaml_config, model_dir)
            torch.set_num_threads(cfg.threads.intra_op)
            try:
                torch.set_num_interop_threads(cfg.threads.inter_op)
            except RuntimeError:  # only settable before the first parallel work in this process
                pass
            ts_config, properties = sg_deployment.ts_properties()
            self.send_header = sg_deployment.defense_header_enabled(properties)
            secret = sg_deployment.find_secret(cfg.secret.file if cfg.secret else None, model_dir)
            cfg, self.model, origin = sg_registry.load(
                cfg, model_dir, lambda c: DefendedModel(c, model_dir, secret)
            )
        except Exception as exc:
            log.error(
                "StealGuard: model %r NOT loaded, so it is never served undefended: %s",
                getattr(context, "model_name", "?"),
                exc,
            )
            raise
        defense = self.model.defense
        self.metrics = DefenseMetrics(
            context.metrics,
            model_name=context.model_name,
            defense_name=defense.name,
            defense_version=cfg.version_label,
            budget=defense.budget,
            extra_norm=getattr(defense.config, "norm", None),
            secret_fingerprint=self.model.secret_fingerprint,
        )
        self.metrics.record_info()
        self.monitor = ClientMonitor.from_config(cfg.monitor, self.model, self.metrics, context.model_name)
        self.initialized = True
        v = cfg.version
        log.info(
            "StealGuard: serving %r with %s [version: %s; run_id %s, alias %s] "
            "(victim %s, surrogate %s, K=%d, max_rows=%d, json input %s; secret %s; %s header %s; code from %s; "
            "defense class from %s)",
            context.model_name,
            self.model.header,
            origin,
            (v.run_id if v else None) or "-",
            (v.alias if v else None) or "-",
            cfg.victim.runtime,
            cfg.surrogate.runtime if cfg.surrogate else "none",
            self.model.num_classes,
            cfg.input.max_rows,
            cfg.input.json_input,
            f"fingerprint {secret.fingerprint} from {secret.source}" if self.model.secret_fingerprint else "none",
            HEADER,
            "on" if self.send_header else f"off ({sg_deployment.PROPERTY_HEADER} in {ts_config or 'no config'})",
            os.path.dirname(os.path.dirname(os.path.abspath(sg_config.__file__))),
            getattr(sys.modules.get(type(defense).__module__), "__file__", "?"),
        )

    def handle(self, data, context) -> list:
        if not self.initialized:
            raise RuntimeError("StealGuard handler used before initialize()")
        if _is_describe(context):  # TorchServe's describe API, GET /models/<name>?customized=true
            return [self.describe_handle()]
        start = time.perf_counter()
        responses: list = [None] * len(data)
        rows: list[torch.Tensor] = []
        owners: list[int] = []
        for idx, request in enumerate(data):
            if self.send_header:
                context.set_response_header(idx, HEADER, self.model.header)
            try:
                body, content_type = _body(request, context, idx)
                rows.append(self.model.codec.decode(body, content_type))
                owners.append(idx)
            except RequestError as exc:
                kind = exc.reason.replace(" ", "")
                responses[idx] = self._refuse(context, idx, exc.status, kind, exc.message)
                self.metrics.record_error("bad_input", rows=exc.rows)
        if not rows:
            return responses
        x = torch.cat(rows) if len(rows) > 1 else rows[0]  # the batch's assembly counts as decoding
        decoded = time.perf_counter()
        done = self._defend(x, rows, owners, responses, context)
        defended = time.perf_counter()
        for batch in done:
            offsets = [0]
            for n in batch.sizes:
                offsets.append(offsets[-1] + n)
            bodies = self.model.codec.encode_many(batch.probs, batch.sizes)
            for k, (idx, body) in enumerate(zip(batch.owners, bodies, strict=True)):
                if batch.blocked is not None and batch.blocked[offsets[k] : offsets[k + 1]].any():
                    self.metrics.record_error("blocked", 1)
                    responses[idx] = self._refuse(context, idx, 429, "TooManyRequests", BLOCK_MESSAGE)
                else:
                    responses[idx] = body
                    context.set_response_content_type(idx, JSON)
        encoded = time.perf_counter()
        # the stages partition the handler's time: `defense` is what the defended section took beyond the victim,
        # the resource networks and the monitor (the defense's arithmetic, the output check, a failed batch's
        # retries); `metrics` runs from here to the end of the last batch's measurement (record_batch adds it)
        victim = sum(b.result.victim_s for b in done)
        surrogate = sum(b.result.surrogate_s for b in done)
        monitor = sum(b.monitor_s for b in done)
        stages = {
            "decode": decoded - start,
            "victim": victim,
            "surrogate": surrogate,
            "defense": (defended - decoded) - victim - surrogate - monitor,
            "encode": encoded - defended,
        }
        if self.monitor is not None:
            stages["monitor"] = monitor
        for k, batch in enumerate(done):  # one record per defended batch; the timings with the last
            last = k == len(done) - 1
            self.metrics.record_batch(
                batch.result.y,
                batch.probs,
                batch.result.out.angular_deviation,
                batch.result.latency_s,
                stages if last else None,
                encoded - start if last else None,
                since=encoded if last else None,
            )
        return responses

    def _defend(
        self, x: torch.Tensor, rows: list[torch.Tensor], owners: list[int], responses: list, context
    ) -> list[Answered]:
        """Defend ``x``, the rows of several requests concatenated, in one batched call, screened by the
        per-client monitor when the archive has one; return the answered batches. If the batch fails, each request
        is retried alone so one bad request cannot fail the others; a request that fails alone gets its refusal in
        ``responses``."""
        monitor_s = 0.0
        try:
            result = self.model.defend(x)
            probs, blocked = result.out.probs, None
            if self.monitor is not None:  # per-client monitor: observe / harden / block (handlers/monitor.py)
                screen_start = time.perf_counter()
                clients = [self.monitor.client_id(context, i) for r, i in zip(rows, owners, strict=True)
                           for _ in range(r.shape[0])]
                screened = self.monitor.screen(clients, x, result.y, probs)
                probs, blocked = screened.probs, screened.blocked
                monitor_s = time.perf_counter() - screen_start
        except Exception as exc:
            if len(rows) > 1:
                log.warning(
                    "StealGuard: defended batch of %d requests failed (%s); retrying each alone",
                    len(rows),
                    exc,
                )
                done: list[Answered] = []
                for row, idx in zip(rows, owners, strict=True):
                    done += self._defend(row, [row], [idx], responses, context)
                return done
            kind = "defense_failed" if isinstance(exc, DefenseFailed) else "model_failed"
            log.error("StealGuard: request %s refused, %s: %s", context.get_request_id(owners[0]), kind, exc)
            self.metrics.record_error(kind, rows=rows[0].shape[0])
            responses[owners[0]] = self._refuse(
                context,
                owners[0],
                500,
                "DefenseFailed",
                "the defense could not run on this request; no prediction",
            )
            return []
        return [Answered(result, probs, blocked, list(owners), [r.shape[0] for r in rows], monitor_s)]

    def describe_handle(self) -> str:
        """TorchServe's describe API (``GET /models/<name>?customized=true``): the archive's input contract,
        as JSON: input shape and dtype, the JSON input space (with mean/std), class names, defense name and
        version, and the secret's fingerprint (never the secret)."""
        if not self.initialized:
            raise RuntimeError("StealGuard handler used before initialize()")
        return json.dumps(self.model.contract(), sort_keys=True)

    @staticmethod
    def _refuse(context, idx: int, status: int, kind: str, message: str) -> bytes:
        context.set_response_status(status, REASONS.get(status, "Error"), idx)
        context.set_response_content_type(idx, JSON)
        return error_body(status, kind, message)


def use_extra_code(model_dir: str) -> None:
    """Put the archive's shipped distributions (``pylib/``, from ``package --extra-dist``) on ``sys.path`` and
    register the defenses their entry points declare, so a third-party defense is found by name."""
    extra = os.path.join(model_dir, EXTRA_CODE_DIR)
    if not os.path.isdir(extra) or extra in sys.path:
        return
    sys.path.insert(0, extra)
    plugins.available_defenses()  # the built-in defenses first (a no-op once loaded) ...
    plugins.load_entry_points()  # ... then the entry points, now including the shipped distributions'


def _is_describe(context) -> bool:
    try:
        return context.get_request_header(0, "describe") == "True"
    except (TypeError, IndexError, AttributeError, KeyError):
        return False


def _body(request, context, idx: int):
    """The request's body and its content type (TorchServe passes the body as parameter 'body' or 'data')."""
    if not isinstance(request, dict):
        return request, None
    name = next((k for k in BODY_KEYS if k in request), None)
    if name is None:
        if len(request) != 1:
            raise RequestError(400, f"send one request body; got form fields {sorted(map(str, request))}")
        name = next(iter(request))
    return request[name], _content_type(context, idx, name)


def _content_type(context, idx: int, name: str) -> str | None:
    try:
        param = context.get_request_header(idx, name)
    except (TypeError, IndexError, AttributeError):
        return None
    if isinstance(param, dict) and param.get("content-type"):
        return param["content-type"]
    try:
        headers = context.get_all_request_header(idx)
    except (TypeError, IndexError, AttributeError):
        return None
    for key, value in headers.items():
        if key.lower() == "content-type" and isinstance(value, str):
            return value
    return None
